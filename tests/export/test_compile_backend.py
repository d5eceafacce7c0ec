"""torch.compile(qmodel, backend="qpass"): real int8 kernels (oneDNN on CPU) from the lowered graph.

Compiled outputs are compared by cosine, not bit for bit: the kernels accumulate in int32 and
quantize activations with ``x * (1 / scale)`` where fake quant multiplies by
``127 / amax`` (a rounding-boundary element can land one code away).
"""

import copy
import logging
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import qpass
from qpass.export import compile_backend as cb

from conftest import MLP, Attention, tiny_bert


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # no inductor caches: a cache hit would skip the code generation the tests inspect
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def _quantized(model, x, cfg=qpass.INT8_DEFAULT_CFG):
    qpass.quantize(model, cfg, lambda m: m(x))
    return model


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _onednn_ops(code) -> Counter:
    return Counter(re.findall(r"torch\.ops\.onednn\.(\w+)", "\n".join(code)))


def test_backend_registered_on_import():
    assert "qpass" in torch._dynamo.list_backends(exclude_tags=())
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("qpass") is cb.qpass_backend


def test_int8_qdq_numerics_equal_fake_quant():
    """The quantized_decomposed encoding the rewrite emits (uint8, zero point 128; scale
    amax/127) gives the fake-quant values on small inputs, full and narrow range."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    from qpass.formats import QuantSpec

    qd = torch.ops.quantized_decomposed
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 2
    amax = torch.tensor(3.0)
    for narrow, qmin in ((False, 0), (True, 1)):
        spec = QuantSpec.from_attributes(8, narrow_range=narrow)
        s = float(amax / 127)
        y = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, s, 128, qmin, 255, torch.uint8), s, 128, qmin, 255,
                                     torch.uint8)
        assert torch.allclose(y, spec.fake_quant(x, amax), rtol=0, atol=1e-6)
    # weights: int8 per-channel codes from the spec, dequantized per channel
    w = torch.randn(8, 16)
    wspec = QuantSpec.from_attributes(8, axis=0)
    wamax = wspec.amax_of(w)
    codes, scale = wspec.quantize(w, wamax)
    y = qd.dequantize_per_channel(codes, scale.float().reshape(-1), torch.zeros(8, dtype=torch.int64), 0, -128, 127,
                                  torch.int8)
    assert torch.allclose(y, wspec.fake_quant(w, wamax), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls,shape", [(MLP, (16, 32)), (Attention, (2, 8, 32))])
def test_int8_compiled_matches_fake_quant_on_onednn(cls, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = _quantized(cls().eval(), x)
    x2 = torch.randn(*shape) * 1.5
    x2_before = x2.clone()
    with torch.no_grad():
        ref = model(x2)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), x2)
        again = torch.compile(model, backend="qpass")(x2)
    assert torch.equal(x2, x2_before), "the compiled model must not write into its input"
    assert _cos(out, ref) >= 0.999 and _cos(again, ref) >= 0.999
    ops = _onednn_ops(code)
    n_linear = 2 if cls is MLP else 4
    assert ops["qlinear_pointwise"] == 2, ops  # Attention: q/k/v share an input: one GEMM, then o_proj
    rep = cb.report(model)
    assert not rep.fell_back and len(rep.lowered) == 2 * n_linear
    assert {d.kernel for d in rep.lowered} == {"onednn_int8"}
    with torch.no_grad():  # eager still runs fake quant afterwards
        assert torch.equal(model(x2), ref)



@pytest.mark.parametrize("cls,shape", [(MLP, (16, 32)), (Attention, (2, 8, 32))])
def test_int8_asymmetric_activations_on_onednn(cls, shape):
    """INT8_ASYMMETRIC_CFG: the affine bias (a whole number of steps) becomes the uint8 zero point
    of oneDNN's int8 linear, as in PT2E; no Sub/Add is left around the quantized input."""
    torch.manual_seed(0)
    x = torch.randn(*shape).abs() + 0.5  # one-sided: the zero point is far from 128
    model = _quantized(cls().eval(), x, qpass.INT8_ASYMMETRIC_CFG)
    assert any(q.bias_value is not None for q in _input_quantizers(model))
    x2 = torch.randn(*shape).abs() + 0.5
    with torch.no_grad():
        ref = model(x2)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), x2)
    assert _cos(out, ref) >= 0.9999
    assert _onednn_ops(code)["qlinear_pointwise"] == 2
    rep = cb.report(model)
    assert not rep.fell_back and {d.kernel for d in rep.lowered} == {"onednn_int8"}


