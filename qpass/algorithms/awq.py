"""AWQ: ``awq_lite`` (activation-aware scale search), ``awq_clip`` (weight range clipping
search) and ``awq_full`` (lite, then clip), with ModelOpt 0.47's options.

All three read one forward_loop pass: the activation max statistics and, per Linear with
an enabled weight quantizer, its input's per-channel mean |x| and a seeded token subsample
(:mod:`qpass.calib.capture`). The searches then run offline on the subsample, unit by unit.

``awq_lite`` (per smoothing unit: a shared-input group such as q/k/v, or one Linear):
for each alpha of the grid 0, alpha_step, ..., 1 the scale is ModelOpt's

    s = mean|x|^alpha / w_scale^(1 - alpha),  clamped to [1e-4, 1e4], divided by sqrt(max(s) min(s))

(``w_scale``: the mean over output rows of |w| / its block's abs-max); the alpha whose
``(x / s) @ Q(W * s)^T`` is closest in MSE to ``x @ W^T`` wins (input quantizers off during
the search, as in ModelOpt). Weights are multiplied by the best ``s``; ``1/s`` is folded into
the producer when the graph allows, else kept as the members' ``pre_quant_scale``.

``awq_clip`` (per Linear with a block weight format): for each clip ratio of
min_clip_ratio, +shrink_step, ..., 1 the weight amax is scaled down; per block (static
block formats) or per tensor (NVFP4's global amax) the ratio with the smallest error of
the block's partial products on up to ``max_tokens_per_batch`` tokens per calibration
call wins. The clipped amax replaces the max-calibrated one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qpass.algorithms import register_algorithm
from qpass.algorithms.smoothing import (
    SEARCH_TOKENS, Changes, alpha_grid, apply_scale, capture_pass, check_common_options, finish,
    quantized_output, require_forward_loop, smoothable_modules, smoothing_units, validate_quantizers,
)
from qpass.errors import QuantConfigError
from qpass.graph.quantized_model import iter_tensor_quantizers


def _first_quantizer(q):
    members = [t for t in iter_tensor_quantizers(q) if t.is_enabled]
    return members[0] if members else None


def weight_block_size(q) -> int | None:
    tq = _first_quantizer(q)
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


@torch.no_grad()
def search_unit_scale(model, unit: list[str], stats, grid) -> tuple[torch.Tensor, float, dict]:
    """ModelOpt's awq_lite scale search for one unit on its captured tokens."""
    x = stats.sample
    act_mean = stats.abs_mean
    w_scale = torch.cat([
        weight_scale(model.get_submodule(p).weight, weight_block_size(model.get_submodule(p).weight_quantizer))[None]
        * model.get_submodule(p).weight.shape[0]
        for p in unit
    ]).sum(0) / sum(model.get_submodule(p).weight.shape[0] for p in unit)
    ref = torch.cat([x @ model.get_submodule(p).weight.detach().float().t() for p in unit], -1)
    losses = {}
    for alpha in grid:
        s = awq_scale(act_mean, w_scale, alpha)
        losses[alpha] = float((quantized_output(model, unit, x, s) - ref).pow(2).mean())
    best = min(losses, key=losses.get)
    return awq_scale(act_mean, w_scale, best), best, losses


def _lite(model, state, modules, stats, alpha_step, debug, changes):
    grid = alpha_grid(alpha_step)
    plan = []
    for unit in smoothing_units(state, modules, stats):
        st = stats[unit[0]]
        if st.sample.shape[0] == 0:
            continue
        s, alpha, losses = search_unit_scale(model, unit, st, grid)
        plan.append((unit, s, alpha, losses))
    applied = []
    for unit, s, alpha, losses in plan:
        done = apply_scale(model, state, unit, s, changes)
        done.alpha = alpha
        applied.append(done)
        if debug:
            for p in unit:
                model.get_submodule(p).awq_lite = {"best_alpha": alpha, "loss": losses, "scale": s}
    return applied


def _clip_ratios(min_clip_ratio: float, shrink_step: float) -> list[float]:
    n = int(math.ceil((1.0 - min_clip_ratio) / shrink_step - 1e-9))
    ratios = [round(min_clip_ratio + i * shrink_step, 2) for i in range(n)]
    return [r for r in ratios if r < 1.0] + [1.0]


