"""Quantization with a calibrated amax: per tensor, per channel or per static block.

All functions take float32 tensors already in the blocked view (see :mod:`.layout`) and
an amax that broadcasts over it. They reproduce ModelOpt's CPU reference paths
operation for operation, so results agree bit for bit:

* integers (``_tensor_quant``): ``scale = max_bound / amax``; ``q = clamp(round(x * scale))``;
  ``out = q / scale``. An amax ``<= 2**-24`` counts as zero: ``q = 0`` and the output is 0.
* floats (``fp8_eager``): ``scale = fmax / amax`` (an amax ``<= 2**-24`` is replaced by 1);
  ``q = cast(clamp(x * scale, +-fmax))``; ``out = q * (1 / scale)``.

The scale handed out by :func:`quantize` is the dequantization scale (``x ~ q * scale``):
float32 ``1 / scale`` for floats. For integers it is ``amax / max_bound`` held in float64,
because ModelOpt divides by ``max_bound / amax`` and only the float64 step lets
:func:`dequantize` recover that float32 divisor exactly (``scale.float()`` is the usual
float32 scale for export).
"""

from __future__ import annotations

import torch

from .floating import FloatFormat
from .integer import IntFormat

__all__ = ["dequantize", "fake_quant", "quantize", "step"]

AMAX_EPS = 1.0 / (1 << 24)  # ModelOpt treats an amax at or below this as zero


def _int_divisor(fmt: IntFormat, amax: torch.Tensor):
    """(multiplier, divisor): ModelOpt's ``scale`` before and after the zero-amax fix-up."""
    return int_divisor_for_bound(fmt.max_bound, amax)


def int_divisor_for_bound(max_bound: float, amax: torch.Tensor):
    """:func:`_int_divisor` from the format's largest code alone (what a compiled graph keeps)."""
    zero = amax <= AMAX_EPS
    # a tensor numerator: ``float / tensor`` would be reciprocal-then-multiply in torch
    scale = amax.new_tensor(max_bound) / amax
    return torch.where(zero, 0.0, scale), torch.where(zero, 1.0, scale)


def _float_scale(fmt: FloatFormat, amax: torch.Tensor):
    safe = torch.where(amax <= AMAX_EPS, torch.ones_like(amax), amax)
    scale = fmt.max / safe  # ``float / tensor``: torch's reciprocal-multiply, as in ModelOpt
    return scale, 1 / scale


def quantize(fmt, xb: torch.Tensor, amax: torch.Tensor):
    """Codes in the blocked view (unpacked) and the dequantization scale (amax's shape)."""
    if isinstance(fmt, IntFormat):
        mult, _ = _int_divisor(fmt, amax)
        codes = fmt.encode(xb * mult)
        return codes, amax.double() / fmt.max_bound
    scale, scale_inv = _float_scale(fmt, amax)
    return fmt.encode(xb * scale), scale_inv


def dequantize(fmt, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values from codes and the scale :func:`quantize` returned."""
    if isinstance(fmt, IntFormat):
        amax = (scale.double() * fmt.max_bound).float()
        _, div = _int_divisor(fmt, amax)
        return fmt.decode(codes) / div
    return fmt.decode(codes) * scale.float()


def fake_quant(fmt, xb: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    if isinstance(fmt, IntFormat):
        mult, div = _int_divisor(fmt, amax)
        return fmt.round_(xb * mult).div_(div)  # in place on the product: the same ops, fewer temporaries
    scale, scale_inv = _float_scale(fmt, amax)
    return fmt.round_(xb * scale).mul_(scale_inv)


def step(fmt, xb: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Grid spacing around each element, in input units (0 where an integer amax is zero)."""
    if isinstance(fmt, IntFormat):
        mult, div = _int_divisor(fmt, amax)
        return torch.where(mult == 0, 0.0, 1 / div).expand_as(xb)
    scale, scale_inv = _float_scale(fmt, amax)
    return fmt.gap((xb * scale).clamp(-fmt.max, fmt.max)) * scale_inv


def clip_mask(xb: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's clipped-STE mask: gradient flows where ``|x| <= amax``."""
    return xb.abs() <= amax
