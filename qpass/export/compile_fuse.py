"""One int8 GEMM for linear layers that read the same quantized activation (CPU backend).

After :func:`qpass.export.compile_rewrite.rewrite_cpu_int8`, projections that share an input
(q/k/v of attention, gate/up of a gated MLP - the groups ``qpass.passes.share_inputs`` gives one
input amax) read one ``dequantize_per_tensor`` node. Each would become its own oneDNN
``qlinear_pointwise`` call over the same uint8 activation. This pass concatenates their int8
weights (per-output-channel, axis 0), weight scales and biases into one constant and emits one
``linear`` whose output columns are sliced back to the original layers: one GEMM with a wider N,
which packs and runs faster than several narrow ones (and pays the per-call overhead once).

The numbers are unchanged: each output column is computed from the same activation codes,
weight codes, scales and bias as before, and int32 accumulation is exact.
"""

from __future__ import annotations

import torch
from torch import fx

import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops

from qpass.passes.lower import _fetch

__all__ = ["fuse_shared_input_linears", "replace_with_slices"]

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
_LINEAR = (aten.linear.default, torch.nn.functional.linear)


def _const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _fetch(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _weight_parts(gm: fx.GraphModule, linear: fx.Node):
    """(codes [N, K] int8, scales [N], qmin, bias [N] or None) of an int8 per-channel linear
    reading a per-tensor dequantized activation; None when the linear has another form."""
    if len(linear.args) < 2 or linear.kwargs:
        return None
    x, w = linear.args[0], linear.args[1]
    b = linear.args[2] if len(linear.args) > 2 else None
    if not (isinstance(x, fx.Node) and x.target is qd.dequantize_per_tensor.default):
        return None
    if not (isinstance(w, fx.Node) and w.target is qd.dequantize_per_channel.default and len(w.users) == 1):
        return None
    codes_n, scale_n, zp_n, axis, qmin, qmax, dtype = w.args
    codes, scales, zps = _const(gm, codes_n), _const(gm, scale_n), _const(gm, zp_n)
    if codes is None or scales is None or zps is None or axis != 0 or dtype != torch.int8 or codes.dim() != 2:
        return None
    if bool(zps.ne(0).any()):
        return None
    bias = None
    if b is not None:
        bias = _const(gm, b)
        if bias is None or bias.dim() != 1:
            return None
    val = linear.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return None
    return codes, scales.reshape(-1), (qmin, qmax), bias


def _layer_name(linear: fx.Node) -> str:
    """The layer's module path, read from its folded weight constant's target
    ("<layer>.weight_quantizer.codes"); the node name when it has another form."""
    target = linear.args[1].args[0].target
    return target.rsplit(".weight_quantizer", 1)[0] if ".weight_quantizer" in target else linear.name


def replace_with_slices(g: fx.Graph, out: fx.Node, members: list[fx.Node], sizes: list[int]) -> None:
    """Each of ``members`` replaced by its slice of ``out``'s last axis (the fused node's output
    columns, in member order); call it where nodes are being inserted before the members."""
    start = 0
    for member, n in zip(members, sizes):
        piece = g.call_function(aten.slice.Tensor, (out, -1, start, start + n))
        if isinstance(out.meta.get("val"), torch.Tensor):
            piece.meta["val"] = aten.slice.Tensor(out.meta["val"], -1, start, start + n)
        start += n
        member.replace_all_uses_with(piece)


def fuse_shared_input_linears(gm: fx.GraphModule) -> list[list[str]]:
    """Fuse, in place, int8 linears that read the same dequantized activation. Returns the
    groups fused, each as its layers' module paths."""
    from qpass.export.compile_rewrite import _new_const

    g = gm.graph
    groups: dict[tuple, list[tuple[fx.Node, tuple]]] = {}
    for node in g.nodes:
        if node.op == "call_function" and node.target in _LINEAR:
            parts = _weight_parts(gm, node)
            if parts is not None:
                groups.setdefault((node.args[0], parts[2], parts[0].shape[1]), []).append((node, parts))
    fused = []
    for (x, (qmin, qmax), _k), members in groups.items():
        if len(members) < 2:
            continue
        linears = [m[0] for m in members]
        codes = torch.cat([m[1][0] for m in members])
        scales = torch.cat([m[1][1].float() for m in members])
        sizes = [m[1][0].shape[0] for m in members]
        has_bias = any(m[1][3] is not None for m in members)
        bias = torch.cat([m[1][3].float() if m[1][3] is not None else codes.new_zeros(n, dtype=torch.float32)
                          for m, n in zip(members, sizes)]) if has_bias else None
        base = f"_qpass_fused.{linears[0].name}"
        codes_n = _new_const(gm, f"{base}_codes", codes)
        scale_n = _new_const(gm, f"{base}_scale", scales)
        zp_n = _new_const(gm, f"{base}_zero_point", torch.zeros(codes.shape[0], dtype=torch.int64))
        bias_n = _new_const(gm, f"{base}_bias", bias) if has_bias else None
        first = linears[0]
        with g.inserting_before(first):
            w = g.call_function(qd.dequantize_per_channel.default, (codes_n, scale_n, zp_n, 0, qmin, qmax, torch.int8))
            w.meta["val"] = codes.new_empty(codes.shape, dtype=torch.float32)
            out = g.call_function(aten.linear.default, (x, w, bias_n) if has_bias else (x, w))
            val = first.meta["val"]
            out.meta["val"] = val.new_empty((*val.shape[:-1], codes.shape[0]))
            replace_with_slices(g, out, linears, sizes)
        fused.append([_layer_name(lin) for lin in linears])
        for lin in linears:
            wdq = lin.args[1]
            g.erase_node(lin)
            if not wdq.users:
                g.erase_node(wdq)
    if fused:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return fused
