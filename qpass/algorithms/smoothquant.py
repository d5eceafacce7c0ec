"""``smoothquant``: move activation outliers into the weights, per input channel.

For each smoothing unit (a shared-input group such as q/k/v, or a lone Linear with
enabled input and weight quantizers) the scale is

    s_c = amax_x[c] ** alpha / amax_w[c] ** (1 - alpha)

with ``amax_x`` the per-channel abs-max of the unit's input over the calibration data
and ``amax_w`` the per-input-channel abs-max over all members' weights. As in ModelOpt,
``1/s`` is clamped to [1e-4, 1e4] and channels that never saw a non-zero value keep
s = 1; ``alpha`` defaults to 1.0 (ModelOpt 0.47's default). The weights are multiplied
by ``s``; ``1/s`` is folded into the producer when the graph allows (see
:mod:`qpass.algorithms.fold`), else kept as the members' ``pre_quant_scale``. The
input amax is then ``max_c amax_x[c] / s_c``: one forward_loop call in all.

Beyond ModelOpt: ``alpha="auto"`` picks, per unit, the alpha of the grid 0, 0.1, ..., 1
whose fake-quantized output (input and weights quantized as configured) is closest, in
mean squared error, to the float output on the captured token subsample.
"""

from __future__ import annotations

import torch

from qpass.algorithms import register_algorithm
from qpass.algorithms.smoothing import (
    SEARCH_TOKENS, Changes, alpha_grid, apply_scale, capture_pass, check_common_options, finish, group_weight,
    require_forward_loop, smoothable_modules, smoothing_units, validate_quantizers,
)
from qpass.errors import QuantConfigError

AUTO_GRID_STEP = 0.1


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
        return 1.0
    if alpha == "auto":
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QuantConfigError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    return float(alpha)


def _input_fake_quant(model, unit, xs: torch.Tensor, act_amax_s: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for p in unit:
        q = model.get_submodule(p).input_quantizer
        spec = q.spec
        if q._attrs.get("type") == "dynamic" or not spec.needs_amax:
            amax = None
        elif spec.amax_of(xs[:2]).numel() == 1:
            amax = act_amax_s.max()
        else:
            amax = spec.amax_of(xs)
        out.append(spec.fake_quant(xs, amax))
    return out


@torch.no_grad()
def search_alpha(model, unit: list[str], stats, weight_amax: torch.Tensor, grid) -> tuple[float, dict]:
    """The grid alpha minimising the unit's quantized-output MSE on the captured subsample."""
    from qpass.algorithms.smoothing import fake_quant_weight

    x = stats.sample
    ref = x @ group_weight(model, unit).t()
    losses = {}
    for alpha in grid:
        s = smoothquant_scale(stats.amax, weight_amax, alpha)
        xs = x / s
        outs = []
        for p, xq in zip(unit, _input_fake_quant(model, unit, xs, stats.amax / s)):
            m = model.get_submodule(p)
            wq = fake_quant_weight(m.weight_quantizer, m.weight.detach().float() * s).float()
            outs.append(xq @ wq.t())
        losses[alpha] = float((torch.cat(outs, -1) - ref).pow(2).mean())
    best = min(losses, key=losses.get)
    return best, losses


@register_algorithm("smoothquant")
def smoothquant(model, state, forward_loop, alpha=1.0, **options):
    check_common_options("smoothquant", options)
    require_forward_loop("smoothquant", forward_loop)
    alpha = _check_alpha(alpha)
    validate_quantizers(model)
    modules = smoothable_modules(model, need_input=True)
    stats = capture_pass(model, state, forward_loop, modules, SEARCH_TOKENS if alpha == "auto" else 0)
    plan = []
    for unit in smoothing_units(state, modules, stats):
        st = stats[unit[0]]
        weight_amax = group_weight(model, unit).abs().amax(0)
        a = alpha
        if alpha == "auto":
            a, _ = search_alpha(model, unit, st, weight_amax, alpha_grid(AUTO_GRID_STEP))
        plan.append((unit, smoothquant_scale(st.amax, weight_amax, a), a))
    applied, changes = [], Changes()
    try:
        for unit, s, a in plan:
            done = apply_scale(model, state, unit, s, changes)
            done.alpha = a
            applied.append(done)
        finish(model, state, forward_loop, applied, stats)
    except BaseException:
        changes.restore()
        raise
    state.smoothing = applied
