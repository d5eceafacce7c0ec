"""``svdquant``: ModelOpt 0.47's SVDQuant ("lite"), the algorithm of NVFP4_SVDQUANT_DEFAULT_CFG.

1. AWQ-lite smoothing (:mod:`qpass.algorithms.awq`), with the quantizers of modules matching
   ``skip_layers`` (fnmatch patterns on module paths) switched off meanwhile, so they are neither
   smoothed nor scaled.
2. For every other quantized Linear, the rank-``lowrank`` SVD of its smoothed weight,
   ``W ~ B A`` (float64, ``B = U_r S_r``, ``A = V_r^T``): the weight becomes ``W - B A`` and the
   factors go to its weight quantizer (``_svdquant_lora_a``/``_svdquant_lora_b``, ModelOpt's
   buffers), whose graphs gain the unquantized branch ``(x * pqs) A^T B^T``
   (:mod:`qpass.passes.lora_branch`). The quantizers then see only the residual, from which the
   outliers the low-rank part holds are gone. A weight tied to another module's (SmolLM2's
   lm_head and embedding) is untied first, so the other owner keeps its values.
3. Weight amaxes are re-calibrated from the residuals. The inputs of the quantized path do not
   change, so their amaxes stand; only modules skipped in step 1, whose activations no pass has
   calibrated, cost one more ``forward_loop`` pass (ModelOpt always runs one).
4. qpass's ``gptq=True`` (as for AWQ; ``False`` is ModelOpt's algorithm): the residuals are
   GPTQ-rounded onto their grids from the smoothed inputs' Gram matrix of the same single pass;
   the branch stays exact, so the rounding error feedback only has the residual to absorb.

Like the other smoothing algorithms, it is undone by the next smoothing calibration (the weights,
scales and factors come back, the branches go) and by a failure part-way.
"""

from __future__ import annotations

import fnmatch
import functools

import torch
from torch import nn

from qpass.algorithms import register_algorithm
from qpass.algorithms.awq import awq_run
from qpass.algorithms.fold import untie_weight
from qpass.algorithms.gptq import check_gptq_flag
from qpass.algorithms.smoothing import check_common_options, graphs_of, require_forward_loop, validate_quantizers
from qpass.calib.max_calibrate import (
    calibrate_weights, collect_activations, global_amax_groups, load_activation_amax, share_group_amax,
)
from qpass.errors import QuantConfigError
from qpass.nn.tensor_quantizer import TensorQuantizer
from qpass.passes.lora_branch import set_lora, sync_lora_branches


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A`` the best rank-``rank`` approximation of ``w`` (float64 SVD; zero
    columns/rows pad a rank above ``min(w.shape)``), in ``w``'s dtype."""
    u, s, vt = torch.linalg.svd(w.detach().double(), full_matrices=False)
    k = min(rank, s.numel())
    b = w.new_zeros(w.shape[0], rank, dtype=torch.float64)
    a = w.new_zeros(rank, w.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vt[:k]
    return b.to(w.dtype), a.to(w.dtype)


def _check(lowrank, skip_layers) -> list[str]:
    if isinstance(lowrank, bool) or not isinstance(lowrank, int) or lowrank < 1:
        raise QuantConfigError(f"svdquant: lowrank must be an int >= 1, got {lowrank!r}")
    if skip_layers is None:
        return []
    if not isinstance(skip_layers, (list, tuple)) or not all(isinstance(p, str) for p in skip_layers):
        raise QuantConfigError(f"svdquant: skip_layers must be a list of module-path patterns, got {skip_layers!r}")
    return list(skip_layers)


def _quantized_linears(model: nn.Module):
    for path, module in model.named_modules():
        q = module._modules.get("weight_quantizer")
        if isinstance(module, nn.Linear) and type(q) is TensorQuantizer and q.is_enabled:
            yield path, module, q


def _split_low_rank(model, state, skipped: set, lowrank: int, changes) -> None:
    """Step 2 on the smoothed model, recorded in the smoothing run's ``changes``; then the weight
    amaxes of the residuals."""
    with torch.no_grad():
        for path, module, q in list(_quantized_linears(model)):
            if path in skipped or module.weight.dim() != 2:
                continue
            untie_weight(model, graphs_of(state), path)  # a tied embedding keeps its values
            changes.tensor(module.weight, f"{path}.weight")
            changes.lora(q)
            b, a = low_rank(module.weight, lowrank)
            module.weight.sub_(b @ a)
            set_lora(q, (a, b))
    sync_lora_branches(state)
    calibrate_weights(model, global_amax_groups(model, state))


@register_algorithm("svdquant")
def svdquant(model, state, forward_loop, lowrank=32, skip_layers=None, gptq=True, **options):
    lowrank = 32 if lowrank is None else lowrank
    skip = _check(lowrank, skip_layers)
    check_gptq_flag("svdquant", gptq)
    check_common_options("svdquant", options)
    require_forward_loop("svdquant", forward_loop)
    validate_quantizers(model)
    skipped = {p for p, _, _ in _quantized_linears(model) if any(fnmatch.fnmatch(p, pat) for pat in skip)}
    off = []
    for path in skipped:
        m = model.get_submodule(path)
        for q in (m._modules.get("weight_quantizer"), m._modules.get("input_quantizer")):
            if isinstance(q, TensorQuantizer) and q.is_enabled:
                q.disable()
                off.append(q)
    try:
        awq_run(model, state, forward_loop, "svdquant", lite=True, clip=False, gptq=gptq,
                before_rounding=functools.partial(_split_low_rank, model, state, skipped, lowrank))
    finally:
        for q in off:
            q.enable()
    if not off:
        return
    try:  # the skipped modules' activations (the others' amaxes come out the same)
        collect_activations(model, state, forward_loop)
        load_activation_amax(model, state)
        share_group_amax(model, state.groups)
    except BaseException:
        state.unsmoothed.restore()
        state.unsmoothed = None
        sync_lora_branches(state)
        raise