def _input_quantizers(model):
    return [m for n, m in model.named_modules() if n.endswith("input_quantizer")]

def test_int8_tiny_bert_on_onednn():
    model = tiny_bert(layers=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), input_ids=ids, attention_mask=mask)
    assert _cos(out.last_hidden_state, ref) >= 0.999
    # q/k/v read one quantized input: one GEMM; then attn out, ffn in/out, pooler
    assert _onednn_ops(code)["qlinear_pointwise"] == 5
    assert not cb.report(model).fell_back


def _lowered_cpu_int8(model, x):
    from qpass.export.compile_rewrite import rewrite_cpu_int8
    from qpass.graph.quantized_model import state_of
    from qpass.passes.lower import lower_graph

    low = lower_graph(next(iter(state_of(model).graphs.values()))[0].gm)
    rewrite_cpu_int8(low)
    return low


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_shared_input_linears_become_one_int8_gemm():
    """q/k/v read one quantized activation: one linear over the concatenated int8 weights,
    sliced back per layer, with the same numbers; out_proj (another input) stays alone."""
    from qpass.export.compile_fuse import fuse_shared_input_linears

    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    model = _quantized(Attention().eval(), x)
    low = _lowered_cpu_int8(model, x)
    qd, aten = torch.ops.quantized_decomposed, torch.ops.aten
    assert _count(low, aten.linear.default) == 4
    with torch.no_grad():
        before = low(x)
        groups = fuse_shared_input_linears(low)
        after = low(x)
    assert groups == [["q_proj", "k_proj", "v_proj"]]
    assert _count(low, aten.linear.default) == 2 and _count(low, qd.dequantize_per_channel.default) == 2
    fused = next(n for n in low.graph.nodes if n.target is aten.linear.default and len(n.users) == 3)
    assert [u.target for u in fused.users] == [aten.slice.Tensor] * 3
    assert [u.args[2:] for u in fused.users] == [(0, 32), (32, 64), (64, 96)]
    before, after = (t[0] if isinstance(t, (tuple, list)) else t for t in (before, after))
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)


def test_linears_with_other_inputs_are_not_fused():
    from qpass.export.compile_fuse import fuse_shared_input_linears

    torch.manual_seed(0)
    x = torch.randn(16, 32)
    model = _quantized(MLP().eval(), x)
    low = _lowered_cpu_int8(model, x)
    assert fuse_shared_input_linears(low) == []
    assert _count(low, torch.ops.aten.linear.default) == 2


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([MLP(), MLP()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_fallback_log_names_layers_by_module_path(caplog):
    """Dynamo spells ModuleList members as getattr(..., '1'); logs use the model's path."""
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "layers.1.fc2.input_quantizer", "cfg": {"num_bits": (4, 3)}})
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    model = _quantized(_Stack().eval(), x, cfg)
    with caplog.at_level(logging.INFO, logger="qpass.compile"), torch.no_grad():
        torch.compile(model, backend="qpass")(x)
    assert "layers.1.fc2.input_quantizer falls back to fused fake quant" in caplog.text
    assert [d.quantizer for d in cb.report(model).fell_back] == ["layers.1.fc2.input_quantizer"]


