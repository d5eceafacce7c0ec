"""Activation capture: exact statistics, bounded seeded subsample, one record per shared input."""

import torch

import qpass
from qpass.algorithms.smoothing import smoothable_modules
from qpass.calib.capture import ActivationCapture, key_seed


def _quantized(model, x):
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(x))
    return model


def test_statistics_are_exact(mlp):
    xs = [torch.randn(3, 7, 32) for _ in range(3)]
    _quantized(mlp, xs[0])
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=10_000) as cap:
        for x in xs:
            mlp(x)
    st = cap.stats["fc1"]
    flat = torch.cat([x.reshape(-1, 32) for x in xs])
    torch.testing.assert_close(st.amax, flat.abs().amax(0))
    torch.testing.assert_close(st.abs_mean, flat.abs().mean(0))
    assert st.tokens == 63 and st.calls == 3
    assert st.sample.shape == (63, 32)  # under the bound: every token, in order
    torch.testing.assert_close(st.sample, flat)


def test_subsample_is_bounded_seeded_and_uniform_rows(mlp):
    xs = [torch.randn(4, 50, 32) for _ in range(5)]
    _quantized(mlp, xs[0])

    def run():
        with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=3) as cap:
            for x in xs:
                mlp(x)
        return cap.stats["fc1"]

    a, b = run(), run()
    assert a.sample.shape == (64, 32) and a.tokens == 1000
    torch.testing.assert_close(a.sample, b.sample)
    flat = torch.cat([x.reshape(-1, 32) for x in xs])
    # every kept row is a real token row
    assert all((flat == row).all(1).any() for row in a.sample)


def test_shared_input_is_recorded_once(attention):
    x = torch.randn(2, 5, 32)
    _quantized(attention, x)
    mods = smoothable_modules(attention, need_input=True)
    with ActivationCapture(mods, max_tokens=100) as cap:
        attention(x)
        attention(x + 1)
    st = cap.stats
    assert st["q_proj"] is st["k_proj"] is st["v_proj"]
    assert st["o_proj"] is not st["q_proj"]
    assert st["q_proj"].calls == 2


def test_hooks_are_removed(mlp):
    x = torch.randn(2, 32)
    _quantized(mlp, x)
    with ActivationCapture({"fc1": mlp.fc1}) as cap:
        mlp(x)
    mlp(x)
    assert cap.stats["fc1"].calls == 1
    assert not mlp.fc1.input_quantizer._forward_pre_hooks


def test_subsample_is_the_bottom_k_of_all_tokens_in_arrival_order(mlp):
    """Copying only the tokens that can still enter (and compacting now and then) keeps exactly
    the tokens with the ``max_tokens`` smallest keys of the whole pass, in arrival order."""

    xs = [torch.randn(4, 50, 32) for _ in range(7)]
    _quantized(mlp, xs[0])
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=3) as cap:
        for x in xs:
            mlp(x)
    st = cap.stats["fc1"]
    g = torch.Generator().manual_seed(key_seed(3, "fc1"))
    keys = torch.cat([torch.rand(200, generator=g) for _ in xs])
    keep = torch.topk(keys, 64, largest=False).indices.sort().values
    flat = torch.cat([x.reshape(-1, 32) for x in xs])
    torch.testing.assert_close(st.sample, flat[keep], rtol=0, atol=0)
    torch.testing.assert_close(st.keys, keys[keep], rtol=0, atol=0)
    assert st.candidates <= 2 * 64 + 200  # bounded between compactions


def _bottom(keys: torch.Tensor, n: int) -> torch.Tensor:
    return torch.topk(keys, n, largest=False).indices.sort().values


def test_growing_sample_is_the_bottom_tokens_div_8_of_the_pass(mlp):
    """``grow_to``: the sample is the ``clamp(tokens // 8, max_tokens, grow_to)`` smallest keys of
    the whole pass, exactly, though that size is known only at the end; on little data it is the
    fixed-size sample, and the candidates kept in between stay bounded."""

    from qpass.calib.capture import GROW_EVERY

    xs = [torch.randn(4, 100, 32) for _ in range(24)]  # 9600 tokens
    _quantized(mlp, xs[0])
    g = torch.Generator().manual_seed(key_seed(5, "fc1"))
    keys = torch.cat([torch.rand(400, generator=g) for _ in xs])
    flat = torch.cat([x.reshape(-1, 32) for x in xs])
    # 400 tokens: the fixed 64; 3200: 400; 9600: 1200, or grow_to=600 where that is smaller
    for batches, grow_to, size in ((1, 2048, 64), (8, 2048, 400), (24, 2048, 1200), (24, 600, 600)):
        with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=5, grow_to=grow_to) as cap:
            for x in xs[:batches]:
                mlp(x)
        st = cap.stats["fc1"]
        n = batches * 400
        assert size == min(grow_to, max(64, n // GROW_EVERY))
        keep = _bottom(keys[:n], size)
        assert st.sample.shape == (size, 32)
        torch.testing.assert_close(st.sample, flat[:n][keep], rtol=0, atol=0)
        torch.testing.assert_close(st.keys, keys[:n][keep], rtol=0, atol=0)
        assert st.candidates <= 2 * st.capacity() + 400
    # on little data the growing capture is the fixed-size one
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=5) as fixed:
        mlp(xs[0])
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=5, grow_to=2048) as grown:
        mlp(xs[0])
    torch.testing.assert_close(grown.stats["fc1"].sample, fixed.stats["fc1"].sample, rtol=0, atol=0)
    assert fixed.stats["fc1"].sample.shape == (64, 32)


def test_the_seed_changes_the_sample_and_rank_0_seed_0_keeps_the_paths_crc(mlp):
    """A CPU generator keeps only 32 bits of its seed: the capture's seed must land in those."""
    import zlib

    xs = [torch.randn(4, 50, 32) for _ in range(3)]
    _quantized(mlp, xs[0])

    def sample(seed):
        with ActivationCapture({"fc1": mlp.fc1}, max_tokens=64, seed=seed) as cap:
            for x in xs:
                mlp(x)
        return cap.stats["fc1"].keys

    assert not torch.equal(sample(0), sample(1))
    torch.testing.assert_close(sample(2), sample(2), rtol=0, atol=0)
    assert key_seed(0, "fc1") == zlib.crc32(b"fc1")
    assert len({key_seed(s, "fc1", r) for s in range(4) for r in range(4)}) == 16
