"""Give a Linear whose forward multiplies by its transposed weight the ``aten.linear`` node of a plain one.

Some ``nn.Linear`` subclasses compute ``x @ self.weight.T (+ self.bias)`` in their own forward
(HF Falcon's ``FalconLinear``). torch.export then records ``matmul(x, numpy_T(W))`` and an
``add``, not ``aten.linear``, so the Linear rule would find nothing to quantize there. ModelOpt
quantizes these layers (it registers FalconLinear as a Linear), and so does qpass:
:func:`linear_from_matmul` rewrites the pattern to ``linear(x, W[, b])`` before quantizers are
placed, when the matmul belongs to that Linear (its innermost owning module) and reads exactly
its own weight, transposed. Every later pass (calibration, smoothing, lowering, ONNX) then sees
an ordinary Linear. The product is the same BLAS call on the same operands.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qpass.graph.trace import fetch_attr

aten = torch.ops.aten

_MATMULS = (aten.matmul.default, aten.mm.default)


def _transposed_2d(node) -> fx.Node | None:
    """The 2-D tensor ``node`` transposes (``.T``, ``.t()``, ``transpose(0, 1)``, ``permute(1, 0)``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    src = node.args[0]
    val = getattr(src, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default):
        return src
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return src
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return src
    return None


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        obj = fetch_attr(gm, node.target)
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def linear_from_matmul(gm: fx.GraphModule, model: nn.Module) -> int:
    """Rewrite ``matmul(x, W.T) [+ b]`` of a Linear's own weight (and bias) to ``aten.linear``;
    returns how many were rewritten. The graph is linted, not recompiled."""
    from qpass.passes.insert_quantizers import owner_path

    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or len(node.args) != 2:
            continue
        x, wt = node.args
        w = _transposed_2d(wt)
        try:
            owner = model.get_submodule(owner_path(node))
        except AttributeError:
            continue
        if w is None or not isinstance(owner, nn.Linear) or _param(gm, w) is not owner.weight:
            continue
        if not isinstance(x, fx.Node) or _param(gm, x) is not None:
            continue
        args = (x, w)
        users = list(node.users)
        bias_add = None
        if owner.bias is not None and len(users) == 1 and users[0].target is aten.add.Tensor \
                and users[0].args[0] is node and _param(gm, users[0].args[1]) is owner.bias:
            bias_add = users[0]
            args = (x, w, bias_add.args[1])
        with graph.inserting_before(node if bias_add is None else bias_add):
            linear = graph.call_function(aten.linear.default, args)
        replaced = bias_add if bias_add is not None else node
        linear.meta.update(replaced.meta)
        linear.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        replaced.replace_all_uses_with(linear)
        if bias_add is not None:
            graph.erase_node(bias_add)
        graph.erase_node(node)
        if not wt.users:
            graph.erase_node(wt)
        done += 1
    if done:
        graph.lint()
    return done
