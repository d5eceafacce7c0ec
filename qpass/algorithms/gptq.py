"""GPTQ (``algorithm="gptq"``) with ModelOpt 0.47's options ``perc_damp``, ``block_size``, ``fused``.

1. Weight quantizers are max-calibrated from the weights; their scales are then fixed.
2. One forward_loop pass collects the activation quantizers' max statistics and, for each
   Linear with an enabled weight quantizer, the Hessian ``2 X^T X / n`` of its input
   (:mod:`qpass.calib.hessian`; shared inputs such as q/k/v get one).
3. Per Linear, :func:`qpass.algorithms.gptq_solve.gptq_quantize` rounds the weight column by
   column to its quantizer's own grid (:class:`qpass.formats.columns.ColumnGrid`) with
   error feedback. The weight is replaced by the result, which the weight quantizer maps to
   itself (checked; for dynamic block formats such as NVFP4, whose block scales are computed
   from the weight, a block whose scale would change is projected onto the grid once more).

With ``layerwise={"enable": True}`` the layers are processed one decoder layer at a time:
each layer's Hessians come from a forward pass through the earlier, already quantized layers
(one forward_loop pass per layer instead of one in all).

Tied weights (SmolLM2's ``lm_head``/``embed_tokens``) are untied first: the other user keeps
its values. ``fused`` selects ModelOpt's Triton kernel there; qpass has one implementation
and gives the same result either way.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qpass.algorithms import register_algorithm
from qpass.algorithms.fold import is_shared_parameter, untie_weight
from qpass.algorithms.gptq_solve import damped_inverse_factor, gptq_quantize
from qpass.algorithms.smoothing import (
    Changes, graphs_of, require_forward_loop, shared_input_units, validate_quantizers,
)
from qpass.calib.compute_device import on_compute_device
from qpass.calib.hessian import HessianCapture
from qpass.calib.max_calibrate import (
    calibrate_weights, collect_activations, global_amax_groups, load_activation_amax, share_group_amax,
    weight_quantizer_owners,
)
from qpass.config.algorithms import check_gptq_options
from qpass.errors import CalibrationError, QuantConfigError
from qpass.formats.columns import ColumnGrid
from qpass.graph.lazy_outputs import deferred_outputs
from qpass.graph.quantized_model import iter_tensor_quantizers
from qpass.nn.packed_weight import PackedWeightQuantizer


@dataclass
class GPTQResult:
    """What GPTQ did to one Linear, for reports and tests."""

    path: str
    tokens: int
    projected: int  # elements re-rounded so that the weight quantizer maps the weight to itself
    untied: bool


class ChainGrid:
    """The grids of a sequence of static weight quantizers, applied in turn (W4A8)."""

    def __init__(self, grids: list[ColumnGrid]) -> None:
        self.grids = grids
        self.is_dynamic = False
        self.block = None

    @classmethod
    def stacked(cls, chains: list["ChainGrid"]) -> "ChainGrid | None":
        if any(type(c) is not cls or len(c.grids) != len(chains[0].grids) for c in chains):
            return None
        stages = [ColumnGrid.stacked([c.grids[i] for c in chains]) for i in range(len(chains[0].grids))]
        return None if any(g is None for g in stages) else cls(stages)

    def quantize(self, column, col):
        for g in self.grids:
            column = g.quantize(column, col)
        return column


def stacked_grid(grids: list):
    """One grid for the members' weights stacked along rows, or None (then each is rounded alone)."""
    if len(grids) < 2:
        return None
    kind = type(grids[0])
    if any(type(g) is not kind for g in grids) or not hasattr(kind, "stacked"):
        return None
    return kind.stacked(grids)


