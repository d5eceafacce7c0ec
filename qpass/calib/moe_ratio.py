"""``moe_calib_experts_ratio``: calibrate MoE experts on more tokens than the router sends them.

A router sends each token to its ``top_k`` experts, so a rarely chosen expert sees few
calibration tokens (its activations' range is then a guess). ModelOpt 0.47's option (an
algorithm option, ``0 < ratio <= 1``) runs each sparse MoE block twice per calibration
forward: once with the router's ``top_k`` raised to ``max(top_k, round(num_experts * ratio))``,
only for the quantizers' statistics, and once as the model runs, whose output the next layer
sees. qpass does the same on the graph, for the calibration pass only:

- The calibration pass runs a copy of the traced graph (:mod:`qpass.calib.pass_graph`) in which
  each MoE block's input goes through :func:`moe_side_pass` first. That op runs the block's own
  graph traced with the raised ``top_k`` (exported once per block and input structure, with the
  block's existing quantizers placed by the usual insertion pass), and returns its input
  unchanged. The block then runs as traced, with its own ``top_k``.
- ``top_k`` is baked into a traced graph in many places (the ``topk`` itself, the token index
  ``flat // top_k``, the shapes of the combine step), so the side graph is a fresh trace, not an
  edit of the model's graph.
- The model's graphs are not changed: inference, export and compile see the router as it is.

A MoE block is a module with ``experts`` and a router, its ``gate`` (ModelOpt's pattern:
transformers 5's ``TopKRouter`` in Mixtral, Qwen-MoE, OLMoE, GLM-4-MoE, ...) or ``router`` (Phi-MoE,
GraniteMoE), holding an integer ``top_k`` and ``num_experts``. A block that does not trace with the
raised ``top_k`` keeps its routed tokens, with a warning naming it. Layer-by-layer calibration
records and partitions the same copy of the graph, so it computes the same statistics (not yet for
a model whose blocks' weights stay on another device than the one they run on: refused).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref

import torch
from torch import fx, nn
from torch.fx.node import has_side_effect

from qpass.calib.pass_graph import copied_graph, drop_variants, variant_over
from qpass.errors import CalibrationError, QuantConfigError

OPTION = "moe_calib_experts_ratio"

_SIDE: dict[int, "_SidePass"] = {}
_TOKENS = itertools.count()


def check_ratio(value, where: str) -> float | None:
    """The option's value (None: off), checked as ModelOpt checks it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise QuantConfigError(f"{where}: {OPTION} must be a number in (0, 1] (the share of each MoE layer's "
                               f"experts every calibration token is routed to), or None; got {value!r}")
    return float(value)


def router(block: nn.Module) -> tuple[nn.Module, int] | None:
    """A MoE block's router and expert count: its ``gate`` (ModelOpt's pattern) or ``router``
    (Phi-MoE, GraniteMoE) child with an integer ``top_k`` and ``num_experts`` (its own or the
    block's), next to an ``experts`` child; None otherwise."""
    if block._modules.get("experts") is None:
        return None
    for name in ("gate", "router"):
        r = block._modules.get(name)
        top_k = getattr(r, "top_k", None)
        experts = getattr(r, "num_experts", getattr(block, "num_experts", None))
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (top_k, experts)):
            return r, experts
    return None


def moe_blocks(model: nn.Module, ratio: float) -> dict[str, int]:
    """Path -> calibration ``top_k`` (``max(top_k, round(num_experts * ratio))``) of every MoE block
    whose ``top_k`` the ratio raises."""
    out = {}
    for path, module in model.named_modules():
        found = router(module)
        if found is not None and (k := round(found[1] * ratio)) > found[0].top_k:
            out[path] = k
    return out


@contextlib.contextmanager
def experts_ratio(model: nn.Module, state, ratio: float | None):
    """While a calibration algorithm runs: its passes route tokens to ``ratio`` of the experts."""
    if ratio is None:
        yield
        return
    if not any(router(m) is not None for _, m in model.named_modules()):
        warnings.warn(f"{OPTION}={ratio}: the model has no MoE block (an 'experts' module and a 'gate' or "
                      "'router' holding 'top_k' and 'num_experts'); the option changes nothing", stacklevel=4)
    previous = state.__dict__.get("moe_ratio")
    state.moe_ratio = ratio
    try:
        yield
    finally:
        state.moe_ratio = previous
        drop_variants(model)


