"""``torch.compile(qmodel, backend="qpass")``: a quantized model on real low-precision kernels.

Registered as the dynamo backend ``"qpass"`` when ``qpass`` is imported.

Path
----
1. **Dynamo** traces the quantized model's forward straight through
   :func:`~qpass.graph.quantized_model.run_graph` into the traced GraphModule; every
   TensorQuantizer call is inlined as its fake-quant arithmetic, and each of those nodes
   carries the quantizer in ``node.meta["nn_module_stack"]`` (keyed by the module's id).
2. **Regions back to quantizers** (:func:`_regions`). The nodes of one quantizer call form a
   region with one quantized input (an activation, or a weight parameter) and one result.
   Regions of quantizers that have a fast kernel on the target device are replaced by one
   ``call_module`` node to the quantizer; weight parameters become ``get_attr`` constants.
3. **The shared lowering pass** (:func:`qpass.passes.lower.lower_graph`) turns those nodes into
   ``qpass::`` quantize/dequantize ops with folded low-precision weights and constant scales -
   the same graph ONNX export consumes; nothing here re-derives a scale.
4. **Kernel rewrite** of the lowered graph:

   * CPU INT8 (W8A8, per-tensor activations, per-channel int8 weights): the PT2E
     ``quantized_decomposed`` Q/DQ pattern (activations as uint8 with zero point 128 - the same
     numbers as int8 with zero point 0, the encoding X86InductorQuantizer produces - and int8
     weights as constants). Inductor's x86 int8 freezing passes fuse ``dq -> linear/conv`` into
     ``onednn.qlinear_pointwise`` / ``onednn.qconv_pointwise`` (``freezing=True`` is set for the
     inductor call, as the PT2E flow requires; weights are packed once, at compile time).
     Linears that read the same quantized activation (q/k/v, gate/up) first become one GEMM
     over their concatenated int8 weights (:mod:`qpass.export.compile_fuse`).
   * CUDA FP8 (E4M3 per-tensor activations, per-tensor or per-channel E4M3 weights) on
     ``torch._scaled_mm``; CUDA INT8 W8A8 on ``torch._int_mm`` (M > 16, K and N multiples of 8,
     checked at run time with a dequantize fallback); weight-only INT4 blocks: unpacked and
     dequantized inside the graph, which inductor fuses into the matmul's prologue. Linears that
     read one quantized activation (q/k/v, gate/up) become one GEMM over their concatenated
     weights, with one activation quantization.
5. **Inductor** (``compile_fx``) compiles the result, with the settings of ``mode=`` (inductor's
   modes: ``"reduce-overhead"`` replays CUDA graphs, ``"max-autotune"`` tunes the GEMMs) or of
   ``options={"cudagraphs": True}``. The graph it gets reads only the inputs it uses, and AOT
   treats its installed weights and constants as static inputs (CUDA graphs read them in place).

Everything without a fast kernel keeps dynamo's fake-quant arithmetic, which inductor fuses
into neighbouring kernels (*fused fake quant*); each such quantizer is logged on
``logging.getLogger("qpass.compile")`` with the reason, and :func:`report` lists every
quantizer's decision.

Numerics: the kernels accumulate in int32 (oneDNN, ``_int_mm``) or fp32 (``_scaled_mm``) and
quantize activations with ``x * (1 / scale)`` where fake quant multiplies by
``max_bound / amax``; outputs match the fake-quant model to about 1e-3 relative (cosine
> 0.999), not bit for bit. Scales are constants of the compiled code: recalibrating or
toggling quantizers needs ``torch._dynamo.reset()`` (dynamo guards on module state, but
not on amax values).
"""

from __future__ import annotations

import ctypes
import logging
import operator
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qpass.export.compile_options import BACKEND_OPTIONS, MODES, backend_options, inductor_patches  # noqa: F401

log = logging.getLogger("qpass.compile")

__all__ = ["qpass_backend", "register", "report", "Decision"]

BACKEND_NAME = "qpass"


# ---------------------------------------------------------------------------------------------
# decisions and the report
# ---------------------------------------------------------------------------------------------
@dataclass
class Decision:
    quantizer: str
    kernel: str | None  # "onednn_int8", "scaled_mm_fp8", "int_mm_int8", "int4_dequant_fused" or None
    reason: str = ""

    @property
    def fell_back(self) -> bool:
        return self.kernel is None


_DECISIONS: "weakref.WeakKeyDictionary[nn.Module, Decision]" = weakref.WeakKeyDictionary()