def test_fallback_is_logged_and_reported(caplog):
    """fc2 in FP8 (no CPU kernel) keeps fused fake quant; fc1 stays on oneDNN int8."""
    cfg = copy.deepcopy(qpass.INT8_DEFAULT_CFG)
    for slot in ("input", "weight"):
        cfg["quant_cfg"].append({"quantizer_name": f"fc2.{slot}_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}})
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    model = _quantized(MLP().eval(), x, cfg)
    with caplog.at_level(logging.INFO, logger="qpass.compile"), torch.no_grad():
        ref = model(x)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), x)
    assert _cos(out, ref) >= 0.999
    assert _onednn_ops(code)["qlinear_pointwise"] == 1
    logged = caplog.text
    assert "fc2.input_quantizer" in logged and "fc2.weight_quantizer" in logged and "fake quant" in logged
    assert "fc1.input_quantizer" not in logged
    rep = cb.report(model)
    assert sorted(d.quantizer for d in rep.fell_back) == ["fc2.input_quantizer", "fc2.weight_quantizer"]
    assert "no CPU kernel" in rep.fell_back[0].reason
    assert "fc2.weight_quantizer: fake quant" in str(rep)


def test_nothing_to_lower_falls_back_to_inductor():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    model = _quantized(MLP().eval(), x, qpass.FP8_DEFAULT_CFG)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="qpass")(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(cb.report(model).fell_back) == 4


# ------------------------------------------------------------------------------------- CUDA
def _cuda_mlp(cfg, d=256, h=512, m=64, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = MLP(d, h).to("cuda", dtype).eval()
    x = torch.randn(m, d, device="cuda", dtype=dtype)
    _quantized(model, x, cfg)
    return model, x


@pytest.mark.cuda
def test_cuda_fp8_scaled_mm_matches_fake_quant():
    from qpass.export.compile_rewrite import rewrite_cuda  # noqa: F401 - registers the ops

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs sm_89+")
    model, x = _cuda_mlp(qpass.FP8_DEFAULT_CFG)
    with torch.no_grad():
        ref = model(x)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), x)
    assert _cos(out.float(), ref.float()) >= 0.995
    assert "fp8_linear" in "\n".join(code) or "_scaled_mm" in "\n".join(code)
    assert {d.kernel for d in cb.report(model).lowered} == {"scaled_mm_fp8"}


@pytest.mark.cuda
def test_cuda_int8_int_mm_matches_fake_quant():
    model, x = _cuda_mlp(qpass.INT8_DEFAULT_CFG, dtype=torch.float16)
    with torch.no_grad():
        ref = model(x)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), x)
    assert _cos(out.float(), ref.float()) >= 0.995
    assert "int8_linear" in "\n".join(code) or "_int_mm" in "\n".join(code)
    assert {d.kernel for d in cb.report(model).lowered} == {"int_mm_int8"}


