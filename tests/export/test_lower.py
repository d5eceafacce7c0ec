"""The lowering pass: pure quantize/dequantize ops that compute exactly the fake-quant outputs."""

import pytest
import torch

import qpass
from qpass.errors import ExportError
from qpass.graph.quantized_model import state_of
from qpass.passes.lower import OPS, lower_graph

from conftest import MLP, Attention, SmallCNN

CONFIGS = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "NVFP4_DEFAULT_CFG",
           "MXFP8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG"]
CASES = ([(MLP, (4, 32), c) for c in CONFIGS]
         + [(Attention, (2, 8, 32), c) for c in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG")]
         + [(SmallCNN, (2, 3, 8, 8), c) for c in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")])


def _quantized(cls, shape, cfg, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    x = torch.randn(*shape)
    qpass.quantize(model, getattr(qpass, cfg), lambda m: m(x))
    return model, x


def _lowered(model, x):
    graphs = state_of(model).graphs
    if not graphs:
        with torch.no_grad():
            model(x)
    return lower_graph(next(iter(state_of(model).graphs.values()))[0].gm)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS.values()]


@pytest.mark.parametrize("cls,shape,cfg", CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
def test_lowered_graph_equals_fake_quant(cls, shape, cfg):
    model, x = _quantized(cls, shape, cfg)
    low = _lowered(model, x)
    x2 = torch.randn(*shape) * 1.5  # other data, including values beyond the calibrated range
    with torch.no_grad():
        for inp in (x, x2):
            assert torch.equal(low(inp), model(inp))
    assert not any(n.op == "call_module" for n in low.graph.nodes)


def test_weights_are_folded_and_float_weights_dropped():
    model, x = _quantized(MLP, (4, 32), "INT8_DEFAULT_CFG")
    low = _lowered(model, x)
    buffers = dict(low.named_buffers())
    params = dict(low.named_parameters())
    assert buffers["fc1.weight_quantizer.codes"].dtype == torch.int8
    assert buffers["fc1.weight_quantizer.scale"].shape == (64,)
    assert "fc1.weight" not in params and "fc2.weight" not in params  # only the codes remain
    assert "fc1.bias" in params and params["fc1.bias"] is model.fc1.bias  # shared, not copied
    t = _targets(low)
    assert t.count(OPS["dequantize_per_channel"]) == 2
    assert t.count(OPS["quantize_per_tensor"]) == 2 and t.count(OPS["dequantize_per_tensor"]) == 2


@pytest.mark.parametrize("cfg,dtype", [("FP8_DEFAULT_CFG", torch.float8_e4m3fn),
                                       ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", torch.uint8),
                                       ("NVFP4_DEFAULT_CFG", torch.float4_e2m1fn_x2)])
def test_low_precision_weight_storage(cfg, dtype):
    model, x = _quantized(MLP, (4, 32), cfg)
    codes = dict(_lowered(model, x).named_buffers())["fc1.weight_quantizer.codes"]
    assert codes.dtype == dtype
    if dtype != torch.float8_e4m3fn:  # 4-bit: two codes per byte
        assert codes.shape == (64, 16)


def test_shared_input_group_gets_one_quantize_op():
    model, x = _quantized(Attention, (2, 8, 32), "INT8_DEFAULT_CFG")
    assert state_of(model).groups == [["k_proj", "q_proj", "v_proj"]]
    low = _lowered(model, x)
    qs = [n for n in low.graph.nodes if n.target == OPS["quantize_per_tensor"]]
    assert len(qs) == 2  # q/k/v share one, o_proj has its own
    dq = next(iter(qs[0].users))
    assert sorted(u.target.__name__ for u in dq.users) == ["linear.default"] * 3


def test_disabled_quantizers_are_removed():
    model, x = _quantized(MLP, (4, 32), "INT8_DEFAULT_CFG")
    qpass.disable_quantizer(model, "*input_quantizer")
    low = _lowered(model, x)
    t = _targets(low)
    assert OPS["quantize_per_tensor"] not in t and t.count(OPS["dequantize_per_channel"]) == 2
    with torch.no_grad():
        assert torch.equal(low(x), model(x))
    qpass.disable_quantizer(model, "*")
    assert _targets(_lowered(model, x)) == []


def test_pre_quant_scale_is_a_multiply_before_quantize():
    model, x = _quantized(MLP, (4, 32), "INT8_DEFAULT_CFG")
    model.fc1.input_quantizer.pre_quant_scale = torch.rand(32) + 0.5
    low = _lowered(model, x)
    with torch.no_grad():
        assert torch.equal(low(x), model(x))
    q = next(n for n in low.graph.nodes if n.target == OPS["quantize_per_tensor"])
    assert q.args[0].target == torch.ops.aten.mul.Tensor


def test_uncalibrated_activation_is_an_error():
    model, x = _quantized(MLP, (4, 32), "INT8_DEFAULT_CFG")
    model.fc2.input_quantizer.amax = None
    with pytest.raises(ExportError, match=r"fc2\.input_quantizer.*no amax"):
        _lowered(model, x)


def test_unsupported_formats_lower_to_exact_fake_quant():
    model, x = _quantized(MLP, (4, 32), "MXFP8_DEFAULT_CFG")
    low = _lowered(model, x)
    assert set(_targets(low)) == {OPS["fake_quant"]}


def test_lowered_graph_keeps_dynamic_shapes():
    model, x = _quantized(Attention, (2, 8, 32), "INT8_DEFAULT_CFG")
    low = _lowered(model, x)
    y = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.equal(low(y), model(y))
