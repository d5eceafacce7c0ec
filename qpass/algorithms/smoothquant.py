"""``smoothquant``: move activation outliers into the weights, per input channel.

For each smoothing unit (a shared-input group such as q/k/v, or a lone Linear with
enabled input and weight quantizers) the scale is

    s_c = amax_x[c] ** alpha / amax_w[c] ** (1 - alpha)

with ``amax_x`` the per-channel abs-max of the unit's input over the calibration data
and ``amax_w`` the per-input-channel abs-max over all members' weights. As in ModelOpt,
``1/s`` is clamped to [1e-4, 1e4] and channels that never saw a non-zero value keep
s = 1. The weights are multiplied by ``s``; ``1/s`` is folded into the producer when the
graph allows (see :mod:`qpass.algorithms.fold`), else kept as the members'
``pre_quant_scale``. The input amax is then ``clip * max_c amax_x[c] / s_c``: one
forward_loop call in all.

``alpha`` = a number in [0, 1]: ModelOpt's algorithm with that alpha (clip = 1).
``alpha="auto"`` (qpass's default; ModelOpt's is 1.0): per unit, alpha of the grid
0, 0.1, ..., 1 and the static activation clip are searched together on the unit's
captured input tokens, for the smallest error of its quantized output (input and weights
quantized as configured) against the float output; see :mod:`qpass.algorithms.smooth_search`.

``gptq=True`` (qpass's own option, off by default): the smoothed weights are then GPTQ-rounded
as AWQ's are (:func:`qpass.algorithms.gptq.round_smoothed`), from the captured tokens' Gram
matrix. On SmolLM2 INT8_SMOOTHQUANT_CFG it lowered held-out perplexity from 15.709 to 15.648
for about twice the calibration time, so it is opt-in for 8-bit weights.
"""

from __future__ import annotations

import torch

from qpass.algorithms import register_algorithm
from qpass.algorithms.smoothing import (
    SEARCH_TOKENS, abort_smoothing, alpha_grid, apply_scale, capture_pass, check_common_options, finish, group_weight,
    end_smoothing, require_forward_loop, smoothable_modules, start_smoothing, smoothing_units, validate_quantizers,
)
from qpass.algorithms.awq_search import sample_grams
from qpass.algorithms.gptq import check_gptq_flag, round_smoothed
from qpass.algorithms.smooth_search import in_parallel, search_alpha_clip
from qpass.calib.compute_device import on_compute_device
from qpass.errors import QuantConfigError
from qpass.formats.layout import abs_amax

AUTO_GRID_STEP = 0.1
#: tokens captured per smoothed input for alpha="auto" (the estimate and the exact scoring read
#: them all). An eighth of AWQ's: SmolLM2 perplexity 15.706 with 512, 15.709 with 2048, for
#: 1.86x instead of 2.06x ModelOpt's quantize time (``tools/bench_algorithms.py``)
AUTO_SEARCH_TOKENS = 512
#: ... and on more data, one token in eight up to this many (the same 512 up to 4096 tokens). On
#: SmolLM2 with 64 calibration windows of 256 tokens: held-out perplexity 15.465 instead of 15.629
#: (FP32 14.850, ModelOpt 15.993)
AUTO_SEARCH_TOKENS_MAX = 2048
#: tokens captured with ``gptq=True``: its Gram matrices want more than the search does
GPTQ_TOKENS = SEARCH_TOKENS // 2


def smoothquant_scale(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s such that x / s and W * s share the quantization difficulty (float32, [C])."""
    act_amax = act_amax.float()
    weight_amax = weight_amax.float().to(act_amax.device)
    inv = weight_amax.pow(1 - alpha) / act_amax.pow(alpha)
    zero = act_amax <= 1.0 / (1 << 31)
    inv = torch.where(zero | ~torch.isfinite(inv), torch.ones_like(inv), inv)
    inv = inv.clamp(min=1e-4, max=1e4)
    return 1.0 / inv


def _check_alpha(alpha):
    if alpha is None:
        return "auto"
    if alpha == "auto":
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QuantConfigError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    return float(alpha)


@register_algorithm("smoothquant")
def smoothquant(model, state, forward_loop, alpha="auto", gptq=False, **options):
    check_common_options("smoothquant", options)
    require_forward_loop("smoothquant", forward_loop)
    alpha = _check_alpha(alpha)
    check_gptq_flag("smoothquant", gptq)
    validate_quantizers(model)
    changes, redo = start_smoothing(state)
    try:
        applied = _smooth(model, state, forward_loop, alpha, changes, gptq)
    except BaseException:
        abort_smoothing(state, changes, redo)
        raise
    end_smoothing(state, changes, applied)


def _smooth(model, state, forward_loop, alpha, changes, gptq):
    modules = smoothable_modules(model, need_input=True)
    tokens = GPTQ_TOKENS if gptq else AUTO_SEARCH_TOKENS if alpha == "auto" else 0
    grow = AUTO_SEARCH_TOKENS_MAX if alpha == "auto" and not gptq else 0
    stats = capture_pass(model, state, forward_loop, modules, tokens, sums=False, grow_to=grow,
                         second=alpha == "auto")
    def plan_unit(unit):
        with on_compute_device(model, state, unit) as dev:
            st = dev.stats(stats[unit[0]])
            weight_amax = abs_amax(group_weight(model, unit), (0,))[0]
            a, clip = alpha, 1.0
            if alpha == "auto":
                found = search_alpha_clip(model, unit, st, lambda al: smoothquant_scale(st.amax, weight_amax, al),
                                          alpha_grid(AUTO_GRID_STEP))
                a, clip = found.alpha, found.clip
            s = dev.home(smoothquant_scale(st.amax, weight_amax, a))
        return unit, s, a, clip

    # the searches (alpha="auto") side by side; a calibration device moves weights per unit
    parallel = alpha == "auto" and state.compute_device is None
    plan = in_parallel(plan_unit, list(smoothing_units(state, modules, stats)), threads=None if parallel else 1)
    applied = []
    for unit, s, a, clip in plan:
        done = apply_scale(model, state, unit, s, changes)
        done.alpha, done.clip = a, clip
        applied.append(done)
    finish(model, state, forward_loop, applied, stats)
    if gptq:
        grams = sample_grams(stats, [done.unit for done in applied], [done.scale for done in applied], state)
        round_smoothed(model, state, grams, changes)
    return applied