def gptq_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules with an enabled weight quantizer (in module order); packed weights are final."""
    return {
        path: module for path, module, q in weight_quantizer_owners(model)
        if isinstance(module, nn.Linear) and q.is_enabled and not isinstance(q, PackedWeightQuantizer)
    }


def column_grid(path: str, module: nn.Linear, block_size: int):
    members = [tq for tq in iter_tensor_quantizers(module.weight_quantizer) if tq.is_enabled]
    w = module.weight.detach().float()
    grids = []
    for tq in members:
        spec = tq.spec
        if spec.needs_amax and not tq.is_dynamic and tq.amax is None:
            raise CalibrationError(f"'{path}.weight_quantizer' has no amax after weight calibration")
        amax = None
        if spec.needs_amax:  # a dynamic ("type": "dynamic") quantizer takes the weight's own range
            amax = tq.amax if tq.amax is not None and tq._attrs.get("type") != "dynamic" else spec.amax_of(w)
        grid = ColumnGrid(spec, w, amax)
        if grid.is_dynamic and block_size % grid.block:
            raise QuantConfigError(
                f"gptq: block_size={block_size} must be a multiple of the weight block size {grid.block} "
                f"of '{path}.weight_quantizer' ({tq.describe()})"
            )
        grids.append(grid)
    if len(grids) == 1:
        return grids[0]
    if any(g.is_dynamic for g in grids):
        raise QuantConfigError(
            f"gptq: '{path}.weight_quantizer' is a sequence with a dynamic block format "
            f"({module.weight_quantizer.describe()}); only sequences of static formats are implemented yet in qpass"
        )
    return ChainGrid(grids)


def _units(state, modules: dict, stats: dict) -> list[list[str]]:
    """Shared-input groups restricted to ``modules``, then the other modules alone; unreached left out."""
    units = shared_input_units(state, modules)
    missed = [p for u in units for p in u if p not in stats]
    if missed:
        warnings.warn(f"gptq: no calibration data reached {', '.join(missed)}; their weights keep "
                      "max calibration (round to nearest)", stacklevel=4)
    return [u for u in units if all(p in stats for p in u)]


def _stage_key(path: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the first numbered container)."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", path)
    return m.group(1) if m else ""


def _stages(modules: dict) -> list[dict]:
    stages: dict[str, dict] = {}
    for path, module in modules.items():
        stages.setdefault(_stage_key(path), {})[path] = module
    return list(stages.values())


@torch.no_grad()
def _quantize_unit(model, state, unit, stats, perc_damp, block_size, changes, act_order) -> list[GPTQResult]:
    st = stats[unit[0]]
    return round_unit(model, state, unit, st.hessian, st.tokens, perc_damp, block_size, changes, act_order)


@torch.no_grad()
def round_unit(model, state, unit: list[str], hessian: torch.Tensor, tokens: int, perc_damp: float,
               block_size: int, changes, act_order: bool = False) -> list[GPTQResult]:
    """GPTQ-round the weights of ``unit`` (modules reading one input) in place, onto their weight
    quantizers' current grids. ``hessian``: that input's Hessian or Gram matrix (its overall scale
    does not matter: the damping is relative to its mean diagonal).

    ``act_order``: round the columns in order of decreasing Hessian diagonal, where every
    member's grid is static (otherwise in channel order)."""
    grids = {}  # path -> (untied, grid)
    for path in unit:
        module = model.get_submodule(path)
        untied = is_shared_parameter(model, module.weight)
        if untied:
            untie_weight(model, graphs_of(state), path)
        grids[path] = (untied, column_grid(path, module, block_size))
    perm = None
    if act_order and not any(g.is_dynamic for _, g in grids.values()):
        perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        hessian = hessian[perm][:, perm]
    u = damped_inverse_factor(hessian, perc_damp)
    rounded = {}
    together = stacked_grid([g for _, g in grids.values()])
    weights = [model.get_submodule(path).weight for path in unit]
    if together is not None and len({(w.device, w.dtype) for w in weights}) == 1:
        # members read the same input: one pass over the columns for all their rows (same result)
        w0 = weights[0]
        p = None if perm is None else perm.to(w0.device)
        new = gptq_quantize(torch.cat([w.detach() for w in weights]), u.to(w0.device), together, block_size, p)
        rounded = dict(zip(unit, new.to(w0.dtype).split([w.shape[0] for w in weights])))
    out = []
    for path in unit:
        module = model.get_submodule(path)
        untied, grid = grids[path]
        w = module.weight
        if path in rounded:
            new = rounded[path]
        else:
            p = None if perm is None else perm.to(w.device)
            new = gptq_quantize(w, u.to(w.device), grid, block_size, p).to(w.dtype)
        q = module.weight_quantizer
        projected = 0
        fq = q(new)
        if not torch.equal(fq, new):
            projected = int((fq != new).sum())
            new = fq
            if not torch.equal(q(new), new):
                raise CalibrationError(f"gptq: the weight quantizer of '{path}' has no fixed point near the "
                                       f"GPTQ weight ({q.describe()})")
        changes.tensor(w, f"{path}.weight").copy_(new)
        out.append(GPTQResult(path=path, tokens=tokens, projected=projected, untied=untied))
    return out


