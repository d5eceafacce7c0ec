"""Sensitivity scores of every (module, candidate format).

``gradient``: one forward with quantization off and one backward per score batch serve every
candidate. A graph rewrite puts a :class:`ScoreTap` after each searched weighted op of every
traced graph; the tap registers a tensor hook on the op's output Y. Parameters are frozen
while scoring, so the backward computes activation gradients only. When the backward reaches
Y, the hook recomputes the op once per candidate with that candidate's quantizers (input
quantizer on the op's input, cached fake-quantized weight) and adds
``sum((grad_Y * (Y_quant - Y))**2)``. Nothing is kept between forward and backward beyond what
autograd already holds. The taps are removed afterwards.

``kl_div``: label-free; per (group, format), only that group quantized, the KL divergence of
the output distribution from the unquantized one, summed over the score batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.auto_quantize.solver import AutoQuantizeError
from qpass.passes.insert_quantizers import QUANTIZER_META, READS_META, SLOT_META, quantizer_nodes
from qpass.passes.rules import EXPERTS

TAP_META = "qpass_auto_quantize_tap"


class ScoreTap(nn.Module):
    """Identity on the op output Y; registers the scoring hook when Y needs a gradient."""

    def __init__(self, scorer: "GradientScorer", path: str, target, i_in: int, i_w: int, layout=()) -> None:
        super().__init__()
        self.scorer, self.path, self.target, self.i_in, self.i_w = scorer, path, target, i_in, i_w
        self.layout = tuple(layout)  # (op, constant args) from the quantized weight to the op's operand

    def operand(self, qweight: torch.Tensor) -> torch.Tensor:
        """A candidate's quantized weight as the op reads it (an expert weight: transposed, say)."""
        for op, args in self.layout:
            qweight = op(qweight, *args)
        return qweight

    def forward(self, y, x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return y
        if not y.requires_grad:
            # Nothing upstream of Y needs a gradient (parameters are frozen while scoring), so
            # Y becomes a leaf: its gradient is the same, and no weight gradient is ever computed.
            y = y.detach().requires_grad_(True)
        y.register_hook(self.scorer.hook(self, y.detach(), x.detach(), args, kwargs))
        return y


def _is_linear(target) -> bool:
    return target in (torch.ops.aten.linear.default, F.linear)


class GradientScorer:
    """Accumulates the scores. ``low_precision`` (``fast_scores``): the score batches' forward and
    backward run under bfloat16 autocast, and each Linear's candidate outputs are bfloat16 GEMMs
    (float32 accumulation) rounded like Y, so ``Y_quant - Y`` is exact in bfloat16 wherever the
    two are within a factor of 2; about 2x faster on CPUs with native bfloat16. The rounding of
    the activations and gradients moves the scores a little: on 8-layer SmolLM2, by at most 3%
    (W4A8) and 7.6% (FP8, whose output errors are the smallest), 0.6% and 2% on average, and the
    chosen recipe was the same. Without autocast (another caller), float32 outputs are compared
    with bfloat16 GEMMs of the quantized operands, the bias subtracted in float32."""

    def __init__(self, slots: dict, n_formats: int, low_precision: bool = False, groups=(), units=None) -> None:
        self.slots = slots  # path -> {format index: Slot}
        self.units = units or {}  # path -> Unit (fused expert parameters among them)
        self.scores = {p: [0.0] * n_formats for p in slots}
        self.bad_grad: str | None = None
        self.seen: set[str] = set()
        self.low_precision = low_precision
        self.share = _shared_input_keys(slots, groups)  # (path, format) -> key of an identical input quantizer
        self.memo: dict = {}  # (input storage, format, share key) -> (input, quantized input); one batch

    def quantized_input(self, path: str, f: int, slot, x: torch.Tensor, low: bool) -> torch.Tensor:
        """``slot.input_quantizer(x)`` (as bfloat16 when ``low``), computed once per batch for the
        members of a shared-input group (q/k/v, gate/up) whose input quantizers are identical."""
        share = None if slot.input_quantizer is None else self.share.get((path, f), path)  # None: x itself
        key = (x.data_ptr(), tuple(x.shape), x.stride(), f if share else None, share, low)
        hit = self.memo.get(key)
        if hit is None:
            xq = x if slot.input_quantizer is None else slot.input_quantizer(x)
            hit = self.memo[key] = (x, xq.bfloat16() if low else xq)  # holding x keeps its storage unique
        return hit[1]

    @staticmethod
    def _low_weight(slot):
        return slot.qweight_low if slot.qweight_low is not None else slot.qweight.bfloat16()

    def hook(self, tap: ScoreTap, y, x, args, kwargs):
        def on_grad(g):
            self.seen.add(tap.path)
            if not bool(torch.isfinite(g.sum())):  # NaN/Inf anywhere makes the sum non-finite
                self.bad_grad = tap.path
                return
            with torch.no_grad():
                low = (self.low_precision and y.dtype in (torch.float32, torch.bfloat16) and _is_linear(tap.target)
                       and not kwargs)
                bias = args[2] if low and len(args) > 2 else None
                if low and y.dtype == torch.bfloat16:
                    # Y from a bfloat16 (autocast) forward: the candidate output is rounded the same
                    # way, so Y_quant - Y is exact in bfloat16 wherever the two are within 2x.
                    bias = None if bias is None else bias.to(y.dtype)
                    for f, slot in self.slots[tap.path].items():
                        out = F.linear(self.quantized_input(tap.path, f, slot, x, True), self._low_weight(slot), bias)
                        d = out.sub_(y).mul_(g)
                        # per-row dot products (float32 accumulation, bfloat16 results), summed in float32
                        self.scores[tap.path][f] += float(torch.linalg.vecdot(d, d).sum(dtype=torch.float32))
                    return
                g, yf = g.float(), y.float()
                if bias is not None:  # compare without the bias: Y - b
                    yf = yf - bias.float()
                for f, slot in self.slots[tap.path].items():
                    xin = self.quantized_input(tap.path, f, slot, x, low)
                    if low:
                        out = F.linear(xin, self._low_weight(slot))
                    else:
                        a = list(args)
                        a[tap.i_in], a[tap.i_w] = xin, tap.operand(slot.qweight)
                        out = tap.target(*a, **kwargs)
                    # a fresh output: in place is safe; bfloat16 promotes to float32 in the subtraction
                    diff = out.sub_(yf) if out.dtype == torch.float32 else torch.sub(out, yf)
                    self.scores[tap.path][f] += float(torch.linalg.vector_norm(diff.mul_(g)) ** 2)
        return on_grad


def _same_quantizer(a, b) -> bool:
    """Two standalone input quantizers that quantize every input identically."""
    from qpass.graph.quantized_model import iter_tensor_quantizers

    if a is None or b is None or type(a) is not type(b):
        return False
    qa, qb = iter_tensor_quantizers(a), iter_tensor_quantizers(b)
    if len(qa) != len(qb):
        return False
    for x, y in zip(qa, qb):
        state = lambda t: (t._attrs, t._disabled, t._if_quant, t.describe())  # noqa: E731
        if state(x) != state(y):
            return False
        for name in ("_amax", "_pre_quant_scale"):
            u, v = x._buffers.get(name), y._buffers.get(name)
            if (u is None) != (v is None) or (u is not None and (u.shape != v.shape or not torch.equal(u, v))):
                return False
    return True


def _shared_input_keys(slots: dict, groups) -> dict:
    """(path, format) -> the first member of its group with an identical input quantizer."""
    keys = {}
    for members in groups:
        members = [p for p in members if p in slots]
        for i, p in enumerate(members):
            for f, slot in slots[p].items():
                for q in members[:i]:
                    other = slots[q].get(f)
                    if other is not None and _same_quantizer(other.input_quantizer, slot.input_quantizer):
                        keys[(p, f)] = keys.get((q, f), q)
                        break
    return keys


def _unit_of_input(scorer: GradientScorer, qn: fx.Node) -> str | None:
    """The searched path whose input quantizer node ``qn`` is."""
    owner, _, slot = qn.meta[QUANTIZER_META].rpartition(".")
    if slot == "input_quantizer":
        return owner
    if slot.endswith(EXPERTS.input_suffix):
        p = f"{owner}.{slot[: -len(EXPERTS.input_suffix)]}" if owner else slot[: -len(EXPERTS.input_suffix)]
        return p if p in scorer.units else None
    return None


def _weight_operand(op: fx.Node, weight_q: fx.Node, transposed: bool):
    """(index of ``op``'s operand that is the quantized weight, the (op, constant args) steps from
    the weight in its parameter's layout to that operand), or None when a step needs a tensor
    computed at run time (batched_mm's per-token expert gather)."""
    start = weight_q
    if transposed:  # [E, in, out] experts: the quantizer sits between two transposes
        after = [u for u in weight_q.users if u.op == "call_function" and u.target is torch.ops.aten.transpose.int]
        if len(after) != 1:
            return None
        start = after[0]
    for i, arg in enumerate(op.args):
        steps, node = [], arg
        while isinstance(node, fx.Node) and node is not start:
            if node.op != "call_function" or not node.args or _reads_nodes(node.args[1:]) or node.kwargs:
                break
            steps.append((node.target, tuple(node.args[1:])))
            node = node.args[0]
        if node is start:
            return i, list(reversed(steps))
    return None


def _reads_nodes(args) -> bool:
    found = []
    fx.node.map_arg(args, found.append)
    return bool(found)


def insert_taps(gm: fx.GraphModule, scorer: GradientScorer) -> int:
    """Put a ScoreTap after each searched weighted op of ``gm``; returns how many."""
    graph, added = gm.graph, 0
    weight_q = {}  # op -> its weight quantizer node (a layer's, or an expert parameter's)
    for n in quantizer_nodes(gm):
        slot = n.meta[SLOT_META]
        if slot == "weight_quantizer" or EXPERTS.is_weight_slot(slot):
            weight_q[n.meta[READS_META]] = n
    for qn in quantizer_nodes(gm):
        path = _unit_of_input(scorer, qn)
        if path is None:
            continue
        op = qn.meta[READS_META]
        if path not in scorer.slots or op not in weight_q or any(TAP_META in u.meta for u in op.users):
            continue
        unit = scorer.units.get(path)
        found = _weight_operand(op, weight_q[op], unit is not None and unit.transposed)
        if found is None:
            continue  # not scorable by gradient: it stays unseen, and the search says so
        name = f"_qpass_aq_tap_{len([n for n in graph.nodes if TAP_META in n.meta])}"
        gm.add_submodule(name, ScoreTap(scorer, path, op.target, op.args.index(qn), found[0], found[1]))
        with graph.inserting_after(op):
            tap = graph.call_module(name, (op, qn.args[0], *op.args), dict(op.kwargs))
        op.replace_all_uses_with(tap, delete_user_cb=lambda u: u is not tap)
        tap.meta.update(op.meta)
        tap.meta[TAP_META] = path
        added += 1
    if added:
        gm.recompile()
    return added


def remove_taps(gm: fx.GraphModule) -> None:
    taps = [n for n in gm.graph.nodes if TAP_META in n.meta]
    for tap in taps:
        tap.replace_all_uses_with(tap.args[0])
        gm.graph.erase_node(tap)
        gm.delete_submodule(tap.target)
    if taps:
        gm.recompile()


def _graphs(model):
    from qpass.graph.quantized_model import state_of

    return [t.gm for ts in state_of(model).graphs.values() for t in ts]


def check_gradient_inputs(loss_func, forward_backward_step) -> None:
    if loss_func is None and forward_backward_step is None:
        raise AutoQuantizeError(
            "auto_quantize(method='gradient') needs loss_func(output, batch) -> loss or "
            "forward_backward_step(model, batch); give one of them, or use method='kl_div' (no labels needed)"
        )
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise AutoQuantizeError(
            "auto_quantize(method='gradient') needs gradients, but it was called under torch.no_grad() "
            "or torch.inference_mode(); call it outside that context, or use method='kl_div'"
        )


def _low_precision(model, on: bool):
    """bfloat16 autocast on the model's device type while ``fast_scores`` scores a batch."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    return torch.autocast(next(iter(model.parameters())).device.type, dtype=torch.bfloat16)


def gradient_scores(model, slots, n_formats, batches, forward_step, loss_func, forward_backward_step,
                    progress=None, history=None, low_precision: bool = False, groups=(),
                    units=None) -> dict[str, list[float]]:
    scorer = GradientScorer(slots, n_formats, low_precision, groups, units)
    # Only the searched ops' outputs need gradients: every parameter is frozen, and each tap
    # makes its op's output a leaf when nothing upstream carries a gradient (so the backward
    # computes activation gradients only: no weight or embedding gradient).
    params = list({id(p): p for p in model.parameters()}.values())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for i, batch in enumerate(batches):
            for gm in _graphs(model):
                insert_taps(gm, scorer)
            with _low_precision(model, low_precision):
                if forward_backward_step is not None:
                    forward_backward_step(model, batch)
                else:
                    out = forward_step(model, batch)
                    for gm in _graphs(model):  # a new input structure traced by this call
                        if insert_taps(gm, scorer):
                            out = forward_step(model, batch)
                    loss = loss_func(out, batch)
                    loss.backward()
            if scorer.bad_grad is not None:
                raise AutoQuantizeError(
                    f"score batch {i}: the gradient reaching '{scorer.bad_grad}' has NaN or Inf; check the "
                    "loss (e.g. labels all ignored) and the data of that batch")
            scorer.memo.clear()
            for p in params:
                p.grad = None
            if history is not None:
                history.append([sum(scorer.scores[p][f] for p in scorer.scores) for f in range(n_formats)])
            if progress is not None:
                progress.update(1)
    finally:
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        for gm in _graphs(model):
            remove_taps(gm)
    missing = [p for p in slots if p not in scorer.seen]
    if missing:
        hint = ("; fused experts gathered per token (experts_implementation='batched_mm') cannot be scored by "
                "gradient: use method='kl_div', or load the model with experts_implementation='grouped_mm'"
                if any(scorer.units.get(p) is not None and scorer.units[p].is_expert for p in missing) else "")
        raise AutoQuantizeError(
            f"{len(missing)} searched layer(s) got no gradient while scoring ({', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}); the loss must depend on every quantizable layer{hint}")
    return scorer.scores


def output_tensors(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (logits first for causal LMs)."""
    from torch.utils import _pytree as pytree

    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return [logits.detach()]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    found = [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not found:
        raise AutoQuantizeError(f"forward_step returned {type(out).__name__} with no floating tensor; kl_div needs one")
    return found


def kl_div(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    """KL(p_ref || p_quant) of the softmax over the last dim, summed over positions and outputs."""
    total = 0.0
    for ref, out in zip(refs, outs):
        ref_logp = F.log_softmax(ref.double(), dim=-1).flatten(0, -2)
        logp = F.log_softmax(out.double(), dim=-1).flatten(0, -2)
        total += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
    return max(total, 0.0)
