"""Affine quantization (ModelOpt's ``bias`` attribute): calibration, numerics against ModelOpt 0.47,
qpass's ``zero_point`` rounding, and the guards around it."""

import copy
import warnings

import pytest
import torch
from torch import nn

import qpass
from qpass.calib.bias import BiasCalibrator, bias_of, reduce_dims
from qpass.errors import QuantConfigError

PER_TENSOR = {-1: None, -2: None, -3: None, -4: None}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _cfg(bias, num_bits=8, axis=None):
    return {"quant_cfg": {"*": {"enable": False},
                          "*weight_quantizer": {"num_bits": 8, "axis": 0},
                          "*input_quantizer": {"num_bits": num_bits, "axis": axis, "bias": bias}},
            "algorithm": "max"}


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, 16, generator=g) * 2 + 1.5 for _ in range(4)]


def test_reduce_dims_ignores_axes_beyond_the_rank():
    assert reduce_dims(PER_TENSOR, 3) == (0, 1, 2)
    assert reduce_dims({-2: None, -4: None}, 4) == (0, 2)
    assert reduce_dims({-2: None, -4: None}, 3) == (1,)


def test_bias_calibrator_methods():
    xs = _data()
    cal = BiasCalibrator({**PER_TENSOR, "method": "max_min"})
    for x in xs:
        cal.collect(x)
    allx = torch.cat([x.reshape(-1) for x in xs])
    torch.testing.assert_close(cal.compute_bias().reshape(()), (allx.max() + allx.min()) / 2)
    cal = BiasCalibrator({**PER_TENSOR, "method": "mean"})
    for x in xs:
        cal.collect(x)
    torch.testing.assert_close(cal.compute_bias().reshape(()), torch.stack([x.mean() for x in xs]).mean())
    per_channel = bias_of(xs[0], {0: None, 1: None, "method": "max_min"})
    assert per_channel.shape == (1, 1, 16)


