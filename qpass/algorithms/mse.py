"""``mse``: max calibration, then an MSE search of every weight quantizer's amax.

ModelOpt 0.47 semantics (``mtq.calibrate(model, {"method": "mse", ...})``):

1. max calibration of all quantizers (weights from the weights, activations over ``forward_loop``);
2. for each enabled, static-range weight quantizer (MX / dynamic formats and quantizer
   sequences are skipped), candidates ``amax_max * r`` for ``r`` in
   ``linspace(start_multiplier, stop_multiplier, ceil((stop - start) / step_size) + 1)``; each
   amax element (per tensor, channel or block) takes the first candidate with the least
   ``sum((w - fake_quant(w, amax))^2)`` over its elements.

Activation amax stays the max-calibrated one, as in ModelOpt (its ``mse`` refines weights
only). For an MSE-chosen activation range, use ``calibrator: "histogram"`` with method ``mse``
(see :mod:`qpass.calib.histogram`), which needs one forward pass and bounded memory.

``fp8_scale_sweep=True`` sweeps the E4M3 block scales of static NVFP4 weight quantizers (each
block takes the E4M3 value of least squared error, see :mod:`qpass.calib.nvfp4_static`) and
leaves every other weight at its max amax, as in ModelOpt. Without it, a static NVFP4 weight's
block amaxes go through the multiplier search against its fixed global amax (ModelOpt's
NVFP4_FOUR_OVER_SIX_CFG: multipliers 1.0 and 1.5, i.e. each block's largest value maps to 6 or
to 4 on the FP4 grid).
"""

from __future__ import annotations

import math

import torch

from qpass.algorithms import register_algorithm
from qpass.algorithms.max import shared_global_amax_groups
from qpass.calib.max_calibrate import max_calibrate, weight_quantizer_owners
from qpass.errors import QuantConfigError
from qpass.calib.nvfp4_static import static_nvfp4_weights, sweep_fp8_scales
from qpass.nn.tensor_quantizer import TensorQuantizer


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise QuantConfigError(f"algorithm 'mse': {name} must be a number > 0, got {value!r}")
    return float(value)


def mse_candidates(step_size=0.1, start_multiplier=0.25, stop_multiplier=4.0, device=None) -> torch.Tensor:
    """The amax multipliers ModelOpt's MSE search tries (float32, ascending)."""
    step = _positive("step_size", step_size)
    start = _positive("start_multiplier", start_multiplier)
    stop = _positive("stop_multiplier", stop_multiplier)
    if stop < start:
        raise QuantConfigError(
            f"algorithm 'mse': stop_multiplier ({stop}) must be >= start_multiplier ({start})"
        )
    steps = math.ceil((stop - start) / step) + 1
    return torch.linspace(start, stop, steps=steps, device=device)


@torch.no_grad()
def mse_search_amax(q: TensorQuantizer, w: torch.Tensor, candidates: torch.Tensor, error_fn=None) -> torch.Tensor:
    """Per amax element, the candidate ``q.amax * r`` with the least squared error on ``w``
    (``error_fn(w - Q(w))``: another per-element error, e.g. :mod:`~qpass.algorithms.local_hessian`'s)."""
    spec = q.spec
    pqs = q.pre_quant_scale
    x = w.detach().float()
    if pqs is not None:
        x = x * pqs.to(x.device, torch.float32)
    base = q.amax.to(x.device)
    lay = spec._layout(x.shape)
    best_loss = best_amax = None
    for r in candidates.to(x.device):
        amax = base * r
        dw = x - spec.fake_quant(x, spec.with_global(amax, q.global_amax))
        err = dw ** 2 if error_fn is None else error_fn(dw)
        eb = lay.to_blocks(err)  # padding is 0 and quantizes to 0: no error
        if lay.kept is None:
            loss = eb.sum()
        else:
            dims = tuple(d for d in range(eb.dim()) if d not in lay.kept)
            loss = eb.sum(dim=dims, keepdim=True) if dims else eb.sum()
            loss = loss.reshape(base.shape) if loss.numel() == base.numel() else loss.sum()
        if best_loss is None:
            best_loss, best_amax = loss.clone(), amax.clone()
        else:
            better = loss < best_loss  # strict: the first minimum wins, as torch.argmin
            best_loss = torch.where(better, loss, best_loss)
            best_amax = torch.where(better, amax, best_amax)
    return best_amax


@register_algorithm("mse")
def mse_algorithm(
    model,
    state,
    forward_loop,
    step_size=0.1,
    start_multiplier=0.25,
    stop_multiplier=4.0,
    fp8_scale_sweep=False,
    distributed_sync=True,
    shared_states=None,
    **common,
):
    step_size = 0.1 if step_size is None else step_size
    start_multiplier = 0.25 if start_multiplier is None else start_multiplier
    stop_multiplier = 4.0 if stop_multiplier is None else stop_multiplier
    candidates = mse_candidates(step_size, start_multiplier, stop_multiplier)  # validates first
    fp8_scale_sweep = False if fp8_scale_sweep is None else fp8_scale_sweep
    if not isinstance(fp8_scale_sweep, bool):
        raise QuantConfigError(f"algorithm 'mse': fp8_scale_sweep must be True or False, got {fp8_scale_sweep!r}")
    distributed_sync = True if distributed_sync is None else distributed_sync
    if not isinstance(distributed_sync, bool):
        raise QuantConfigError(f"algorithm 'mse': distributed_sync must be True or False, got {distributed_sync!r}")
    global_groups = shared_global_amax_groups("mse", model, shared_states)
    max_calibrate(model, state, forward_loop, distributed_sync=distributed_sync, global_groups=global_groups)
    if fp8_scale_sweep:  # ModelOpt: only static NVFP4 weights are swept; others keep their max amax
        for module, tq in static_nvfp4_weights(model):
            tq.amax = sweep_fp8_scales(tq, module.weight)
        return
    for _, module, q in weight_quantizer_owners(model):
        if not isinstance(q, TensorQuantizer):
            continue  # ModelOpt skips quantizer sequences
        if not q.needs_calibration or q.spec.is_dynamic or q.amax is None:
            continue
        q.amax = mse_search_amax(q, module.weight, candidates)
