"""Affine-quantization bias: ModelOpt's ``bias`` quantizer attribute, computed from the data.

A quantizer with ``bias={<axes>: None, "type": ..., "method": ...}`` quantizes ``x - b`` and adds
``b`` back (ModelOpt's affine quantization). The int keys are the axes ``b`` is reduced over
(the others are kept: ``{-2: None, -4: None}`` on a [batch, heads, seq, dim] KV tensor gives
one bias per head and channel); an axis beyond the input's rank is ignored, as in ModelOpt, so
``{-1: None, -2: None, -3: None, -4: None}`` is per tensor for inputs of rank 4 or less.

``method``: ``"max_min"``, the midpoint of the running max and min; ``"mean"`` (the default), the
running average of the per-batch means (a mean of means, as ModelOpt keeps it). ``type``:
``"static"`` (the default) calibrates ``b`` with the amax, which is then collected on ``x - b``
with the running bias of the moment; ``"dynamic"`` computes ``b`` from every input.

qpass's own key ``"zero_point": True`` (a static per-tensor bias of an integer format under a
per-tensor amax) makes the quantizer exactly an integer zero-point quantizer: ONNX
QuantizeLinear's ``zero_point``, ONNX Runtime's ``quantize_static`` and PT2E's uint8 activations.
The calibrated range is widened to include 0, as those tools do (``max_min``: the bias is the
midpoint of ``[min(lo, 0), max(hi, 0)]``; the amax grows to at least ``|b|``), so the zero point
is a code of the format; and the bias is used rounded to a whole number of steps, so
the extremes lose at most half a step to clipping.
"""

from __future__ import annotations

import torch


def reduce_dims(bias_cfg: dict, ndim: int) -> tuple[int, ...]:
    """The dims of a rank-``ndim`` input the bias is reduced over (its int keys in range)."""
    axes = [k for k in bias_cfg if isinstance(k, int)]
    return tuple(i for i in range(ndim) if i in axes or i - ndim in axes)


def shifted_zero_point(bias: float, step: float, zero_point: int, lo: int, hi: int) -> int | None:
    """The zero point that absorbs a bias of a whole number ``k`` of steps: ``zero_point - k``, or
    None when ``bias / step`` is not whole (to 1e-3) or the result leaves the codes ``[lo, hi]``.
    ``Q(x - b) + zero_point == Q(x) + zero_point - k`` for ``b = k * step`` (the ONNX export and the
    CPU compile backend fold ``zero_point`` biases this way)."""
    if not step > 0:
        return None
    k = bias / step
    if not abs(k - round(k)) <= 1e-3:
        return None
    new = zero_point - round(k)
    return new if lo <= new <= hi else None


def bias_of(x: torch.Tensor, bias_cfg: dict) -> torch.Tensor:
    """The bias of one tensor (``type: "dynamic"``), float32, kept dims of size 1."""
    dims = reduce_dims(bias_cfg, x.dim())
    xf = x.detach().float()
    if bias_cfg.get("method", "mean") == "max_min":
        hi = xf.amax(dim=dims, keepdim=True) if dims else xf
        lo = xf.amin(dim=dims, keepdim=True) if dims else xf
        return (hi + lo) / 2
    return xf.mean(dim=dims, keepdim=True) if dims else xf


class BiasCalibrator:
    """The running bias of a static affine quantizer."""

    def __init__(self, bias_cfg: dict) -> None:
        self.cfg = bias_cfg
        self.method = bias_cfg.get("method", "mean")
        self.reset()

    def reset(self) -> None:
        self._bias = None
        self._max = None
        self._min = None
        self._count = 0

    def collect(self, x: torch.Tensor) -> None:
        dims = reduce_dims(self.cfg, x.dim())
        xf = x.detach().float()
        if self.method == "max_min":
            hi = xf.amax(dim=dims, keepdim=True) if dims else xf
            lo = xf.amin(dim=dims, keepdim=True) if dims else xf
            self._max = hi if self._max is None else torch.maximum(self._max, hi)
            self._min = lo if self._min is None else torch.minimum(self._min, lo)
            self._bias = (self._max + self._min) / 2
        else:
            mean = xf.mean(dim=dims, keepdim=True) if dims else xf
            self._bias = mean if self._bias is None else (self._bias * self._count + mean) / (self._count + 1)
        self._count += 1

    def compute_bias(self) -> torch.Tensor | None:
        return None if self._bias is None else self._bias.clone()

    def zero_point_range(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias, amax) of a per-tensor ``zero_point`` quantizer: the range widened to hold 0
        (``max_min``: the midpoint of ``[min(lo, 0), max(hi, 0)]``), and the amax at least the
        bias, so that 0 lies on the grid (a calibrated amax, e.g. a histogram's, is kept when
        it already covers 0)."""
        amax = amax.float()
        b = self.compute_bias()
        if self.method == "max_min":
            b = (self._min.clamp(max=0.0) + self._max.clamp(min=0.0)) / 2
        return b, torch.maximum(amax, b.abs().reshape(amax.shape).to(amax.device))