@pytest.mark.parametrize("axes", ["tensor", "channel"])
@pytest.mark.parametrize("method", ["max_min", "mean"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_affine_quantization_matches_modelopt(method, fmt, axes):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    num_bits = 8 if fmt == "int8" else (4, 3)
    reduced = PER_TENSOR if axes == "tensor" else {0: None, 1: None}  # per channel: one bias per feature
    bias = {**reduced, "type": "static", "method": method}
    torch.manual_seed(0)
    base = MLP().eval()
    xs = _data()
    ours = qpass.quantize(copy.deepcopy(base), _cfg(bias, num_bits), lambda m: [m(x) for x in xs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mtq.quantize(copy.deepcopy(base), _cfg(bias, num_bits), lambda m: [m(x) for x in xs])
    for name in ("fc1", "fc2"):
        q, r = getattr(ours, name).input_quantizer, getattr(theirs, name).input_quantizer
        torch.testing.assert_close(q.bias_value.reshape(-1), r._bias_value.reshape(-1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q.amax.reshape(-1), r.amax.reshape(-1), rtol=1e-6, atol=0)
    x = torch.randn(2, 7, 16) * 2 + 1.5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_asymmetric_range_beats_symmetric_and_zero_point_rounds_the_bias():
    torch.manual_seed(0)
    base = MLP().eval()
    xs = [x.abs() for x in _data()]  # one-sided inputs: a symmetric grid wastes half its codes
    ref = base(xs[0])
    loop = lambda m: [m(x) for x in xs]  # noqa: E731
    sym = qpass.quantize(copy.deepcopy(base), _cfg(None), loop)
    aff = qpass.quantize(copy.deepcopy(base), _cfg({**PER_TENSOR, "method": "max_min"}), loop)
    zp = qpass.quantize(copy.deepcopy(base), _cfg({**PER_TENSOR, "method": "max_min", "zero_point": True}), loop)
    with torch.no_grad():
        err = {k: float((m(xs[0]) - ref).pow(2).mean()) for k, m in (("sym", sym), ("aff", aff), ("zp", zp))}
    assert err["aff"] < 0.5 * err["sym"] and err["zp"] < 0.5 * err["sym"], err
    q = zp.fc1.input_quantizer
    step = q.amax / 127
    b = q.effective_bias(xs[0], q.amax)
    k = b / step
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)  # a whole number of steps
    assert float((b - q.bias_value).abs().max()) <= float(step) / 2 + 1e-7
    # the zero-point quantizer's outputs are on the grid k*step + step*Z, i.e. of x's own grid
    x = xs[1]
    y = q(x)
    codes = y / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=2e-3)


def test_dynamic_bias_uses_each_input():
    q = qpass.nn.tensor_quantizer.TensorQuantizer(
        {"num_bits": 8, "axis": None, "bias": {**PER_TENSOR, "type": "dynamic", "method": "max_min"}}, name="q")
    x = torch.rand(2, 3, 8) + 10.0
    q.amax = torch.tensor(0.5)
    y = q(x)
    assert float((y - x).abs().max()) < 0.5 / 127  # x - b lies within +-0.5: a fine grid
    assert q.bias_value is None


def test_bias_with_real_quantization_is_refused():
    q = qpass.nn.tensor_quantizer.TensorQuantizer(
        {"num_bits": 8, "axis": 0, "fake_quant": False, "bias": PER_TENSOR}, name="lin.weight_quantizer")
    with pytest.raises(QuantConfigError, match="lin.weight_quantizer.*bias"):
        q.check_supported()


def test_bias_survives_state_dict_round_trip():
    torch.manual_seed(0)
    xs = _data()
    cfg = _cfg({**PER_TENSOR, "method": "max_min", "zero_point": True})
    a = qpass.quantize(MLP().eval(), cfg, lambda m: [m(x) for x in xs])
    b = qpass.quantize(MLP().eval(), cfg, lambda m: [m(torch.zeros(1, 16))])
    b.load_state_dict(a.state_dict())
    assert "fc1.input_quantizer._bias_value" in a.state_dict()
    torch.testing.assert_close(b.fc1.input_quantizer.bias_value, a.fc1.input_quantizer.bias_value)
    with torch.no_grad():
        torch.testing.assert_close(b(xs[0]), a(xs[0]), rtol=0, atol=0)


def test_zero_point_key_is_validated():
    with pytest.raises(QuantConfigError, match="zero_point"):
        qpass.quantize(MLP().eval(), _cfg({**PER_TENSOR, "zero_point": "yes"}), lambda m: m(torch.zeros(1, 16)))


def test_smoothing_refuses_affine_input_quantizers_and_leaves_the_model():
    torch.manual_seed(0)
    base = MLP().eval()
    model = copy.deepcopy(base)
    x = _data()[0]
    cfg = _cfg({**PER_TENSOR, "method": "max_min"})
    cfg["algorithm"] = "smoothquant"
    with pytest.raises(QuantConfigError, match="fc1.input_quantizer.*affine bias"):
        qpass.quantize(model, cfg, lambda m: m(x))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_lowered_graph_and_onnx_zero_points(tmp_path):
    import numpy as np
    import onnx

    from qpass.export.compare import compare, compare_quantizers
    from qpass.export.onnx import lowered_for_export

    torch.manual_seed(0)
    xs = [x.abs() for x in _data()]
    model = qpass.quantize(MLP().eval(), _cfg({**PER_TENSOR, "method": "max_min", "zero_point": True}),
                           lambda m: [m(x) for x in xs])
    lowered = lowered_for_export(model, xs[0])[0]
    with torch.no_grad():
        assert torch.equal(lowered(xs[1]), model(xs[1]))  # sub, quantize, dequantize, add: the forward's arithmetic
    ort_path = qpass.export_onnx(model, str(tmp_path / "ort.onnx"), target="onnxruntime")
    g = onnx.load(ort_path).graph
    ops = [n.op_type for n in g.node]
    assert "Sub" not in ops and ops.count("QuantizeLinear") == 2  # the bias is the zero point
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    for q in (n for n in g.node if n.op_type == "QuantizeLinear"):
        zp = inits[q.input[2]]
        assert zp.dtype == np.uint8 and int(zp) != 128
    rep = compare(model, ort_path, xs[1])
    assert rep[0]["cosine"] > 0.99999 and rep[0]["max_abs_err"] < 1e-5, rep
    assert all(r["mismatches"] == 0 for r in compare_quantizers(model, ort_path, xs[1]))
    # TensorRT takes zero point 0 only: the bias stays a Sub and an Add around symmetric Q/DQ
    trt_path = qpass.export_onnx(model, str(tmp_path / "trt.onnx"))
    ops = [n.op_type for n in onnx.load(trt_path).graph.node]
    assert ops.count("Sub") == 2 and ops.count("QuantizeLinear") == 2
    rep = compare(model, trt_path, xs[1])
    assert rep[0]["cosine"] > 0.99999 and rep[0]["max_abs_err"] < 1e-5, rep


def test_dynamic_bias_has_no_lowered_form(tmp_path):
    from qpass.errors import ExportError

    x = _data()[0]
    model = qpass.quantize(MLP().eval(), _cfg({**PER_TENSOR, "type": "dynamic", "method": "max_min"}), lambda m: m(x))
    path = tmp_path / "dyn.onnx"
    with pytest.raises(ExportError, match="fc1.input_quantizer.*dynamic affine bias"):
        qpass.export_onnx(model, str(path))
    assert not path.exists()


def test_checkpoint_round_trip_keeps_the_bias(tmp_path):
    torch.manual_seed(0)
    base = MLP().eval()
    xs = _data()
    model = qpass.quantize(copy.deepcopy(base), "INT8_ASYMMETRIC_CFG", lambda m: [m(x) for x in xs])
    path = str(tmp_path / "ckpt.qpass")
    qpass.save(model, path)
    again = qpass.restore(copy.deepcopy(base), path)
    torch.testing.assert_close(again.fc2.input_quantizer.bias_value, model.fc2.input_quantizer.bias_value)
    with torch.no_grad():
        assert torch.equal(again(xs[1]), model(xs[1]))


def test_zero_point_range_holds_zero():
    """One-sided data: the zero_point range widens to include 0 (as ORT and PT2E do), so the zero
    point is a uint8 code; without zero_point the range is ModelOpt's [min, max]."""
    torch.manual_seed(0)
    xs = [x.abs() + 3.0 for x in _data()]  # all in [3, ~12]
    lo, hi = min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)
    for zero_point in (False, True):
        model = qpass.quantize(MLP().eval(), _cfg({**PER_TENSOR, "method": "max_min", "zero_point": zero_point}),
                               lambda m: [m(x) for x in xs])
        q = model.fc1.input_quantizer
        if zero_point:
            torch.testing.assert_close(float(q.bias_value), hi / 2)
            torch.testing.assert_close(float(q.amax), hi / 2)
            k = float(q.effective_bias(xs[0], q.amax)) / (float(q.amax) / 127)
            assert 0 <= 128 - round(k) <= 255
        else:
            torch.testing.assert_close(float(q.bias_value), (hi + lo) / 2)
            torch.testing.assert_close(float(q.amax), (hi - lo) / 2)


# ---------------------------------------------------------------- the "histogram" range search

def test_search_range_trims_sparse_tails_only():
    from qpass.calib.bias import SignedHistogram, search_range

    g = torch.Generator().manual_seed(0)
    # a squared-error criterion cuts a tail only where it holds few values for the range it
    # costs every other value: here 6 outliers among a million
    x = torch.randn(1_000_000, generator=g)
    x[:6] = torch.tensor([40.0, 31.0, 22.0, -20.0, -27.0, -36.0])
    h = SignedHistogram()
    h.add(x)
    lo, hi = search_range(h.counts, h.origin, h.width, 256)
    assert float(x.min()) + 10 < lo < -3 and 3 < hi < float(x.max()) - 10  # the tail cut, the body kept
    # uniform values: nothing is sparse, the range stays (nearly) whole
    u = torch.rand(100_000, generator=g) * 2 - 1
    h = SignedHistogram()
    h.add(u)
    lo, hi = search_range(h.counts, h.origin, h.width, 256)
    assert lo < -0.98 and hi > 0.98
    # one-sided values: the range still holds 0, which is a bin edge
    h = SignedHistogram()
    h.add(u.abs() + 0.5)
    lo, hi = search_range(h.counts, h.origin, h.width, 256)
    assert lo == 0.0 and 1.4 < hi <= 1.5 + 1e-6
    assert search_range(torch.zeros(8), 0.0, 1.0, 256) == (0.0, 0.0)


def test_search_range_is_near_the_best_squared_error():
    """The estimate (rounding noise inside, exact clipping outside) leads to a range whose real
    quantization error is the least among scaled versions of it and the full range."""
    from qpass.calib.bias import SignedHistogram, search_range

    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50_000, generator=g), torch.randn(300, generator=g) * 8])  # a heavy tail
    h = SignedHistogram()
    h.add(x)
    lo, hi = search_range(h.counts, h.origin, h.width, 256)

    def mse(a, b):
        step = (b - a) / 255
        q = ((x.clamp(a, b) - a) / step).round() * step + a
        return float((q - x).pow(2).mean())

    found = mse(lo, hi)
    others = [mse(float(x.min()), float(x.max()))] + [mse(lo * t, hi * t) for t in (0.3, 0.5, 0.7, 0.85, 1.2, 1.5)]
    assert found <= 1.02 * min(others), (found, others)
    assert hi < float(x.max()) and lo > float(x.min())


