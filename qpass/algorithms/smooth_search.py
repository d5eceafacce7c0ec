"""SmoothQuant's per-unit search: the smoothing exponent alpha together with the static
activation clip, on the unit's captured input tokens.

For every (alpha, clip) of the grids the unit's output error is first estimated cheaply,
channel by channel: quantization errors of different input channels are nearly
uncorrelated, so

    |Q(x/s) Q(W s)^T - x W^T|^2  ~  sum_c |dx_c|^2 |(W s)_c|^2 + |(x/s)_c|^2 |dW_c|^2

(``dx``: the activation error of x/s quantized with the clipped per-tensor amax, ``dW``:
the weight error of W*s, ``_c``: input channel c's column). That costs O(tokens x channels)
per candidate instead of a matmul. The weight error ``|dW_c|^2`` is summed over
``ESTIMATE_ROWS`` evenly spaced output rows per member, scaled to all rows, when every stage of
the weight quantizer works row by row (per-row amax, blocks within a row); the rest of the
estimate is per channel (``|(W s)_c|^2 = s_c^2 |W_c|^2``). The ``SHORTLIST`` best candidates
are then scored exactly, by the matmul on a bounded token subsample (and, for weights quantized
row by row, on ``EXACT_ROWS`` evenly spaced output rows per member, weighted up to all rows: the
same candidates, with the matmul cut 2-12x on SmolLM2), and the best wins. Clip
1.0 with any alpha is always part of the exact round, so the search can only pick a clip when
it measurably beats the unclipped amax on the unit's output.

Both rounds add a leave-one-out term for the tokens the model will see after calibration
(:func:`_holdout_errors`). Every candidate's static ranges (the per-channel scale ``s`` from the
channel maxima, the per-tensor amax from the smoothed maxima) are fitted on the calibration tokens,
and scoring them on the same tokens favours the candidates that fit those maxima tightest: alpha
near 1 leaves every channel exactly at the clip, so a later token above a channel's calibration
maximum is clipped in every channel. The jackknife estimate of the error on a new token fits each
channel's range without its largest token (its second largest |x| instead) and charges that token's
clipping error, once per channel, spread over all tokens. On SmolLM2 INT8_SMOOTHQUANT_CFG (16
windows) held-out perplexity went from 15.626 to 15.463 with it (FP32 14.850, ModelOpt 16.585), and on
small random transformers with 48-80 calibration tokens the search no longer ends below a fixed
alpha of 0.5 (Gemma2 mean output cosine 0.980 -> 0.998, T5 0.992 -> 0.9995).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.algorithms.smoothing import fake_quant_weight, group_weight
from qpass.formats.layout import abs_amax

#: activation clip ratios (of the smoothed input's max) tried per alpha
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
#: candidates scored exactly after the per-channel estimate
SHORTLIST = 3
#: tokens used by the exact scoring
EXACT_TOKENS = 512
#: output rows per member whose weight error the estimate measures (weights quantized by row)
ESTIMATE_ROWS = 64
#: output rows per member that the exact scoring computes (weights quantized by row)
EXACT_ROWS = 128


@dataclass
class SearchResult:
    alpha: float
    clip: float
    loss: float  # exact output MSE of the winner on the scoring tokens, plus its held-out term
    estimates: dict  # (alpha, clip) -> estimated output MSE


def strided(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of ``x``, evenly spaced (the capture's order is already random)."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).round().long()]


def clippable(model, unit) -> bool:
    """True if every member's input quantizer is an enabled static per-tensor max quantizer."""
    from qpass.algorithms.smoothing import _is_dynamic, _scalar_max_statistic

    for p in unit:
        m = model.get_submodule(p)
        q = m.input_quantizer
        if not q.is_enabled or _is_dynamic(q) or not _scalar_max_statistic(q, m.weight.shape[1]):
            return False
    return True


