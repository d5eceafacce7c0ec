"""AWQ's searches on captured tokens, through Gram matrices.

For a weight-only quantized Linear the output error of any weight error ``dW`` over the
tokens ``x`` is ``sum((dW @ G) * dW)`` with ``G = x^T x``: computed once per unit, it
makes every candidate cost O(out x in x in) instead of O(tokens x out x in), over *all*
captured tokens. Per-block clip errors use the block-diagonal part of ``G`` (the partial
products of one block of input channels), and smoothing by ``s`` only rescales ``G``.

:func:`search_unit_scale` picks the alpha of the grid (weights max-calibrated, as ModelOpt
scores it), then, when ``clip_ratios`` are given, each block's clipped amax for that scale.
(Scoring every alpha with its own clipped weights was tried: it lost on SmolLM2.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qpass.algorithms.smoothing import fake_quant_weight, group_weight
from qpass.graph.quantized_model import iter_tensor_quantizers

_CHUNK = 1024


def first_quantizer(q):
    members = [t for t in iter_tensor_quantizers(q) if t.is_enabled]
    return members[0] if members else None


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [C, C] in float64 (float32 products summed over chunks of tokens)."""
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK):
        part = x[start:start + _CHUNK].float()
        g += (part.t() @ part).double()
    return g


def output_error(dw: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per output row, the sum over tokens of (x . dw_row)^2, given ``g = gram(x)``."""
    dw = dw.double()
    return ((dw @ g) * dw).sum(-1)


def block_grams(g: torch.Tensor, bs: int) -> torch.Tensor:
    """The diagonal [bs, bs] blocks of ``g`` (zero-padded to whole blocks): [nb, bs, bs] float32."""
    c = g.shape[0]
    nb = math.ceil(c / bs)
    gp = F.pad(g.float(), (0, nb * bs - c, 0, nb * bs - c))
    idx = torch.arange(nb)
    return gp.view(nb, bs, nb, bs)[idx, :, idx, :]


def clippable_blocks(tq, w: torch.Tensor) -> str | None:
    """'blocks' for a static block format along the input channels, 'global' for a format with
    only a per-tensor amax to clip (NVFP4), None when there is nothing to clip."""
    if tq is None or not tq.spec.needs_amax or not tq._attrs.get("block_sizes"):
        return None
    spec = tq.spec
    amax = spec.amax_of(w)
    if spec.is_dynamic or amax.numel() == 1:
        return "global"
    bs = spec.block_size
    if not bs or amax.numel() != w.shape[0] * math.ceil(w.shape[1] / bs):
        return None
    return "blocks"


@torch.no_grad()
def clip_amax(tq, w: torch.Tensor, g: torch.Tensor, ratios, max_co_batch_size: int = 1024,
              gb: torch.Tensor | None = None) -> torch.Tensor | None:
    """Best clipped amax of quantizer ``tq`` for weight ``w`` [out, in] and token Gram ``g``.

    Static blocks: per block, the ratio with the smallest error of the block's partial products
    (``gb``: the block Grams, derived from ``g`` when not given); a global amax (NVFP4): the ratio
    with the smallest error of the whole output. None when the format has nothing to clip."""
    kind = clippable_blocks(tq, w)
    if kind is None:
        return None
    spec = tq.spec
    w = w.float()
    w_amax = spec.amax_of(w)
    if kind == "global":
        best, best_loss = w_amax, float("inf")
        for r in ratios:
            loss = float(output_error(spec.fake_quant(w, w_amax * r).float() - w, g).sum())
            if loss < best_loss:
                best, best_loss = w_amax * r, loss
        return best
    co, ci = w.shape
    bs = spec.block_size
    nb = math.ceil(ci / bs)
    pad = nb * bs - ci
    if gb is None:
        gb = block_grams(g, bs)
    best_loss = torch.full((co, nb), float("inf"))
    best = torch.zeros(co, nb)
    amax2d = w_amax.reshape(co, nb).float()
    for r in ratios:
        dw = spec.fake_quant(w, w_amax * r).float() - w
        dwb = F.pad(dw, (0, pad)).view(co, nb, bs)
        loss = torch.empty(co, nb)
        for start in range(0, co, max_co_batch_size):
            part = dwb[start:start + max_co_batch_size]
            loss[start:start + max_co_batch_size] = (torch.einsum("onb,nbc->onc", part, gb) * part).sum(-1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better, amax2d * r, best)
    return best.reshape(w_amax.shape).to(w_amax.dtype)


def _scaled_block_grams(gb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Block Grams of x / s from those of x."""
    nb, bs, _ = gb.shape
    sp = F.pad(s.float(), (0, nb * bs - s.numel()), value=1.0).view(nb, bs)
    return gb / (sp[:, :, None] * sp[:, None, :])


def _clipped_amaxes(mods, s, gc, gb_of, clip_ratios, max_co_batch_size) -> dict:
    """Per member, the clipped amax of its first weight quantizer for W * s on tokens x / s."""
    out = {}
    for p, m in mods.items():
        ws = m.weight.detach().float() * s
        tq = first_quantizer(m.weight_quantizer)
        kind = clippable_blocks(tq, ws)
        amax = None
        if kind == "blocks":
            bs = tq.spec.block_size
            if bs not in gb_of:
                gb_of[bs] = block_grams(gc, bs)
            amax = clip_amax(tq, ws, None, clip_ratios, max_co_batch_size, gb=_scaled_block_grams(gb_of[bs], s))
        elif kind == "global":
            sd = s.double()
            amax = clip_amax(tq, ws, gc / (sd[:, None] * sd[None, :]), clip_ratios, max_co_batch_size)
        if amax is not None:
            out[p] = amax
    return out


@torch.no_grad()
def search_unit_scale(model, unit: list[str], x: torch.Tensor, scale_fn, grid, clip_ratios=None,
                      clip_x: torch.Tensor | None = None, max_co_batch_size: int = 1024):
    """The grid alpha whose quantized unit output is closest (MSE over ``x``) to the float one,
    then, with ``clip_ratios``, each member's clipped weight amax for that scale.

    ``scale_fn(alpha)`` gives the scale s; the clip search runs on ``W * s`` with the tokens
    ``clip_x / s`` (default: ``x``). Returns (s, alpha, losses, {path: clipped amax}).
    """
    mods = {p: model.get_submodule(p) for p in unit}
    g = gram(x)
    w = group_weight(model, unit)
    denom = max(x.shape[0], 1) * w.shape[0]
    losses = {}
    for alpha in grid:
        s = scale_fn(alpha)
        wq = torch.cat([fake_quant_weight(m.weight_quantizer, m.weight.detach().float() * s).float()
                        for m in mods.values()])
        # (x / s) @ Q(W s)^T = x @ (Q(W s) / s)^T: the effective weight error through x's Gram matrix
        losses[alpha] = float(output_error(wq / s - w, g).sum()) / denom
    best = min(losses, key=losses.get)
    s = scale_fn(best)
    amaxes = {}
    if clip_ratios:
        gc = g if clip_x is None or clip_x is x else gram(clip_x)
        amaxes = _clipped_amaxes(mods, s, gc, {}, clip_ratios, max_co_batch_size)
    return s, best, losses, amaxes
