"""Lowering: a quantized GraphModule becomes a graph of pure quantize/dequantize ops.

Every back end (ONNX today) consumes the one lowered graph this pass produces from a
traced graph of a quantized model (its ops are defined in :mod:`qpass.passes.qdq_ops`):

* an **enabled activation quantizer** (per tensor, 8-bit integer or FP8) becomes
  ``qpass::quantize_per_tensor`` followed by ``qpass::dequantize_per_tensor``
  (preceded by a ``mul`` when it has a ``pre_quant_scale``);
* an **enabled weight quantizer** reading a parameter is folded: the weight is stored in
  its low-precision form as a buffer (int8 / float8 codes; int4 packed two per byte as
  uint8; FP4 packed as ``torch.float4_e2m1fn_x2``) with its scales, behind one
  ``qpass::dequantize_per_tensor`` / ``dequantize_per_channel`` / ``dequantize_blockwise``
  / ``dequantize_nvfp4`` op. The float weight is dropped unless something else reads it;
* a **disabled** quantizer (or one that does not quantize, as during calibration) is removed,
  except for its ``pre_quant_scale``, which its forward applies anyway (a ``mul``);
* quantizers reading the same tensor with the same numerics (a shared-input group:
  q/k/v, gate/up) are merged into one quantize/dequantize pair feeding all readers;
* an **affine** quantizer (ModelOpt's ``bias`` attribute, static) becomes ``sub(x, b)``, its
  quantize/dequantize ops (or ``qpass::fake_quant``), then ``add(., b)``: the arithmetic of its
  forward. ONNX export folds the pair into an integer zero point where ``b`` is a whole
  number of steps (``zero_point``), for ONNX Runtime; a dynamic bias has no lowered form;
* anything else (per-channel or block activations, MX formats, dynamic NVFP4 activations,
  quantizer sequences) becomes ``qpass::fake_quant`` - exact in PyTorch, and refused by the
  exporters with an :class:`~qpass.errors.ExportError` naming the node and the format.

Each op carries two scales: ``scale``, the float32 dequantization step a back end stores
(ONNX ``y_scale``), and ``ref`` - the calibrated ``amax`` for quantize ops, the scale
:meth:`QuantSpec.quantize` returned for dequantize ops - from which the PyTorch kernels
reproduce the fake-quant arithmetic bit for bit through :mod:`qpass.formats` (ModelOpt
multiplies by ``max_bound / amax`` where ONNX divides by ``scale``; the two can differ by
one code at a rounding boundary, so only back ends use ``scale``). The lowered graph
therefore computes exactly the fake-quant model's outputs. Op order is the same as in the
fake-quant graph; the one difference is that merged shared-input quantizers run once.

Codes are always the format's own signed/unsigned integers with zero point 0 (or float
codes); a back end that wants another encoding (ONNX Runtime's uint8 activations with zero
point 128) derives it in its translation.
"""

from __future__ import annotations

import json
import math

import torch
from torch import fx, nn

from qpass.errors import ExportError
from qpass.formats import QuantSpec
from qpass.graph.trace import GUARDS_FN
from qpass.passes.insert_quantizers import QUANTIZER_META, SLOT_META
from qpass.passes.qdq_ops import OPS, _is_nvfp4, format_token, spec_of_token
from qpass.passes.rules import EXPERTS

__all__ = ["LOWERED_META", "OPS", "format_token", "lower_graph", "spec_of_token"]

LOWERED_META = "qpass_lowered"  # node.meta key on lowered ops: {"quantizer", "format", "kind"}

# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
def _backend_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float32 step a back end stores; a zero step (an all-zero channel, amax 0) becomes
    1 for weights (codes are 0 there) and the smallest normal float for activations."""
    s = scale.detach().float()
    return torch.where(s > 0, s, torch.finfo(torch.float32).tiny)


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.cse: dict[tuple, fx.Node] = {}
        self.names: set[str] = set()

    # attributes ------------------------------------------------------------------------------
    def get_attr(self, target: str) -> fx.Node:
        node = self.attrs.get(target)
        if node is None:
            value = _fetch(self.gm, target)
            _install(self.root, target, value)
            node = self.graph.get_attr(target)
            self.attrs[target] = node
        return node

    def constant(self, base: str, suffix: str, value: torch.Tensor) -> fx.Node:
        target = f"{base}.{suffix}"
        n = 1
        while target in self.attrs:
            n += 1
            target = f"{base}.{suffix}{n}"
        _install(self.root, target, value.detach().clone().contiguous())
        node = self.graph.get_attr(target)
        self.attrs[target] = node
        return node

    def call(self, op, args, meta: dict) -> fx.Node:
        node = self.graph.call_function(op, tuple(args))
        node.meta[LOWERED_META] = meta
        return node


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _install(root: nn.Module, target: str, value) -> None:
    *path, leaf = target.split(".")
    mod = root
    for p in path:
        sub = mod._modules.get(p)
        if sub is None:
            sub = nn.Module()
            mod.add_module(p, sub)
        mod = sub
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(leaf, value)
    else:
        setattr(mod, leaf, value)


def _is_quantizer_node(node: fx.Node) -> bool:
    return node.op == "call_module" and QUANTIZER_META in node.meta


def lower_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A lowered copy of a quantized GraphModule (see the module docstring).

    Parameters are shared with the model (not copied); folded codes and scales are new
    buffers named ``<quantizer path>.codes`` / ``.scale`` / ...; the calling convention
    (flat input tensors, the model's output structure) is the traced graph's.
    """
    from qpass.nn.tensor_quantizer import ExpertQuantizers, SequentialQuantizer, TensorQuantizer, iter_tensor_quantizers

    b = _Builder(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module" and not _is_quantizer_node(node):
            if node.target == GUARDS_FN or not node.users:
                continue  # torch.export's input-guard check; the back end re-derives guards
            raise ExportError(f"node '{node.name}' calls module '{node.target}', which lowering cannot inline")
        if _is_quantizer_node(node) and (isinstance(gm.get_submodule(node.target), ExpertQuantizers)
                                         or EXPERTS.is_weight_slot(node.meta.get(SLOT_META, ""))):
            # fused MoE experts' weights [E, out, in]: stored low-precision behind one dequantize op
            # where every expert's format is the same and the stacked codes give the fake-quant
            # values exactly (see _lower_experts), else as their fake-quant float values
            q = gm.get_submodule(node.target)
            src, transposed = node.args[0], False
            if src.op == "call_function" and src.target is torch.ops.aten.transpose.int:  # [E, in, out] experts
                src, transposed = src.args[0], True
            if src.op != "get_attr":
                raise ExportError(f"node '{node.name}': expert weight quantizer '{node.target}' does not read a parameter")
            if q.is_enabled:
                with torch.no_grad():
                    w = _fetch(gm, src.target)
                    w = w.mT.contiguous() if transposed else w
                    b.env[node] = _lower_experts(b, node, q, w)
            else:
                b.env[node] = b.env[node.args[0]] if transposed else _LazyAttr(src.target)
            continue
        if _is_quantizer_node(node):
            q = gm.get_submodule(node.target)
            src = b.env[node.args[0]]
            members = iter_tensor_quantizers(q)
            out = src
            if isinstance(q, SequentialQuantizer) and sum(_active(m) for m in members) > 1:
                for m in members:
                    if _active(m):
                        out = _lower_fallback(b, node, m, out)
                    elif m.pre_quant_scale is not None:
                        out = _lower_scale_only(b, node, m, out)
            else:
                for m in members:
                    if isinstance(m, TensorQuantizer) and _active(m):
                        out = _lower_one(b, node, m, node.args[0], out)
                    elif isinstance(m, TensorQuantizer) and m.pre_quant_scale is not None:
                        out = _lower_scale_only(b, node, m, out)
            b.env[node] = out
            continue
        if node.op == "get_attr":
            b.env[node] = _LazyAttr(node.target)
            continue
        b.env[node] = b.graph.node_copy(node, lambda n: _resolve(b, n))
    b.graph._codegen = gm.graph._codegen
    b.graph.eliminate_dead_code()
    b.graph.lint()
    lowered = fx.GraphModule(b.root, b.graph, class_name="QpassLowered")
    return lowered


class _LazyAttr:
    __slots__ = ("target",)

    def __init__(self, target):
        self.target = target


def _resolve(b: _Builder, n: fx.Node) -> fx.Node:
    v = b.env[n]
    if isinstance(v, _LazyAttr):
        v = b.get_attr(v.target)
        b.env[n] = v
    return v


def _active(q) -> bool:
    return q.is_enabled and q._if_quant


def _meta(node: fx.Node, q, kind: str) -> dict:
    return {"quantizer": node.meta[QUANTIZER_META], "slot": node.meta.get(SLOT_META), "node": node.name,
            "format": q.describe(), "kind": kind}


def _lower_one(b: _Builder, node: fx.Node, q, old_src: fx.Node, src) -> fx.Node:
    if q._attrs.get("bias"):
        return _lower_affine(b, node, q, _resolve_src(b, src))
    # a parameter: fold it (src is already a get_attr node when another op read the same
    # parameter first, e.g. an embedding tied to lm_head)
    if old_src.op == "get_attr" and (isinstance(src, _LazyAttr) or (isinstance(src, fx.Node) and src.op == "get_attr")):
        return _lower_weight(b, node, q, old_src.target)
    return _lower_activation(b, node, q, _resolve_src(b, src))


def _lower_affine(b: _Builder, node: fx.Node, q, src: fx.Node) -> fx.Node:
    """``sub(x, b)`` -> the quantizer's own lowering without the bias -> ``add(., b)``."""
    cfg = q._attrs["bias"]
    amax = q.amax
    if cfg.get("type", "static") == "dynamic" or q.bias_value is None or (amax is None and q.spec.needs_amax):
        raise ExportError(
            f"quantizer '{node.meta[QUANTIZER_META]}' (node '{node.name}', {q.describe()}) has "
            + ("a dynamic affine bias, which has no lowered form" if cfg.get("type", "static") == "dynamic"
               else "no calibrated bias and amax: calibrate the model before lowering or exporting it"))
    val = node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    bias = q.effective_bias(q.bias_value, amax).to(dtype)
    key = ("affine", src, q.describe(), None if amax is None else amax.detach().cpu().numpy().tobytes(),
           bias.cpu().numpy().tobytes(), None if q.pre_quant_scale is None else q.pre_quant_scale.cpu().numpy().tobytes())
    if key in b.cse:
        return b.cse[key]
    x = src
    if q.pre_quant_scale is not None:
        x = b.graph.call_function(torch.ops.aten.mul.Tensor, (x, b.constant(node.target, "pre_quant_scale", q.pre_quant_scale)))
    bias_n = b.constant(node.target, "bias", bias)
    x = b.graph.call_function(torch.ops.aten.sub.Tensor, (x, bias_n))
    unbiased = _Unbiased(q)
    if amax is not None and not q.spec.is_dynamic and not q.spec.block_sizes and q.spec.axis is None:
        out = _lower_activation(b, node, unbiased, x)
    else:
        out = _fallback_call(b, node, unbiased, x)
    out = b.graph.call_function(torch.ops.aten.add.Tensor, (out, bias_n))
    b.cse[key] = out
    return out


class _Unbiased:
    """A quantizer seen without its bias and pre_quant_scale (the affine lowering applies them)."""

    def __init__(self, q) -> None:
        self._q = q
        self.spec, self.amax, self.pre_quant_scale = q.spec, q.amax, None

    def describe(self) -> str:
        return self._q.describe()


def _resolve_src(b: _Builder, src):
    if isinstance(src, _LazyAttr):
        return b.get_attr(src.target)
    return src


def _lower_weight(b: _Builder, node: fx.Node, q, target: str) -> fx.Node:
    key = ("w", node.target, target)
    if key in b.cse:
        return b.cse[key]
    dequantized = getattr(q, "dequantized", None)  # real_quantize: the graph's weight is a placeholder
    w = dequantized().detach() if dequantized is not None else _fetch(b.gm, target).detach()
    pqs = q.pre_quant_scale
    if pqs is not None:
        w = w * pqs.to(w.dtype)
    spec = q.spec
    amax = q.amax
    base = node.target
    tok = format_token(spec)
    out = None
    if _is_nvfp4(spec) and w.dim() >= 1:
        codes, (bscale, gscale) = spec.quantize(w, spec.with_global(amax, q.global_amax))
        packed = codes.view(torch.float4_e2m1fn_x2)
        args = [b.constant(base, "codes", packed), b.constant(base, "block_scale", bscale),
                b.constant(base, "global_scale", gscale.reshape(()).float()), spec.block_size, list(w.shape), w.dtype]
        out = b.call(OPS["dequantize_nvfp4"], args, _meta(node, q, "weight"))
    elif tok is not None and not spec.is_dynamic:
        codes, scale = spec.quantize(w, amax)
        kind = _granularity(spec, w.shape)
        if kind is not None:
            out = _emit_weight(b, node, q, tok, kind, codes, scale, w)
    if out is None:  # exact, but no dedicated op: back ends refuse it
        out = _fallback_call(b, node, q, b.get_attr(target))
    b.cse[key] = out
    return out


def _lower_experts(b: _Builder, node: fx.Node, q, w: torch.Tensor) -> fx.Node:
    """Expert weights ``w`` [E, out, in] under per-expert quantizers (an ExpertQuantizers) or one
    quantizer on the whole tensor: codes and scales behind one dequantize op over all experts, when
    the experts share one 8- or 4-bit integer/FP8 format whose per-expert granularity has a 3-D form
    (per tensor -> per channel on the expert axis; per output row or blocks along the input ->
    blocks along the last axis). The stacked codes are checked against the fake-quant weight, bit
    for bit; anything else is stored as that fake-quant weight (float)."""
    from qpass.nn.tensor_quantizer import ExpertQuantizers, TensorQuantizer

    want = q(w).detach()
    members = list(q) if isinstance(q, ExpertQuantizers) else None
    out = None
    if members is not None and all(type(m) is TensorQuantizer and _active(m) for m in members):
        spec = members[0].spec
        tok = format_token(spec)
        kind = _granularity(spec, w.shape[1:])
        uniform = all(m.spec == spec and m.amax is not None for m in members)
        if uniform and _is_nvfp4(spec):
            out = _lower_nvfp4_experts(b, node, members, w, want)
        elif uniform and tok is not None and not spec.is_dynamic and kind is not None:
            amax = [m.amax.detach().float() for m in members]
            if kind == ("tensor",):
                spec3, amax3, kind3 = spec_of_token(tok, axis=0), torch.stack(amax).reshape(-1, 1, 1), ("channel", 0)
            elif kind in (("channel", 0),) or (kind[0] == "block" and kind[1] == 1):
                size = w.shape[2] if kind[0] == "channel" else kind[2]
                spec3, amax3, kind3 = (spec_of_token(tok, block_axis=2, block_size=size), torch.cat(amax),
                                       ("block", 2, size))
            else:
                spec3 = None
            if spec3 is not None:
                try:
                    codes, scale = spec3.quantize(w, amax3)
                    exact = torch.equal(spec3.dequantize(codes, scale, w.dtype, list(w.shape)), want)
                except (RuntimeError, ValueError):  # an amax layout the 3-D spec does not take
                    exact = False
                if exact:
                    out = _emit_weight(b, node, members[0], tok, kind3, codes, scale, w)
    elif members is None and type(q) is TensorQuantizer and _active(q) and q.amax is not None:
        # one quantizer on the whole [E, out, in] tensor (GPT-OSS, Llama 4): its own 3-D granularity
        spec = q.spec
        tok, kind = format_token(spec), _granularity(spec, w.shape)
        lowerable = kind is not None and (kind[0] == "channel" or (kind[0] == "block" and kind[1] == 2))
        if tok is not None and not spec.is_dynamic and not _is_nvfp4(spec) and lowerable:
            codes, scale = spec.quantize(w, q.amax)
            if torch.equal(spec.dequantize(codes, scale, w.dtype, list(w.shape)), want):
                out = _emit_weight(b, node, q, tok, kind, codes, scale, w)
    if out is None:
        out = b.constant(node.target, "weight", want)
    return out


def _lower_nvfp4_experts(b: _Builder, node: fx.Node, members: list, w: torch.Tensor, want: torch.Tensor):
    """NVFP4 expert weights [E, out, in]: each expert's E2M1 codes and E4M3 block scales as its own
    quantizer makes them, stacked, with one global scale per expert; None unless their dequantized
    values are the fake-quant weight, bit for bit."""
    codes, block, glob = [], [], []
    for m, we in zip(members, w):
        c, (bs, gs) = m.spec.quantize(we, m.spec.with_global(m.amax, m.global_amax))
        codes.append(c)
        block.append(bs)
        glob.append(gs.reshape(()).float())
    codes, block, glob = torch.stack(codes), torch.stack(block), torch.stack(glob)
    spec = members[0].spec
    size = spec.block_size
    got = OPS["dequantize_nvfp4"](codes.view(torch.float4_e2m1fn_x2), block, glob, size, list(w.shape), w.dtype)
    if not torch.equal(got, want):
        return None
    base = node.target
    args = [b.constant(base, "codes", codes.view(torch.float4_e2m1fn_x2)), b.constant(base, "block_scale", block),
            b.constant(base, "global_scale", glob), size, list(w.shape), w.dtype]
    return b.call(OPS["dequantize_nvfp4"], args, _meta(node, members[0], "weight"))


def _emit_weight(b: _Builder, node: fx.Node, q, tok: str, kind: tuple, codes, scale, w: torch.Tensor):
    """The dequantize op of a weight's codes and scales for granularity ``kind`` (see
    :func:`_granularity`), or None where none applies (4-bit blocks off the packed last axis)."""
    if kind[0] == "block" and kind[1] != w.dim() - 1 and tok in ("int4", "int4n", "uint4", "e2m1"):
        return None  # packing runs along the last axis only
    base = node.target
    common = [b.constant(base, "codes", codes)]
    if kind == ("tensor",):
        common += [b.constant(base, "scale", _backend_scale(scale).reshape(())), b.constant(base, "ref", scale), tok]
        return b.call(OPS["dequantize_per_tensor"], common + [w.dtype], _meta(node, q, "weight"))
    if kind[0] == "channel":
        common += [b.constant(base, "scale", _backend_scale(scale).reshape(-1)), b.constant(base, "ref", scale), tok]
        return b.call(OPS["dequantize_per_channel"], common + [kind[1], w.dtype], _meta(node, q, "weight"))
    axis, size = kind[1], kind[2]
    sshape = list(w.shape)
    sshape[axis] = math.ceil(sshape[axis] / size)
    common += [b.constant(base, "scale", _backend_scale(scale).reshape(sshape)), b.constant(base, "ref", scale), tok]
    return b.call(OPS["dequantize_blockwise"], common + [axis, size, list(w.shape), w.dtype], _meta(node, q, "weight"))


def _granularity(spec: QuantSpec, shape) -> tuple | None:
    """('tensor',), ('channel', axis) or ('block', axis, size) for a static spec on ``shape``."""
    bs = spec.block_sizes
    if bs:
        if all(v is None for v in bs.values()):
            listed = {k % len(shape) for k in bs}
            kept = [i for i in range(len(shape)) if i not in listed]
            return ("channel", kept[0]) if len(kept) == 1 else None
        sized = {k: v for k, v in bs.items() if v}
        if len(sized) == 1 and len(bs) == 1:
            (k, v), = sized.items()
            return ("block", k % len(shape), int(v))
        return None
    if spec.axis is None:
        return ("tensor",)
    axes = (spec.axis,) if isinstance(spec.axis, int) else tuple(spec.axis)
    if len(axes) == 1:
        return ("channel", axes[0] % len(shape))
    return None


def _lower_activation(b: _Builder, node: fx.Node, q, src: fx.Node) -> fx.Node:
    spec = q.spec
    amax = q.amax
    pqs = q.pre_quant_scale
    tok = format_token(spec)
    per_tensor = (not spec.is_dynamic and not spec.block_sizes and spec.axis is None
                  and tok is not None and spec.fmt.total_bits == 8)
    if not per_tensor or amax is None:
        if amax is None and spec.needs_amax and per_tensor:
            raise ExportError(
                f"quantizer '{node.meta[QUANTIZER_META]}' (node '{node.name}', {q.describe()}) has no amax: "
                "calibrate the model before lowering or exporting it")
        if pqs is not None:
            src = b.graph.call_function(torch.ops.aten.mul.Tensor, (src, b.constant(node.target, "pre_quant_scale", pqs)))
        return _fallback_call(b, node, q, src)
    key = ("a", src, tok, amax.detach().float().reshape(()).item(),
           None if pqs is None else (tuple(pqs.shape), pqs.detach().cpu().numpy().tobytes()))
    if key in b.cse:
        return b.cse[key]
    base = node.target
    x = src
    if pqs is not None:
        x = b.graph.call_function(torch.ops.aten.mul.Tensor, (x, b.constant(base, "pre_quant_scale", pqs)))
    amax_c = amax.detach().float().reshape(())
    _, scale = spec.quantize(amax_c.new_zeros(1), amax_c)
    scale_n = b.constant(base, "scale", _backend_scale(scale).reshape(()))
    val = node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    codes = b.call(OPS["quantize_per_tensor"], [x, scale_n, b.constant(base, "amax", amax_c), tok],
                   _meta(node, q, "activation"))
    out = b.call(OPS["dequantize_per_tensor"], [codes, scale_n, b.constant(base, "ref", scale.reshape(())), tok, dtype],
                 _meta(node, q, "activation"))
    b.cse[key] = out
    return out


def _lower_scale_only(b: _Builder, node: fx.Node, q, src) -> fx.Node:
    """A quantizer that does not quantize still multiplies by its ``pre_quant_scale``, as its
    forward does (weight-only AWQ: the input quantizer is disabled, the weights carry the
    inverse scale)."""
    x = _resolve_src(b, src)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    pqs = q.pre_quant_scale.detach()
    if isinstance(val, torch.Tensor):
        pqs = pqs.to(val.dtype)
    return b.graph.call_function(torch.ops.aten.mul.Tensor, (x, b.constant(node.target, "pre_quant_scale", pqs)))


def _fallback_call(b: _Builder, node: fx.Node, q, src: fx.Node) -> fx.Node:
    amax = q.amax
    has = amax is not None
    a = b.constant(node.target, "amax", amax.detach().float() if has else torch.zeros(()))
    attrs = json.dumps(q.spec.to_attributes(), default=list)
    return b.call(OPS["fake_quant"], [src, a, attrs, has], _meta(node, q, "fake_quant"))


def _lower_fallback(b: _Builder, node: fx.Node, q, src) -> fx.Node:
    return _fallback_call(b, node, q, _resolve_src(b, src))