@dataclass
class CompileReport:
    decisions: list[Decision] = field(default_factory=list)

    @property
    def lowered(self) -> list[Decision]:
        return [d for d in self.decisions if not d.fell_back]

    @property
    def fell_back(self) -> list[Decision]:
        return [d for d in self.decisions if d.fell_back]

    def __str__(self) -> str:
        lines = [f"qpass compile: {len(self.lowered)} quantizers on low-precision kernels, "
                 f"{len(self.fell_back)} on fused fake quant"]
        for d in self.decisions:
            lines.append(f"  {d.quantizer}: {d.kernel or 'fake quant'}" + (f" ({d.reason})" if d.reason else ""))
        return "\n".join(lines)


def report(model: nn.Module) -> CompileReport:
    """What the "qpass" backend did with each enabled quantizer of ``model`` it compiled."""
    from qpass.nn.tensor_quantizer import TensorQuantizer

    out = CompileReport()
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            d = _DECISIONS.get(m)
            if d is not None:
                out.decisions.append(Decision(name, d.kernel, d.reason))
    return out


# ---------------------------------------------------------------------------------------------
# step 2: quantizer regions in dynamo's graph
# ---------------------------------------------------------------------------------------------
@dataclass
class _Region:
    q: nn.Module
    path: str  # the quantizer's module path in the traced graph (= the model's path)
    nodes: list[fx.Node]
    src: fx.Node | None = None
    out: fx.Node | None = None
    problem: str = ""
    param: nn.Parameter | None = None  # a cached weight's parameter (src is None then)


def _object_by_id(key: str, expected: type):
    """The live module dynamo recorded by id in nn_module_stack (alive: the model holds it)."""
    try:
        obj = ctypes.cast(int(key), ctypes.py_object).value
    except (ValueError, TypeError):  # pragma: no cover
        return None
    return obj if isinstance(obj, expected) else None


def _innermost_quantizer(node: fx.Node):
    from qpass.nn.tensor_quantizer import TensorQuantizer

    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, (path, typ) in reversed(list(stack.items())):
        if isinstance(typ, type) and issubclass(typ, TensorQuantizer):
            return key, path
    return None


def _module_path(dynamo_path: str) -> str:
    """The model's module path of a quantizer from dynamo's source expression:
    "L['self'].__dict__['_qpass_state'].graphs[...][0].gm.fc1.input_quantizer" -> "fc1.input_quantizer",
    "getattr(L[...].gm.encoder.layer, '0').attention.input_quantizer" -> "encoder.layer.0.attention.input_quantizer"."""
    i = dynamo_path.rfind(".gm.")
    p = dynamo_path[i + 4:] if i >= 0 else dynamo_path
    p = re.sub(r", '([^']*)'\)", r".\1", p)
    return p.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")


def _traced_modules(gm: fx.GraphModule) -> list[nn.Module]:
    """The qpass traced GraphModules dynamo inlined (recorded by id in nn_module_stack)."""
    found: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        for key, (path, typ) in (node.meta.get("nn_module_stack") or {}).items():
            if key not in found and isinstance(typ, type) and issubclass(typ, fx.GraphModule) and path.endswith(".gm"):
                obj = _object_by_id(key, fx.GraphModule)
                if obj is not None:
                    found[key] = obj
    return list(found.values())


def _cached_weight_regions(gm: fx.GraphModule, example_inputs) -> list[_Region]:
    """Weight quantizers dynamo did not trace: TensorQuantizer caches a parameter's fake-quant
    weight after an eager no-grad forward, and dynamo then reads that cached tensor as a graph
    input. Such a placeholder becomes the quantizer's region output; its source is the parameter."""
    from qpass.nn.tensor_quantizer import TensorQuantizer

    cached: dict[int, tuple] = {}
    for tgm in _traced_modules(gm):
        for path, q in tgm.named_modules():
            if isinstance(q, TensorQuantizer) and q._weight_cache is not None:
                w = q._weight_cache[0]()
                if isinstance(w, nn.Parameter):
                    cached[id(q._weight_cache[2])] = (q, path, w)
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, v in zip(placeholders, example_inputs):
        hit = cached.get(id(v)) if isinstance(v, torch.Tensor) else None
        if hit is not None:
            q, path, w = hit
            r = _Region(q, path, [], src=None, out=n)
            r.param = w
            out.append(r)
    return out