def test_signed_histogram_grows_with_the_batches():
    from qpass.calib.bias import SignedHistogram

    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5000, generator=g) * s for s in (1.0, 3.0, 0.5, 6.0)]
    h = SignedHistogram(bins=512)
    for b in batches:
        h.add(b)
    allx = torch.cat(batches)
    assert float(h.counts.sum()) == allx.numel()
    assert h.origin <= float(allx.min()) and h.end >= float(allx.max())
    first = batches[0]
    assert h.width == pytest.approx((float(first.max()) - float(first.min())) / 512)  # fixed by batch 1
    # every count sits in the bin of its value (to float rounding at the edges)
    ref = torch.histc(allx, h.counts.numel(), h.origin, h.end).double()
    assert float((h.counts - ref).abs().sum()) <= 4
    # a far larger batch merges bins in pairs instead of growing without bound
    h.add(torch.tensor([1e4]))
    assert h.counts.numel() <= 8 * 512 and float(h.counts.sum()) == allx.numel() + 1


def test_histogram_zero_point_quantizer_calibrates_the_searched_range():
    from qpass.calib.bias import SignedHistogram, search_range

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, 256, 16, generator=g) * 2 + 1.5 for _ in range(4)]  # a million values
    xs[1][0, 0, 0] = 60.0  # one outlier the max_min range would stretch to
    bias = {**PER_TENSOR, "method": "histogram", "zero_point": True}
    m = qpass.quantize(MLP().eval(), _cfg(bias), lambda mm: [mm(x) for x in xs])
    q = m.fc1.input_quantizer
    h = SignedHistogram()
    for x in xs:
        h.add(x)
    lo, hi = search_range(h.counts, h.origin, h.width, 256)
    assert hi < 30.0
    torch.testing.assert_close(q.amax.reshape(()), torch.tensor((hi - lo) / 2), rtol=1e-6, atol=0)
    step = q.amax / 127
    b = q.effective_bias(xs[0], q.amax)
    torch.testing.assert_close(b / step, (b / step).round(), rtol=0, atol=1e-4)
    assert abs(float(b.flatten()[0]) - (lo + hi) / 2) <= float(step) / 2 + 1e-6
    mm = qpass.quantize(MLP().eval(), _cfg({**PER_TENSOR, "method": "max_min", "zero_point": True}),
                        lambda mm_: [mm_(x) for x in xs])
    assert float(mm.fc1.input_quantizer.amax) > 2 * float(q.amax)


