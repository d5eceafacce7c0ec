"""Place quantizer call_module nodes where a rule of the rule set matches.

The pass is mechanism only: a callback (``get_quantizer``) supplies the
quantizer module for an (owner, slot) pair, already configured, or None to
leave the slot out.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qpass.graph.trace import fetch_attr
from qpass.passes.rules import EXPERTS, OUT, REGISTER_ONLY, OpRule, RuleSet, fused_expert_params
from qpass.nn.tensor_quantizer import bump_quantizer_epoch

aten = torch.ops.aten

# Ops that do not change which tensor an attention probability is.
_PASSTHROUGH = {
    aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.slice.Tensor,  # GPT-OSS drops its attention-sink column from the probabilities
}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}

GetQuantizer = Callable[[str, nn.Module, str], "nn.Module | None"]

QUANTIZER_META = "qpass_quantizer"  # node.meta key: FQN of the quantizer the node calls
SLOT_META = "qpass_slot"
READS_META = "qpass_reads"  # the op node the quantizer feeds (or reads, for outputs)


def owner_path(node: fx.Node) -> str:
    """Innermost owning module path of a node ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", path)
    path = re.sub(r"@\d+$", "", path)
    return path


def _from_softmax(node) -> bool:
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "call_function" and node.target in _SOFTMAX:
            return True
        if node.op == "call_function" and node.target in _PASSTHROUGH:
            node = node.args[0]
            seen += 1
            continue
        return False
    return False