def _regions(gm: fx.GraphModule, example_inputs) -> list[_Region]:
    from qpass.nn.tensor_quantizer import TensorQuantizer

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = {n: v for n, v in zip(placeholders, example_inputs)}
    by_key: dict[str, _Region] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        hit = _innermost_quantizer(node)
        if hit is None:
            continue
        key, path = hit
        r = by_key.get(key)
        if r is None:
            q = _object_by_id(key, TensorQuantizer)
            if q is None:
                continue
            r = by_key[key] = _Region(q, _module_path(path), [])
        r.nodes.append(node)
    for r in by_key.values():
        inside = set(r.nodes)
        own = [t for t in (r.q._buffers.get(k) for k in ("_amax", "_pre_quant_scale", "_bias_value")) if t is not None]
        srcs = []
        for n in r.nodes:
            for a in n.all_input_nodes:
                if a in inside or a in srcs:
                    continue
                if a.op == "placeholder" and any(value_of.get(a) is t for t in own):
                    continue
                srcs.append(a)
        outs = [n for n in r.nodes if any(u not in inside for u in n.users)]
        if len(srcs) != 1 or len(outs) != 1:
            r.problem = (f"the quantizer is called {'more than once' if len(outs) > 1 else 'in a form'} "
                         "the backend cannot isolate in the captured graph")
            continue
        r.src, r.out = srcs[0], outs[0]
    return list(by_key.values())


# ---------------------------------------------------------------------------------------------
# eligibility
# ---------------------------------------------------------------------------------------------
_LINEAR_OPS = {torch.ops.aten.linear.default, torch.nn.functional.linear}
_CONV_OPS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
             torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}


def _consumers(r: _Region) -> list[fx.Node]:
    return [u for u in r.out.users if u.op != "output"]


def _kernel_for(r: _Region, is_weight: bool, device: str) -> tuple[str | None, str]:
    """(kernel name, reason) for one quantizer; kernel None means fused fake quant."""
    from qpass.formats.floating import E4M3
    from qpass.formats.integer import IntFormat
    from qpass.passes.lower import _granularity, format_token

    q = r.q
    if r.problem:
        return None, r.problem
    if q.pre_quant_scale is not None and is_weight:
        pass  # lowering folds it into the weight
    spec = q.spec
    if q._attrs.get("type") == "dynamic" or spec.is_dynamic:
        return None, f"dynamic format {q.describe()} has no fast kernel here"
    if q.amax is None:
        return None, "not calibrated (no amax)"
    tok = format_token(spec)
    users = _consumers(r)
    mm_users = [u for u in users if u.target in _LINEAR_OPS or u.target in _CONV_OPS]
    if not users or len(mm_users) != len(users):
        return None, "its result does not feed a linear/conv layer"
    if r.param is not None:
        val = r.param
    else:
        val = r.src.meta.get("example_value")
        if val is None:
            val = r.src.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None, f"input dtype {val.dtype}"
    if device == "cpu":
        if not (isinstance(spec.fmt, IntFormat) and spec.fmt.num_bits == 8 and not spec.fmt.unsigned):
            return None, f"{q.describe()} has no CPU kernel (CPU: int8 W8A8 via oneDNN)"
        if isinstance(val, torch.Tensor) and val.dtype != torch.float32:
            return None, f"CPU int8 kernels take float32 inputs, got {val.dtype}"
        if is_weight:
            g = _granularity(spec, tuple(val.shape)) if isinstance(val, torch.Tensor) else None
            if g != ("channel", 0):
                return None, f"weight granularity {g} (oneDNN int8 needs per-output-channel weights)"
        elif spec.axis is not None or spec.block_sizes:
            return None, "per-channel/block activations have no int8 kernel"
        return "onednn_int8", ""
    if device == "cuda":
        if tok == "e4m3":
            if is_weight:
                g = _granularity(spec, tuple(val.shape))
                if not all(u.target in _LINEAR_OPS for u in users) or g not in (("tensor",), ("channel", 0)):
                    return None, "FP8 _scaled_mm needs per-tensor or per-row weights of a linear layer"
            elif spec.axis is not None or spec.block_sizes:
                return None, "FP8 activations must be per tensor for _scaled_mm"
            return "scaled_mm_fp8", ""
        if tok in ("int8", "int8n"):
            if not all(u.target in _LINEAR_OPS for u in users):
                return None, "CUDA int8 _int_mm covers linear layers only"
            if is_weight:
                g = _granularity(spec, tuple(val.shape))
                if g not in (("tensor",), ("channel", 0)):
                    return None, f"weight granularity {g}"
            elif spec.axis is not None or spec.block_sizes:
                return None, "per-channel/block activations have no int8 kernel"
            return "int_mm_int8", ""
        if is_weight and tok in ("int4", "int4n", "uint4") and spec.block_sizes:
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
            g = _granularity(spec, shape) if shape else None
            if g is None or g[0] != "block" or g[1] != len(shape) - 1 or shape[-1] % g[2] or shape[-1] % 2:
                return None, (f"int4 blocks {g} do not tile the last axis of the {shape} weight (the in-graph "
                              "unpacking needs blocks along K that divide an even K)")
            return "int4_dequant_fused", ""
        return None, f"{q.describe()} has no CUDA kernel in qpass"
    return None, f"no low-precision kernels for device {device!r}"


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
def _device_of(example_inputs) -> str:
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def _install(root: nn.Module, target: str, value) -> None:
    from qpass.passes.lower import _install as install

    install(root, target, value)


