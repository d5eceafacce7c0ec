"""AWQ's searches on captured tokens, through Gram matrices.

For a weight-only quantized Linear the output error of any weight error ``dW`` over the
tokens ``x`` is ``sum((dW @ G) * dW)`` with ``G = x^T x``, or ``|dW @ F|^2`` with any factor
``F F^T = G`` (its Cholesky factor, or ``x^T`` itself when there are fewer tokens than input
channels): computed once per unit, it makes every candidate cost O(out x in x min(in, tokens))
float32 instead of O(tokens x out x in), over *all* captured tokens, with no cancellation. Per-block clip errors use the block-diagonal part of ``G`` (the partial
products of one block of input channels), and smoothing by ``s`` only rescales ``G``.

:func:`search_unit_scale` picks the alpha of the grid (weights max-calibrated, as ModelOpt
scores it), then, when ``clip_ratios`` are given, each block's clipped amax for that scale.
(Scoring every alpha with its own clipped weights was tried: it lost on SmolLM2.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qpass.algorithms.smoothing import scaled_weight_rows
from qpass.calib.compute_device import to_compute_device
from qpass.formats.layout import abs_amax
from qpass.graph.quantized_model import iter_tensor_quantizers

_CHUNK = 1024


def first_quantizer(q):
    members = [t for t in iter_tensor_quantizers(q) if t.is_enabled]
    return members[0] if members else None


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [C, C] in float64 (float32 products summed over chunks of tokens)."""
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        part = x[start:start + _CHUNK].float()
        g += (part.t() @ part).double()
    return g


