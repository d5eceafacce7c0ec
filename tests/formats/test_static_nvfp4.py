"""Static NVFP4 weights (per-block amax buffer + global amax): numerics, calibration, round trips.

The reference below is written from the format's definition, independently of qpass.formats:
block scale ``e4m3(amax_b * norm / G) * G / (6 * norm)`` (norm 448, or 256 for four-over-six),
elements rounded to the nearest E2M1 value (random data: no ties).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import qpass
from qpass.calib.nvfp4_static import fp8_scale_candidates
from qpass.errors import QuantConfigError
from qpass.formats.spec import QuantSpec

from conftest import has_package

STATIC = {-1: 16, "type": "static", "scale_bits": (4, 3)}
DYNAMIC = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference(w: torch.Tensor, block_amax: torch.Tensor, glob: float, norm: float = 448.0) -> torch.Tensor:
    """Row-major blocks of 16 along the last axis (the last axis a multiple of 16)."""
    blocks = w.reshape(-1, 16).double()
    code = (block_amax.reshape(-1, 1).double() * norm / glob).float().to(torch.float8_e4m3fn).double()
    d = code * glob / (6 * norm)
    y = (blocks / torch.where(d == 0, 1.0, d)).clamp(-6, 6)
    idx = (y.abs().unsqueeze(-1) - E2M1.double()).abs().argmin(-1)
    q = E2M1.double()[idx] * y.sign() * d
    return torch.where(d == 0, 0.0, q).reshape(w.shape).float()


def spec(four_over_six=False):
    bs = {**STATIC, "four_over_six": 1} if four_over_six else STATIC
    return QuantSpec.from_attributes(num_bits=(2, 1), block_sizes=bs)


@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 32), (7, 40)])
def test_static_at_the_max_amax_equals_dynamic_nvfp4(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 3
    s = spec()
    dyn = QuantSpec.from_attributes(num_bits=(2, 1), block_sizes=DYNAMIC)
    out = s.fake_quant(w, s.amax_of(w))
    assert torch.equal(out, dyn.fake_quant(w, w.abs().amax()))
    codes, scale = s.quantize(w, s.amax_of(w))
    assert torch.equal(s.dequantize(codes, scale, shape=w.shape), out)


@pytest.mark.parametrize("four_over_six", [False, True])
def test_static_matches_the_reference_for_any_block_amax(four_over_six):
    torch.manual_seed(1)
    w = torch.randn(6, 64)
    s = spec(four_over_six)
    blocks = s.amax_of(w) * torch.empty(24, 1).uniform_(0.6, 1.5)
    glob = float(s.amax_of(w).max())
    norm = 256.0 if four_over_six else 448.0
    got = s.fake_quant(w, (blocks, torch.tensor(glob)))
    torch.testing.assert_close(got, reference(w, blocks, glob, norm), rtol=1e-6, atol=1e-7)
    codes, scale = s.quantize(w, (blocks, torch.tensor(glob)))
    assert scale[0].dtype == torch.float8_e4m3fn and scale[0].shape == (6, 4)
    assert torch.equal(s.dequantize(codes, scale, shape=w.shape), got)
    assert s.effective_bits == 4.5 and "static" in s.describe()


def _model():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.o_proj = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32), torch.nn.Linear(64, 48)

        def forward(self, x):
            return self.o_proj(self.q_proj(x)) + self.k_proj(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    return Attn().eval(), [torch.randn(4, 10, 64) for _ in range(3)]


def _loop(data):
    return lambda m: [m(x) for x in data]


def test_fp8_sweep_picks_each_blocks_best_e4m3_scale():
    model, data = _model()
    maxed = copy.deepcopy(model)
    cfg = copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG)
    qpass.quantize(model, cfg, _loop(data))
    cfg["algorithm"] = "max"
    qpass.quantize(maxed, cfg, _loop(data))
    for name in ("q_proj", "k_proj", "o_proj"):
        q, qm = model.get_submodule(name).weight_quantizer, maxed.get_submodule(name).weight_quantizer
        w = model.get_submodule(name).weight.detach()
        glob = float(q.global_amax)
        assert torch.equal(q.global_amax, qm.global_amax)
        # every block amax is global * v / 448 for an E4M3 value v: the scale is exact in E4M3
        v = q.amax.reshape(-1) / glob * 448
        assert torch.equal(v.to(torch.float8_e4m3fn).float(), v)
        # brute force over the 126 candidates, block by block
        errs = torch.stack([((reference(w, torch.full((w.numel() // 16, 1), glob * c), glob) - w) ** 2)
                            .reshape(-1, 16).sum(-1) for c in fp8_scale_candidates().tolist()])
        best = errs.min(0).values
        got = ((q(w) - w) ** 2).reshape(-1, 16).sum(-1)
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-9)
        assert (got <= ((qm(w) - w) ** 2).reshape(-1, 16).sum(-1) + 1e-9).all()


def test_four_over_six_maps_each_block_max_to_6_or_4():
    model, data = _model()
    qpass.quantize(model, copy.deepcopy(qpass.NVFP4_FOUR_OVER_SIX_CFG), _loop(data))
    q = model.q_proj.weight_quantizer
    w = model.q_proj.weight.detach()
    block_max = w.reshape(-1, 16).abs().amax(-1, keepdim=True)
    ratio = q.amax / block_max
    assert torch.isclose(ratio, torch.ones_like(ratio)).logical_or(torch.isclose(ratio, torch.full_like(ratio, 1.5))).all()
    assert (ratio > 1.25).any() and (ratio < 1.25).any()
    glob = float(q.global_amax)
    for r in (1.0, 1.5):  # the chosen multiplier is at least as good as either, block by block
        other = ((reference(w, block_max * r, glob, 256.0) - w) ** 2).reshape(-1, 16).sum(-1)
        assert (((q(w) - w) ** 2).reshape(-1, 16).sum(-1) <= other + 1e-9).all()


def test_shared_input_group_shares_one_global_amax():
    model, data = _model()
    qpass.quantize(model, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG), _loop(data))
    qg, kg, og = (model.get_submodule(n).weight_quantizer.global_amax for n in ("q_proj", "k_proj", "o_proj"))
    own = [model.get_submodule(n).weight.detach().abs().max() for n in ("q_proj", "k_proj")]
    assert torch.equal(qg, kg) and float(qg) == float(max(own))  # q/k read one input
    assert float(og) == float(model.o_proj.weight.detach().abs().max())


@pytest.mark.parametrize("preset", ["NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "NVFP4_FOUR_OVER_SIX_CFG"])
def test_save_restore_real_quantize_and_onnx_keep_the_values(preset, tmp_path):
    model, data = _model()
    base = copy.deepcopy(model)
    qpass.quantize(model, copy.deepcopy(getattr(qpass, preset)), _loop(data))
    with torch.no_grad():
        want = model(data[0])
    qpass.save(model, os.fspath(tmp_path / "ck"))
    again = copy.deepcopy(base)
    qpass.restore(again, os.fspath(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), want)
    packed = copy.deepcopy(base)
    cfg = copy.deepcopy(getattr(qpass, preset))
    cfg["algorithm"] = {"method": "real_quantize", "additional_algorithm": cfg["algorithm"]}
    qpass.quantize(packed, cfg, _loop(data))
    with torch.no_grad():
        assert torch.equal(packed(data[0]), want)
    # FP4 weights behind DequantizeLinear-23 (ONNX Runtime 1.32's CPU has no kernel for it:
    # ONNX's reference evaluator runs the file)
    from onnx.reference import ReferenceEvaluator

    path = os.fspath(tmp_path / "m.onnx")
    qpass.export_onnx(model, path, example_inputs=(data[0],))
    ev = ReferenceEvaluator(path)
    got = torch.from_numpy(ev.run(None, {ev.input_names[0]: data[0].numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_static_nvfp4_attributes_name_the_problem():
    model, data = _model()
    bad = {"quant_cfg": {"default": {"enable": False},
                         "*weight_quantizer": {"num_bits": (2, 1), "block_sizes": {**DYNAMIC, "four_over_six": 1}}},
           "algorithm": "max"}
    with pytest.raises(QuantConfigError, match="four_over_six applies to static NVFP4"):
        qpass.quantize(model, bad, _loop(data))
    bad["quant_cfg"]["*weight_quantizer"] = {"num_bits": 4, "block_sizes": STATIC}
    with pytest.raises(QuantConfigError, match="supported for NVFP4 only"):
        qpass.quantize(model, bad, _loop(data))
    bad["quant_cfg"]["*weight_quantizer"] = {"num_bits": (2, 1), "block_sizes": {**STATIC, -1: 16, -2: 4}}
    with pytest.raises(QuantConfigError, match="one int block size on the last axis"):
        qpass.quantize(model, bad, _loop(data))
    assert not any("quantizer" in n for n, _ in model.named_modules())  # untouched


# ------------------------------------------------------------------------------ local_hessian
class OneLinear(torch.nn.Module):
    def __init__(self, cin=64, cout=24):
        super().__init__()
        self.proj = torch.nn.Linear(cin, cout)

    def forward(self, x):
        return self.proj(x)


def _correlated_inputs(cin, n=3):
    torch.manual_seed(3)
    mix = torch.randn(cin, cin) / cin**0.5 + torch.eye(cin)
    return [torch.randn(4, 12, cin) @ mix * torch.linspace(0.2, 3, cin) for _ in range(n)]


def test_local_hessian_picks_each_blocks_best_scale_under_the_block_hessian():
    torch.manual_seed(0)
    model = OneLinear().eval()
    plain = copy.deepcopy(model)
    data = _correlated_inputs(64)
    qpass.quantize(model, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG), _loop(data))
    q = model.proj.weight_quantizer
    w = model.proj.weight.detach()
    x = torch.cat([d.reshape(-1, 64) for d in data]).double()
    h = torch.stack([x[:, 16 * b:16 * b + 16].t() @ x[:, 16 * b:16 * b + 16] for b in range(4)]) / x.shape[0]
    glob = float(q.global_amax)

    def block_losses(wq):
        d = (wq - w).double().reshape(-1, 4, 16)
        return torch.einsum("rnb,nbd,rnd->rn", d, h, d).reshape(-1)

    losses = torch.stack([block_losses(reference(w, torch.full((w.numel() // 16, 1), glob * c), glob))
                          for c in fp8_scale_candidates().tolist()])
    got = block_losses(q(w))
    torch.testing.assert_close(got, losses.min(0).values, rtol=1e-4, atol=1e-10)
    # the Hessian changes the choice: the plain sweep picks other scales, worse under H
    qpass.quantize(plain, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG), _loop(data))
    other = block_losses(plain.proj.weight_quantizer(w))
    assert not torch.equal(plain.proj.weight_quantizer.amax, q.amax)
    assert (got <= other * (1 + 1e-5) + 1e-12).all() and got.sum() < other.sum()


def test_local_hessian_falls_back_to_plain_error_and_refuses_a_missing_loop():
    torch.manual_seed(0)
    model = OneLinear(cin=40).eval()  # 40 input channels: not whole blocks of 16
    data = _correlated_inputs(40)
    plain = copy.deepcopy(model)
    qpass.quantize(model, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG), _loop(data))
    qpass.quantize(plain, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG), _loop(data))
    assert torch.equal(model.proj.weight_quantizer.amax, plain.proj.weight_quantizer.amax)
    fresh = OneLinear().eval()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(qpass.CalibrationError, match="local_hessian needs calibration data"):
        qpass.quantize(fresh, copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG), None)
    assert type(fresh) is OneLinear and fresh.state_dict().keys() == before.keys()
    bad = copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG)
    bad["algorithm"]["block_size"] = 0
    with pytest.raises(QuantConfigError, match="block_size"):
        qpass.quantize(OneLinear().eval(), bad, _loop(data))


def test_local_hessian_multiplier_search_lowers_the_hessian_loss():
    """fp8_scale_sweep=False: every static weight goes through the multiplier grid under H."""
    torch.manual_seed(0)
    data = _correlated_inputs(64)
    cfg = {"quant_cfg": {"default": {"enable": False},
                         "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}},
           "algorithm": {"method": "local_hessian", "fp8_scale_sweep": False}}
    model = OneLinear().eval()
    plain = copy.deepcopy(model)
    qpass.quantize(model, cfg, _loop(data))
    qpass.quantize(plain, {**cfg, "algorithm": "mse"}, _loop(data))
    w = model.proj.weight.detach()
    x = torch.cat([d.reshape(-1, 64) for d in data])
    out = lambda m: x @ m.proj.weight_quantizer(w).t()  # noqa: E731
    want = x @ w.t()
    assert not torch.equal(model.proj.weight_quantizer.amax, plain.proj.weight_quantizer.amax)
    assert float((out(model) - want).pow(2).sum()) < float((out(plain) - want).pow(2).sum())


def _global_amaxes(model):
    return {n: float(model.get_submodule(n).weight_quantizer.global_amax) for n in ("q_proj", "k_proj", "o_proj")}


@pytest.mark.parametrize("method", ["max", "mse"])
def test_shared_states_patterns_choose_the_global_amax_groups(method):
    """ModelOpt 0.47's ``shared_states={"weight_global_amax": {"patterns": [...]}}``: full-match
    regexes over module names, one group per pattern and captured groups; an empty list shares
    nothing; without patterns the graph's shared-input groups (q/k here) share."""
    base, data = _model()
    own = {n: float(base.get_submodule(n).weight.detach().abs().max()) for n in ("q_proj", "k_proj", "o_proj")}

    def run(shared_states):
        model = copy.deepcopy(base)
        cfg = copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG)
        cfg["algorithm"] = {"method": method, "shared_states": shared_states}
        qpass.quantize(model, cfg, _loop(data))
        return _global_amaxes(model)

    default = run({"weight_global_amax": {}})
    assert default == run(None) and default["q_proj"] == default["k_proj"] == max(own["q_proj"], own["k_proj"])
    assert default["o_proj"] == own["o_proj"]
    assert run({"weight_global_amax": {"patterns": []}}) == own
    paired = run({"weight_global_amax": {"patterns": [r"(?:(.*)\.)?(?:q_proj|o_proj)"]}})
    assert paired["q_proj"] == paired["o_proj"] == max(own["q_proj"], own["o_proj"]) and paired["k_proj"] == own["k_proj"]
    with pytest.warns(UserWarning, match=r"pattern '\(\.\*\)\\\\\.gate_proj' matches no module"):
        assert run({"weight_global_amax": {"patterns": [r"(.*)\.gate_proj"]}}) == own


