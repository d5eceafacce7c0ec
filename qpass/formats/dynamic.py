"""Dynamic block quantization: per-block scales computed from the input at run time.

Blocks run along the last axis; a partial last block is padded with zeros (which never
change a block's abs-max) and the padding is dropped afterwards, as ModelOpt's kernels do.

Two scale schemes, following ModelOpt's GPU kernels (which refuse to run on CPU):

* **E8M0 scales (MX formats)**, ``tensor_quant_mx.cu``'s "NV" rule: the block scale is
  ``2**e`` with ``e = ceil(log2(block_amax / elem_max))`` clamped to [-127, 127], computed
  exactly from the float32 bits (an all-zero block stores ``e = -127``, as ModelOpt's
  ``MXFP8QTensor`` does). Elements are ``round(x * 2**-e)``; values are ``q * 2**e``.
* **Float scales with a per-tensor global amax (NVFP4 and kin)**, the Triton
  ``fp4_fake_quant_block`` arithmetic: ``g = amax / (elem_max * scale_max)``;
  ``s = round_S(min(block_amax / (elem_max * g), scale_max))``; block scale ``d = s * g``;
  elements ``round(x / d)``; values ``q * d``. A zero ``d`` (zero block, zero global amax,
  or a block scale that underflows the scale format) gives zeros. ModelOpt's Triton kernel
  instead replaces any ``d < 1e-5`` by 1.0; qpass does not copy that (it zeroes tensors
  whose amax is below about 6e-5).

``quantize`` returns codes in the padded blocked view ``[..., num_blocks, block]`` and the
scales: E8M0 exponents as uint8 (``e + 127``), shape ``[..., num_blocks]``; or a tuple
``(block_scales, global_scale)`` with block scales as float8 (or uint8 codes for sub-byte
scale formats), shape ``[..., num_blocks]``, and a 0-dim float32 global scale ``g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .floating import FloatFormat

__all__ = ["block_float_scales", "dequantize", "encode_scaled", "gap_scaled", "round_scaled", "e8m0_exponent", "fake_quant", "pow2", "quantize", "step", "to_blocks"]


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Pad the last axis with zeros to a multiple of ``block`` and split it into blocks."""
    rem = x.shape[-1] % block
    if rem:
        x = F.pad(x, (0, block - rem))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def from_blocks(y: torch.Tensor, shape) -> torch.Tensor:
    y = y.reshape(*y.shape[:-2], -1)
    return y[..., : shape[-1]] if y.shape[-1] != shape[-1] else y


def e8m0_exponent(ratio: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(ratio))`` clamped to [-127, 127] as int32; -127 where ratio is 0."""
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2**exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)
    e = torch.where(ratio > 0, e, -127)
    e = torch.where(torch.isfinite(ratio), e, 127)
    return e.clamp(-127, 127).to(torch.int32)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for integer ``e`` in [-149, 127] (built from bits)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=0) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def _mx_scales(elem, xb: torch.Tensor):
    block_amax = xb.abs().amax(dim=-1, keepdim=True)
    e = e8m0_exponent(block_amax / elem.max)
    return e, pow2(-e), pow2(e)


def _global_scale(elem, scale_fmt: FloatFormat, amax: torch.Tensor) -> torch.Tensor:
    amax = torch.as_tensor(amax).detach().float()
    if amax.numel() != 1:
        amax = amax.amax()
    return amax.reshape(()) / (elem.max * scale_fmt.max)


def _float_scales(elem, scale_fmt: FloatFormat, xb: torch.Tensor, amax: torch.Tensor):
    return block_float_scales(elem, scale_fmt, xb.abs().amax(dim=-1, keepdim=True), amax, scale_fmt.max)


def block_float_scales(elem, scale_fmt: FloatFormat, block_amax: torch.Tensor, amax, norm: float):
    """Scale codes, global scale ``g`` and block scales ``d`` for given block amaxes: the dynamic
    scheme with ``block_amax`` taken from a static NVFP4 quantizer's buffer instead of from x.
    ``norm`` is the scale value a block whose amax equals the global ``amax`` gets (448, or 256
    for four-over-six)."""
    g = (_global_scale(elem, scale_fmt, amax) * (scale_fmt.max / norm)).to(block_amax.device)
    s = block_amax / (elem.max * g)
    s = torch.where(g > 0, s, 0.0).clamp(max=scale_fmt.max)
    s_codes = scale_fmt.encode(s)
    d = scale_fmt.decode(s_codes) * g
    return s_codes, g, d


def _unscaled(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``xb / d``, with 0 where the block scale ``d`` is 0 (the block quantizes to zeros)."""
    zero = d == 0
    return torch.where(zero, 0.0, xb / torch.where(zero, 1.0, d))


def round_scaled(elem, xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``xb`` rounded to ``elem``'s grid under block scales ``d`` (broadcast over ``xb``)."""
    return elem.round_(_unscaled(xb, d)).mul_(d)


def encode_scaled(elem, xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """:func:`round_scaled`'s element codes."""
    return elem.encode(_unscaled(xb, d))


def gap_scaled(elem, xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The grid step around each element of ``xb`` under block scales ``d`` (0 where ``d`` is)."""
    return torch.where(d == 0, 0.0, elem.gap(_unscaled(xb, d)) * d)


def quantize(elem, scale_fmt: FloatFormat, xb: torch.Tensor, amax):
    if scale_fmt.is_scale_only:
        e, scale, _ = _mx_scales(elem, xb)
        return elem.encode(xb * scale), (e + 127).to(torch.uint8).squeeze(-1)
    s_codes, g, d = _float_scales(elem, scale_fmt, xb, amax)
    return encode_scaled(elem, xb, d), (s_codes.squeeze(-1), g)


def dequantize(elem, scale_fmt: FloatFormat, codes: torch.Tensor, scale) -> torch.Tensor:
    if scale_fmt.is_scale_only:
        e = scale.to(torch.int32).unsqueeze(-1) - 127
        return elem.decode(codes) * pow2(e)
    s_codes, g = scale
    d = scale_fmt.decode(s_codes.unsqueeze(-1)) * g.float()
    return elem.decode(codes) * d


def fake_quant(elem, scale_fmt: FloatFormat, xb: torch.Tensor, amax) -> torch.Tensor:
    """``dequantize(quantize(...))`` without the codes: the elements rounded in place."""
    if scale_fmt.is_scale_only:
        e, scale, _ = _mx_scales(elem, xb)
        return elem.round_(xb * scale).mul_(pow2(e))
    _, _, d = _float_scales(elem, scale_fmt, xb, amax)
    return round_scaled(elem, xb, d)


def step(elem, scale_fmt: FloatFormat, xb: torch.Tensor, amax) -> torch.Tensor:
    if scale_fmt.is_scale_only:
        _, scale, unscale = _mx_scales(elem, xb)
        return elem.gap(xb * scale) * unscale
    _, _, d = _float_scales(elem, scale_fmt, xb, amax)
    return gap_scaled(elem, xb, d)
