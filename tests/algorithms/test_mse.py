"""The ``mse`` calibration algorithm: max calibration, then an MSE search of weight amax."""

import copy

import pytest
import torch

import qpass
from qpass.algorithms.mse import mse_candidates, mse_search_amax
from qpass.errors import QuantConfigError
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import MLP, has_package, needs_minilm
from conftest import minilm_calibration_case

needs_modelopt = pytest.mark.skipif(not has_package("modelopt"), reason="nvidia-modelopt not installed")


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 32, generator=g) for _ in range(3)]


def _loop(data):
    return lambda m: [m(x) for x in data]


def _mse_cfg(base, **options):
    cfg = copy.deepcopy(qpass.config.get_preset(base))
    cfg["algorithm"] = {"method": "mse", **options}
    return cfg


def test_candidates_follow_modelopt_grid():
    c = mse_candidates()
    assert len(c) == 39 and float(c[0]) == 0.25 and float(c[-1]) == pytest.approx(4.0)
    assert len(mse_candidates(0.5, 1.0, 1.5)) == 2
    with pytest.raises(QuantConfigError, match="step_size"):
        mse_candidates(0.0)
    with pytest.raises(QuantConfigError, match="stop_multiplier"):
        mse_candidates(0.1, 2.0, 1.0)


def test_search_clips_an_outlier_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g)
    w[0, 0] = 8.0  # one large weight in channel 0: a 1.1-wide int4 step for the other 255
    q = TensorQuantizer({"num_bits": 4, "axis": 0}, name="fc.weight_quantizer")
    q.amax = w.abs().amax(1, keepdim=True)
    cands = mse_candidates()
    best = mse_search_amax(q, w, cands)
    assert best.shape == (4, 1)
    assert float(best[0]) < 0.8 * 8.0  # clipped (5.95 here)
    for ch in range(4):  # known answer: brute force over the same candidates, first minimum
        errs = torch.stack([((w[ch] - q.spec.fake_quant(w[ch:ch + 1], q.amax[ch:ch + 1] * r)[0]) ** 2).sum()
                            for r in cands])
        assert float(best[ch]) == pytest.approx(float(q.amax[ch] * cands[int(torch.argmin(errs))]), rel=1e-6)


def test_mse_refines_weights_only():
    data = _data()
    torch.manual_seed(0)
    a = MLP().eval()
    qpass.quantize(a, "INT8_DEFAULT_CFG", _loop(data))
    c = copy.deepcopy(a)
    qpass.calibrate(c, {"method": "mse"}, _loop(data))
    assert torch.equal(a.fc1.input_quantizer.amax, c.fc1.input_quantizer.amax)  # activations: max
    assert torch.equal(a.fc2.input_quantizer.amax, c.fc2.input_quantizer.amax)
    for name in ("fc1", "fc2"):
        before, after = a.get_submodule(name).weight_quantizer.amax, c.get_submodule(name).weight_quantizer.amax
        assert after.shape == before.shape and not torch.equal(after, before)
        # every choice is max amax times a grid multiplier (1.0 is not on the default grid)
        ratio = (after / before).flatten()
        assert torch.isclose(ratio[:, None], mse_candidates()[None, :], rtol=1e-5).any(1).all()


@needs_modelopt
@pytest.mark.parametrize("base,options", [
    ("INT8_DEFAULT_CFG", {}),
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", {"step_size": 0.05, "start_multiplier": 0.5, "stop_multiplier": 1.2}),
    ("FP8_DEFAULT_CFG", {}),
])
def test_matches_modelopt(base, options):
    import warnings

    import modelopt.torch.quantization as mtq

    data = _data()
    torch.manual_seed(0)
    ours = MLP().eval()
    theirs = copy.deepcopy(ours)
    qpass.quantize(ours, _mse_cfg(base, **options), _loop(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(theirs, _mse_cfg(base, **options), _loop(data))
    for name, q in theirs.named_modules():
        if name.endswith("_quantizer") and q.is_enabled and getattr(q, "amax", None) is not None:
            got = ours.get_submodule(name).amax
            torch.testing.assert_close(got, q.amax.float().reshape(got.shape), rtol=1e-6, atol=0)


def test_static_nvfp4_mse_presets_run_and_refuse_bad_options():
    data = _data()
    for name in ("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "NVFP4_FOUR_OVER_SIX_CFG"):
        m = MLP().eval()
        qpass.quantize(m, name, _loop(data))
        q = m.fc1.weight_quantizer
        assert q.spec.is_static_nvfp4 and q.global_amax is not None and q.amax.numel() > 1, name
    with pytest.raises(QuantConfigError, match="fp8_scale_sweep"):
        qpass.quantize(MLP().eval(), _mse_cfg("NVFP4_DEFAULT_CFG", fp8_scale_sweep="yes"), _loop(data))
    # fp8_scale_sweep without static NVFP4 weights changes nothing (ModelOpt: others keep max)
    torch.manual_seed(0)
    a = MLP().eval()
    b = copy.deepcopy(a)
    qpass.quantize(a, "INT8_DEFAULT_CFG", _loop(data))
    qpass.quantize(b, _mse_cfg("INT8_DEFAULT_CFG", fp8_scale_sweep=True), _loop(data))
    assert torch.equal(a.fc1.weight_quantizer.amax, b.fc1.weight_quantizer.amax)


def test_failed_mse_leaves_previous_amax():
    data = _data()
    torch.manual_seed(0)
    model = MLP().eval()
    qpass.quantize(model, "INT8_DEFAULT_CFG", _loop(data))
    before = model.fc1.weight_quantizer.amax.clone()
    with pytest.raises(QuantConfigError, match="step_size"):
        qpass.calibrate(model, {"method": "mse", "step_size": -1.0}, _loop(data))
    assert torch.equal(model.fc1.weight_quantizer.amax, before)


@needs_minilm
def test_minilm_int8_mse_not_worse_than_max():
    from qpass import zoo

    model, loop, evals, ref = minilm_calibration_case(16)
    qpass.quantize(model, "INT8_DEFAULT_CFG", loop)
    cos_max = zoo.mean_cosine(ref, zoo.embed(model, evals))
    qpass.calibrate(model, {"method": "mse"}, loop)
    cos_mse = zoo.mean_cosine(ref, zoo.embed(model, evals))
    assert cos_mse >= cos_max - 0.01, (cos_mse, cos_max)
