"""The execution graph (qpass.graph.execution) and the per-tensor fast path of TensorQuantizer:
the same outputs as the traced graph and the general fake-quant path, fewer calls, and rebuilt
whenever a quantizer's state or identity changes."""

import copy

import pytest
import torch

import qpass
from qpass.formats import QuantSpec
from qpass.formats.integer import IntFormat
from qpass.graph.execution import execution_graph
from qpass.graph.quantized_model import state_of
from qpass.nn.tensor_quantizer import TensorQuantizer

from conftest import tiny_llama

ALL_OFF = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None}


def _traced(model):
    (traced,) = [t for ts in state_of(model).graphs.values() for t in ts]
    return traced.gm


def _count(gm, pred):
    return sum(1 for n in gm.graph.nodes if pred(n))


def _quantizer_calls(gm):
    return _count(gm, lambda n: n.op == "call_module" and "quantizer" in str(n.target))


@pytest.mark.parametrize("config", [ALL_OFF, "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG",
                                    "INT4_AWQ_CFG"])
def test_same_outputs_fewer_nodes(config):
    ids = torch.randint(0, 128, (2, 16))
    model = qpass.quantize(tiny_llama(), copy.deepcopy(config), lambda m: m(input_ids=ids))
    out = model(input_ids=ids).logits
    gm = _traced(model)
    ref = gm(ids)
    ref = ref.logits if hasattr(ref, "logits") else ref[0]
    assert torch.equal(out, ref)
    exe = execution_graph(gm)
    asserts = lambda n: n.op == "call_function" and "_assert_tensor_metadata" in str(n.target)  # noqa: E731
    assert _count(gm, asserts) > 0 and _count(exe, asserts) == 0
    # kept: the enabled quantizers and the disabled ones that apply AWQ's pre_quant_scale
    kept = sum(1 for n in gm.graph.nodes if n.op == "call_module" and "quantizer" in str(n.target)
               and (gm.get_submodule(n.target).is_enabled or gm.get_submodule(n.target).pre_quant_scale is not None))
    # ... less the input quantizers merged into the first of their shared-input group (q/k/v:
    # 2, gate/up: 1 per layer), which AWQ's pre_quant_scale rules out
    merged = 0 if config in (ALL_OFF, "INT4_AWQ_CFG") else 3 * len(model.model.layers)
    assert _quantizer_calls(exe) == kept - merged < _quantizer_calls(gm)
    # parameters and quantizers are reached through one bound container, not the dotted path
    assert all(n.target.count(".") <= 1 for n in exe.graph.nodes if n.op in ("get_attr", "call_module"))


def test_rebuilt_when_a_quantizer_is_enabled_hooked_or_swapped():
    ids = torch.randint(0, 128, (2, 16))
    model = qpass.quantize(tiny_llama(), "INT8_DEFAULT_CFG", lambda m: m(input_ids=ids))
    gm = _traced(model)
    base = model(input_ids=ids).logits
    first = execution_graph(gm)
    assert execution_graph(gm) is first  # cached

    qpass.disable_quantizer(model, "*o_proj.input_quantizer")
    off = model(input_ids=ids).logits
    assert not torch.equal(off, base) and execution_graph(gm) is not first
    qpass.enable_quantizer(model, "*o_proj.input_quantizer")
    assert torch.equal(model(input_ids=ids).logits, base)

    # a hook on a disabled quantizer is called: the graph calls that quantizer again
    seen = []
    q = model.get_submodule("model.layers.0.self_attn.q_proj.output_quantizer")
    handle = q.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(input_ids=ids)
    assert seen == [torch.Size([2, 16, 64])]
    handle.remove()

    # a swapped-in quantizer object (auto_quantize's candidates) is the one that runs
    from qpass.passes.insert_quantizers import _register

    target = "model.layers.1.mlp.down_proj.output_quantizer"
    swapped = TensorQuantizer({"num_bits": 4, "axis": None}, name=target)
    swapped.amax = torch.tensor(0.01)
    model.get_submodule("model.layers.1.mlp.down_proj")._modules["output_quantizer"] = swapped
    _register(gm, target, swapped)
    assert not torch.equal(model(input_ids=ids).logits, base)


def test_fold_weight_and_device_moves_are_seen():
    ids = torch.randint(0, 128, (2, 16))
    model = qpass.quantize(tiny_llama(), "INT8_WEIGHT_ONLY_CFG", lambda m: m(input_ids=ids))
    before = model(input_ids=ids).logits
    qpass.fold_weight(model)
    assert torch.equal(model(input_ids=ids).logits, before)
    model.to(torch.float64)  # every parameter replaced in place; the copy reads the live containers
    assert model(input_ids=ids).logits.dtype == torch.float64