def input_fake_quant(q, xs: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``xs`` as input quantizer ``q`` would quantize it with per-tensor statistic ``amax``."""
    from qpass.algorithms.smoothing import _is_dynamic

    if not q.is_enabled:
        return xs
    spec = q.spec
    if _is_dynamic(q):
        return spec.fake_quant(xs, None)
    if spec.amax_of(xs[:2]).numel() == 1:
        return spec.fake_quant(xs, amax)
    return spec.fake_quant(xs, spec.amax_of(xs))


class ChannelProfile:
    """Each channel's largest |x| values with their sums: the error of clipping and rounding
    x/s at any per-tensor threshold, channel by channel, in O(channels x log tokens).

    Only the top ``1/TOP_FRACTION`` of each channel's values are kept (sorted); a threshold
    that would clip more of a channel than that is reported as an infinite error (far too
    aggressive a clip for a calibrated amax anyway)."""

    TOP_FRACTION = 16

    def __init__(self, x: torch.Tensor) -> None:
        a = x.abs().t()  # [C, N]
        self.n = a.shape[1]
        k = max(1, min(self.n, -(-self.n // self.TOP_FRACTION)))
        top = a.topk(k, dim=1).values.flip(1).double()  # ascending
        self.complete = k == self.n
        self.sorted = top
        zero = top.new_zeros(top.shape[0], 1)
        self.cs1 = torch.cat([zero, top.cumsum(1)], 1)
        self.cs2 = torch.cat([zero, top.pow(2).cumsum(1)], 1)

    def int_error(self, s: torch.Tensor, threshold: float, max_bound: float) -> torch.Tensor:
        """Per-channel squared error of x/s quantized to integers with amax ``threshold``:
        the exact clipping error plus step^2/12 for every unclipped element."""
        return self.int_errors(s, [threshold], max_bound)[:, 0]

    def int_errors(self, s: torch.Tensor, thresholds, max_bound: float) -> torch.Tensor:
        """:meth:`int_error` for several thresholds at once: [C, len(thresholds)]."""
        t = torch.tensor([[float(v) for v in thresholds]], dtype=torch.float64, device=s.device)
        return self.grid_errors(s[None], t, max_bound)[:, 0]

    def grid_errors(self, s: torch.Tensor, t: torch.Tensor, max_bound: float) -> torch.Tensor:
        """:meth:`int_error` for scales ``s`` [A, C] (one per alpha), each with its thresholds
        ``t`` [A, K]: [C, A, K]."""
        a, c = s.shape
        k_t = t.shape[1]
        s = s.double().t()[:, :, None]  # [C, A, 1]
        t = t.double().to(s.device)[None]  # [1, A, K]
        tau = (t * s).reshape(c, a * k_t)  # the thresholds in x's units, per channel
        j = torch.searchsorted(self.sorted, tau, right=True)  # kept elements <= tau
        k = (self.sorted.shape[1] - j).double().reshape(c, a, k_t)  # elements above tau
        s1 = (self.cs1[:, -1:] - self.cs1.gather(1, j)).reshape(c, a, k_t)
        s2 = (self.cs2[:, -1:] - self.cs2.gather(1, j)).reshape(c, a, k_t)
        clip = s2 / s.pow(2) - 2 * t * s1 / s + k * t.pow(2)
        step = t / max_bound
        err = clip.clamp(min=0) + (self.n - k) * step.pow(2) / 12
        if not self.complete:
            err = torch.where(j.reshape(c, a, k_t) == 0, torch.full_like(err, float("inf")), err)
        return err


def _int_spec(model, unit):
    """The members' common per-tensor signed-integer input format, if there is one."""
    from qpass.formats.integer import IntFormat

    specs = [model.get_submodule(p).input_quantizer.spec for p in unit]
    fmt = specs[0].fmt
    if isinstance(fmt, IntFormat) and not fmt.unsigned and all(sp.fmt == fmt for sp in specs):
        return fmt
    return None


def _unseen_errors(unseen: torch.Tensor, s: torch.Tensor, thresholds, col: torch.Tensor, total: int) -> list[float]:
    """Output error per token of clipping the channel maxima the subsample does not hold, at
    each per-tensor threshold."""
    t = torch.tensor([float(v) for v in thresholds], dtype=torch.float64, device=s.device)
    over = ((unseen / s).double()[:, None] - t[None, :]).clamp(min=0)
    return ((over.pow(2) * col[:, None]).sum(0) / total).tolist()


def _holdout_errors(amax: torch.Tensor, second: torch.Tensor, s_all: torch.Tensor, alphas, clips,
                    col: torch.Tensor, total: int) -> torch.Tensor:
    """Leave-one-out output error, per token, added to each (alpha, clip) candidate: [A, K].

    For channel c, drop its largest token (|x| = ``amax``; the next is ``second``) from the fit:
    its scale becomes ``s' = s (second / amax) ** alpha``, its smoothed maximum
    ``amax / s * (second / amax) ** (1 - alpha)``, and the per-tensor clip ``clip * max`` of that
    and the other channels' smoothed maxima. The dropped token, at ``amax / s'``, is clipped there;
    its error (in x's units, times ``|W_c|^2``) replaces the error the in-sample fit gives it, and
    the difference is spread over ``total`` tokens. The weights' quantization is left as fitted."""
    dev = s_all.device
    al = torch.tensor([float(a) for a in alphas], dtype=torch.float32, device=dev)[:, None]  # [A, 1]
    x1 = amax.float().to(dev)[None]
    x2 = second.float().to(dev)[None]
    held = (x2 > 0) & (x1 > x2)  # channels whose top value stands alone above the next
    ratio = torch.where(held, x1 / x2.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(x1))
    top = x1 / s_all.float()  # [A, C] smoothed channel maxima, fitted on every token
    if top.shape[1] > 1:
        two = top.topk(2, dim=1)
        own = torch.arange(top.shape[1], device=dev)[None] == two.indices[:, :1]
        others = torch.where(own, two.values[:, 1:2], two.values[:, :1])  # max over the other channels
    else:
        others = torch.zeros_like(top)
    r = torch.tensor([float(v) for v in clips], dtype=torch.float32, device=dev)  # [K]
    # in the fitted scale's units (x / s): the left-out token sits at ``top``, and the refitted clip
    # (the refitted scale is s * shrink, shrink = (second / amax) ** alpha <= 1) at
    # clip * max(others * shrink, top / ratio); no factor above 1 appears, so nothing overflows
    shrink = ratio.pow(-al)
    loo = (top[:, :, None] - torch.maximum(others * shrink, top / ratio)[:, :, None] * r).clamp_(min=0).square_()
    fitted = (top[:, :, None] - top.amax(1)[:, None, None] * r).clamp_(min=0).square_()
    w = (held * col.float()).double()
    loo = torch.einsum("ack,ac->ak", loo.double(), w)
    fitted = torch.einsum("ack,ac->ak", fitted.double(), w)
    return (loo - fitted) / max(total, 1)


def _row_local(q, w: torch.Tensor) -> bool:
    """True when every stage of weight quantizer ``q`` quantizes row by row (a per-row amax,
    blocks within a row, or no amax), so a row's result depends on that row alone."""
    from qpass.algorithms.smoothing import _LOCAL, _NONE, _stage_kinds

    plan = _stage_kinds(q, w[:2], torch.ones(w.shape[1], device=w.device))
    return plan is not None and all(kind in (_LOCAL, _NONE) for _, kind, _ in plan)


def _estimate_rows(q, w: torch.Tensor, rows: int):
    """Row indices of ``w`` whose weight error stands in for all rows (None: all rows), and the
    factor that scales their sum to the whole: only for quantizers whose every stage quantizes
    row by row (:func:`_row_local`)."""
    n = w.shape[0]
    if n <= rows or not _row_local(q, w):
        return None, 1.0
    return torch.linspace(0, n - 1, rows, device=w.device).round().long(), n / rows


def _weight_errors(mods, sampled, picks, s: torch.Tensor) -> torch.Tensor:
    """Per alpha and input channel, the weight quantization error ``sum_rows |Q(W s) - W s|^2``
    over the sampled rows, scaled to all rows: [A, C] for scales ``s`` [A, C]. Row-by-row
    quantizers quantize every alpha's rows in one call (rows are independent)."""
    d2 = torch.zeros_like(s)
    for m, wr, (_, factor) in zip(mods, sampled, picks):
        if _row_local(m.weight_quantizer, m.weight):
            ws = wr[None] * s[:, None, :]  # [A, rows, C]
            fq = fake_quant_weight(m.weight_quantizer, ws.reshape(-1, ws.shape[-1])).float().reshape(ws.shape)
            d2 += (fq - ws).pow(2).sum(1) * factor
        else:
            for i in range(s.shape[0]):
                ws = wr * s[i]
                d2[i] += (fake_quant_weight(m.weight_quantizer, ws).float() - ws).pow(2).sum(0) * factor
    return d2


@dataclass
class _Grid:
    """Fake-quantized values and, where they lie on a signed 8-bit integer grid, their codes
    (int8, [rows, C]) and each row's step (or one step for all rows)."""

    values: torch.Tensor
    codes: torch.Tensor | None = None
    step: torch.Tensor | None = None


def _on_int8_grid(v: torch.Tensor, q, amax: torch.Tensor | None = None, check: bool = True) -> _Grid:
    """``v`` (the output of ``q``'s fake quant) with its integer codes, when ``q``'s format is a
    signed integer of at most 8 bits: per tensor with ``amax``, else per row with each row's abs-max
    on the format's bound (max calibration). ``check``: confirm that ``v`` is ``codes * step`` (to
    float rounding) and keep the float values only where it is not; without it the caller vouches
    for the grid (a per-tensor fake quant with this ``amax``, or a weight quantizer already checked)."""
    from qpass.formats.integer import IntFormat

    fmt = getattr(getattr(q, "spec", None), "fmt", None)
    if not isinstance(fmt, IntFormat) or fmt.unsigned or fmt.max_bound > 127 or v.numel() == 0 or v.dim() != 2:
        return _Grid(v)
    top = v.abs().amax(1, keepdim=True) if amax is None else amax.float().reshape(1, 1)
    step = (top / fmt.max_bound).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (v / step).round_()
    if check and not (bool(codes.amax() <= 127) and bool(codes.amin() >= -128)
                      and float(((codes * step - v).abs_() / step).amax()) < 1e-3):
        return _Grid(v)
    return _Grid(v, codes.to(torch.int8), step.reshape(-1))


def _product(xq: torch.Tensor, x: _Grid, w: _Grid) -> torch.Tensor:
    """``xq @ w.values.t()``: in int32 from the codes where both sides have them (exact, and on a
    CPU about 4x faster than the float32 GEMM), else in float."""
    if x.codes is None or w.codes is None:
        return xq @ w.values.t()
    return torch._int_mm(x.codes, w.codes.t()).float() * (x.step[:, None] * w.step[None, :])


#: threads that search units side by side (None: torch's intra-op thread count, at most 4)
SEARCH_THREADS = None


def in_parallel(fn, items: list, threads: int | None = None) -> list:
    """``[fn(x) for x in items]``, run by ``threads`` threads (default :data:`SEARCH_THREADS`), each
    with one intra-op thread.

    Each unit's search is small (a few hundred tokens by a few hundred channels): its kernels
    parallelise poorly, and much of its time is spent between kernels. On SmolLM2 (120 units, two
    cores) the searches took 1.73-1.91 s side by side against 1.99-2.34 s one after another with two
    intra-op threads (both timed on the same statistics, three times each, in one run), with identical
    results: every search reads only its own unit's statistics and weights."""
    intra = torch.get_num_threads()
    n = threads or SEARCH_THREADS or min(4, intra)
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    grad = torch.is_grad_enabled()

    def run(x):
        with torch.set_grad_enabled(grad):  # grad mode is per thread
            return fn(x)

    torch.set_num_threads(1)  # each search single-threaded, the searches side by side
    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="qpass-search") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(intra)


