"""AWQ (lite, clip, full) on small layers with salient channels, and the ModelOpt presets end to end."""

import copy

import pytest
import torch
from torch import nn

import qpass
from qpass.algorithms.awq import _clip_ratios, weight_scale
from qpass.algorithms.smoothing import alpha_grid
from qpass.errors import QuantConfigError
from qpass.graph.quantized_model import state_of

from conftest import counting_loop as _counting, tiny_llama


class OneLinear(nn.Module):
    def __init__(self, d_in=256, d_out=64):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


def _salient_case(seed=0):
    torch.manual_seed(seed)
    model = OneLinear().eval()
    x = torch.randn(512, 256)
    x[:, [3, 77, 130, 200]] *= 25.0  # a few salient input channels
    return model, x


def _err(model, x, ref):
    return (model(x) - ref).pow(2).mean().item()


def _cfg(name, **options):
    cfg = copy.deepcopy(getattr(qpass, name))
    if options:
        algo = cfg["algorithm"]
        algo = {"method": algo} if isinstance(algo, str) else dict(algo)
        cfg["algorithm"] = {**algo, **options}
    return cfg


def test_awq_lite_beats_max_on_salient_channels():
    base, x = _salient_case()
    ref = base(x)
    errs = {}
    for name in ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4_AWQ_CFG"):
        m = copy.deepcopy(base)
        loop, calls = _counting([x[:256], x[256:]])
        qpass.quantize(m, _cfg(name), loop)
        # max calibration of weights alone needs no data; AWQ needs exactly one pass
        assert len(calls) == (0 if name == "INT4_BLOCKWISE_WEIGHT_ONLY_CFG" else 1)
        errs[name] = _err(m, x, ref)
    assert errs["INT4_AWQ_CFG"] < 0.8 * errs["INT4_BLOCKWISE_WEIGHT_ONLY_CFG"]


def test_awq_lite_scale_is_explicit_without_producer_and_exact_in_float():
    base, x = _salient_case()
    ref = base(x)
    w0 = base.fc.weight.detach().clone()
    qpass.quantize(base, _cfg("INT4_AWQ_CFG", gptq=False), lambda m: m(x))
    a = state_of(base).smoothing[0]
    assert a.site is None and a.alpha in alpha_grid(0.1)
    # weight-only: the input quantizer is off, yet its pre_quant_scale applies
    assert not base.fc.input_quantizer.is_enabled
    torch.testing.assert_close(base.fc.input_quantizer.pre_quant_scale, 1 / a.scale)
    torch.testing.assert_close(base.fc.weight, w0 * a.scale)
    qpass.disable_quantizer(base, "*")
    torch.testing.assert_close(base(x), ref, rtol=1e-4, atol=1e-4)


def test_weight_scale_matches_definition():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 2.0, -1.0, 1.0]])
    # blocks of 2: [1, -2] [4, 0.5] / [2, 2] [-1, 1], each relative to its block's abs-max
    expected = torch.stack([torch.tensor([0.5, 1.0, 1.0, 0.125]), torch.tensor([1.0, 1.0, 1.0, 1.0])]).mean(0)
    torch.testing.assert_close(weight_scale(w, 2), expected)
    torch.testing.assert_close(weight_scale(w, None), (w.abs() / w.abs().amax(1, keepdim=True)).mean(0))


