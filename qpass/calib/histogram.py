"""Histogram calibration: amax by percentile, KL divergence (entropy) or MSE.

Same semantics as ModelOpt 0.47's ``HistogramCalibrator`` (``calibrator: "histogram"`` on a
quantizer), per tensor only, as there:

* the histogram is of ``|x|`` over ``[0, range]``. The first batch fixes the bin width
  (``range = max|x|``, ``num_bins`` bins, default 2048); a later batch with a larger max adds
  bins of the same width until it fits, so the bin count grows and the width never changes;
* ``compute_amax("percentile", percentile=99.99)``: the left edge of the bin where the
  cumulative share of counts reaches ``percentile`` %;
* ``compute_amax("entropy", stride=1, start_bin=128)``: TensorRT's KL-divergence search. For
  each candidate bin count ``i >= start_bin`` the first ``i`` bins (the tail folded into bin
  ``i - 1``) are compared with their ``2**(num_bits - 1 + unsigned)``-level quantization;
  amax is the right edge of the last ``i`` with the least divergence. Integer formats only;
* ``compute_amax("mse", stride=1, start_bin=128)``: the bin centre, from ``start_bin`` on,
  whose use as amax gives the least count-weighted squared error when the bin centres are
  fake-quantized with the quantizer's format (integer or float).

The searches are vectorised over candidates (ModelOpt loops in Python), on the CPU in float64.

How a user picks the method (ModelOpt 0.47 has no ``calibrate(algorithm=...)`` spelling for it;
``calibrate(model, "max")`` with a histogram quantizer fails in ModelOpt with a TypeError):

* ModelOpt's own per-quantizer flow, which works in qpass unchanged::

      for name, q in model.named_modules():       # after quantize(model, cfg, forward_loop) with
          if isinstance(q, TensorQuantizer):       # algorithm None, or any calibrated model
              q.disable_quant(); q.enable_calib()
      forward_loop(model)
      for name, q in ...: q.load_calib_amax("percentile", percentile=99.99); q.enable_quant(); q.disable_calib()

* qpass's one call for the same thing, weights included::

      qpass.calib.histogram.calibrate_histogram(model, forward_loop, method="entropy")

Distributed reduction (``qpass.calib.distributed``): :meth:`HistogramCalibrator.state` returns
``{"hist": counts, "range": top edge}``. Ranks' bins differ until aligned, so reduce in this
order: ``range`` with MAX, then on every rank ``calibrator.align(range)`` (re-bins onto
``num_bins`` bins over ``[0, range]``), then ``state()["hist"]`` with SUM, then
``calibrator.load_state(state)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qpass.errors import CalibrationError, QuantConfigError

__all__ = ["HistogramCalibrator", "calibrate_histogram", "histogram_calibrator_for"]

METHODS = ("percentile", "entropy", "mse")
# (method, options) while calibrate_histogram runs, for calibrators created mid-run (first trace).
_ACTIVE: tuple[str, dict] | None = None
_CHUNK = 1 << 21  # elements per candidate-by-bin matrix in the vectorised searches


def _format_of(num_bits, unsigned: bool, narrow_range: bool):
    from qpass.formats import IntFormat
    from qpass.formats.spec import FLOAT_FORMATS

    if isinstance(num_bits, int):
        return IntFormat(num_bits, unsigned, narrow_range)
    fmt = FLOAT_FORMATS.get(tuple(num_bits))
    if fmt is None:
        raise QuantConfigError(f"histogram calibrator: unsupported num_bits {num_bits!r}")
    return fmt


class HistogramCalibrator:
    """Collects a histogram of ``|x|``; :meth:`compute_amax` picks amax by percentile, entropy or mse.

    ``num_bits``/``unsigned``/``narrow_range`` give the integer or float format the entropy and
    mse searches quantize to (``fmt`` overrides them with a qpass format object).
    """

    name = "histogram"

    def __init__(
        self,
        num_bits=8,
        axis=None,
        unsigned: bool = False,
        num_bins: int = 2048,
        grow_method=None,
        skip_zeros: bool = False,
        torch_hist: bool = True,
        *,
        narrow_range: bool = False,
        fmt=None,
    ) -> None:
        if axis is not None:
            raise QuantConfigError(
                f"histogram calibration supports per-tensor amax only (as in ModelOpt 0.47), got axis={axis!r}"
            )
        if not isinstance(num_bins, int) or num_bins < 1:
            raise QuantConfigError(f"histogram calibrator: num_bins must be a positive int, got {num_bins!r}")
        self._num_bits = num_bits
        self._unsigned = bool(unsigned)
        self._narrow_range = bool(narrow_range)
        self._fmt = fmt
        self.num_bins = num_bins
        self.skip_zeros = bool(skip_zeros)
        # Method used when compute_amax() is called without one (set by calibrate_histogram).
        self.method: str | None = None
        self.method_options: dict = {}
        self.reset()

    # ---------------------------------------------------------------- collection
    def reset(self) -> None:
        self._hist: torch.Tensor | None = None  # float64 counts, len = current bin count
        self._width: torch.Tensor | None = None  # float32 0-dim bin width
        self._top: torch.Tensor | None = None  # float32 0-dim upper edge of the last bin
        self._zeros = 0  # count of zeros seen before any nonzero batch fixed the width
        self.num_batches = 0

    @property
    def has_data(self) -> bool:
        return self._hist is not None or self._zeros > 0

    @torch.no_grad()
    def collect(self, x: torch.Tensor, x_max: torch.Tensor | None = None) -> None:
        """Add ``|x|`` to the histogram. ``x_max`` (``max|x|``) may be passed if already known."""
        x = x.detach()
        if x.numel() == 0:
            return
        x = x.float().abs().reshape(-1)
        if self.skip_zeros:
            x = x[x != 0]
            if x.numel() == 0:
                return
            x_max = None
        x_max = (x.amax() if x_max is None else x_max.detach().float().to(x.device)).reshape(())
        self.num_batches += 1
        if self._hist is None:
            if float(x_max) == 0.0:  # the width is fixed by the first batch that has a range
                self._zeros += x.numel()
                return
            self._top = x_max.clone()
            self._width = torch.linspace(0, float(x_max), self.num_bins + 1, dtype=torch.float32)[1].to(x.device)
            self._hist = torch.histc(x, bins=self.num_bins, min=0, max=float(x_max)).double()
            if self._zeros:
                self._hist[0] += self._zeros
                self._zeros = 0
            return
        if self._hist.device != x.device:
            self._to(x.device)
        if bool(x_max > self._top):  # grow: same width, more bins
            nbins = int(torch.ceil(x_max / self._width).item())
            self._top = (self._width * nbins).reshape(())
            grown = self._hist.new_zeros(nbins)
            grown[: self._hist.numel()] = self._hist
            self._hist = grown
        n = self._hist.numel()
        self._hist += torch.histc(x, bins=n, min=0, max=float(self._top)).double()

    def _to(self, device) -> None:
        self._hist = self._hist.to(device)
        self._width = self._width.to(device)
        self._top = self._top.to(device)

    # ---------------------------------------------------------------- distributed reduction
    def state(self) -> dict:
        """Tensors a data-parallel reduction combines: ``hist`` (SUM) and ``range`` (MAX).

        Call :meth:`align` with the MAX-reduced range on every rank before summing ``hist``.
        """
        return {"hist": self._hist, "range": self._top}

    @torch.no_grad()
    def align(self, top) -> None:
        """Re-bin onto ``num_bins`` bins over ``[0, top]`` (``top`` >= the current range).

        Each old bin's count moves to the new bin holding the old bin's centre, so ranks that
        align to the same ``top`` have identical bins and their histograms can be summed.
        """
        if self._hist is None:
            top = torch.as_tensor(top, dtype=torch.float32).reshape(())
            self._top, self._width = top.clone(), top / self.num_bins
            self._hist = torch.zeros(self.num_bins, dtype=torch.float64, device=top.device)
            self._hist[0] += self._zeros
            self._zeros = 0
            return
        top = torch.as_tensor(top, dtype=torch.float32, device=self._hist.device).reshape(())
        centers = (torch.arange(self._hist.numel(), device=top.device, dtype=torch.float64) + 0.5) * self._width.double()
        new_width = top.double() / self.num_bins
        idx = (centers / new_width).floor().long().clamp_(0, self.num_bins - 1)
        hist = torch.zeros(self.num_bins, dtype=torch.float64, device=top.device)
        hist.index_add_(0, idx, self._hist)
        self._hist, self._top, self._width = hist, top.clone(), (top / self.num_bins).float()

    def load_state(self, state: dict) -> None:
        """Take reduced ``hist``/``range`` back (their bins must be :meth:`align`-ed)."""
        hist, top = state["hist"], state["range"]
        if hist is None:
            return
        self._hist = hist.double()
        self._top = torch.as_tensor(top, dtype=torch.float32, device=hist.device).reshape(())
        self._width = self._top / hist.numel()

    # ---------------------------------------------------------------- amax
    def compute_amax(
        self,
        method: str | None = None,
        *,
        stride: int = 1,
        start_bin: int = 128,
        percentile: float = 99.99,
    ) -> torch.Tensor | None:
        """amax (0-dim float32) by ``method``: ``"percentile"``, ``"entropy"`` or ``"mse"``.

        Without ``method``, the one set in ``self.method`` (with ``self.method_options``).
        Returns None if nothing was collected.
        """
        if method is None and self.method is None and _ACTIVE is not None:
            method, opts = _ACTIVE
            return self.compute_amax(method, **opts)
        if method is None:
            if self.method is None:
                raise CalibrationError(
                    f"calibrator 'histogram' needs a method ({', '.join(METHODS)}) to compute amax, which "
                    "calibrate(algorithm='max'/'mse') cannot give (ModelOpt 0.47 fails here too); calibrate with "
                    "qpass.calib.histogram.calibrate_histogram(model, forward_loop, method='percentile') or, "
                    "ModelOpt's way, q.load_calib_amax('percentile', percentile=99.99) per quantizer"
                )
            opts = {"stride": stride, "start_bin": start_bin, "percentile": percentile, **self.method_options}
            return self.compute_amax(self.method, **opts)
        if method not in METHODS:
            raise QuantConfigError(f"histogram calibration: unknown method {method!r}; allowed: {list(METHODS)}")
        if not isinstance(stride, int) or stride < 1:
            raise QuantConfigError(f"histogram calibration: stride must be a positive int, got {stride!r}")
        if not isinstance(start_bin, int) or start_bin < 0:
            raise QuantConfigError(f"histogram calibration: start_bin must be an int >= 0, got {start_bin!r}")
        if method == "percentile" and not 0 <= percentile <= 100:
            raise QuantConfigError(f"histogram calibration: percentile must be in [0, 100], got {percentile!r}")
        if self._hist is None:
            if self._zeros:
                return torch.zeros((), dtype=torch.float32)
            return None
        hist = self._hist.detach().cpu().double()
        width = float(self._width)
        device = self._hist.device
        if method == "percentile":
            amax = _percentile_amax(hist, width, percentile)
        elif method == "entropy":
            amax = _entropy_amax(hist, width, self._entropy_levels(), stride, start_bin)
        else:
            amax = _mse_amax(hist, self._width.float().cpu(), self._format(), stride, start_bin)
        return torch.as_tensor(amax, dtype=torch.float32).reshape(()).to(device)

    def _format(self):
        if self._fmt is None:
            self._fmt = _format_of(self._num_bits, self._unsigned, self._narrow_range)
        return self._fmt

    def _entropy_levels(self) -> int:
        from qpass.formats import IntFormat

        fmt = self._format()
        if not isinstance(fmt, IntFormat):
            raise QuantConfigError(
                f"histogram method 'entropy' needs an integer format, got num_bits={self._num_bits!r}; "
                "use 'percentile' or 'mse' for float formats"
            )
        return 1 << (fmt.bits - 1 + int(fmt.unsigned))

    def __repr__(self) -> str:
        if self._hist is None:
            return f"HistogramCalibrator(num_bins={self.num_bins}, empty)"
        return f"HistogramCalibrator(bins={self._hist.numel()}, range=[0, {float(self._top):.4g}])"


# ---------------------------------------------------------------------- searches
def _percentile_amax(hist: torch.Tensor, width: float, percentile: float) -> float:
    cdf = torch.cumsum(hist / hist.sum(), 0)
    target = torch.tensor([percentile / 100], dtype=torch.float64)
    idx = int(torch.searchsorted(cdf, target).item())
    return min(idx, hist.numel()) * width


def _entropy_amax(hist: torch.Tensor, width: float, levels: int, stride: int, start_bin: int) -> float:
    """KL(reference || quantized) for every candidate bin count; right edge of the last minimum.

    For ``i`` candidate bins, quantized level ``k`` covers bins ``j`` with ``k * i / levels <= j <
    (k + 1) * i / levels``; its count is spread evenly over its nonzero bins. The divergence is
    summed per level from prefix sums, so each candidate costs O(levels), not O(i).
    """
    bins = hist.clone()
    n = bins.numel()
    if n > 1:
        bins[0] = bins[1]  # the zero bin is dominated by padding/ReLU zeros: use its neighbour's count
    cands = torch.arange(start_bin, n + 1, stride, dtype=torch.float64)
    cands = cands[cands > 0]
    if cands.numel() == 0:
        raise QuantConfigError(
            f"histogram method 'entropy': start_bin={start_bin} leaves no candidate among {n} bins"
        )
    total = bins.sum()
    zero = bins.new_zeros(1)
    blogb = torch.where(bins > 0, bins * torch.log(bins.clamp(min=1e-300)), 0.0)
    count_c = torch.cat([zero, torch.cumsum(bins, 0)])  # prefix sums, index = number of bins
    nonzero_c = torch.cat([zero, torch.cumsum((bins != 0).double(), 0)])
    blogb_c = torch.cat([zero, torch.cumsum(blogb, 0)])

    i = cands[:, None]  # [M, 1]
    k = torch.arange(levels + 1, dtype=torch.float64)
    bounds = torch.ceil(k * (i / levels))  # first bin of each level (numpy linspace arithmetic)
    bounds[:, -1] = cands
    b = bounds.long()
    S = count_c[b[:, 1:]] - count_c[b[:, :-1]]  # [M, levels] count per level
    N = nonzero_c[b[:, 1:]] - nonzero_c[b[:, :-1]]  # nonzero bins per level
    Ci = count_c[cands.long()]  # counts inside the first i bins
    log_q = torch.log(S / (N.clamp(min=1) * Ci[:, None]))  # log of the normalised level density
    level_terms = torch.where(S > 0, S * log_q, 0.0).sum(1)
    kl = (blogb_c[cands.long()] - Ci * torch.log(total) - level_terms) / total

    # the clipped tail t = total - Ci joins bin i-1 in the reference distribution
    last = cands.long() - 1
    t = total - Ci
    b_last = bins[last]
    K = (bounds[:, :-1] <= (cands - 1)[:, None]).sum(1) - 1  # level holding bin i-1
    lq = log_q.gather(1, K[:, None]).squeeze(1)
    xlogx = lambda v: torch.where(v > 0, v * torch.log(v.clamp(min=1e-300)), 0.0)  # noqa: E731
    delta = (xlogx(b_last + t) - xlogx(b_last) - t * torch.log(total) - torch.where(t > 0, t * lq, 0.0)) / total
    kl = kl + torch.where(t > 0, delta, 0.0)
    kl = torch.where((t > 0) & (b_last == 0), math.inf, kl)  # mass where the quantized density is 0
    kl = torch.where(torch.isnan(kl), math.inf, kl)
    best = kl.numel() - 1 - int(torch.argmin(kl.flip(0)))  # last index holding the minimum
    return float(cands[best]) * width


def _mse_amax(hist: torch.Tensor, width: torch.Tensor, fmt, stride: int, start_bin: int) -> float:
    """Bin centre (from start_bin) minimising sum(count * (fq(centre) - centre)^2)."""
    from qpass.formats import QuantSpec

    n = hist.numel()
    edges = torch.arange(n + 1, dtype=torch.float32) * width
    centers = (edges[1:] + edges[:-1]) / 2
    idx = torch.arange(start_bin, n, stride)
    if idx.numel() == 0:
        raise QuantConfigError(f"histogram method 'mse': start_bin={start_bin} leaves no candidate among {n} bins")
    spec = QuantSpec(fmt, axis=0)  # one amax per row: a row per candidate
    used = hist > 0  # empty bins add no error
    counts, values = hist[used].float(), centers[used]
    errs = []
    rows = max(1, _CHUNK // max(1, values.numel()))
    for chunk in idx.split(rows):
        amax = centers[chunk][:, None]
        xs = values.expand(len(chunk), values.numel())
        fq = spec.fake_quant(xs, amax)
        errs.append((((fq - xs) ** 2) * counts).double().sum(1))
    err = torch.cat(errs)
    return float(centers[idx[int(torch.argmin(err))]])


# ---------------------------------------------------------------------- quantizer wiring
def _constructor_parts(value):
    """(class, args, kwargs) of a calibrator given as a class, tuple or dict (ModelOpt's forms)."""
    if isinstance(value, dict):
        return value.get("class"), tuple(value.get("args", ())), dict(value.get("kwargs", {}))
    if isinstance(value, (tuple, list)):
        cls, *rest = value
        args = tuple(rest[0]) if rest else ()
        kwargs = dict(rest[1]) if len(rest) > 1 else {}
        return cls, args, kwargs
    return value, (), {}


def histogram_calibrator_for(attrs: dict, name: str = "<quantizer>") -> HistogramCalibrator | None:
    """The HistogramCalibrator a quantizer with these attributes uses, or None if it uses another.

    ``calibrator`` may be ``"histogram"`` or ModelOpt's constructor forms naming a class called
    ``HistogramCalibrator`` (its ``num_bins``/``skip_zeros`` keyword arguments are honoured).
    Per-channel and static-block quantizers are refused, as in ModelOpt.
    """
    value = attrs.get("calibrator", "max")
    kwargs: dict = {}
    if value != "histogram":
        if isinstance(value, str) or value is None:
            return None
        cls, _args, kwargs = _constructor_parts(value)
        if getattr(cls, "__name__", None) != "HistogramCalibrator":
            return None
        kwargs = {k: v for k, v in kwargs.items() if k in ("num_bins", "skip_zeros")}
    block_sizes = attrs.get("block_sizes")
    static_blocks = bool(block_sizes) and (block_sizes.get("type", "static") == "static")
    if attrs.get("axis") is not None or static_blocks:
        got = f"axis={attrs.get('axis')!r}" if attrs.get("axis") is not None else f"block_sizes={block_sizes!r}"
        raise QuantConfigError(
            f"quantizer '{name}': calibrator 'histogram' supports per-tensor amax only (as in ModelOpt 0.47), "
            f"got {got}; use calibrator 'max' for per-channel or block quantizers"
        )
    return HistogramCalibrator(
        attrs.get("num_bits", 8),
        unsigned=attrs.get("unsigned", False),
        narrow_range=attrs.get("narrow_range", False),
        **kwargs,
    )


def calibrate_histogram(
    model,
    forward_loop: Callable | None,
    method: str = "percentile",
    *,
    percentile: float = 99.99,
    stride: int = 1,
    start_bin: int = 128,
):
    """Calibrate a quantized model: histogram quantizers by ``method``, the others by max.

    ``method`` is ``"percentile"`` (with ``percentile``), ``"entropy"`` or ``"mse"`` (with
    ``stride``/``start_bin``), as ModelOpt's ``load_calib_amax(method, ...)`` takes them. Weight
    quantizers with a histogram calibrator use it on their weight. On failure the previous amax
    values stay. Returns the model.
    """
    from qpass.calib.max_calibrate import max_calibrate, named_tensor_quantizers, restore_amax, snapshot_amax
    from qpass.graph.quantized_model import state_of

    if method not in METHODS:
        raise QuantConfigError(f"calibrate_histogram: unknown method {method!r}; allowed: {list(METHODS)}")
    options = {"percentile": percentile, "stride": stride, "start_bin": start_bin}
    state = state_of(model)
    hist_quantizers = [
        q for _, q in named_tensor_quantizers(model) if isinstance(q.calibrator, HistogramCalibrator)
    ]
    if method == "entropy":
        for q in hist_quantizers:
            if q.is_enabled and q.spec.needs_amax:
                try:
                    q.calibrator._entropy_levels()
                except QuantConfigError as e:
                    raise QuantConfigError(f"quantizer '{q._name}': {e}") from None
    global _ACTIVE
    snap = snapshot_amax(model)
    previous, _ACTIVE = _ACTIVE, (method, options)
    try:
        max_calibrate(model, state, forward_loop)
    except BaseException:
        restore_amax(model, snap)
        raise
    finally:
        _ACTIVE = previous
    return model


# ---------------------------------------------------------------------- distributed reduction
def _register_reducer() -> None:
    from qpass.calib.distributed import register_reducer

    @register_reducer(HistogramCalibrator)
    def _reduce_histogram(items, comm) -> None:
        """Range MAX, re-bin every rank onto num_bins bins over it, counts SUM."""
        cals = [it.obj for it in items]
        devices = [it.device for it in items]
        names = [it.name for it in items]
        nbins = comm.all_reduce([torch.tensor([c.num_bins for c in cals], dtype=torch.int64)], comm.dist.ReduceOp.MAX)[0]
        low = comm.all_reduce([torch.tensor([-c.num_bins for c in cals], dtype=torch.int64)], comm.dist.ReduceOp.MAX)[0]
        if not torch.equal(nbins, -low):
            bad = [n for n, a, b in zip(names, nbins.tolist(), (-low).tolist()) if a != b]
            raise CalibrationError(f"histogram calibrators differ in num_bins across ranks: {', '.join(bad[:5])}")
        tops = comm.all_reduce_optional(
            [c._top if c._hist is not None else None for c in cals], comm.dist.ReduceOp.MAX, devices=devices, names=names
        )
        zeros = comm.all_reduce([torch.tensor([c._zeros for c in cals], dtype=torch.int64)], comm.dist.ReduceOp.SUM)[0]
        for c, top in zip(cals, tops):
            c._zeros = 0
            if top is not None and c._hist is not None:
                c.align(top)
        hists = comm.all_reduce_optional(
            [c._hist for c in cals], comm.dist.ReduceOp.SUM, devices=devices, names=names
        )
        for c, top, hist, z in zip(cals, tops, hists, zeros.tolist()):
            if hist is not None:
                c.load_state({"hist": hist, "range": top})
                c._hist[0] += z  # zeros seen before a rank's first nonzero batch
            else:
                c._zeros = int(z)


_register_reducer()