@pytest.mark.parametrize("cfg,kernel", [("FP8_DEFAULT_CFG", "fp8_linear"), ("INT8_DEFAULT_CFG", "int8_linear"),
                                        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4_dequant")])
def test_cuda_kernel_rewrite_numerics_on_cpu(cfg, kernel):
    """The CUDA rewrite of the lowered graph (_scaled_mm, _int_mm, in-graph int4 unpacking),
    run eagerly on torch's CPU implementations of those ops, matches fake quant."""
    from qpass.export.compile_rewrite import rewrite_cuda
    from qpass.graph.quantized_model import state_of
    from qpass.passes.lower import lower_graph

    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = _quantized(MLP(64, 128).eval(), x, getattr(qpass, cfg))
    with torch.no_grad():
        ref = model(x)
        low = lower_graph(next(iter(state_of(model).graphs.values()))[0].gm)
        counts = rewrite_cuda(low)
        out = low(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert counts[kernel] >= 1
    assert _cos(out, ref) >= 0.999


def test_repeated_calls_do_not_recompile():
    """Dynamo must not guard on per-call state (run_graph's call counter, the eager weight
    cache): a compiled model compiles once, also after eager no-grad forwards."""
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    model = _quantized(MLP().eval(), x)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return cb.qpass_backend(gm, example_inputs)

    with torch.no_grad():
        model(x)  # fills TensorQuantizer's weight cache
        compiled = torch.compile(model, backend=counting)
        outs = [compiled(x) for _ in range(10)]
        model(x)
        outs.append(compiled(x))
    assert len(compiles) == 1
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert not cb.report(model).fell_back


def test_compiled_forward_with_kwargs_is_one_graph():
    """The quantized forward (graph lookup by input structure, then the graph) traces without
    graph breaks for keyword inputs: every break would add a resumed frame and its guards to
    each call (about 0.8 ms per MiniLM call before, 3% at 1x256)."""
    from torch._dynamo.utils import counters

    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones_like(ids)
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids, attention_mask=mask))
    counters.clear()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = torch.compile(model, backend="qpass")(attention_mask=mask, input_ids=ids).last_hidden_state
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert _cos(out, ref) >= 0.999


# ------------------------------------------------------------- CUDA rewrite, checked on CPU
class _Spy:
    """Records the operands of a kernel call and runs torch's CPU implementation."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def _compile_as_cuda(model, x, monkeypatch, options=None, call_kwargs=None):
    """The "qpass" backend's CUDA path (decisions, lowering, rewrite_cuda) on CPU tensors: the
    device is reported as cuda, the rewritten graph runs eagerly on the kernels' CPU versions."""
    from qpass.export.compile_rewrite import rewrite_cuda

    monkeypatch.setattr(cb, "_device_of", lambda example_inputs: "cuda")
    counts = {}
    opts = cb.backend_options(options)

    def backend(gm, example_inputs):
        lowered, keep, const_outputs, device = cb.prepare(gm, example_inputs)
        assert device == "cuda"
        counts.update(rewrite_cuda(lowered, fp8_fast_accum=opts["fp8_fast_accum"], fuse=opts["fuse_shared_inputs"]))
        return cb._Adapter(lowered, keep, const_outputs)

    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)
        out = compiled(**call_kwargs) if call_kwargs is not None else compiled(x)
    return out, counts