@torch.no_grad()
def search_alpha_clip(model, unit: list[str], stats, scale_fn, alphas, clips=CLIP_RATIOS,
                      shortlist: int = SHORTLIST, exact_tokens: int = EXACT_TOKENS) -> SearchResult:
    """Best (alpha, clip) for one smoothing unit; ``scale_fn(alpha)`` gives its scale ``s``."""
    static = clippable(model, unit)  # static per-tensor input ranges: fitted, so held out below
    fmt = _int_spec(model, unit) if static else None
    if fmt is None:
        clips = (1.0,)
    x = stats.sample
    total = max(stats.tokens, x.shape[0], 1)
    # each channel's abs-max over all tokens, where the subsample missed it: its clipping error
    # is added to every candidate (one element among ``total`` tokens)
    unseen = torch.where(stats.amax.float() > abs_amax(x, (0,))[0], stats.amax.float(), torch.zeros(()))
    xa = strided(x, exact_tokens)  # activation error of formats without a closed form
    profile = ChannelProfile(x) if fmt is not None else None
    mods = [model.get_submodule(p) for p in unit]
    w = group_weight(model, unit)
    x2 = x.pow(2).sum(0)  # [C]
    col2 = w.pow(2).sum(0).double()  # [C]: |W_c|^2, so |(W s)_c|^2 = s_c^2 |W_c|^2
    picks = [_estimate_rows(m.weight_quantizer, m.weight, ESTIMATE_ROWS) for m in mods]
    sampled = [m.weight.detach().float() if idx is None else m.weight.detach()[idx].float()
               for m, (idx, _) in zip(mods, picks)]
    # the estimate for every (alpha, clip) at once: scales [A, C], thresholds [A, K]
    alphas = list(alphas)
    s_all = torch.stack([scale_fn(a).float() for a in alphas])
    d2 = _weight_errors(mods, sampled, picks, s_all)
    w_err = ((x2[None] / s_all.pow(2) * d2).sum(1) / max(x.shape[0], 1)).tolist()
    col = s_all.double().pow(2) * col2[None]  # [A, C]
    base = (stats.amax.float()[None] / s_all).amax(1)  # [A]
    t = base.double()[:, None] * torch.tensor(clips, dtype=torch.float64, device=base.device)[None]
    over = ((unseen[None] / s_all).double()[:, :, None] - t[:, None, :]).clamp(min=0)  # [A, C, K]
    unseen_errs = ((over.pow(2) * col[:, :, None]).sum(1) / total).tolist()
    if static and stats.second is not None:
        held_errs = _holdout_errors(stats.amax, stats.second, s_all, alphas, clips, col, total).tolist()
    else:
        held_errs = [[0.0] * len(clips) for _ in alphas]
    if profile is not None:
        a_errs = ((profile.grid_errors(s_all, t, fmt.max_bound) * col.t()[:, :, None]).sum(0) / profile.n).tolist()
    est, scales, held = {}, {}, {}
    for a, alpha in enumerate(alphas):
        s = s_all[a]
        scales[alpha] = (s, base[a], col[a])
        for i, r in enumerate(clips):
            if profile is not None:
                a_err = a_errs[a][i]
            else:
                xs = xa / s
                dx = input_fake_quant(mods[0].input_quantizer, xs, base[a] * r) - xs
                a_err = float((dx.pow(2).sum(0) * col[a]).sum()) / max(xa.shape[0], 1)
            held[(alpha, r)] = held_errs[a][i]
            est[(alpha, r)] = w_err[a] + a_err + unseen_errs[a][i] + held[(alpha, r)]
    ranked = sorted(est, key=est.get)
    chosen = ranked[:shortlist]
    if (ranked[0][0], 1.0) not in chosen:
        chosen.append((ranked[0][0], 1.0))
    # the exact output error, on at most EXACT_ROWS output rows per member where the weight
    # quantizer works row by row (each member's rows weighted up to all of its rows)
    rows = [_estimate_rows(m.weight_quantizer, m.weight, EXACT_ROWS) for m in mods]
    w_rows = [m.weight.detach().float() if idx is None else m.weight.detach()[idx].float()
              for m, (idx, _) in zip(mods, rows)]
    row_weight = torch.cat([torch.full((wr.shape[0],), float(f)) for wr, (_, f) in zip(w_rows, rows)]).to(x.device)
    n_out = sum(m.weight.shape[0] for m in mods)
    ref = xa @ torch.cat(w_rows).t()
    exact, wqs = {}, {}
    on_grid: list[bool | None] = [None] * len(mods)
    for alpha, r in chosen:
        s, base, col = scales[alpha]
        if alpha not in wqs:
            wqs[alpha] = []
            for i, (m, wr) in enumerate(zip(mods, w_rows)):
                wq = fake_quant_weight(m.weight_quantizer, wr * s).float()
                if on_grid[i] is False:
                    grid = _Grid(wq)
                else:  # whether a member's weights lie on an int8 grid is checked on its first alpha
                    grid = _on_int8_grid(wq, m.weight_quantizer, check=on_grid[i] is None)
                on_grid[i] = grid.codes is not None
                wqs[alpha].append(grid)
        xs = xa / s
        quantized = {}  # members with one input format quantize xs alike
        outs = []
        for m, wq in zip(mods, wqs[alpha]):
            q = m.input_quantizer
            key = (q.is_enabled, q.spec)
            if key not in quantized:
                xq = input_fake_quant(q, xs, base * r)
                # codes only for a static int8 input (``fmt``) whose weights have codes too
                codes = fmt is not None and wq.codes is not None
                quantized[key] = (xq, _on_int8_grid(xq, q, base * r, check=False) if codes else _Grid(xq))
            outs.append(_product(*quantized[key], wq))
        per_token = float(((torch.cat(outs, -1) - ref).pow(2) * row_weight).sum(-1).mean())
        unseen_err = _unseen_errors(unseen, s, [float(base) * r], col, total)[0]
        exact[(alpha, r)] = (per_token + unseen_err + held[(alpha, r)]) / n_out
    best = min(exact, key=exact.get)
    return SearchResult(alpha=best[0], clip=best[1], loss=exact[best], estimates=est)
