"""SmoothQuant's alpha + activation clip search (alpha="auto"): its error estimate and its choices."""

import copy

import torch
from torch import nn

import qpass
from qpass.algorithms.smooth_search import CLIP_RATIOS, ChannelProfile
from qpass.graph.quantized_model import state_of
from qpass.nn.tensor_quantizer import TensorQuantizer

INT8_CFG = [{"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}}]


def _cfg(alpha):
    return {"quant_cfg": INT8_CFG, "algorithm": {"method": "smoothquant", "alpha": alpha}}


def test_channel_profile_error_matches_fake_quant():
    torch.manual_seed(0)
    x = torch.randn(3000, 12) * (torch.rand(12) * 4 + 0.1)
    x[11, 2] = 90.0
    s = torch.rand(12) + 0.5
    q = TensorQuantizer({"num_bits": 8, "axis": None})
    profile = ChannelProfile(x)
    xs = x / s
    top = float(xs.abs().max())
    for r in (1.0, 0.5, 0.2):
        t = top * r
        real = (q.spec.fake_quant(xs, torch.tensor(t)) - xs).pow(2).sum(0)
        est = profile.int_error(s, t, 127).float()
        clip_part = (xs.abs() - t).clamp(min=0).pow(2).sum(0)
        # clipping is exact; rounding (step^2 / 12 per unclipped element) is within a few percent
        torch.testing.assert_close(est, real, rtol=0.08, atol=1e-3 * float(clip_part.max()) + 1e-6)
    # a threshold clipping more than 1/16 of a channel's values is out of the profile: infinite
    t = float(xs.abs().median())
    est = profile.int_error(s, t, 127)
    too_many = (xs.abs() > t).float().mean(0) > 1 / ChannelProfile.TOP_FRACTION
    assert bool(too_many.any()) and torch.equal(torch.isinf(est), too_many)


class OneLinear(nn.Module):
    def __init__(self, d_in=64, d_out=48):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


def _captured_unit(base, x, max_tokens):
    """A max-calibrated copy of ``base``, its fc input's capture, and its SmoothQuant scale(alpha)."""
    from qpass.algorithms.smoothquant import smoothquant_scale
    from qpass.calib.capture import ActivationCapture

    m = copy.deepcopy(base)
    qpass.quantize(m, {"quant_cfg": INT8_CFG, "algorithm": "max"}, lambda mm: mm(x))
    with ActivationCapture({"fc": m.fc}, max_tokens=max_tokens) as cap:
        m(x)
    st = cap.stats["fc"]
    w_amax = m.fc.weight.detach().abs().amax(0)
    return m, st, lambda al: smoothquant_scale(st.amax, w_amax, al)


def test_rare_outlier_tokens_are_clipped():
    """Two tokens 20x larger in every channel: no smoothing scale can flatten them, a clip can."""
    from qpass.algorithms.smooth_search import input_fake_quant, search_alpha_clip

    torch.manual_seed(0)
    base = OneLinear().eval()
    x = torch.randn(4096, 64)
    x[[123, 2000]] *= 20.0
    ref = base(x)
    m, st, scale = _captured_unit(base, x, 4096)
    found = search_alpha_clip(m, ["fc"], st, scale, [0.5])
    assert found.alpha == 0.5 and found.clip < 1.0

    def err(clip):
        s = scale(0.5)
        xs = input_fake_quant(m.fc.input_quantizer, x / s, (st.amax / s).max() * clip)
        wq = m.fc.weight_quantizer.spec.fake_quant(m.fc.weight.detach() * s)
        return (xs @ wq.t() + m.fc.bias - ref).pow(2).mean()

    assert err(found.clip) < 0.85 * err(1.0)  # on all tokens, the two outliers included


def test_auto_sets_the_clipped_smoothed_amax_and_is_never_much_worse_than_fixed_alphas():
    torch.manual_seed(0)
    base = OneLinear().eval()
    x = torch.randn(4096, 64)
    x[[123, 2000]] *= 20.0
    x[:, 7] *= 30.0
    ref = base(x)
    errs, models = {}, {}
    for alpha in (1.0, 0.5, "auto"):
        m = copy.deepcopy(base)
        qpass.quantize(m, _cfg(alpha), lambda mm: mm(x))
        errs[alpha], models[alpha] = (m(x) - ref).pow(2).mean().item(), m
    a = state_of(models["auto"]).smoothing[0]
    assert a.clip in CLIP_RATIOS
    smoothed_max = (x.abs().amax(0) / a.scale).max()
    torch.testing.assert_close(models["auto"].fc.input_quantizer.amax, smoothed_max * a.clip)
    assert errs["auto"] <= 1.1 * min(errs[1.0], errs[0.5])
    # fixed alphas are ModelOpt's algorithm: never clipped
    assert state_of(models[0.5]).smoothing[0].clip == 1.0


def test_outlier_channel_without_rare_tokens_keeps_full_range():
    """A constant-size outlier channel is smoothing's job: every alpha of the search keeps it
    below the unclipped error and the amax stays (nearly) the smoothed max."""
    torch.manual_seed(1)
    base = OneLinear().eval()
    x = torch.rand(2048, 64) * 2 - 1  # bounded: nothing to gain by clipping uniform values
    x[:, 5] *= 40.0
    ref = base(x)
    m = copy.deepcopy(base)
    qpass.quantize(m, _cfg("auto"), lambda mm: mm(x))
    a = state_of(m).smoothing[0]
    assert a.clip >= 0.9
    plain = copy.deepcopy(base)
    qpass.quantize(plain, {"quant_cfg": INT8_CFG, "algorithm": "max"}, lambda mm: mm(x))
    assert (m(x) - ref).pow(2).mean() < 0.5 * (plain(x) - ref).pow(2).mean()


def test_holdout_term_is_the_left_out_tokens_clipping_error():
    """One channel whose largest |x| (x1) stands above the next (x2): fitted without it, the range
    ends at x2, so that token, coming later, loses (x1 - x2) at clip 1, once in ``total`` tokens."""
    from qpass.algorithms.smooth_search import _holdout_errors

    x1, x2, w2, total = 8.0, 6.0, 3.0, 100
    for alpha, s in ((1.0, x1), (0.0, 0.25)):  # s = x1^alpha / w_amax^(1 - alpha), w_amax = 4
        col = torch.tensor([[s * s * w2]], dtype=torch.float64)  # |(W s)_c|^2
        got = _holdout_errors(torch.tensor([x1]), torch.tensor([x2]), torch.tensor([[s]]), [alpha], (1.0, 0.5),
                              col, total)[0]
        # clip 1: the token loses x1 - x2; clip 1/2: it is cut at x2/2 instead of x1/2 (with alpha 0
        # the scale does not move, with alpha 1 it moves with the range: the same in x's units)
        want = [(x1 - x2) ** 2, (x1 - x2 / 2) ** 2 - (x1 / 2) ** 2]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64) * w2 / total)
    # a channel far below the per-tensor range, or whose top value repeats, costs nothing
    amax, second = torch.tensor([8.0, 1.0, 5.0]), torch.tensor([6.0, 0.5, 5.0])
    s = torch.ones(1, 3)
    got = _holdout_errors(amax, second, s, [0.0], (1.0,), torch.ones(1, 3, dtype=torch.float64), 10)
    torch.testing.assert_close(got, torch.tensor([[(8.0 - 6.0) ** 2 - 0.0]], dtype=torch.float64) / 10)
    # a top value far above the next (a ratio of 1e31) stays finite: (x1 - 0)^2 at alpha 1, clip 1
    got = _holdout_errors(torch.tensor([10.0]), torch.tensor([1e-30]), torch.tensor([[10.0]]), [1.0], (1.0,),
                          torch.tensor([[100.0]], dtype=torch.float64), 1)
    torch.testing.assert_close(got, torch.tensor([[100.0]], dtype=torch.float64))