@torch.no_grad()
def clip_search(module, x: torch.Tensor, ratios, max_co_batch_size: int) -> torch.Tensor | None:
    """Best clipped amax of ``module``'s first weight quantizer for the inputs ``x`` [N, C]."""
    tq = _first_quantizer(module.weight_quantizer)
    if tq is None or not tq.spec.needs_amax or not tq._attrs.get("block_sizes"):
        return None
    spec = tq.spec
    w = module.weight.detach().float()
    co, ci = w.shape
    w_amax = spec.amax_of(w)
    if spec.is_dynamic or w_amax.numel() == 1:  # e.g. NVFP4: only the global amax can be clipped
        ref = x @ w.t()
        best, best_loss = w_amax, float("inf")
        for r in ratios:
            loss = float((x @ spec.fake_quant(w, w_amax * r).float().t() - ref).pow(2).mean())
            if loss < best_loss:
                best, best_loss = w_amax * r, loss
        return best
    bs = spec.block_size
    nb = math.ceil(ci / bs) if bs else 0
    if not bs or w_amax.numel() != co * nb:
        return None  # not blocks along the input channels
    pad = (-ci) % bs
    xb = F.pad(x, (0, pad)).view(x.shape[0], nb, bs)
    best_loss = torch.full((co, nb), float("inf"))
    best = torch.zeros(co, nb)
    amax2d = w_amax.reshape(co, nb).float()
    for r in ratios:
        dw = spec.fake_quant(w, w_amax * r).float() - w
        dwb = F.pad(dw, (0, pad)).view(co, nb, bs)
        loss = torch.empty(co, nb)
        for start in range(0, co, max_co_batch_size):
            part = torch.einsum("tnb,onb->otn", xb, dwb[start:start + max_co_batch_size])
            loss[start:start + max_co_batch_size] = part.pow(2).mean(1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better, amax2d * r, best)
    return best.reshape(w_amax.shape).to(w_amax.dtype)


def _clip(model, modules, stats, applied, max_co_batch_size, max_tokens_per_batch, min_clip_ratio,
          shrink_step, debug) -> dict:
    ratios = _clip_ratios(min_clip_ratio, shrink_step)
    scale_of = {p: a.scale for a in applied for p in a.unit}
    keep = {}
    for path, module in modules.items():
        st = stats.get(path)
        if st is None or st.sample.shape[0] == 0:
            continue
        x = st.sample
        limit = max(1, max_tokens_per_batch * st.calls)
        if x.shape[0] > limit:
            x = x[:: math.ceil(x.shape[0] / limit)][:limit]
        if path in scale_of:
            x = x / scale_of[path]
        amax = clip_search(module, x, ratios, max_co_batch_size)
        if amax is None:
            continue
        keep[_first_quantizer(module.weight_quantizer)] = amax
        if debug:
            module.awq_clip = {"best_clip_val": amax}
    return keep


def _run(model, state, forward_loop, method, *, lite: bool, clip: bool, alpha_step=0.1, debug=False,
         max_co_batch_size=1024, max_tokens_per_batch=64, min_clip_ratio=0.5, shrink_step=0.05, **options):
    check_common_options(method, options)
    require_forward_loop(method, forward_loop)
    alpha_step = _check_step(f"{method}: alpha_step", alpha_step)
    shrink_step = _check_step(f"{method}: shrink_step", shrink_step)
    if isinstance(min_clip_ratio, bool) or not isinstance(min_clip_ratio, (int, float)) or not 0 < min_clip_ratio < 1:
        raise QuantConfigError(f"{method}: min_clip_ratio must be in (0, 1), got {min_clip_ratio!r}")
    for name, v in (("max_co_batch_size", max_co_batch_size), ("max_tokens_per_batch", max_tokens_per_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise QuantConfigError(f"{method}: {name} must be a positive integer, got {v!r}")
    validate_quantizers(model)
    modules = smoothable_modules(model, need_input=False)
    stats = capture_pass(model, state, forward_loop, modules, SEARCH_TOKENS)
    changes = Changes()
    try:
        applied = _lite(model, state, modules, stats, alpha_step, debug, changes) if lite else []
        keep = {}
        if clip:
            keep = _clip(model, modules, stats, applied, max_co_batch_size, max_tokens_per_batch,
                         min_clip_ratio, shrink_step, debug)
        finish(model, state, forward_loop, applied, stats, keep_weight_amax=keep)
    except BaseException:
        changes.restore()  # calibrate() restores the amax values
        raise
    state.smoothing = applied


@register_algorithm("awq_lite")
def awq_lite(model, state, forward_loop, **options):
    _run(model, state, forward_loop, "awq_lite", lite=True, clip=False, **options)


@register_algorithm("awq_clip")
def awq_clip(model, state, forward_loop, **options):
    _run(model, state, forward_loop, "awq_clip", lite=False, clip=True, **options)


@register_algorithm("awq_full")
def awq_full(model, state, forward_loop, **options):
    _run(model, state, forward_loop, "awq_full", lite=True, clip=True, **options)
