"""SVDQuant's low-rank branch in the traced graphs.

After ``svdquant`` a quantized Linear keeps ``W - B A`` as its (quantized) weight and the rank-r
factors in its weight quantizer, as ModelOpt's ``SVDQuantTensorQuantizer`` does
(``_svdquant_lora_a`` = A [r, in], ``_svdquant_lora_b`` = B [out, r]). Its output becomes

    linear(Q_in(x * pqs), Q_w(W - B A), bias) + (x * pqs) A^T B^T

(``pqs``: the input quantizer's ``pre_quant_scale``, when AWQ kept one). :func:`sync_lora_branches`
adds those unquantized ``mul``/``linear``/``linear``/``add`` nodes after every such Linear of a
graph and removes the branches of quantizers that no longer hold factors, so a graph always
matches its quantizers: it runs after ``svdquant``, after a smoothing re-calibration restored the
weights, and on every newly traced graph. The added nodes carry the Linear's module stack
(layerwise calibration keeps them in its block) and a :data:`BRANCH_META` mark.
"""

from __future__ import annotations

import torch
from torch import fx, nn

BRANCH_META = "qpass_lora_branch"
LORA_A, LORA_B = "_svdquant_lora_a", "_svdquant_lora_b"


def lora_of(q) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A weight quantizer's (A, B) factors, or None."""
    buffers = getattr(q, "_buffers", {})
    a, b = buffers.get(LORA_A), buffers.get(LORA_B)
    return None if a is None or b is None else (a, b)


def set_lora(q: nn.Module, factors) -> None:
    """Install (A, B) as ``q``'s buffers, or drop them (None)."""
    for name, value in zip((LORA_A, LORA_B), factors or (None, None)):
        if value is None:
            q._buffers.pop(name, None)
        else:
            q._buffers[name] = value.detach().clone()
    q._bump()


def _module(gm: fx.GraphModule, target: str):
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _remove(graph: fx.Graph) -> bool:
    marked = [n for n in graph.nodes if n.meta.get(BRANCH_META)]
    for n in marked:
        if n.meta[BRANCH_META] == "out":
            n.replace_all_uses_with(n.args[0])
    for n in reversed(marked):
        graph.erase_node(n)
    return bool(marked)


def _add(gm: fx.GraphModule) -> bool:
    graph = gm.graph
    added = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default or len(node.args) < 2:
            continue
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "call_module" and w.target.endswith("weight_quantizer")):
            continue
        wq = _module(gm, w.target)
        if wq is None or lora_of(wq) is None:
            continue
        x = node.args[0]
        pqs_target = None
        if isinstance(x, fx.Node) and x.op == "call_module" and x.target.endswith("input_quantizer"):
            iq = _module(gm, x.target)
            if iq is not None and iq._buffers.get("_pre_quant_scale") is not None:
                pqs_target = f"{x.target}._pre_quant_scale"
            x = x.args[0]
        meta = {"nn_module_stack": node.meta.get("nn_module_stack", {}), BRANCH_META: "node"}
        with graph.inserting_after(node):
            out = graph.call_function(torch.ops.aten.add.Tensor, (node, node))  # second arg set below
        with graph.inserting_before(out):
            xs = x
            if pqs_target is not None:
                xs = graph.call_function(torch.ops.aten.mul.Tensor, (x, graph.get_attr(pqs_target)))
            h = graph.call_function(torch.ops.aten.linear.default, (xs, graph.get_attr(f"{w.target}.{LORA_A}")))
            y = graph.call_function(torch.ops.aten.linear.default, (h, graph.get_attr(f"{w.target}.{LORA_B}")))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        out.args = (node, y)
        for n in _between(node, out):  # the branch: get_attr, mul, linear, linear
            n.meta.update(meta)
        out.meta.update(meta, **{BRANCH_META: "out"})
        if "val" in node.meta:
            out.meta["val"] = node.meta["val"]
        added = True
    return added


def _between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes strictly between ``first`` and ``last`` in graph order."""
    out, n = [], first.next
    while n is not last:
        out.append(n)
        n = n.next
    return out


def sync_graph(gm: fx.GraphModule) -> None:
    """Remove ``gm``'s branches, then add one for each Linear whose weight quantizer holds factors."""
    changed = _remove(gm.graph)
    changed = _add(gm) or changed
    if changed:
        gm.graph.lint()
        gm.recompile()


def sync_lora_branches(state) -> None:
    """:func:`sync_graph` on every graph the model has traced."""
    for traced in [t for group in state.graphs.values() for t in group]:
        sync_graph(traced.gm)