def test_auto_generalizes_from_few_calibration_tokens():
    """64 calibration tokens through a small Llama: scored in-sample only, the search picked
    alphas that fit those tokens' maxima exactly and erred 7x more than alpha 0.5 on new text;
    with the held-out term it errs less than alpha 0.5."""
    from conftest import tiny_llama

    base = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(2)]
    fresh = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(4)]
    cfg = copy.deepcopy(qpass.INT8_SMOOTHQUANT_CFG)

    def rel_err(alpha):
        m = copy.deepcopy(base)
        cfg["algorithm"] = {"method": "smoothquant", "alpha": alpha}
        qpass.quantize(m, cfg, lambda mm: [mm(input_ids=c) for c in calib])
        with torch.no_grad():
            return sum(((m(input_ids=f).logits - base(input_ids=f).logits).pow(2).mean()
                        / base(input_ids=f).logits.pow(2).mean()).item() for f in fresh)

    assert rel_err("auto") < 0.8 * rel_err(0.5)


def test_estimate_rows_sample_only_row_local_weight_quantizers():
    from qpass.algorithms.smooth_search import _estimate_rows
    from qpass.algorithms.smoothing import fake_quant_weight

    torch.manual_seed(0)
    w = torch.randn(300, 40)
    s = torch.rand(40) + 0.5
    per_row = TensorQuantizer({"num_bits": 8, "axis": 0})
    idx, factor = _estimate_rows(per_row, w, 60)
    assert idx.numel() == 60 and factor == 5.0
    # a per-row quantizer's error on the sampled rows is the whole-weight error of those rows,
    # and the scaled sum estimates the whole within sampling error
    full = (fake_quant_weight(per_row, w * s) - w * s).pow(2)
    part = (fake_quant_weight(per_row, w[idx] * s) - w[idx] * s).pow(2)
    torch.testing.assert_close(part, full[idx])
    torch.testing.assert_close(float(part.sum() * factor), float(full.sum()), rtol=0.1, atol=0)
    blocks = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 8}})
    assert _estimate_rows(blocks, w, 60)[0] is not None
    # one per-tensor amax spans all rows: every row is measured
    assert _estimate_rows(TensorQuantizer({"num_bits": 8, "axis": None}), w, 60) == (None, 1.0)
    assert _estimate_rows(per_row, w[:50], 60) == (None, 1.0)