@pytest.mark.parametrize("shared_states,match", [
    ({"weight_global_amax": {"patterns": ["q_proj("]}}, r"shared_states\['weight_global_amax'\]\['patterns'\] has an invalid "
                                                         r"regex 'q_proj\('"),
    ({"weight_global_amax": {"patterns": "q_proj"}}, r"must be a list of regex strings"),
    ({"weight_global_amax": {"pattern": []}}, r"must be a dict with the field 'patterns' only"),
    ({"global_amax": {}}, r"unknown state\(s\) \['global_amax'\]"),
])
def test_bad_shared_states_name_the_key_and_leave_the_model(shared_states, match):
    model, data = _model()
    ref = model(data[0])
    cfg = copy.deepcopy(qpass.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG)
    cfg["algorithm"] = {"method": "max", "shared_states": shared_states}
    with pytest.raises(QuantConfigError, match=match):
        qpass.quantize(model, cfg, _loop(data))
    assert torch.equal(model(data[0]), ref)


@pytest.mark.skipif(not has_package("modelopt"), reason="nvidia-modelopt not installed")
@pytest.mark.parametrize("shared_states", [None, {"weight_global_amax": {"patterns": []}},
                                           {"weight_global_amax": {"patterns": [r"(?:(.*)\.)?(?:q_proj|o_proj)"]}}])
def test_shared_states_global_amax_equal_modelopts(shared_states):
    """Static NVFP4 weights (activations off, so ModelOpt runs on the CPU): the same global amax
    as ModelOpt 0.47 for the default grouping, none, and a pattern of one's own."""
    import modelopt.torch.quantization as mtq

    base, data = _model()
    got = {}
    for lib, module in (("qpass", qpass), ("modelopt", mtq)):
        model = copy.deepcopy(base)
        cfg = copy.deepcopy(module.NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG)
        cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
        cfg["algorithm"] = {"method": "max", "shared_states": shared_states}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.quantize(model, cfg, _loop(data))
        got[lib] = {n: model.get_submodule(n).weight_quantizer.global_amax.float() for n in ("q_proj", "k_proj", "o_proj")}
    for n in got["qpass"]:
        assert torch.equal(got["qpass"][n], got["modelopt"][n]), n
