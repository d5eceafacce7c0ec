"""Static NVFP4 weights: the global amax, and ModelOpt's MSE sweep of their E4M3 block scales.

A static NVFP4 weight quantizer (``block_sizes={-1: 16, "type": "static", "scale_bits": (4, 3)}``)
keeps two buffers, as ModelOpt's: ``_amax``, one amax per block of 16 along the last axis, and
``_global_amax``, the per-tensor amax that fixes the E4M3 grid of the block scales. Block ``b``
gets the scale ``e4m3(amax_b * norm / global) * global / (6 * norm)``, ``norm`` being 448, or
256 with ``four_over_six``. Max calibration sets each block's amax to its abs-max and the global
amax to the largest of them; modules reading one input (q/k/v, gate/up, found in the graph) share
one global amax, the largest of theirs, so their weight scales sit on one FP8 grid and a fused
GEMM can use one second-level scale (ModelOpt shares it for the same name-matched groups).

``fp8_scale_sweep`` (algorithm ``mse``): each block takes, of the 126 positive finite E4M3
values ``v``, the block amax ``global * v / 448`` with the least squared weight error; every
block scale is then exactly an E4M3 value.
"""

from __future__ import annotations

import re
import warnings

import torch

from qpass.calib.max_calibrate import weight_quantizer_owners
from qpass.formats import dynamic
from qpass.graph.quantized_model import iter_tensor_quantizers

__all__ = ["fp8_scale_candidates", "name_groups", "pattern_groups", "set_global_amax", "static_nvfp4_weights",
           "sweep_fp8_scales"]

#: modules that share a global amax by name, per parent module (ModelOpt 0.47's default grouping):
#: the groups of a model whose graph is not traced yet (a weight-only config runs no forward)
NAME_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def static_nvfp4_weights(model):
    """(module, quantizer) for every enabled, calibrated static NVFP4 weight quantizer."""
    out = []
    for _, module, q in weight_quantizer_owners(model):
        for tq in iter_tensor_quantizers(q):
            if tq.is_enabled and tq.amax is not None and tq.spec.is_static_nvfp4:
                out.append((module, tq))
    return out


@torch.no_grad()
def set_global_amax(model, groups=()) -> None:
    """Each static NVFP4 weight's global amax: its blocks' max, shared within ``groups``."""
    found = static_nvfp4_weights(model)
    by_module: dict[int, list] = {}
    for module, tq in found:
        by_module.setdefault(id(module), []).append(tq)
    shared: dict[int, torch.Tensor] = {}
    for group in groups:
        members = [tq for path in group for tq in by_module.get(id(model.get_submodule(path)), ())]
        if len(members) < 2 or len({tq.spec for tq in members}) != 1:
            continue
        g = torch.stack([tq.amax.float().amax().to(members[0].amax.device) for tq in members]).amax()
        for tq in members:
            shared[id(tq)] = g
    for _, tq in found:
        tq.global_amax = shared.get(id(tq), tq.amax.float().amax())


def fp8_scale_candidates(device=None) -> torch.Tensor:
    """The 126 positive finite E4M3 values divided by 448, ascending."""
    values = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return (values[torch.isfinite(values) & (values > 0)] / 448.0).to(device)


@torch.no_grad()
def sweep_fp8_scales(tq, weight: torch.Tensor, error_fn=None) -> torch.Tensor:
    """The block amax of least squared error per block, among ``global * v / 448``
    (``error_fn(w - Q(w))``: another per-element error, summed per block).

    Every block shares a candidate's scale, so each candidate quantizes the weight with one
    scalar block scale ``d`` (the value :meth:`QuantSpec.fake_quant` computes for a block amax of
    ``global * v``): the same values as the general path at a fifth of its cost."""
    spec = tq.spec
    x = weight.detach().float()
    pqs = tq.pre_quant_scale
    if pqs is not None:
        x = x * pqs.to(x.device, torch.float32)
    glob = tq.global_amax.to(x.device)
    lay = spec._layout(x.shape)
    best_loss = best = None
    for v in fp8_scale_candidates(x.device):
        amax = glob * v
        _, _, d = dynamic.block_float_scales(spec.fmt, spec.scale_format, amax.reshape(1), glob, spec.scale_norm)
        dw = x - dynamic.round_scaled(spec.fmt, x, d)
        loss = lay.to_blocks(dw.pow_(2) if error_fn is None else error_fn(dw)).sum(-1)
        if best is None:
            best_loss, best = loss, torch.full_like(loss, float(amax))
        else:
            better = loss < best_loss  # strict: the smallest scale wins a tie, as argmin does
            best_loss = torch.where(better, loss, best_loss)
            best = torch.where(better, amax, best)
    return best.reshape(tq.amax.shape)


def name_groups(model) -> list[list[str]]:
    """:data:`NAME_GROUPS`: sibling modules with those names and enabled weight quantizers."""
    return pattern_groups(model, [re.compile(rf"(?:(.*)\.)?(?:{'|'.join(roles)})") for roles in NAME_GROUPS])


def pattern_groups(model, compiled: list, where: str | None = None) -> list[list[str]]:
    """Modules with an enabled weight quantizer grouped by regex: each module joins its first
    pattern that matches its whole name, keyed by that pattern and the captured groups; groups of
    two or more. ``where``: warn, naming it, of a pattern that matches no such module."""
    buckets: dict[tuple, list[str]] = {}
    matched = set()
    for name, module in model.named_modules():
        q = module._modules.get("weight_quantizer")
        if q is None or not any(tq.is_enabled for tq in iter_tensor_quantizers(q)):
            continue
        for i, regex in enumerate(compiled):
            m = regex.fullmatch(name)
            if m is not None:
                buckets.setdefault((i, m.groups()), []).append(name)
                matched.add(i)
                break
    for i, regex in enumerate(compiled):
        if where is not None and i not in matched:
            warnings.warn(f"{where}['weight_global_amax'] pattern {regex.pattern!r} matches no module with an "
                          "enabled weight quantizer", stacklevel=4)
    return [names for names in buckets.values() if len(names) >= 2]
