"""GPU checks (``pytest -m cuda``): numerics and calibration on CUDA equal the CPU's."""

import copy

import pytest
import torch

import qpass
from qpass.formats import QuantSpec

from conftest import tiny_llama

pytestmark = pytest.mark.cuda

SPECS = [
    dict(num_bits=8, axis=None),
    dict(num_bits=8, axis=0),
    dict(num_bits=(4, 3), axis=None),
    dict(num_bits=4, block_sizes={-1: 128, "type": "static"}),
    dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}),
    dict(num_bits=(4, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}),
    dict(num_bits=(2, 1), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attrs", SPECS, ids=lambda a: str(a["num_bits"]) + str(a.get("block_sizes", a.get("axis"))))
def test_fake_quant_cuda_equals_cpu(attrs, dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 256) * 3).to(dtype)
    spec = QuantSpec.from_attributes(**attrs)
    amax = spec.amax_of(x) if spec.needs_amax else None
    cpu = spec.fake_quant(x, amax)
    gpu = spec.fake_quant(x.cuda(), None if amax is None else amax.cuda())
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "INT8_ASYMMETRIC_CFG"])
def test_quantize_on_cuda_matches_cpu(config):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    cpu_model = qpass.quantize(copy.deepcopy(model), config, lambda m: m(input_ids=ids))
    gpu_model = qpass.quantize(copy.deepcopy(model).cuda(), config, lambda m: m(input_ids=ids.cuda()))
    for (n, a), (_, b) in zip(cpu_model.named_buffers(), gpu_model.named_buffers()):
        if n.endswith("weight_quantizer._amax"):  # the same weights: the same bits
            assert torch.equal(a, b.cpu()), n
        elif n.endswith("_amax") or n.endswith("_bias_value"):
            # activations come from CUDA's GEMM and attention kernels, whose float32 sums
            # differ from the CPU's in the last bits
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6, msg=n)
    out_cpu = cpu_model(input_ids=ids).logits
    out_gpu = gpu_model(input_ids=ids.cuda()).logits.cpu()
    cos = torch.nn.functional.cosine_similarity(out_cpu.flatten(), out_gpu.flatten(), dim=0)
    assert cos > 0.9999


def test_nan_in_cuda_calibration_names_the_quantizer_and_leaves_the_model():
    from qpass.errors import CalibrationError

    from conftest import MLP

    torch.manual_seed(0)
    model = MLP().cuda().eval()
    x = torch.randn(4, 32, device="cuda")
    ref = model(x)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="'fc1.input_quantizer' saw NaN or Inf"):
        qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(x), m(bad)])
    assert type(model) is MLP and torch.equal(model(x), ref)


FAST_PATH_FORMATS = [
    dict(num_bits=8), dict(num_bits=(4, 3)),
    dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}),
]