def _is_param(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _from_param(node, layout_ops) -> bool:
    """A parameter, or a view/gather/transpose of one (MoE experts' weights picked per token):
    not an activation, whatever the op reading it."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "get_attr":
            return True
        if node.op != "call_function" or node.target not in layout_ops or not node.args:
            return False
        node, seen = node.args[0], seen + 1
    return False


def _register(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_path, _, leaf = target.rpartition(".")
    parent = gm
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if parent._modules.get(leaf) is not module:
        # Drop any plain tensors torch.export unlifted at this path (quantizer buffers).
        if leaf in parent.__dict__:
            delattr(parent, leaf)
        parent._modules[leaf] = module
        bump_quantizer_epoch()  # execution graphs re-check which quantizers they skip


class InsertQuantizers(PassBase):
    def __init__(self, model: nn.Module, rule_set: RuleSet, get_quantizer: GetQuantizer) -> None:
        super().__init__()
        self.model = model
        self.rule_set = rule_set
        self.get_quantizer = get_quantizer
        self.placed: list[str] = []

    def _rule_for(self, gm: fx.GraphModule, node: fx.Node, owner: nn.Module) -> OpRule | None:
        for rule in self.rule_set.op_rules:
            if node.target not in rule.ops:
                continue
            if not rule.matches(owner):
                continue
            if rule.weight_arg is not None:
                w = node.args[rule.weight_arg] if len(node.args) > rule.weight_arg else None
                if not _is_param(gm, w) or fetch_attr(gm, w.target) is not getattr(owner, "weight", None):
                    continue
            if any(_from_param(node.args[i], EXPERTS.layout_ops) for i in rule.activation_args if i < len(node.args)):
                continue
            if rule.after_softmax is not None and _from_softmax(node.args[0]) != rule.after_softmax:
                continue
            return rule
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            path = owner_path(node)
            try:
                owner = self.model.get_submodule(path)
            except AttributeError:
                continue
            rule = self._rule_for(gm, node, owner)
            if rule is None:
                continue
            for slot in rule.slots:
                quantizer = self.get_quantizer(path, owner, slot.name)
                if quantizer is None:
                    continue
                if slot.arg is REGISTER_ONLY:
                    if quantizer.is_enabled:
                        warnings.warn(
                            f"quantizer '{path}.{slot.name}' is enabled but {node.target} computes its "
                            "probabilities internally, so it quantizes nothing; use an eager attention "
                            "implementation (matmul/softmax/matmul) to quantize them", stacklevel=2)
                    continue
                target = f"{path}.{slot.name}" if path else slot.name
                _register(gm, target, quantizer)
                self._place(graph, node, slot.arg, target, slot.name)
                self.placed.append(target)
                modified = True
        if self.rule_set.expert_rule is not None:
            modified |= self._place_experts(gm)
        for path, readers in self.unquantized_weights(gm).items():
            owner = self.model.get_submodule(path)
            fix = ("its weight is computed by a parametrization (weight norm, say): remove it first with "
                   "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
                   if "weight" in getattr(owner, "parametrizations", {}) else
                   "make its forward call torch.nn.functional.linear/conv on its own weight")
            warnings.warn(
                f"'{path}' ({type(owner).__name__}) has enabled quantizers, but the traced graph reads its weight "
                f"through {', '.join(readers)}, which no qpass rule matches: its weight and input stay "
                f"unquantized. To quantize it, {fix}; or disable its quantizers", stacklevel=2)
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def unquantized_weights(self, gm: fx.GraphModule) -> dict[str, list[str]]:
        """Layers whose enabled weight quantizer this graph did not place although the graph reads
        their weight (directly, or through a parametrization such as weight norm): {module path:
        the ops reading it}. A layer the graph never reads (dead code, another input structure's
        branch) is not listed."""
        weighted = [r for r in self.rule_set.module_rules if "weight_quantizer" in r.slots]
        placed = set(self.placed)
        out: dict[str, set] = {}
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            path, _, leaf = node.target.rpartition(".")
            if leaf != "weight":
                path, sep, _ = node.target.partition(".parametrizations.weight.")
                if not sep:
                    continue
            try:
                owner = self.model.get_submodule(path)
            except AttributeError:
                continue
            q = owner._modules.get("weight_quantizer")
            target = f"{path}.weight_quantizer" if path else "weight_quantizer"
            if q is None or not q.is_enabled or target in placed or not any(r.matches(owner) for r in weighted):
                continue
            out.setdefault(path, set()).update(str(u.target) for u in node.users)
        return {p: sorted(r) for p, r in out.items()}

    def _place_experts(self, gm: fx.GraphModule) -> bool:
        """Fused MoE expert parameters: the per-expert weight quantizers on the parameter, the input
        quantizer on the activation of each matmul the parameter reaches (see :class:`ExpertRule`)."""
        rule = self.rule_set.expert_rule
        modified = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in list(gm.graph.nodes):
            if node.op != "get_attr":
                continue
            path, _, leaf = node.target.rpartition(".")
            try:
                owner = self.model.get_submodule(path)
            except AttributeError:
                continue
            if leaf not in fused_expert_params(owner) or fetch_attr(gm, node.target) is not getattr(owner, leaf):
                continue
            matmuls = sorted(_expert_matmuls(node, rule), key=lambda pair: order[pair[0]])
            if not matmuls:
                continue  # read for something else (a norm of the weights, say): nothing to quantize
            for slot in (rule.weight_slot(owner, leaf), leaf + rule.input_suffix):
                quantizer = self.get_quantizer(path, owner, slot)
                if quantizer is None:
                    continue
                target = f"{path}.{slot}" if path else slot
                _register(gm, target, quantizer)
                if rule.is_weight_slot(slot):
                    # before the first reader, not after the get_attr (export hoists those to the top,
                    # outside the block that owns the parameter)
                    first = min(node.users, key=order.__getitem__)
                    users = list(node.users)
                    with gm.graph.inserting_before(first):
                        src = node
                        if rule.transposed(owner):  # the quantizer sees [E, out, in]
                            src = gm.graph.call_function(aten.transpose.int, (node, -2, -1))
                        q = gm.graph.call_module(target, (src,))
                        out = q if src is node else gm.graph.call_function(aten.transpose.int, (q, -2, -1))
                    for user in users:
                        user.replace_input_with(node, out)
                    q.meta.update({QUANTIZER_META: target, SLOT_META: slot, READS_META: matmuls[0][0],
                                   "nn_module_stack": matmuls[0][0].meta.get("nn_module_stack", {})},
                                  val=node.meta.get("val"))
                else:
                    for mm, act in matmuls:
                        column = _column_of(mm.args[act])
                        if column is None:
                            self._place(gm.graph, mm, act, target, slot)
                        else:  # bmm(W [N, out, in], x.unsqueeze(-1)): blocks run along x's channels
                            self._place(gm.graph, column, 0, target, slot, reads=mm)
                self.placed.append(target)
                modified = True
        return modified

    @staticmethod
    def _place(graph: fx.Graph, node: fx.Node, arg: int, target: str, slot: str, reads: fx.Node | None = None) -> None:
        """The quantizer on ``node``'s input ``arg`` (or its output: ``OUT``); ``reads``: the weighted
        op it quantizes for, when that is not ``node`` itself."""
        reads = node if reads is None else reads
        meta = {QUANTIZER_META: target, SLOT_META: slot, READS_META: reads,
                "nn_module_stack": reads.meta.get("nn_module_stack", {})}
        if arg == OUT:
            with graph.inserting_after(node):
                q = graph.call_module(target, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
            q.meta.update(meta, val=node.meta.get("val"))
        else:
            src = node.args[arg]
            with graph.inserting_before(node):
                q = graph.call_module(target, (src,))
            q.meta.update(meta, val=getattr(src, "meta", {}).get("val"))
            node.update_arg(arg, q)


def _column_of(act) -> fx.Node | None:
    """``act`` when it is ``x.unsqueeze(-1)`` read by nothing else: batched experts multiply each
    token's weights by its activation as a column (``bmm(W [N, out, in], x [N, in, 1])``). The
    experts' input quantizer then goes on ``x`` [N, in], so block and per-token formats group the
    activation's channels as they do for every other layer, not its size-1 last axis."""
    if not isinstance(act, fx.Node) or act.op != "call_function" or act.target is not aten.unsqueeze.default:
        return None
    val = act.meta.get("val")
    if not isinstance(val, torch.Tensor) or len(act.users) != 1 or act.args[1] not in (-1, val.dim() - 1):
        return None
    return act


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


def _expert_matmuls(param: fx.Node, rule) -> list[tuple[fx.Node, int]]:
    """(matmul, index of its activation operand) for every matmul-like op that ``param`` reaches
    through layout ops only."""
    out, frontier, seen = [], [param], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in rule.matmul_ops or _op_name(user.target) in rule.matmul_op_names:
                weight_args = [i for i, a in enumerate(user.args[:2]) if a is node]
                acts = [i for i in range(min(2, len(user.args))) if i not in weight_args
                        and isinstance(user.args[i], fx.Node)]
                if weight_args and acts:
                    out.append((user, acts[0]))
            elif user.target in rule.layout_ops and user.args and user.args[0] is node:
                frontier.append(user)
    return out


def quantizer_nodes(gm: fx.GraphModule):
    """The quantizer call_module nodes qpass placed in a graph."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and QUANTIZER_META in n.meta]
