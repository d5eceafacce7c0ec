"""AWQ: ``awq_lite`` (activation-aware scale search), ``awq_clip`` (weight range clipping
search) and ``awq_full`` (both), with ModelOpt 0.47's options.

All three read one forward_loop pass: the activation max statistics and, per Linear with
an enabled weight quantizer, its input's per-channel mean |x| and a seeded token subsample
(:mod:`qpass.calib.capture`). The searches then run offline on the subsample, unit by unit,
through the tokens' Gram matrices (:mod:`qpass.algorithms.awq_search`): exact output errors
over every captured token at a fraction of the matmul cost.

Scale search (per smoothing unit: a shared-input group such as q/k/v, or one Linear): for
each alpha of the grid 0, alpha_step, ..., 1 the scale is ModelOpt's

    s = mean|x|^alpha / w_scale^(1 - alpha),  clamped to [1e-4, 1e4], divided by sqrt(max(s) min(s))

(``w_scale``: the mean over output rows of |w| / its block's abs-max); the alpha whose
``(x / s) @ Q(W * s)^T`` is closest in MSE to ``x @ W^T`` wins (input quantizers off during
the search, as in ModelOpt). Weights are multiplied by the best ``s``; ``1/s`` is folded into
the producer when the graph allows, else kept as the members' ``pre_quant_scale``.

Clip search (block weight formats): for each ratio of min_clip_ratio, +shrink_step, ..., 1
the weight amax is scaled down; per block (static block formats) or per tensor (NVFP4's
global amax) the ratio with the smallest error of the block's partial products wins and
replaces the max-calibrated amax.

* ``awq_lite``: the scale search (ModelOpt's awq_lite).
* ``awq_full``: the scale search, then the clip search on the smoothed weights.
* ``awq_clip``: the clip search alone, on the unsmoothed weights.

Then (``gptq=True``, qpass's own option and default; ``False`` is ModelOpt's round to nearest)
the weights are GPTQ-rounded onto the grids the search left (its scales, clipped amax): the
Hessian of each unit is the Gram matrix of its captured tokens, rescaled by ``s``, so no further
forward_loop pass is needed (:func:`qpass.algorithms.gptq.round_smoothed`; act-order, damping
0.1). On SmolLM2-135M INT4_AWQ_CFG this took held-out perplexity from 20.008 to 17.397
(ModelOpt 0.47: 19.179; FP32 14.850).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qpass.algorithms import register_algorithm
from qpass.algorithms.awq_search import (
    clip_amax, first_quantizer, gram, sample_grams, scaled_gram, search_unit_scale,
)
from qpass.algorithms.gptq import check_gptq_flag, round_smoothed
from qpass.algorithms.smoothing import (
    SEARCH_TOKENS, abort_smoothing, alpha_grid, apply_scale, capture_pass, check_common_options, end_smoothing,
    finish, require_forward_loop, smoothable_modules, smoothing_units, start_smoothing,
    validate_quantizers,
)
from qpass.calib.compute_device import on_compute_device
from qpass.errors import QuantConfigError


def weight_block_size(q) -> int | None:
    tq = first_quantizer(q)
    return None if tq is None else tq.spec.block_size


def weight_scale(w: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Mean over output rows of |w| relative to its block's (or row's) abs-max, per input channel."""
    w = w.detach().float()
    co, ci = w.shape
    if block_size:
        pad = (-ci) % block_size
        wb = F.pad(w, (0, pad)).view(co, -1, block_size).abs()
        rel = (wb / (wb.amax(-1, keepdim=True) + torch.finfo(torch.float32).tiny)).view(co, -1)[:, :ci]
    else:
        wa = w.abs()
        rel = wa / (wa.amax(-1, keepdim=True) + torch.finfo(torch.float32).tiny)
    return rel.mean(0)


