"""Make a lowered graph survive torch.onnx's own re-trace and decompositions.

torch.onnx (``dynamo=True``) traces the graph it is given again and then decomposes it with
its own table, and ONNX Runtime's optimizer rewrites what it loads. Three things that are valid
in the graph torch.export gave qpass break there; :func:`legalize_for_onnx` rewrites them, with
the same values, before the export:

- **Strides.** torch.export records ``view`` wherever the fake tensor at that point was
  viewable, and strides come from each op's meta kernel at trace time. A fused op can have
  other strides once decomposed: ``scaled_dot_product_attention`` on the CPU returns its
  output in ``[batch, tokens, heads, dim]`` memory order, so HF's
  ``attn.transpose(1, 2).reshape(b, t, -1)`` traces to a ``view``; torch.onnx's math
  decomposition returns contiguous ``[batch, heads, tokens, dim]``, and that ``view`` fails
  ("Cannot view a tensor with shape ..."). T5, Swin and BEiT failed so. A reshaping op
  (``view``, ``reshape``, ...) whose input comes, through view ops only, from a non-view op
  whose traced output is not contiguous gets a contiguous ``clone`` of that input first:
  the re-trace and the decomposition then agree on its strides. ONNX has no strides; the
  clone is an Identity that torch.onnx's optimizer removes (the ONNX graph of a model that
  exported before is node for node the same).
- **Mixed dtypes.** ``rsub(int64_mask, 1.0)`` (XLNet's and BigBird's ``1 - mask``) promotes to
  float32 in PyTorch, but torch.onnx's dispatcher finds no overload of ``sub`` for a float
  scalar and an integer tensor. Arithmetic whose output dtype differs from an input tensor's
  gets that input cast first (what type promotion does anyway).
- **Dequantize, then unsqueeze.** See :func:`_unsqueeze_codes`.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

#: elementwise arithmetic whose tensor inputs type promotion converts to the output dtype
_ARITHMETIC = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
}


#: ops that re-read memory in a new shape: the ones a stride change makes fail
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.unflatten.int}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _inherit(new: fx.Node, src: fx.Node, val) -> None:
    """``new`` takes ``src``'s node metadata (module stack, ...), with its own traced value."""
    new.meta.update({k: v for k, v in src.meta.items() if k != "val"})
    new.meta["val"] = val


def _is_view(op) -> bool:
    schema = getattr(op, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _non_contiguous_output(node: fx.Node) -> bool:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or val.layout != torch.strided:
        return False
    try:
        return not bool(val.is_contiguous())
    except Exception:  # noqa: BLE001 - a stride condition on symbols: leave it as it is
        return False


def legalize_for_onnx(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite ``gm`` in place (see the module docstring); returns how many nodes of each kind
    were changed, and recompiles it."""
    graph = gm.graph
    counts = {"clone": 0, "cast": 0, "unsqueeze": 0}
    suspect: set[fx.Node] = set()  # strides may differ once torch.onnx decomposes their producer
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target in _ARITHMETIC:
            counts["cast"] += _cast_inputs(graph, node)
        if node.target in _RESHAPES and node.args[0] in suspect:
            src = node.args[0]
            with graph.inserting_before(node):
                clone = graph.call_function(aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
            val = _val(src)
            _inherit(clone, src, val.contiguous() if isinstance(val, torch.Tensor) else val)
            node.replace_input_with(src, clone)
            counts["clone"] += 1
        elif _is_view(node.target):
            if node.args and node.args[0] in suspect:
                suspect.add(node)
        elif _non_contiguous_output(node):
            suspect.add(node)
    counts["unsqueeze"] = _unsqueeze_codes(graph)
    if any(counts.values()):
        graph.lint()
        gm.recompile()
    return counts


def _cast_inputs(graph: fx.Graph, node: fx.Node) -> int:
    out = _val(node)
    if not isinstance(out, torch.Tensor):
        return 0
    done = 0
    args = list(node.args)
    for i, arg in enumerate(args):
        val = _val(arg)
        if not isinstance(val, torch.Tensor) or val.dtype == out.dtype:
            continue
        with graph.inserting_before(node):
            cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": out.dtype})
        _inherit(cast, arg, val.to(out.dtype))
        args[i] = cast
        done += 1
    node.args = tuple(args)
    return done


def _unsqueeze_codes(graph: fx.Graph) -> int:
    """``dequantize_per_tensor(int codes) -> unsqueeze`` becomes ``unsqueeze(codes) -> dequantize``: the
    same values (one scale for the tensor), and the DequantizeLinear then feeds its MatMul directly.
    Batched MoE experts quantize each token's activation as [tokens, channels] and unsqueeze it to
    a column for their bmm; ONNX Runtime's Q/DQ propagation fails on a DequantizeLinear followed by
    an Unsqueeze ("output_dtype INT8 does not match y_zero_point type UINT8")."""
    from qpass.passes.qdq_ops import OPS

    done = 0
    for node in list(graph.nodes):
        dq = node.args[0] if node.op == "call_function" and node.target is aten.unsqueeze.default else None
        if not isinstance(dq, fx.Node) or dq.target is not OPS["dequantize_per_tensor"] or len(dq.users) != 1:
            continue
        if not str(dq.args[3]).startswith(("int", "uint")):
            continue  # ONNX's Unsqueeze takes no float8 before opset 24; ONNX Runtime runs no FP8 on the CPU
        codes = dq.args[0]
        with graph.inserting_before(node):
            column = graph.call_function(aten.unsqueeze.default, (codes, node.args[1]))
            moved = graph.call_function(dq.target, (column, *dq.args[1:]), dict(dq.kwargs))
        codes_val = _val(codes)
        _inherit(column, node, codes_val.unsqueeze(node.args[1]) if isinstance(codes_val, torch.Tensor) else None)
        moved.meta.update(dq.meta)
        moved.meta["val"] = _val(node)
        node.replace_all_uses_with(moved)
        graph.erase_node(node)
        graph.erase_node(dq)
        done += 1
    return done