def release_side_passes(tokens: list) -> None:
    for token in tokens:
        _SIDE.pop(token, None)


def with_side_passes(model, state, gm: fx.GraphModule, blocks: dict[str, int], tokens: list) -> fx.GraphModule:
    from qpass.passes.insert_quantizers import owner_path

    graph = copied_graph(gm)
    changed = False
    for path, k in blocks.items():
        inside = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")
                  and _within(owner_path(n), path)]
        if not inside:
            continue
        members = set(inside)
        feeds = {a for n in inside for a in n.all_input_nodes if a not in members and a.op != "get_attr"
                 and isinstance(a.meta.get("val"), torch.Tensor)}
        if len(feeds) != 1:
            warnings.warn(f"{OPTION}: MoE block '{path}' reads {len(feeds)} tensors in the traced graph, not "
                          "one; its experts are calibrated on the routed tokens only", stacklevel=5)
            continue
        (hidden,) = feeds
        readers = [n for n in inside if hidden in n.all_input_nodes]
        token = next(_TOKENS)
        _SIDE[token] = _SidePass(model, state, path, k)
        tokens.append(token)
        with graph.inserting_before(readers[0]):
            side = graph.call_function(moe_side_pass, (token, hidden))
        side.meta.update(hidden.meta)
        for n in readers:
            n.replace_input_with(hidden, side)
        changed = True
    if not changed:
        return gm
    graph.lint()  # nodes were inserted and rewired
    return variant_over(gm, graph)


def _within(owner: str, path: str) -> bool:
    return owner == path or owner.startswith(path + ".")


@has_side_effect
def moe_side_pass(token: int, hidden: torch.Tensor) -> torch.Tensor:
    """Run MoE block ``token``'s raised-``top_k`` graph on ``hidden`` (statistics only); return ``hidden``."""
    side = _SIDE.get(token)
    if side is None:
        raise RuntimeError("qpass's moe_side_pass exists only while a calibration pass with "
                           f"{OPTION} runs")
    side(hidden)
    return hidden


class _SidePass:
    """One MoE block's graph with the raised ``top_k``, per input structure (traced on first use)."""

    def __init__(self, model: nn.Module, state, path: str, top_k: int) -> None:
        self.model = weakref.ref(model)
        self.rule_set = state.rule_set
        self.path = path
        self.top_k = top_k
        self.graphs: dict[tuple, fx.GraphModule] = {}

    def __call__(self, hidden: torch.Tensor) -> None:
        key = (hidden.dim(), hidden.dtype, hidden.device)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._trace(hidden)
            except Exception as e:  # noqa: BLE001 - the block's own routing still calibrates it
                self.graphs[key] = None
                warnings.warn(f"{OPTION}: MoE block '{self.path}' does not trace with top_k={self.top_k} "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                              "its experts are calibrated on the routed tokens only", stacklevel=2)
        gm = self.graphs[key]
        if gm is None:
            return
        weight = next(self.model().get_submodule(self.path).parameters(), None)
        if weight is not None and weight.device != hidden.device:
            raise CalibrationError(
                f"{OPTION}: MoE block '{self.path}' keeps its weights on {weight.device} but runs on {hidden.device} "
                "(layer-by-layer calibration of an offloaded model); the option is not implemented for that yet")
        gm(hidden)

    def _trace(self, hidden: torch.Tensor) -> fx.GraphModule:
        from qpass.graph.trace import export_graph
        from qpass.nn.tensor_quantizer import is_quantizer_slot
        from qpass.passes.insert_quantizers import InsertQuantizers

        block = self.model().get_submodule(self.path)
        r = router(block)[0]
        saved = r.top_k
        r.top_k = self.top_k
        try:
            gm = export_graph(block, type(block), (hidden,), {}).gm
        finally:
            r.top_k = saved

        def existing(path, owner, slot):  # the block's own quantizers, never new ones
            q = owner._modules.get(slot)
            return q if q is not None and is_quantizer_slot(q) else None

        InsertQuantizers(block, self.rule_set, existing).call(gm)
        gm.recompile()
        return gm
