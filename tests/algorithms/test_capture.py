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


def test_channel_abs_top2_is_exact_across_groups_and_a_lower_bound_within_one():
    from qpass.calib import max as cmax

    torch.manual_seed(0)
    x = torch.randn(5, 67, 24)  # 335 tokens: 20 full rounds of the 16 groups, then 15 loose tokens
    flat = x.reshape(-1, 24)
    amax, second = cmax.channel_abs_top2(x)
    srt = flat.abs().sort(0, descending=True).values
    assert torch.equal(amax, srt[0])
    assert torch.equal(cmax.channel_abs_max(x), amax)  # the memo holds the same max
    assert bool((second <= srt[1]).all())
    # the two largest 16 tokens apart (one group): the bound is the next value in another group
    y = torch.zeros(64, 2)
    y[:, 0] = torch.arange(64.0)
    y[3, 1], y[19, 1], y[20, 1] = 9.0, -8.0, 7.0  # tokens 3 and 19 share group 3
    a, b = cmax.channel_abs_top2(y)
    assert a.tolist() == [63.0, 9.0] and b.tolist() == [62.0, 7.0]
    # fewer tokens than groups, one token, and NaN (it must stay visible to the NaN check)
    a, b = cmax.channel_abs_top2(torch.tensor([[1.0, -5.0], [3.0, 2.0]]))
    assert a.tolist() == [3.0, 5.0] and b.tolist() == [1.0, 2.0]
    a, b = cmax.channel_abs_top2(torch.tensor([[4.0, -2.0]]))
    assert a.tolist() == [4.0, 2.0] and b.tolist() == [0.0, 0.0]
    a, _ = cmax.channel_abs_top2(torch.tensor([[1.0], [float("nan")], [2.0]]))
    assert torch.isnan(a).all()


def test_second_largest_merges_over_calls(mlp):
    torch.manual_seed(0)
    xs = [torch.randn(2, 40, 32) for _ in range(4)]
    xs[2][1, 5, 3] = 50.0  # channel 3: its two largest values in different calls
    xs[0][0, 9, 3] = -40.0
    _quantized(mlp, xs[0])
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=16, second=True) as cap:
        for x in xs:
            mlp(x)
    st = cap.stats["fc1"]
    srt = torch.cat([x.reshape(-1, 32) for x in xs]).abs().sort(0, descending=True).values
    assert torch.equal(st.amax, srt[0]) and bool((st.second <= srt[1]).all())
    assert st.second[3].item() == 40.0
    assert st.moved(lambda t: t.clone()).second is not None
    with ActivationCapture({"fc1": mlp.fc1}, max_tokens=16) as cap:  # kept only when asked for
        mlp(xs[0])
    assert cap.stats["fc1"].second is None
