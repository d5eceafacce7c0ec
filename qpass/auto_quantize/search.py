"""auto_quantize: per-layer format search under a weight-size budget.

Flow: candidates (per-layer rules of each format) -> groups (graph shared-input groups united
with :attr:`AutoQuantizeSearcher.rules`; an experts module's parameters together) -> per-candidate
calibration (:mod:`.candidates`) -> scores (:mod:`.scoring`) -> exact knapsack (:mod:`.solver`) ->
the chosen slots installed.

The searched units (:mod:`.units`) are weighted layers and fused MoE expert parameters. The model
itself is quantized once with every quantizer off; choosing a format for a unit installs that
candidate's quantizer objects at its input and weight slots (``input_quantizer``/``weight_quantizer``,
or an expert parameter's ``<param>_input_quantizer``/``<param>_weight_quantizers``; the candidates
differ in type: W4A8's weight quantizer is a sequence) and points every traced graph's call_module
target at them.
"""

from __future__ import annotations

import copy
import itertools
import re

import numpy as np
import torch
from torch import nn

from qpass.auto_quantize.candidates import (
    NONE_NAME, SeenInputs, calib_steps, calibrate_candidate, make_candidates, planned_bits, quantizes,
    records_float_inputs,
)
from qpass.auto_quantize.scoring import check_gradient_inputs, gradient_scores, kl_div, output_tensors
from qpass.auto_quantize.solver import AutoQuantizeError, budget_bits, check_budget
from qpass.auto_quantize.units import Unit, units_of
from qpass.graph.compile_fallback import whole_graph_needed
from qpass.graph.quantized_model import is_quantized, realize_code, state_of
from qpass.model_quant import _unquantize
from qpass.nn.hf_conv1d import conv1d_as_linear
from qpass.passes.insert_quantizers import _register

SEARCH_ATTR = "_qpass_auto_quantize"


class AutoQuantizeSearcher:
    """Holds the editable grouping rules: regexes on module names, first capture group = group key."""

    rules: list[str] = [
        r"^(.*?)\.(q_proj|k_proj|v_proj)$",
        r"^(.*?)\.(gate_proj|up_proj)$",
        r"^(.*?)\.(query|key|value)$",
    ]