def test_cuda_fp8_rewrite_passes_scaled_mm_its_operands(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = _quantized(MLP(64, 128).eval(), x, qpass.FP8_DEFAULT_CFG)
    spy = _Spy(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with torch.no_grad():
        ref = model(x)
    out, counts = _compile_as_cuda(model, x, monkeypatch)
    assert counts["fp8_linear"] == 2 and _cos(out, ref) >= 0.999
    assert {d.kernel for d in cb.report(model).lowered} == {"scaled_mm_fp8"} and not cb.report(model).fell_back
    (a, b), kw = spy.calls[0]
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert tuple(a.shape) == (32, 64) and tuple(b.shape) == (64, 128) and b.stride() == (1, 64)  # column-major
    assert torch.allclose(kw["scale_a"], model.fc1.input_quantizer.amax.float() / 448)
    assert torch.allclose(kw["scale_b"], model.fc1.weight_quantizer.amax.float() / 448)  # per tensor
    assert kw["out_dtype"] == torch.float32


@pytest.mark.parametrize("m,uses_int_mm", [(32, True), (8, False)])
def test_cuda_int8_rewrite_uses_int_mm_where_its_shape_rules_allow(monkeypatch, m, uses_int_mm):
    """_int_mm needs M > 16 (and K, N multiples of 8): a smaller M dequantizes instead."""
    torch.manual_seed(0)
    x = torch.randn(m, 64)
    model = _quantized(MLP(64, 128).eval(), torch.randn(32, 64))
    spy = _Spy(torch._int_mm)
    monkeypatch.setattr(torch, "_int_mm", spy)
    with torch.no_grad():
        ref = model(x)
    out, counts = _compile_as_cuda(model, x, monkeypatch)
    assert counts["int8_linear"] == 2 and _cos(out, ref) >= 0.999
    assert {d.kernel for d in cb.report(model).lowered} == {"int_mm_int8"}
    if uses_int_mm:
        shapes = [(tuple(a.shape), tuple(b.shape), a.dtype, b.dtype) for (a, b), _ in spy.calls]
        assert shapes == [((m, 64), (64, 128), torch.int8, torch.int8), ((m, 128), (128, 64), torch.int8, torch.int8)]
    else:
        assert spy.calls == []


def test_cuda_int4_weight_only_is_unpacked_in_graph(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = _quantized(MLP(64, 128).eval(), x, qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    with torch.no_grad():
        ref = model(x)
    out, counts = _compile_as_cuda(model, x, monkeypatch)
    # fc2 (K=128): blocks of 128 tile K; fc1 (K=64) has one partial block: fused fake quant
    assert counts == {"fp8_linear": 0, "int8_linear": 0, "int4_dequant": 1, "fused_groups": 0}
    assert _cos(out, ref) >= 0.9999
    rep = cb.report(model)
    assert [(d.quantizer, d.kernel) for d in rep.lowered] == [("fc2.weight_quantizer", "int4_dequant_fused")]
    assert [d.quantizer for d in rep.fell_back] == ["fc1.weight_quantizer"]
    assert "do not tile" in rep.fell_back[0].reason


class _TiedHead(torch.nn.Module):
    """An output projection sharing its weight with the input embedding (SmolLM2's lm_head)."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_tied_weight_is_folded_and_runs_on_onednn():
    """The embedding reads the tied parameter before the head's weight quantizer: lowering must
    still fold it into int8 codes (not a fake-quant fallback) so that oneDNN gets the layer."""
    from qpass.graph.quantized_model import state_of
    from qpass.passes.lower import OPS, lower_graph

    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _quantized(_TiedHead().eval(), ids)
    low = lower_graph(next(iter(state_of(model).graphs.values()))[0].gm)
    assert _count(low, OPS["fake_quant"]) == 0 and _count(low, OPS["dequantize_per_channel"]) == 1
    with torch.no_grad():
        ref = model(ids)
        out, code = run_and_get_code(torch.compile(model, backend="qpass"), ids)
    assert _cos(out, ref) >= 0.999
    assert _onednn_ops(code)["qlinear_pointwise"] == 1


def test_compiled_fake_quant_reads_cached_weights_and_recompiles_on_quantizer_change():
    """After an eager no-grad forward, dynamo reads each weight quantizer's cached fake-quant
    weight as an input instead of compiling the weight's quantization into every call; a
    quantizer change (its _state_version, which dynamo guards on) recompiles."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = _quantized(MLP(64, 128).eval(), x, qpass.FP8_DEFAULT_CFG)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        ref = model(x)  # fills the weight caches
        compiled = torch.compile(model, backend=backend)
        out = compiled(x)
    assert torch.equal(out, ref) and len(graphs) == 1
    weight_params = {id(p) for p in model.parameters() if p.dim() == 2}
    # the two cached weights are inputs; neither raw weight is read by the graph
    vals = graphs[0][1]
    assert sum(v is model.fc1.weight_quantizer._weight_cache[2] or v is model.fc2.weight_quantizer._weight_cache[2]
               for v in vals) == 2
    assert not any(id(v) in weight_params for v in vals)
    qpass.disable_quantizer(model, "*fc2.weight_quantizer")
    with torch.no_grad():
        out2 = compiled(x)
        assert torch.equal(out2, model(x)) and not torch.equal(out2, ref)
    assert len(graphs) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("cfg,kernel", [("FP8_DEFAULT_CFG", "_scaled_mm"), ("INT8_DEFAULT_CFG", "_int_mm")])
def test_cuda_rewrite_fuses_shared_input_projections(monkeypatch, cfg, kernel):
    """q/k/v read one activation with one scale: the CUDA rewrite gives them one quantization and
    one GEMM over their concatenated weights (row-wise weight scales), then o_proj its own."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if kernel == "_scaled_mm" else torch.float32  # row-wise FP8 writes bf16
    x = torch.randn(2, 16, 32, dtype=dtype)
    model = _quantized(Attention().eval().to(dtype), x, getattr(qpass, cfg))
    spy = _Spy(getattr(torch, kernel))
    monkeypatch.setattr(torch, kernel, spy)
    with torch.no_grad():
        ref = model(x)
    out, counts = _compile_as_cuda(model, x, monkeypatch)
    assert counts["fused_groups"] == 1 and _cos(out, ref) >= 0.999
    (a, b), kw = spy.calls[0]
    assert tuple(a.shape) == (32, 32) and tuple(b.shape) == (32, 96)  # q, k and v: N = 3 x 32
    (a2, b2), _ = spy.calls[1]
    assert tuple(b2.shape) == (32, 32) and len(spy.calls) == 2
    if kernel == "_scaled_mm":
        # the activation's scale is folded into the row-wise weight scales; scale_a is a constant
        # of ones (no [M, 1] tensor made per call)
        assert tuple(kw["scale_b"].shape) == (1, 96) and tuple(kw["scale_a"].shape) == (32, 1)
        assert torch.equal(kw["scale_a"], torch.ones(32, 1))
        x_step = model.q_proj.input_quantizer.amax.float() / 448
        want = torch.cat([getattr(model, p).weight_quantizer.amax.float().reshape(1).expand(32)
                          for p in ("q_proj", "k_proj", "v_proj")]) / 448 * x_step
        assert torch.allclose(kw["scale_b"].reshape(-1), want)


@pytest.mark.parametrize("options, fused, fast", [
    (None, True, True),
    ({"fp8_fast_accum": False}, True, False),
    ({"fp8_fast_accum": True, "fuse_shared_inputs": False}, False, True),
])
def test_cuda_backend_options_reach_the_fp8_kernels(monkeypatch, options, fused, fast):
    """``options={"fp8_fast_accum": ..., "fuse_shared_inputs": ...}``: every _scaled_mm call gets
    use_fast_accum as asked; without fusion q, k, v and o_proj are four GEMMs."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    model = _quantized(Attention().eval().to(torch.bfloat16), x, qpass.FP8_DEFAULT_CFG)
    spy = _Spy(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with torch.no_grad():
        ref = model(x)
    out, counts = _compile_as_cuda(model, x, monkeypatch, options)
    assert counts["fused_groups"] == (1 if fused else 0) and counts["fp8_linear"] == 4
    assert len(spy.calls) == (2 if fused else 4)
    assert all(kw["use_fast_accum"] is fast for _, kw in spy.calls)
    assert _cos(out, ref) >= 0.999
    torch._dynamo.reset()


@pytest.mark.parametrize("options, match", [
    ({"fast_accum": True}, "unknown option 'fast_accum'; allowed: cudagraphs, fp8_fast_accum, fuse_shared_inputs"),
    ({"fp8_fast_accum": 1}, "option 'fp8_fast_accum' must be True or False, got 1"),
])
def test_bad_backend_options_are_named(options, match):
    from qpass.errors import QuantConfigError

    with pytest.raises(QuantConfigError, match=match):
        cb.backend_options(options)
    model = _quantized(MLP(16, 32).eval(), torch.randn(4, 16))
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = model(x)
        with pytest.raises(Exception, match=match):
            torch.compile(model, backend="qpass", options=options)(x)
        assert torch.equal(model(x), want)  # the model is untouched
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs, cudagraphs, autotune", [
    ({}, False, False),
    ({"mode": "reduce-overhead"}, True, False),
    ({"options": {"cudagraphs": True}}, True, False),
    ({"mode": "max-autotune-no-cudagraphs"}, False, True),
])
def test_compile_mode_and_cudagraphs_reach_inductor(monkeypatch, kwargs, cudagraphs, autotune):
    """``mode=`` (inductor's modes) and ``options={"cudagraphs": True}`` set inductor's settings for
    the compile of the lowered graph; the CPU keeps freezing on for its int8 lowering."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    def spy(gm, inputs, *a, **kw):
        c = torch._inductor.config
        seen.append((c.triton.cudagraphs, c.max_autotune, c.freezing))
        # compile with the default settings: CPU max-autotune benchmarks every GEMM template
        with torch._inductor.config.patch({"max_autotune": False, "triton.cudagraphs": False}):
            return real(gm, inputs, *a, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = _quantized(MLP(16, 32).eval(), x)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="qpass", **kwargs)(x)
    torch._dynamo.reset()
    assert seen == [(cudagraphs, autotune, True)]
    assert _cos(out, ref) >= 0.999


def test_bad_compile_mode_is_named():
    from qpass.errors import QuantConfigError

    model = _quantized(MLP(16, 32).eval(), torch.randn(4, 16))
    x = torch.randn(4, 16)
    with pytest.raises(QuantConfigError, match="unknown mode 'fast'; allowed: default, reduce-overhead"):
        cb.inductor_patches("fast", cb.backend_options(None))
    with torch.no_grad():
        want = model(x)
        with pytest.raises(Exception, match="unknown mode 'fast'"):
            torch.compile(model, backend="qpass", mode="fast")(x)
        assert torch.equal(model(x), want)
    torch._dynamo.reset()


def test_lowered_graph_reads_weights_as_static_inputs():
    """The graph handed to inductor keeps only the inputs it reads (the lowered quantizers' amax
    buffers are constants now), and AOT counts every installed parameter and buffer as a static
    input - what CUDA graphs read in place instead of copying on every replay."""
    import torch._inductor.compile_fx as cfx

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = _quantized(MLP(16, 32).eval(), x)
    seen = {}

    def inner(gm, inputs, **kw):
        seen.update(n_inputs=len(inputs), static=list(kw.get("static_input_idxs", ())))
        return cfx.compile_fx_inner(gm, inputs, **kw)

    def backend(gm, example_inputs):
        lowered, keep, const_outputs, device = cb.prepare(gm, example_inputs)
        seen.update(dynamo_inputs=len(example_inputs), keep=len(keep),
                    consts=len(list(lowered.parameters())) + len(list(lowered.buffers())))
        with torch._inductor.config.patch({"freezing": False}):
            compiled = cfx.compile_fx(lowered, [example_inputs[i] for i in keep], inner_compile=inner)
        return cb._Adapter(compiled, keep, const_outputs)

    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()
    assert _cos(out, ref) >= 0.999
    assert seen["keep"] == 1 < seen["dynamo_inputs"]  # x alone; the quantizers' amax inputs are gone
    assert seen["n_inputs"] == seen["consts"] + 1
    assert seen["static"] == list(range(seen["consts"]))


def test_cuda_fused_fp8_groups_share_one_ones_constant(monkeypatch):
    """A Llama block's q/k/v and gate/up groups: every row-wise _scaled_mm gets the same [M, 1]
    constant as scale_a (one per graph, none made per call), and the output still matches the
    fake-quant model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    lm = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    qpass.quantize(lm, qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    spy = _Spy(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
    out, counts = _compile_as_cuda(lambda **kw: lm(**kw).logits, None, monkeypatch, call_kwargs={"input_ids": ids})
    assert counts["fused_groups"] == 4 and counts["fp8_linear"] == 14
    row_wise = [kw["scale_a"] for _, kw in spy.calls if kw["scale_a"].dim() == 2]
    assert len(row_wise) == 4 and all(a is row_wise[0] for a in row_wise)
    assert torch.equal(row_wise[0], torch.ones(32, 1))
    assert _cos(out, ref) >= 0.999
    torch._dynamo.reset()