def qpass_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None, **kwargs):
    """The dynamo backend: lower quantizers with fast kernels, rewrite, compile with inductor.
    ``options``: see :data:`BACKEND_OPTIONS`; ``mode``: one of :data:`MODES` (torch.compile
    accepts a mode or options, not both: ``options={"cudagraphs": True}`` is reduce-overhead)."""
    from torch._inductor.compile_fx import compile_fx

    opts = backend_options(options)
    patches = inductor_patches(mode, opts)  # a bad mode is an error before anything is compiled
    prepared = prepare(gm, example_inputs)
    if prepared is None:
        with torch._inductor.config.patch(patches):
            return compile_fx(gm, example_inputs)
    lowered, keep, const_outputs, device = prepared
    if device == "cpu":
        from qpass.export.compile_fuse import fuse_shared_input_linears
        from qpass.export.compile_rewrite import rewrite_cpu_int8

        rewrite_cpu_int8(lowered)
        if opts["fuse_shared_inputs"]:
            for group in fuse_shared_input_linears(lowered):
                log.debug("qpass compile: one int8 GEMM for %s (shared input)", ", ".join(group))
    elif device == "cuda":
        from qpass.export.compile_rewrite import rewrite_cuda

        rewrite_cuda(lowered, fp8_fast_accum=opts["fp8_fast_accum"], fuse=opts["fuse_shared_inputs"])
    from qpass.export.compile_rewrite import no_inplace_qlinear_sum

    lowered.recompile()
    inputs = [example_inputs[i] for i in keep]
    if device == "cpu":
        patches["freezing"] = True  # the x86 int8 lowering packs the weights at compile time
    with torch._inductor.config.patch(patches), no_inplace_qlinear_sum():
        compiled = compile_fx(lowered, inputs)
    return _Adapter(compiled, keep, const_outputs)


class _Adapter:
    """Dynamo's calling convention (all its inputs, all its outputs) around the compiled graph."""

    def __init__(self, compiled, keep, const_outputs):
        self.compiled = compiled
        self.keep = keep
        self.const_outputs = const_outputs  # {output index: constant} (weight-cache side outputs)
        # without this, dynamo would treat the adapter as a plain callable: fine either way
        self._boxed_call = False

    def __call__(self, *args):
        outs = self.compiled(*[args[i] for i in self.keep])
        if not self.const_outputs:
            return outs
        single = not isinstance(outs, (tuple, list))
        outs = [outs] if single else list(outs)
        for i in sorted(self.const_outputs):
            outs.insert(i, self.const_outputs[i])
        return tuple(outs)