# ---------------------------------------------------------------------- the per-tensor fast path
NVFP4 = dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
FAST = [dict(num_bits=8), dict(num_bits=8, unsigned=True), dict(num_bits=8, narrow_range=True), dict(num_bits=4),
        dict(num_bits=(4, 3)), NVFP4,
        dict(num_bits=(2, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (4, 3)})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attrs", FAST, ids=str)
@pytest.mark.parametrize("amax", [0.0, 1e-30, 0.37, 3.0, 500.0])
def test_fast_path_equals_general_path(attrs, dtype, amax):
    torch.manual_seed(0)
    x = (torch.randn(4, 33, 64) * 2).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e6, -1e6])
    x[1, 2, :32] = -0.0  # whole blocks of (negative) zeros
    x[1, 3, :16] = 1e-30
    q = TensorQuantizer(attrs, name="t.input_quantizer")
    q.amax = torch.tensor(amax)
    fast = q(x)
    spec = QuantSpec.from_attributes(**attrs)
    if not (spec.is_dynamic and amax == 0.0):  # a zero global amax takes the general path
        assert q._fast is not None and q._fast[3] is not None  # the fast path ran
    ref = spec.fake_quant(x, torch.tensor(amax))
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert torch.equal(fast, ref)
    if not isinstance(spec.fmt, IntFormat):  # float formats: to the bit, signed zeros included
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(fast.view(bits), ref.view(bits))  # (integers: a zero may keep x's sign)
    t = x.transpose(0, 1)  # not contiguous
    assert torch.equal(q(t), spec.fake_quant(t, torch.tensor(amax)))
    # a new amax (set, or changed in place) is picked up
    q.amax = torch.tensor(amax * 2 + 0.5)
    assert torch.equal(q(x), spec.fake_quant(x, torch.tensor(amax * 2 + 0.5)))
    with torch.no_grad():
        q.amax.mul_(0.5)
    assert torch.equal(q(x), spec.fake_quant(x, q.amax.clone()))


def test_fast_path_leaves_other_cases_to_the_general_path():
    x = torch.randn(8, 32, requires_grad=True)
    q = TensorQuantizer({"num_bits": 8}, name="t.input_quantizer")
    q.amax = torch.tensor(2.0)
    y = q(x)  # autograd: the straight-through path
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    for attrs in (dict(num_bits=8, axis=0), dict(num_bits=4, block_sizes={-1: 16}), NVFP4,
                  dict(num_bits=(4, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)})):
        q = TensorQuantizer(attrs, name="t.input_quantizer")
        x = torch.randn(8, 32)
        q.amax = QuantSpec.from_attributes(**attrs).amax_of(x)
        out = q(x.half())  # float16 saturates through the general path's cast
        assert out.dtype == torch.float16 and (q._fast is None or q._fast[3] is None)



def _qkv_model():
    from conftest import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 16))
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    return model, ids


def _exe_quantizer_nodes(model, ids) -> int:
    from qpass.graph.execution import execution_graph
    from qpass.graph.quantized_model import graph_for

    traced, _ = graph_for(model, (), {"input_ids": ids, "use_cache": False})
    exe = execution_graph(traced.gm)
    return sum(1 for n in exe.graph.nodes if n.op == "call_module" and n.target.endswith("_quantizer"))


def test_shared_input_quantizers_run_once_and_split_again_when_they_differ():
    """q/k/v (and gate/up) input quantizers share one amax: the execution graph runs one of them
    per input and reuses its output. An amax changed in place (which the quantizer epoch does not
    see) splits that member off again; set equal again, it is merged again. Outputs always equal
    those of the quantizers run one by one."""
    model, ids = _qkv_model()
    per_layer = 7 + 4  # 7 weight quantizers; input quantizers for qkv, o, gate/up, down
    layers = len(model.model.layers)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert _exe_quantizer_nodes(model, ids) == layers * per_layer
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 16, attn.q_proj.in_features)
    with torch.no_grad():
        attn.k_proj.input_quantizer._amax.mul_(0.5)  # in place
        out = model(input_ids=ids).logits
        assert not torch.equal(attn.k_proj.input_quantizer(x), attn.q_proj.input_quantizer(x))
    assert _exe_quantizer_nodes(model, ids) == layers * per_layer + 1 and not torch.equal(out, ref)
    attn.k_proj.input_quantizer.amax = attn.q_proj.input_quantizer.amax
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert _exe_quantizer_nodes(model, ids) == layers * per_layer


def test_merged_quantizers_give_the_outputs_of_separate_ones():
    from qpass.graph import execution

    model, ids = _qkv_model()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    real = execution._same_quantization
    execution._same_quantization = lambda a, b: False
    execution._CACHE.clear()
    try:
        with torch.no_grad():
            separate = model(input_ids=ids).logits
    finally:
        execution._same_quantization = real
        execution._CACHE.clear()
    assert torch.equal(merged, separate)