def test_histogram_bias_method_errors_name_the_key_or_quantizer():
    base = MLP().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loop = lambda m: [m(x) for x in _data()]  # noqa: E731
    with pytest.raises(QuantConfigError, match="bias.*'histogram'.*zero_point"):
        qpass.quantize(base, _cfg({**PER_TENSOR, "method": "histogram"}), loop)
    with pytest.raises(QuantConfigError, match="input_quantizer.*'histogram'.*per-tensor"):
        qpass.quantize(base, _cfg({**PER_TENSOR, "method": "histogram", "zero_point": True}, axis=-1), loop)
    with pytest.raises(qpass.errors.CalibrationError, match="fc1.input_quantizer.*per-tensor bias"):
        qpass.quantize(base, _cfg({0: None, 1: None, "method": "histogram", "zero_point": True}), loop)
    bad = [x.clone() for x in _data()]
    bad[2][0, 0, 0] = float("nan")
    with pytest.raises(qpass.errors.CalibrationError, match="fc1.input_quantizer.*NaN"):
        qpass.quantize(base, _cfg({**PER_TENSOR, "method": "histogram", "zero_point": True}),
                       lambda m: [m(x) for x in bad])
    assert not any(isinstance(mod, qpass.nn.tensor_quantizer.TensorQuantizer) for mod in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