def fast_bf16(device) -> bool:
    """True where bfloat16 GEMMs are native and faster than float32: CPUs with AVX512-BF16/AMX."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gram_factor(g: torch.Tensor | None, x: torch.Tensor | None = None,
                low_precision: bool | None = None) -> torch.Tensor:
    """A factor ``F`` [C, r] with ``F @ F.T == g``, so that :func:`output_error` is a sum of squares.

    With at most C tokens, ``x.T`` itself (r = tokens; ``g`` may then be None); otherwise the
    Cholesky factor of ``g`` (computed in float64; a Gram matrix of rank < C gets a jitter of
    1e-12 of its mean diagonal, which adds that fraction of ``|dw|^2`` to every error).
    ``low_precision`` (default: where :func:`fast_bf16`) returns it in bfloat16, and
    :func:`output_error` then multiplies in bfloat16 with float32 accumulation: about 2x faster,
    with errors about 1e-5 relative, far below the gaps between the candidates compared."""
    if low_precision is None:
        low_precision = fast_bf16((x if g is None else g).device)
    dtype = torch.bfloat16 if low_precision else torch.float32
    if x is not None and x.shape[0] <= x.shape[1]:
        return x.t().to(dtype).contiguous()
    g = g.double()
    jitter = 0.0
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(g + jitter * eye if jitter else g)
        if int(info) == 0:
            return factor.to(dtype)
        jitter = scale * 1e-12 if not jitter else jitter * 100
    vals, vecs = torch.linalg.eigh(g)
    return (vecs * vals.clamp(min=0).sqrt()).to(dtype)


def scaled_weight_loss(mods, s: torch.Tensor, factor: torch.Tensor, col_amax=None,
                       stop_above: float = math.inf, denom: float = 1.0) -> float:
    """``sum |(Q(W s) / s - W) @ factor|^2 / denom`` over the members' weights, row chunk by row
    chunk (``col_amax``: each member's ``|W|.amax(0)``, in order, when known). Every row adds a
    non-negative term, so once the partial result exceeds ``stop_above`` it is returned as is: a
    lower bound of the whole, already too large to matter."""
    total = 0.0
    for i, m in enumerate(mods):
        cols = None if col_amax is None else col_amax[i]
        for _, wc, wq in scaled_weight_rows(m.weight_quantizer, m.weight, s, cols):
            total += float(output_error(wq.float().div_(s).sub_(wc), factor).sum())
            if total / denom > stop_above:
                return total / denom
    return total / denom


def output_error(dw: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per output row, the sum over tokens of (x . dw_row)^2, given ``factor = gram_factor(gram(x))``
    (any ``F`` with ``F @ F.T = x^T x``): ``|dw_row @ F|^2``, float32 (the product in ``F``'s dtype)."""
    return torch.linalg.vector_norm(dw.to(factor.dtype) @ factor, dim=-1, dtype=torch.float32).pow_(2)


def block_grams(g: torch.Tensor, bs: int) -> torch.Tensor:
    """The diagonal [bs, bs] blocks of ``g`` (zero-padded to whole blocks): [nb, bs, bs] float32."""
    c = g.shape[0]
    nb = math.ceil(c / bs)
    gp = F.pad(g.float(), (0, nb * bs - c, 0, nb * bs - c))
    idx = torch.arange(nb, device=g.device)
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
        factor = gram_factor(g)
        for r in ratios:
            loss = float(output_error(spec.fake_quant(w, w_amax * r).float() - w, factor).sum())
            if loss < best_loss:
                best, best_loss = w_amax * r, loss
        return best
    co, ci = w.shape
    bs = spec.block_size
    nb = math.ceil(ci / bs)
    pad = nb * bs - ci
    if gb is None:
        gb = block_grams(g, bs)
    best_loss = torch.full((co, nb), float("inf"), device=w.device)
    best = torch.zeros(co, nb, device=w.device)
    amax2d = w_amax.reshape(co, nb).float()
    for r in ratios:
        dw = spec.fake_quant(w, w_amax * r).float() - w
        dwb = F.pad(dw, (0, pad)).view(co, nb, bs)
        loss = torch.empty(co, nb, device=w.device)
        for start in range(0, co, max_co_batch_size):
            part = dwb[start:start + max_co_batch_size]
            loss[start:start + max_co_batch_size] = (torch.einsum("onb,nbc->onc", part, gb) * part).sum(-1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better, amax2d * r, best)
    return best.reshape(w_amax.shape).to(w_amax.dtype)


def scaled_gram(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of x / s from that of x (float64)."""
    sd = s.to(g.device, torch.float64)
    return g.double() / (sd[:, None] * sd[None, :])


def sample_grams(stats: dict, units, scales=None, state=None) -> list:
    """(unit, Gram matrix of its captured token sample, tokens seen) for every unit whose sample is not
    empty; with ``scales`` (one per unit) the Gram matrix of the smoothed tokens x / s. Computed on
    the calibration device (:mod:`qpass.calib.compute_device`), kept next to the statistics."""
    out = []
    for i, unit in enumerate(units):
        st = stats[unit[0]]
        if st.sample.shape[0]:
            g = gram(to_compute_device(state, st.sample))
            if scales is not None:
                g = scaled_gram(g, to_compute_device(state, scales[i]))
            out.append((unit, g.to(st.sample.device), st.tokens))
    return out


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
            amax = clip_amax(tq, ws, scaled_gram(gc, s), clip_ratios, max_co_batch_size)
        if amax is not None:
            out[p] = amax
    return out


@torch.no_grad()
def search_unit_scale(model, unit: list[str], x: torch.Tensor, scale_fn, grid, clip_ratios=None,
                      clip_x: torch.Tensor | None = None, max_co_batch_size: int = 1024, prune: bool = True,
                      g: torch.Tensor | None = None):
    """The grid alpha whose quantized unit output is closest (MSE over ``x``) to the float one,
    then, with ``clip_ratios``, each member's clipped weight amax for that scale.

    ``scale_fn(alpha)`` gives the scale s; the clip search runs on ``W * s`` with the tokens
    ``clip_x / s`` (default: ``x``); ``g``: ``gram(x)`` when the caller has it. Returns
    (s, alpha, losses, {path: clipped amax}).
    ``prune``: alphas are tried from the middle of the grid outwards, and one whose partial loss
    already exceeds the best whole loss stops early (its entry in ``losses`` is then that lower
    bound). The chosen alpha is the same as with every loss complete (ties: the first in grid order).
    """
    mods = {p: model.get_submodule(p) for p in unit}
    few_tokens = x.shape[0] <= x.shape[1]  # the factor is x^T itself: no Gram matrix needed for it
    if g is None and not few_tokens:
        g = gram(x)
    factor = gram_factor(g, x)
    denom = max(x.shape[0], 1) * sum(m.weight.shape[0] for m in mods.values())
    cols = [abs_amax(m.weight.detach().float(), (0,))[0] for m in mods.values()]  # the same for every alpha
    grid = list(grid)
    order = sorted(range(len(grid)), key=lambda i: (abs(i - (len(grid) - 1) / 2), i)) if prune else range(len(grid))
    losses, best_i = {}, None
    for i in order:
        s = scale_fn(grid[i])
        bound = losses[grid[best_i]] if prune and best_i is not None else math.inf
        # (x / s) @ Q(W s)^T = x @ (Q(W s) / s)^T: the effective weight error through x's Gram matrix
        losses[grid[i]] = loss = scaled_weight_loss(list(mods.values()), s, factor, cols, bound, denom)
        if best_i is None or loss < losses[grid[best_i]] or (loss == losses[grid[best_i]] and i < best_i):
            best_i = i
    losses = {a: losses[a] for a in grid}  # grid order
    best = grid[best_i]
    s = scale_fn(best)
    amaxes = {}
    if clip_ratios:
        gc = g if g is not None and (clip_x is None or clip_x is x) else gram(x if clip_x is None else clip_x)
        amaxes = _clipped_amaxes(mods, s, gc, {}, clip_ratios, max_co_batch_size)
    return s, best, losses, amaxes
