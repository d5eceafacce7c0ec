"""A tensor stored quantized: the smallest set of tensors from which :meth:`QuantSpec.dequantize`
gives back exactly what :meth:`QuantSpec.fake_quant` computes.

``pack`` keeps the codes (two 4-bit codes per byte) and the scales :meth:`QuantSpec.quantize`
returns, except the float64 step of integer formats with a calibrated amax: it is
``amax / max_bound``, recomputed from the float32 amax the quantizer keeps anyway (the same
float64 value, so the dequantized tensor is the same bit for bit).
"""

from __future__ import annotations

import torch

from .integer import IntFormat

__all__ = ["pack", "unpack", "packed_bytes"]


def _step_from_amax(spec) -> bool:
    return isinstance(spec.fmt, IntFormat) and not spec.is_dynamic


def pack(spec, x: torch.Tensor, amax) -> dict[str, torch.Tensor]:
    """``{"codes", and "scale" or "block_scale" + "global_scale"}`` for ``x`` under ``spec``."""
    if _step_from_amax(spec) and amax is None:
        raise ValueError("packing an integer format needs its calibrated amax")
    codes, scale = spec.quantize(x, amax)
    out = {"codes": codes}
    if isinstance(scale, tuple):
        out["block_scale"], out["global_scale"] = scale
    elif not _step_from_amax(spec):
        out["scale"] = scale
    return out


def unpack(spec, packed: dict, amax, shape, dtype) -> torch.Tensor:
    """The values :func:`pack` stored, as ``dtype`` of ``shape``."""
    if "global_scale" in packed:
        scale = (packed["block_scale"], packed["global_scale"])
    elif "scale" in packed:
        scale = packed["scale"]
    else:
        scale = torch.as_tensor(amax).double() / spec.fmt.max_bound  # scaled.quantize's step
    return spec.dequantize(packed["codes"], scale, dtype=dtype, shape=shape)


def packed_bytes(packed: dict) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())