def prepare(gm: fx.GraphModule, example_inputs):
    """(lowered GraphModule, kept input indices, constant outputs, device) or None when the
    graph has no quantizer with a fast kernel."""
    from qpass.passes.insert_quantizers import QUANTIZER_META
    from qpass.passes.lower import lower_graph

    device = _device_of(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = dict(zip(placeholders, example_inputs))
    regions = _regions(gm, example_inputs) + _cached_weight_regions(gm, example_inputs)
    chosen = []
    for r in regions:
        is_weight = r.param is not None or (r.src is not None and isinstance(value_of.get(r.src), nn.Parameter))
        kernel, reason = _kernel_for(r, is_weight, device)
        _DECISIONS[r.q] = Decision(r.path, kernel, reason)
        if kernel is None:
            log.info("qpass compile: %s falls back to fused fake quant: %s", r.path, reason)
        else:
            log.debug("qpass compile: %s -> %s", r.path, kernel)
            chosen.append(r)
    if not chosen:
        return None

    # a copy of dynamo's graph with each chosen region as one call_module node
    g = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    region_of_out = {r.out: r for r in chosen}
    skip = {n for r in chosen for n in r.nodes}
    params: dict[int, str] = {}
    keep: list[int] = []
    param_nodes: dict[fx.Node, fx.Node] = {}
    cached_ph = {r.out: r for r in chosen if r.param is not None}
    for r in cached_ph.values():
        target = params.setdefault(id(r.param), f"_qpass_param_{len(params)}")
        if not hasattr_path(root, target):
            _install(root, target, r.param)
    for i, n in enumerate(placeholders):
        v = example_inputs[i]
        if n in cached_ph:
            continue
        if isinstance(v, nn.Parameter):
            target = params.setdefault(id(v), f"_qpass_param_{len(params)}")
            if not hasattr_path(root, target):
                _install(root, target, v)
            param_nodes[n] = n
        else:
            keep.append(i)
    kept_ph = {placeholders[i] for i in keep}
    for n in placeholders:  # every placeholder first: lowering inserts constants after the last one
        if n in kept_ph:
            env[n] = g.node_copy(n)
    for n in placeholders:  # cached fake-quant weights: the quantizer of their parameter
        if n in cached_ph:
            r = cached_ph[n]
            _install(root, r.path, r.q)
            w = g.get_attr(params[id(r.param)])
            w.meta["val"] = n.meta.get("example_value")
            node = g.call_module(r.path, (w,))
            node.meta[QUANTIZER_META] = r.path
            node.meta["val"] = n.meta.get("example_value")
            env[n] = node
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            break
        if n in skip and n not in region_of_out:
            continue
        if n in region_of_out:
            r = region_of_out[n]
            if r.path not in _installed_quantizers(root):
                _install(root, r.path, r.q)
            src = _get(env, g, r.src, params, value_of)
            node = g.call_module(r.path, (src,))
            node.meta[QUANTIZER_META] = r.path
            ex = n.meta.get("example_value")
            node.meta["val"] = ex
            env[n] = node
            continue
        env[n] = g.node_copy(n, lambda a: _get(env, g, a, params, value_of))
    # outputs: a chosen weight quantizer's result among dynamo's outputs is the weight cache
    # TensorQuantizer keeps: return the fake-quant weight as a constant instead (the compiled
    # dequantize then has one user, which the kernel patterns need)
    flat_out = out_node.args[0]
    single = not isinstance(flat_out, (tuple, list))
    items = [flat_out] if single else list(flat_out)
    const_outputs = {}
    new_items = []
    for i, a in enumerate(items):
        r = region_of_out.get(a) if isinstance(a, fx.Node) else None
        if r is not None and r.src is not None and isinstance(value_of.get(r.src), nn.Parameter):
            with torch.no_grad():
                const_outputs[i] = r.q._fake_quant(value_of[r.src])
            continue
        new_items.append(fx.map_arg(a, lambda x: _get(env, g, x, params, value_of)))
    g.output(tuple(new_items) if not single or const_outputs else new_items[0])
    pre = fx.GraphModule(root, g, class_name="QpassCompilePre")
    lowered = lower_graph(pre)
    lowered.graph.eliminate_dead_code()
    for n in lowered.graph.nodes:  # lower_graph copies example values under "val"; inductor wants both
        if "val" not in n.meta and "example_value" in n.meta:
            n.meta["val"] = n.meta["example_value"]
    # inputs the lowering left unused (the chosen quantizers' amax buffers, now constants) are
    # dropped: each would cost a per-call argument and, with CUDA graphs, a copy per replay
    lowered_ph = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    assert len(lowered_ph) == len(keep), "lowering changed the graph's inputs"
    for n in lowered_ph:
        if not n.users:
            lowered.graph.erase_node(n)
    keep = [i for i, n in zip(keep, lowered_ph) if n.users]
    # a dynamo graph: AOT then counts the parameters and buffers installed above as static
    # inputs (CUDA graphs read them in place instead of copying them on every replay)
    if "dynamo_compile_id" in gm.meta:
        lowered.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
    lowered.recompile()
    return lowered, keep, const_outputs, device


def hasattr_path(root: nn.Module, target: str) -> bool:
    obj = root
    for p in target.split("."):
        if not hasattr(obj, p):
            return False
        obj = getattr(obj, p)
    return True


def _installed_quantizers(root: nn.Module) -> set[str]:
    return {name for name, _ in root.named_modules()}


def _get(env, g: fx.Graph, a: fx.Node, params, value_of) -> fx.Node:
    got = env.get(a)
    if got is not None:
        return got
    v = value_of.get(a)
    if isinstance(v, nn.Parameter):
        node = g.get_attr(params[id(v)])
        node.meta["val"] = a.meta.get("example_value")
        env[a] = node
        return node
    raise KeyError(f"node {a.name} is not available")  # pragma: no cover


_REGISTERED = False


def register() -> None:
    """Register the "qpass" dynamo backend (idempotent; done on ``import qpass``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if BACKEND_NAME not in _BACKENDS:
        register_backend(name=BACKEND_NAME)(qpass_backend)
    _REGISTERED = True


register()