def test_awq_clip_lowers_error_and_only_shrinks_amax():
    base, x = _salient_case(1)
    ref = base(x)
    plain = copy.deepcopy(base)
    qpass.quantize(plain, _cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), lambda m: m(x))
    clipped = copy.deepcopy(base)
    qpass.quantize(clipped, {**_cfg("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), "algorithm": {"method": "awq_clip"}},
                   lambda m: m(x))
    a0, a1 = plain.fc.weight_quantizer.amax, clipped.fc.weight_quantizer.amax
    assert a0.shape == a1.shape
    ratio = a1 / a0
    assert bool((ratio <= 1.0 + 1e-6).all()) and bool((ratio >= 0.5 - 1e-6).all())
    assert bool((ratio < 1).any())
    allowed = torch.tensor(_clip_ratios(0.5, 0.05))
    assert bool(((ratio.flatten()[:, None] - allowed).abs().amin(1) < 1e-5).all())
    assert _err(clipped, x, ref) < _err(plain, x, ref)


def test_clip_ratio_grid_matches_modelopt():
    assert _clip_ratios(0.5, 0.05) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    assert _clip_ratios(0.8, 0.1) == [0.8, 0.9, 1.0]
    assert alpha_grid(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("name", ["INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_AWQ_LITE_CFG",
                                  "NVFP4_AWQ_CLIP_CFG", "NVFP4_AWQ_FULL_CFG"])
def test_presets_end_to_end_on_llama(name):
    model = tiny_llama(1)
    ids = [torch.randint(0, 128, (2, 32)) for _ in range(2)]
    ref = model(ids[0]).logits
    loop, calls = _counting(ids)
    options = {"gptq": False}  # ModelOpt's algorithm: the float function is unchanged
    if "NVFP4" in name and "CLIP" not in name:
        options["alpha_step"] = 0.5  # NVFP4 fake quantization is slow on the CPU
    if "CLIP" in name or "FULL" in name:
        options["max_co_batch_size"] = 64
    qpass.quantize(model, _cfg(name, **options), loop)
    assert len(calls) == 1
    out = model(ids[0]).logits
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98
    applied = state_of(model).smoothing
    if "CLIP" in name:
        assert applied == []
        return
    units = {tuple(a.unit): a for a in applied}
    qkv = units[("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")]
    assert qkv.site.vectors == ("model.layers.0.input_layernorm.weight",)
    down = units[("model.layers.0.mlp.down_proj",)]
    assert down.site.rows == ("model.layers.0.mlp.up_proj.weight",)  # act(gate) * up: folded into up
    assert model.model.layers[0].mlp.down_proj.input_quantizer.pre_quant_scale is None
    o = model.model.layers[0].self_attn.o_proj.input_quantizer
    assert o.pre_quant_scale is not None  # after attention: explicit
    qpass.disable_quantizer(model, "*")
    torch.testing.assert_close(model(ids[0]).logits, ref, rtol=1e-3, atol=1e-3)


def test_w4a8_input_amax_equals_recalibrated_smoothed_activations():
    model = tiny_llama(1)
    ids = [torch.randint(0, 128, (2, 32)) for _ in range(2)]
    loop = lambda m: [m(i) for i in ids]  # noqa: E731
    # without GPTQ rounding: the layers after a rounded one would see other values than the
    # float model the amax was computed on
    qpass.quantize(model, _cfg("W4A8_AWQ_BETA_CFG", gptq=False), loop)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight_quantizer, nn.Sequential)
    names = [n for n, m in model.named_modules() if n.endswith("input_quantizer") and m.is_enabled]
    analytic = {n: model.get_submodule(n).amax.clone() for n in names}
    qpass.calibrate(model, "max", loop)  # max calibration of what the quantizers now see
    for n in names:
        torch.testing.assert_close(analytic[n], model.get_submodule(n).amax, rtol=1e-5, atol=1e-6)


def test_debug_keeps_search_results_and_bad_options_are_refused():
    base, x = _salient_case()
    m = copy.deepcopy(base)
    qpass.quantize(m, _cfg("INT4_AWQ_CFG", debug=True, alpha_step=0.25), lambda mm: mm(x))
    assert set(m.fc.awq_lite["loss"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    with pytest.raises(QuantConfigError, match="alpha_step"):
        qpass.quantize(copy.deepcopy(base), _cfg("INT4_AWQ_CFG", alpha_step=0.0), lambda mm: mm(x))
    with pytest.raises(QuantConfigError, match="min_clip_ratio"):
        qpass.quantize(copy.deepcopy(base), _cfg("NVFP4_AWQ_CLIP_CFG", min_clip_ratio=1.5), lambda mm: mm(x))


def test_gram_errors_equal_the_direct_partial_products():
    from qpass.algorithms.awq_search import block_grams, gram, gram_factor, output_error

    torch.manual_seed(0)
    x = torch.randn(3000, 40)
    dw = torch.randn(6, 40)
    direct = (x.double() @ dw.double().t()).pow(2).sum(0)
    # Cholesky factor (more tokens than channels), and x^T itself (fewer tokens)
    exact = dict(low_precision=False)
    torch.testing.assert_close(output_error(dw, gram_factor(gram(x), **exact)).double(), direct, rtol=1e-5, atol=1e-6)
    # bfloat16 products (float32 accumulation): rows within 1%, the total (what a search compares) 1e-3
    low = output_error(dw, gram_factor(gram(x), low_precision=True)).double()
    torch.testing.assert_close(low, direct, rtol=1e-2, atol=0)
    assert abs(float(low.sum() / direct.sum()) - 1) < 1e-3
    few = x[:30]
    torch.testing.assert_close(output_error(dw, gram_factor(gram(few), few, **exact)).double(),
                               (few.double() @ dw.double().t()).pow(2).sum(0), rtol=1e-5, atol=1e-6)
    # a rank-deficient Gram (two equal channels, more tokens than channels) still factors
    dup = torch.cat([x[:, :1], x], 1)
    dw2 = torch.randn(6, 41)
    torch.testing.assert_close(output_error(dw2, gram_factor(gram(dup), **exact)).double(),
                               (dup.double() @ dw2.double().t()).pow(2).sum(0), rtol=1e-4, atol=1e-4)
    gb = block_grams(gram(x), 16)  # 40 channels: blocks 16, 16, 8 (+8 zero padding)
    assert gb.shape == (3, 16, 16)
    torch.testing.assert_close(gb[1], (x[:, 16:32].t() @ x[:, 16:32]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb[2, :8, :8], (x[:, 32:].t() @ x[:, 32:]), rtol=1e-4, atol=1e-3)
    assert not gb[2, 8:].any() and not gb[2, :, 8:].any()


def test_clip_amax_picks_each_blocks_best_ratio_by_brute_force():
    from qpass.algorithms.awq_search import clip_amax, gram
    from qpass.nn.tensor_quantizer import TensorQuantizer

    torch.manual_seed(0)
    tq = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}})
    w = torch.randn(5, 32)
    x = torch.randn(500, 32)
    ratios = [0.6, 0.8, 1.0]
    got = clip_amax(tq, w, gram(x), ratios).reshape(5, 2)
    amax = tq.spec.amax_of(w).reshape(5, 2)
    for o in range(5):
        for b in range(2):
            cols = slice(16 * b, 16 * b + 16)
            errs = []
            for r in ratios:
                a = tq.spec.amax_of(w).reshape(5, 2).clone()
                a[o, b] *= r
                dw = tq.spec.fake_quant(w, a.reshape(tq.spec.amax_of(w).shape)) - w
                errs.append(float((x[:, cols] @ dw[o, cols]).pow(2).sum()))
            best = ratios[min(range(len(ratios)), key=errs.__getitem__)]
            torch.testing.assert_close(got[o, b], amax[o, b] * best)


def test_awq_full_clips_the_smoothed_weights_of_the_chosen_scale():
    base, x = _salient_case()
    ref = base(x)
    errs, models = {}, {}
    for name, method in (("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None), ("INT4_AWQ_CFG", "awq_lite"),
                         ("INT4_AWQ_CFG", "awq_full")):
        m = copy.deepcopy(base)
        qpass.quantize(m, _cfg(name, **({"method": method, "gptq": False} if method else {})), lambda mm: mm(x))
        errs[method], models[method] = _err(m, x, ref), m
    m = models["awq_full"]
    a = state_of(m).smoothing[0]
    assert a.alpha == state_of(models["awq_lite"]).smoothing[0].alpha  # the same scale search
    ratio = m.fc.weight_quantizer.amax / m.fc.weight_quantizer.spec.amax_of(m.fc.weight.detach())
    allowed = torch.tensor(_clip_ratios(0.5, 0.05))
    assert bool(((ratio.flatten()[:, None] - allowed).abs().amin(1) < 1e-5).all())
    assert bool((ratio < 1).any())
    assert errs["awq_full"] < errs["awq_lite"] < 0.8 * errs[None]
    torch.testing.assert_close(m.fc.weight, base.fc.weight.detach() * a.scale)


@pytest.mark.parametrize("preset", ["W4A8_AWQ_BETA_CFG", "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG",
                                    "MXFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_row_chunked_weight_fake_quant_equals_whole(preset, monkeypatch):
    """scaled_weight_rows (small temporaries) gives exactly fake_quant_weight(q, w * s), chunk by chunk."""
    from qpass.algorithms import smoothing

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 70, bias=False))
    qpass.quantize(lin, preset, lambda m: m(torch.randn(4, 256)))
    q, w = lin[0].weight_quantizer, lin[0].weight.detach()
    s = torch.rand(256) * 3 + 0.1
    want = smoothing.fake_quant_weight(q, w * s)
    monkeypatch.setattr(smoothing, "ROW_CHUNK_ELEMENTS", 256 * 16)  # 16 rows per chunk, a short last one
    chunks = list(smoothing.scaled_weight_rows(q, w, s))
    assert len(chunks) == 5
    got = torch.cat([c[2] for c in chunks])
    assert torch.equal(got, want)


def test_row_chunks_with_a_known_column_amax_are_the_same():
    from qpass.algorithms import smoothing

    torch.manual_seed(1)
    lin = torch.nn.Sequential(torch.nn.Linear(96, 40, bias=False))
    qpass.quantize(lin, "W4A8_AWQ_BETA_CFG", lambda m: m(torch.randn(4, 96)))
    q, w = lin[0].weight_quantizer, lin[0].weight.detach()
    s = torch.rand(96) + 0.2
    plain = torch.cat([c[2] for c in smoothing.scaled_weight_rows(q, w, s)])
    known = torch.cat([c[2] for c in smoothing.scaled_weight_rows(q, w, s, w.abs().amax(0))])
    assert torch.equal(plain, known) and torch.equal(plain, smoothing.fake_quant_weight(q, w * s))


def test_pruned_alpha_search_picks_the_same_alpha_as_the_full_one():
    """Stopping an alpha once its partial loss exceeds the best whole loss changes nothing chosen."""
    from qpass.algorithms import smoothing
    from qpass.algorithms.awq import awq_scale
    from qpass.algorithms.awq_search import search_unit_scale

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300, bias=False), torch.nn.Linear(64, 200, bias=False))
    x = torch.randn(500, 64) * torch.rand(64) * 4
    for lin in model:
        qpass.quantize(torch.nn.Sequential(lin), "W4A8_AWQ_BETA_CFG", lambda m: m(x))
    mean = x.abs().mean(0)
    w_scale = torch.cat([model[0].weight, model[1].weight]).abs().mean(0)
    grid = [i / 10 for i in range(11)]
    old = smoothing.ROW_CHUNK_ELEMENTS
    smoothing.ROW_CHUNK_ELEMENTS = 64 * 40  # several chunks per member, so pruning can stop early
    try:
        full = search_unit_scale(model, ["0", "1"], x, lambda a: awq_scale(mean, w_scale, a), grid, prune=False)
        pruned = search_unit_scale(model, ["0", "1"], x, lambda a: awq_scale(mean, w_scale, a), grid)
    finally:
        smoothing.ROW_CHUNK_ELEMENTS = old
    assert pruned[1] == full[1] and torch.equal(pruned[0], full[0])
    assert pruned[2][pruned[1]] == full[2][full[1]]
    assert all(pruned[2][a] <= full[2][a] for a in grid)  # stopped ones are lower bounds
    assert any(pruned[2][a] < full[2][a] for a in grid)  # and some did stop


@pytest.mark.parametrize("name", ["INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_AWQ_LITE_CFG", "NVFP4_AWQ_CLIP_CFG"])
def test_gptq_rounding_keeps_weights_on_their_grid_and_lowers_the_error(name):
    """qpass's default gptq=True: after the AWQ search the weights are GPTQ-rounded onto their
    quantizers' grids (each a fixed point of its weight quantizer), from the same one pass,
    and the quantized model is closer to the float one than with round-to-nearest."""
    torch.manual_seed(0)
    base = tiny_llama(2)
    ids = [torch.randint(0, 128, (4, 32)) for _ in range(2)]
    ref = [base(i).logits for i in ids]
    options = {"alpha_step": 0.5} if "LITE" in name else {}
    if "CLIP" in name:
        options["max_co_batch_size"] = 64
    errs = {}
    for gptq in (False, True):
        model = copy.deepcopy(base)
        loop, calls = _counting(ids)
        qpass.quantize(model, _cfg(name, gptq=gptq, **options), loop)
        assert len(calls) == 1
        with torch.no_grad():
            errs[gptq] = sum(float((model(i).logits - r).pow(2).mean()) for i, r in zip(ids, ref))
        if gptq:
            for path, mod in model.named_modules():
                q = getattr(mod, "weight_quantizer", None)
                if isinstance(mod, nn.Linear) and q is not None and q.is_enabled:
                    assert torch.equal(q(mod.weight), mod.weight), path
            assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert errs[True] < errs[False]


def test_gptq_option_is_checked():
    base, x = _salient_case()
    with pytest.raises(QuantConfigError, match="gptq"):
        qpass.quantize(copy.deepcopy(base), _cfg("INT4_AWQ_CFG", gptq="yes"), lambda mm: mm(x))