def test_exact_scoring_on_sampled_rows_estimates_the_full_output_error(monkeypatch):
    """The exact round multiplies EXACT_ROWS output rows per member, weighted up to all rows: its
    loss estimates the all-rows loss, and a clear winner stays the winner."""
    import qpass.algorithms.smooth_search as ss

    torch.manual_seed(0)
    base = OneLinear(64, 600).eval()
    x = torch.randn(2048, 64)
    x[:, 7] *= 30.0
    m, st, scale = _captured_unit(base, x, 512)
    alphas = [0.0, 0.5, 1.0]
    sampled = ss.search_alpha_clip(m, ["fc"], st, scale, alphas, shortlist=9)
    monkeypatch.setattr(ss, "EXACT_ROWS", 10**6)
    full = ss.search_alpha_clip(m, ["fc"], st, scale, alphas, shortlist=9)
    assert 600 > ss.ESTIMATE_ROWS and (sampled.alpha, sampled.clip) == (full.alpha, full.clip)
    assert sampled.alpha > 0.0  # an outlier channel: smoothing wins clearly
    torch.testing.assert_close(sampled.loss, full.loss, rtol=0.15, atol=0)


def test_units_searched_side_by_side_give_the_serial_result(monkeypatch):
    """The per-unit searches run on a few threads (each single-threaded); the choices, scales and
    amax equal a one-after-another search, and torch's thread count is restored."""
    from conftest import tiny_llama
    import qpass.algorithms.smooth_search as ss

    base = tiny_llama(layers=3)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    threads = torch.get_num_threads()
    results = []
    for n in (1, 3):
        monkeypatch.setattr(ss, "SEARCH_THREADS", n)
        m = copy.deepcopy(base)
        qpass.quantize(m, copy.deepcopy(qpass.INT8_SMOOTHQUANT_CFG), lambda mm: [mm(input_ids=c) for c in calib])
        assert torch.get_num_threads() == threads
        results.append({k: v.clone() for k, v in m.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_int8_codes_give_the_float_products_of_the_exact_scoring():
    """The exact round multiplies int8 codes (``torch._int_mm``) where both sides lie on an int8
    grid: the result equals the float32 product of the fake-quantized values."""
    from qpass.algorithms.smooth_search import _Grid, _on_int8_grid, _product

    torch.manual_seed(0)
    x = torch.randn(200, 64) * (torch.rand(64) * 3 + 0.1)
    w = torch.randn(48, 64) * 0.05
    qx = TensorQuantizer({"num_bits": 8, "axis": None})
    qw = TensorQuantizer({"num_bits": 8, "axis": 0})
    amax = x.abs().max() * 0.7  # a clipped per-tensor range
    xq = qx.spec.fake_quant(x, amax)
    wq = qw.spec.fake_quant(w, w.abs().amax(1, keepdim=True))
    gx, gw = _on_int8_grid(xq, qx, amax, check=False), _on_int8_grid(wq, qw)
    assert gx.codes is not None and gw.codes is not None and gw.codes.dtype == torch.int8
    torch.testing.assert_close(gx.codes.float() * gx.step[:, None], xq, rtol=1e-6, atol=0)
    ref = xq.double() @ wq.double().t()
    got = _product(xq, gx, gw)
    assert float((got.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # weights quantized per tensor are not on each row's own grid: the float product is used
    wt = qw.spec.fake_quant(w, w.abs().max())
    wt[0] *= 0.3  # one row far below the tensor's amax
    assert _on_int8_grid(wt, qw).codes is None
    torch.testing.assert_close(_product(xq, gx, _Grid(wt)), xq @ wt.t())
    # formats that are not signed int8 keep float values
    assert _on_int8_grid(xq, TensorQuantizer({"num_bits": (4, 3), "axis": None}), amax).codes is None
    assert _on_int8_grid(xq, TensorQuantizer({"num_bits": 8, "axis": None, "unsigned": True}), amax).codes is None