@pytest.mark.parametrize("attrs", FAST_PATH_FORMATS, ids=lambda a: str(a["num_bits"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_fast_path_on_cuda_equals_the_general_path(attrs, dtype):
    from qpass.nn.tensor_quantizer import TensorQuantizer

    torch.manual_seed(0)
    x = (torch.randn(8, 64, 128) * 3).to(dtype).cuda()
    x[0, 0, :16] = -0.0
    q = TensorQuantizer(attrs, name="t.input_quantizer")
    q.amax = x.float().abs().amax().cpu() * 0.7
    q.cuda()
    fast = q(x)
    assert q._fast is not None and q._fast[3] is not None
    spec = QuantSpec.from_attributes(**attrs)
    ref = spec.fake_quant(x, q.amax)
    assert torch.equal(fast, ref)
    # and the CPU computes the same values
    assert torch.equal(fast.cpu(), spec.fake_quant(x.cpu(), q.amax.cpu()))


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_cuda_graph_replay_equals_the_eager_forward(config):
    from qpass.graph.quantized_model import state_of

    torch.manual_seed(0)
    model = tiny_llama().cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    other = torch.randint(0, 128, (2, 32), device="cuda")
    qpass.quantize(model, config, lambda m: m(input_ids=ids))
    graphs = state_of(model).cuda_graphs
    with torch.no_grad():
        qpass.set_cuda_graphs(model, False)
        ref, ref_other = model(input_ids=ids).logits, model(input_ids=other).logits
        qpass.set_cuda_graphs(model, True)
        outs = [model(input_ids=ids).logits for _ in range(3)]
        out_other = model(input_ids=other).logits
    assert graphs.replays == 3 and len(graphs.graphs) == 1, graphs.refused
    for out in outs:
        assert torch.equal(out, ref)
    assert torch.equal(out_other, ref_other)
    # a recalibrated amax drops the graph; the next forward is eager and uses the new amax
    q = model.model.layers[0].self_attn.o_proj.input_quantizer
    q.amax = q.amax * 0.25
    with torch.no_grad():
        changed = model(input_ids=ids).logits
        qpass.set_cuda_graphs(model, False)
        eager = model(input_ids=ids).logits
    assert not torch.equal(changed, ref) and torch.equal(changed, eager)
    # autograd on: never captured
    qpass.set_cuda_graphs(model, True)
    before = graphs.replays
    for _ in range(3):
        model(input_ids=ids)
    assert graphs.replays == before


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"])
def test_cuda_graph_calibration_gives_the_eager_amax(config):
    """Max calibration replays its forwards from a CUDA graph after the first batch; the running
    statistics are the eager pass's, to the bit."""
    torch.manual_seed(0)
    base = tiny_llama().cuda().to(torch.bfloat16).eval()
    batches = [torch.randint(0, 128, (2, 32), device="cuda") for _ in range(6)]

    def loop(m):
        for b in batches:
            m(input_ids=b)

    import os

    os.environ["QPASS_CUDA_GRAPHS"] = "0"
    try:
        ref = qpass.quantize(copy.deepcopy(base), config, loop)
    finally:
        del os.environ["QPASS_CUDA_GRAPHS"]
    from qpass.graph import cuda_graphs

    captured = []
    real = cuda_graphs._capture
    cuda_graphs._capture = lambda *a: captured.append(1) or real(*a)
    try:
        model = qpass.quantize(copy.deepcopy(base), config, loop)
    finally:
        cuda_graphs._capture = real
    assert captured, "no calibration forward was captured"
    for (n, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n


def test_cuda_graph_calibration_defers_and_keeps_the_outputs():
    """Calibration forwards on CUDA replay the graph's head (qpass.graph.lazy_outputs); outputs
    held by the forward_loop come back lazy and equal the unquantized model's, and the amax
    values equal a pass that reads every output."""
    from qpass.graph.lazy_outputs import LazyOutput

    torch.manual_seed(0)
    base = tiny_llama().cuda().eval()
    batches = [torch.randint(0, 128, (2, 32), device="cuda") for _ in range(6)]
    held = []

    def holding(m):
        for b in batches:
            held.append(m(input_ids=b).logits)

    def reading(m):
        for b in batches:
            m(input_ids=b).logits.sum().item()

    model = qpass.quantize(copy.deepcopy(base), "INT8_DEFAULT_CFG", holding)
    ref = qpass.quantize(copy.deepcopy(base), "INT8_DEFAULT_CFG", reading)
    assert all(isinstance(t, LazyOutput) and t.device.type == "cuda" for t in held)
    with torch.no_grad():
        for t, b in zip(held, batches):
            # graph against eager kernels: equal up to float reordering, far below INT8's error
            assert torch.allclose(t + 0, base(input_ids=b, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n


def test_cuda_bf16_graph_attention_is_causal_and_equals_eager():
    """The traced graph calls SDPA with is_causal=True (FlashAttention's path) as the eager model
    does, and the unquantized graph's logits equal the eager ones."""
    ref = tiny_llama(layers=2).cuda().to(torch.bfloat16)
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    qpass.quantize(model, copy.deepcopy(qpass.FP8_DEFAULT_CFG), lambda m: m(input_ids=ids, use_cache=False))
    from qpass.graph.quantized_model import state_of

    sdpa = [n for ts in state_of(model).graphs.values() for t in ts for n in t.gm.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa and all(n.kwargs.get("is_causal") is True and len(n.args) == 3 for n in sdpa)
    qpass.disable_quantizer(model, "*")
    with torch.no_grad():
        x = torch.randint(0, 128, (2, 100), device="cuda")
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits,
                                   ref(input_ids=x, use_cache=False).logits)