def default_forward_step(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def search_groups(paths: list[str], graph_groups: list[list[str]], rules: list[str]) -> list[list[str]]:
    parent = {p: p for p in paths}

    def find(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    def union(a, b):
        parent[find(a)] = find(b)

    for g in graph_groups:
        members = [p for p in g if p in parent]
        for a, b in zip(members, members[1:]):
            union(a, b)
    for i, rule in enumerate(rules):
        first: dict[str, str] = {}
        for p in paths:
            m = re.match(rule, p)
            if m and m.groups():
                key = m.group(1)
                if key in first:
                    union(p, first[key])
                else:
                    first[key] = p
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(find(p), []).append(p)
    return list(groups.values())


class _Traced(Exception):
    """Raised by :func:`trace_only`'s recorder once the model's first call is traced."""


def trace_only(model: nn.Module, forward_step, batch) -> None:
    """Trace the graph of ``forward_step(model, batch)``'s first model call without running it."""
    from qpass.graph.quantized_model import graph_for

    state = state_of(model)

    def record(m, args, kwargs):
        with whole_graph_needed("auto_quantize (it scores layers on the traced graph)"):
            graph_for(m, args, kwargs)
        raise _Traced

    state.recorder = record
    try:
        with torch.no_grad():
            forward_step(model, batch)
    except _Traced:
        pass
    finally:
        state.recorder = None


def _calibration_loop(forward_step, batches):
    """A forward_loop over calibration batches. Its outputs are never read, so each graph run
    computes only up to its last quantizer (:mod:`qpass.graph.lazy_outputs`)."""

    def loop(m):
        for b in batches:
            forward_step(m, b)

    return loop


def group_name(members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    prefix = members[0].rpartition(".")[0]
    if all(m.rpartition(".")[0] == prefix for m in members):
        return f"{prefix}.{{{','.join(m.rpartition('.')[2] for m in members)}}}"
    return "+".join(members)


class _Search:
    """Everything kept on the model for re-solving without re-scoring."""

    def __init__(self, formats, slots, base, original_weights, units):
        self.formats = formats  # candidate names
        self.slots = slots  # path -> {format index: Slot}
        self.base = base  # path -> (input quantizer, weight quantizer) with quantization off
        self.original_weights = original_weights  # path -> weight before any algorithm
        self.units = units  # path -> Unit


def _install(model: nn.Module, unit: Unit, in_q, w_q, weight) -> None:
    from qpass.algorithms.fold import untie_weight

    owner = unit.owner(model)
    graphs = [t.gm for ts in state_of(model).graphs.values() for t in ts]
    for slot, q in ((unit.input_slot, in_q), (unit.weight_slot, w_q)):
        if q is None or slot not in owner._modules:
            continue
        owner._modules[slot] = q
        for gm in graphs:
            _register(gm, f"{unit.owner_path}.{slot}" if unit.owner_path else slot, q)
    current = unit.weight(model)
    if not torch.equal(current.detach(), weight):
        if not unit.is_expert:
            untie_weight(model, graphs, unit.path)  # a tied weight (lm_head) gets its own copy first
            current = unit.weight(model)
        with torch.no_grad():
            current.copy_(weight)


def apply_choice(model: nn.Module, groups: list[list[str]], choice: list[int]) -> None:
    search: _Search = model.__dict__.get(SEARCH_ATTR)
    if search is None:
        raise AutoQuantizeError("this model has no auto_quantize search attached; pass the model auto_quantize returned")
    for members, f in zip(groups, choice):
        for p in members:
            slot = search.slots[p].get(f)
            orig = search.original_weights[p]
            unit = search.units[p]
            if slot is None:
                _install(model, unit, copy.deepcopy(search.base[p][0]), copy.deepcopy(search.base[p][1]), orig)
            else:
                _install(model, unit, copy.deepcopy(slot.input_quantizer), copy.deepcopy(slot.weight_quantizer),
                         orig if slot.weight is None else slot.weight)


def _kl_scores(model, groups, search: _Search, batches, forward_step, progress):
    with torch.no_grad():
        refs = [output_tensors(forward_step(model, b)) for b in batches]
        scores = []
        for members in groups:
            row = []
            for f in range(len(search.formats)):
                if all(f not in search.slots[p] for p in members):
                    row.append(0.0)
                    continue
                apply_choice(model, [members], [f])
                row.append(sum(kl_div(r, output_tensors(forward_step(model, b))) for r, b in zip(refs, batches)))
                apply_choice(model, [members], [-1])
                if progress is not None:
                    progress.update(1)
            scores.append(row)
    return scores


def auto_quantize(model: nn.Module, constraints=None, quantization_formats=("W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None),
                  data_loader=None, forward_step=None, loss_func=None, forward_backward_step=None,
                  num_calib_steps: int = 512, num_score_steps: int = 128, verbose: bool = False,
                  method: str = "gradient", fast_scores: bool | None = None):
    """Choose a format per layer group minimising the sensitivity score under ``constraints``.

    Returns ``(model, state_dict)``; see :func:`qpass.auto_quantize.report.format_table` for the
    state_dict contents. ``method``: ``"gradient"`` (needs ``loss_func`` or
    ``forward_backward_step``) or ``"kl_div"`` (label-free). Formats calibrated with AWQ use
    ``num_calib_steps // 4`` batches (at least one), as ModelOpt's auto_quantize does.
    ``fast_scores``: run the score batches under bfloat16 autocast and compute the candidates'
    Linear outputs with bfloat16 GEMMs (see :class:`qpass.auto_quantize.scoring.GradientScorer`);
    default: on CPUs with native bfloat16 (AVX512-BF16/AMX), off elsewhere. ``False`` scores in
    float32. Calibration always runs in the model's own precision.
    """
    from qpass.model_quant import quantize

    constraints = {"effective_bits": 4.8} if constraints is None else constraints
    if method not in ("gradient", "kl_div"):
        raise AutoQuantizeError(f"method must be 'gradient' or 'kl_div', got {method!r}")
    if method == "gradient":
        check_gradient_inputs(loss_func, forward_backward_step)
    budget_bits(constraints, 1)  # validate the shape before any work
    if is_quantized(model):
        raise AutoQuantizeError("auto_quantize needs an unquantized model; pass a fresh copy of the original model")
    if data_loader is None:
        raise AutoQuantizeError("auto_quantize needs a data_loader of calibration/score batches")
    candidates = make_candidates(list(quantization_formats))
    forward_step = forward_step or default_forward_step
    batches = list(itertools.islice(iter(data_loader), max(num_calib_steps, num_score_steps)))
    if not batches:
        raise AutoQuantizeError("data_loader yielded no batches")
    calib, score = batches[:num_calib_steps], batches[:num_score_steps]
    from qpass.auto_quantize.report import auto_quantize_resolve, format_table

    # GPT-2's Conv1D layers become Linears before the copy the candidates calibrate, so that the
    # copy and the model agree on weight layouts; a failed search gives them back
    with conv1d_as_linear(model):
        original = [copy.deepcopy(model)]  # handed over: _search drops it once every candidate is calibrated
        quantize(model, {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None})
        try:
            groups, group_scores, search, history = _search(model, original, candidates, constraints, calib,
                                                            score, forward_step, loss_func, forward_backward_step,
                                                            verbose, method, fast_scores)
            state_dict = _state_dict(model, method, search, groups, group_scores, history)
            auto_quantize_resolve(model, state_dict, constraints)
        except BaseException:
            model.__dict__.pop(SEARCH_ATTR, None)
            _unquantize(model)  # a failed search leaves the caller's model as it was
            raise
    realize_code(model)
    if verbose:
        print(format_table(state_dict))
    return model, state_dict


def _search(model, holder, candidates, constraints, calib, score, forward_step, loss_func, forward_backward_step,
            verbose, method, fast_scores=None):
    """Calibrate every candidate and score every (group, format); the model gets the search attached."""
    original = holder.pop()
    trace_only(model, forward_step, score[0])  # the graph the scores run on (and its shared-input groups)
    units = {p: u for p, u in units_of(model).items()
             if any(quantizes(c, u, u.owner(original)) for c in candidates)}
    paths = list(units)
    if not paths:
        raise AutoQuantizeError("no format in quantization_formats quantizes any layer of this model")
    experts: dict[str, list[str]] = {}  # an experts module's parameters: one group, as in ModelOpt
    for p, u in units.items():
        if u.group_key is not None:
            experts.setdefault(u.group_key, []).append(p)
    groups = search_groups(paths, state_of(model).groups + list(experts.values()), AutoQuantizeSearcher.rules)
    numel = {p: u.weight(original).numel() for p, u in units.items()}
    costs = [[sum(planned_bits(c, units[p], units[p].owner(original)) * numel[p] for p in g) for c in candidates]
             for g in groups]
    total = sum(numel.values())
    check_budget(np.array(costs), budget_bits(constraints, total), constraints, total)  # before the costly part
    tqdm = _tqdm(verbose)
    slots: dict[str, dict] = {p: {} for p in paths}
    # Candidates on fewer batches (AWQ: a quarter) calibrate first and record the searched
    # inputs' channel maxima; max-calibrated candidates then only run the batches after those.
    steps = {f: calib_steps(c, len(calib)) for f, c in enumerate(candidates) if c.rules is not None}
    order = sorted(steps, key=lambda f: (steps[f], f))
    seen = SeenInputs()
    over = lambda batches: _calibration_loop(forward_step, batches)  # noqa: E731

    for f in tqdm(order, desc="auto_quantize: calibrating formats"):
        cand, n = candidates[f], steps[f]
        rest_loop = over(calib[seen.batches:n]) if 0 < seen.batches < n else None
        record = n if not seen.batches and n < len(calib) and records_float_inputs(cand) else 0
        for p, slot in calibrate_candidate(original, cand, units, over(calib[:n]), seen, record, rest_loop).items():
            slots[p][f] = slot
    base = {p: (u.owner(model)._modules.get(u.input_slot), u.owner(model)._modules[u.weight_slot])
            for p, u in units.items()}
    weights = {p: u.weight(model).detach().clone() for p, u in units.items()}
    search = _Search([c.name for c in candidates], slots, base, weights, units)
    model.__dict__[SEARCH_ATTR] = search
    del original
    history: list = []
    if method == "gradient":
        from qpass.algorithms.awq_search import fast_bf16

        if fast_scores is None:
            fast_scores = all(fast_bf16(weights[p].device) for p in paths)
        with torch.no_grad():
            for p in paths:
                for slot in slots[p].values():
                    w = slot.weight if slot.weight is not None else weights[p]
                    slot.qweight = units[p].quantized_weight(slot.weight_quantizer, w)
                    if fast_scores and slot.qweight.dtype == torch.float32:
                        slot.qweight_low = slot.qweight.bfloat16()
        bar = tqdm(total=len(score), desc="auto_quantize: scoring") if verbose else None
        per_module = gradient_scores(model, slots, len(candidates), score, forward_step, loss_func,
                                     forward_backward_step, bar, history, low_precision=bool(fast_scores),
                                     groups=groups, units=units)
        for s in slots.values():
            for slot in s.values():
                slot.qweight = slot.qweight_low = None
        group_scores = [[sum(per_module[p][f] for p in g) for f in range(len(candidates))] for g in groups]
    else:
        bar = tqdm(total=len(groups) * len(candidates), desc="auto_quantize: scoring (kl_div)") if verbose else None
        group_scores = _kl_scores(model, groups, search, score, forward_step, bar)
    if bar is not None:
        bar.close()
    return groups, group_scores, search, history


def _state_dict(model, method, search: _Search, groups, group_scores, history) -> dict:
    stats = {}
    for members, row in zip(groups, group_scores):
        costs = []
        numel = {p: search.units[p].weight(model).numel() for p in members}
        n = sum(numel.values())
        for f in range(len(search.formats)):
            bits = [search.slots[p][f].effective_bits if f in search.slots[p] else 16.0 for p in members]
            costs.append(sum(b * numel[p] for b, p in zip(bits, members)))
        stats[group_name(members)] = {"members": list(members), "formats": list(search.formats),
                                      "scores": [float(s) for s in row], "costs": costs, "weights": n}
    total = sum(s["weights"] for s in stats.values())
    return {"method": method, "candidate_stats": stats, "total_weights": total,
            "score_history": history, "best": None}


def _tqdm(verbose: bool):
    if verbose:
        from tqdm.auto import tqdm

        return tqdm
    return lambda it=None, **_: it