def awq_scale(act_mean: torch.Tensor, w_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (act_mean.pow(alpha) / (w_scale.pow(1 - alpha) + torch.finfo(torch.float32).tiny)).clamp(1e-4, 1e4)
    return s / (s.max() * s.min()).sqrt()


def _check_step(name, value, low_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise QuantConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _unit_w_scale(model, unit) -> torch.Tensor:
    """ModelOpt's w_scale over a unit: the members' weight_scale, weighted by their row counts."""
    mods = [model.get_submodule(p) for p in unit]
    rows = sum(m.weight.shape[0] for m in mods)
    return sum(weight_scale(m.weight, weight_block_size(m.weight_quantizer)) * m.weight.shape[0] for m in mods) / rows


def _lite(model, state, modules, stats, alpha_step, debug, changes, clip_ratios, clip_tokens, max_co_batch_size,
          grams: list | None = None):
    """The scale search (and, with ``clip_ratios``, the joint clip search); applies the scales.

    Returns the applied units and the clipped weight amax per weight quantizer. ``grams``: a list
    that receives (unit, Gram matrix of the smoothed input, tokens) per unit, for the rounding."""
    grid = alpha_grid(alpha_step)
    plan = []
    for unit in smoothing_units(state, modules, stats):
        if stats[unit[0]].sample.shape[0] == 0:
            continue
        with on_compute_device(model, state, unit) as dev:
            st = dev.stats(stats[unit[0]])
            act_mean, w_scale = st.abs_mean, _unit_w_scale(model, unit)
            clip_x = _limit(st, clip_tokens) if clip_ratios else None
            g = gram(st.sample) if grams is not None else None
            s, alpha, losses, amaxes = search_unit_scale(
                model, unit, st.sample, lambda a, m=act_mean, w=w_scale: awq_scale(m, w, a), grid,
                clip_ratios=clip_ratios, clip_x=clip_x, max_co_batch_size=max_co_batch_size, prune=not debug, g=g)
            if grams is not None:
                grams.append((unit, dev.home(scaled_gram(g, s)), st.tokens))
            s, amaxes = dev.home(s), {p: dev.home(a) for p, a in amaxes.items()}
            if debug:
                losses = {a: dev.home(x) if isinstance(x, torch.Tensor) else x for a, x in losses.items()}
        plan.append((unit, s, alpha, losses, amaxes))
    applied, keep = [], {}
    for unit, s, alpha, losses, amaxes in plan:
        done = apply_scale(model, state, unit, s, changes)
        done.alpha = alpha
        applied.append(done)
        for p, amax in amaxes.items():
            keep[first_quantizer(model.get_submodule(p).weight_quantizer)] = amax
        if debug:
            for p in unit:
                model.get_submodule(p).awq_lite = {"best_alpha": alpha, "loss": losses, "scale": s}
                if p in amaxes:
                    model.get_submodule(p).awq_clip = {"best_clip_val": amaxes[p]}
    return applied, keep


def _limit(st, tokens_per_call: int | None) -> torch.Tensor:
    """The captured tokens, at most ``tokens_per_call`` per calibration call (evenly spaced)."""
    x = st.sample
    if tokens_per_call is None:
        return x
    limit = max(1, tokens_per_call * st.calls)
    if x.shape[0] > limit:
        x = x[:: math.ceil(x.shape[0] / limit)][:limit]
    return x


def _clip_ratios(min_clip_ratio: float, shrink_step: float) -> list[float]:
    n = int(math.ceil((1.0 - min_clip_ratio) / shrink_step - 1e-9))
    ratios = [round(min_clip_ratio + i * shrink_step, 2) for i in range(n)]
    return [r for r in ratios if r < 1.0] + [1.0]


def _clip(model, state, modules, stats, max_co_batch_size, max_tokens_per_batch, ratios, debug) -> dict:
    """awq_clip: the clip search alone, per module, on its (unsmoothed) weights."""
    keep = {}
    for path, module in modules.items():
        st = stats.get(path)
        if st is None or st.sample.shape[0] == 0:
            continue
        with on_compute_device(model, state, [path]) as dev:
            tq = first_quantizer(module.weight_quantizer)
            x = _limit(dev.stats(st), max_tokens_per_batch)
            amax = dev.home(clip_amax(tq, module.weight.detach(), gram(x), ratios, max_co_batch_size))
        if amax is None:
            continue
        keep[tq] = amax
        if debug:
            module.awq_clip = {"best_clip_val": amax}
    return keep


def awq_run(model, state, forward_loop, method, *, lite: bool, clip: bool, alpha_step=0.1, debug=False,
            max_co_batch_size=1024, max_tokens_per_batch=64, min_clip_ratio=0.5, shrink_step=0.05, gptq=True,
            before_rounding=None, **options):
    """One AWQ run; ``before_rounding(changes)`` runs after the scales are applied and calibrated,
    before the GPTQ rounding (SVDQuant splits off its low-rank part there)."""
    check_common_options(method, options)
    check_gptq_flag(method, gptq)
    require_forward_loop(method, forward_loop)
    alpha_step = _check_step(f"{method}: alpha_step", alpha_step)
    shrink_step = _check_step(f"{method}: shrink_step", shrink_step)
    if isinstance(min_clip_ratio, bool) or not isinstance(min_clip_ratio, (int, float)) or not 0 < min_clip_ratio < 1:
        raise QuantConfigError(f"{method}: min_clip_ratio must be in (0, 1), got {min_clip_ratio!r}")
    for name, v in (("max_co_batch_size", max_co_batch_size), ("max_tokens_per_batch", max_tokens_per_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise QuantConfigError(f"{method}: {name} must be a positive integer, got {v!r}")
    validate_quantizers(model)
    changes, redo = start_smoothing(state)
    try:
        modules = smoothable_modules(model, need_input=False)
        stats = capture_pass(model, state, forward_loop, modules, SEARCH_TOKENS)
        ratios = _clip_ratios(min_clip_ratio, shrink_step) if clip else None
        applied, keep = [], {}
        grams = [] if gptq else None
        if lite:
            applied, keep = _lite(model, state, modules, stats, alpha_step, debug, changes, ratios,
                                  max_tokens_per_batch, max_co_batch_size, grams)
        elif clip:
            keep = _clip(model, state, modules, stats, max_co_batch_size, max_tokens_per_batch, ratios, debug)
            if gptq:
                grams = sample_grams(stats, smoothing_units(state, modules, stats), state=state)
        finish(model, state, forward_loop, applied, stats, keep_weight_amax=keep)
        if before_rounding is not None:
            before_rounding(changes)
        if grams:
            round_smoothed(model, state, grams, changes)
    except BaseException:
        abort_smoothing(state, changes, redo)  # calibrate() restores the amax values
        raise
    end_smoothing(state, changes, applied)


@register_algorithm("awq_lite")
def awq_lite(model, state, forward_loop, **options):
    awq_run(model, state, forward_loop, "awq_lite", lite=True, clip=False, **options)


@register_algorithm("awq_clip")
def awq_clip(model, state, forward_loop, **options):
    awq_run(model, state, forward_loop, "awq_clip", lite=False, clip=True, **options)


@register_algorithm("awq_full")
def awq_full(model, state, forward_loop, **options):
    awq_run(model, state, forward_loop, "awq_full", lite=True, clip=True, **options)