#: GPTQ rounding after smoothing (AWQ, SmoothQuant: their ``gptq`` option): the Hessian is the Gram
#: matrix of the unit's captured token sample (a few thousand tokens), so it is damped more than
#: ModelOpt's 0.01 default for a full pass (on SmolLM2's INT4 AWQ, held-out perplexity was flat
#: for 0.03-1 on a validation split and worse at 0.01); columns go in act-order.
SMOOTHED_DAMP = 0.1


def round_smoothed(model, state, grams: list, changes) -> None:
    """GPTQ-round every smoothed unit's weights onto their final grids (scales and clipped amax
    already set). ``grams``: (unit, Gram matrix of its smoothed input, tokens) per unit."""
    for unit, g, tokens in grams:
        for path in unit:  # untied and recorded at home: within, the weights are device copies
            if is_shared_parameter(model, model.get_submodule(path).weight):
                untie_weight(model, graphs_of(state), path)
            changes.tensor(model.get_submodule(path).weight, f"{path}.weight")
        with on_compute_device(model, state, unit, writes=True) as dev:
            round_unit(model, state, unit, dev.to(g), tokens, SMOOTHED_DAMP, 128, changes, act_order=True)


def check_gptq_flag(method: str, value) -> None:
    if not isinstance(value, bool):
        raise QuantConfigError(f"{method}: gptq (qpass's GPTQ rounding of the smoothed weights) must be "
                               f"True or False, got {value!r}")


def _capture(model, state, forward_loop, modules, first: bool) -> dict:
    with HessianCapture(modules) as capture:
        if first:
            collect_activations(model, state, forward_loop)
        else:
            calls = state.calls
            with torch.no_grad(), deferred_outputs(state):
                forward_loop(model)
            if state.calls == calls:
                raise CalibrationError("forward_loop never called the model: it must run model(batch) "
                                       "for the calibration data")
    if first:
        load_activation_amax(model, state)
    return capture.stats


@register_algorithm("gptq")
def gptq(model, state, forward_loop, perc_damp=0.01, block_size=128, fused=False, layerwise=None, act_order=True):
    opts = check_gptq_options({"perc_damp": perc_damp, "block_size": block_size, "fused": fused,
                               "layerwise": layerwise, "act_order": act_order})
    require_forward_loop("gptq", forward_loop)
    validate_quantizers(model)
    calibrate_weights(model, global_amax_groups(model, state))
    modules = gptq_modules(model)
    for path, module in modules.items():
        column_grid(path, module, opts["block_size"])  # every format problem before any work
    # calibrate() hands the layerwise option to the pass driver (state.layerwise); GPTQ then also
    # goes stage by stage, so later layers' Hessians see the earlier layers already quantized.
    sequential = opts["layerwise"] or state.layerwise is not None
    stages = _stages(modules) if sequential else [modules]
    changes = Changes()
    results = []
    try:
        if not stages:
            collect_activations(model, state, forward_loop)
            load_activation_amax(model, state)
        for i, stage in enumerate(stages):
            stats = _capture(model, state, forward_loop, stage, first=i == 0)
            for unit in _units(state, stage, stats):
                results += _quantize_unit(model, state, unit, stats, opts["perc_damp"], opts["block_size"], changes,
                                          opts["act_order"])
        share_group_amax(model, state.groups)
    except BaseException:
        changes.restore()  # calibrate() restores the amax values
        raise
    state.gptq = results
