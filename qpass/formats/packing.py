"""Two 4-bit codes per byte along the last axis.

Element ``2k`` goes to the low nibble and element ``2k + 1`` to the high nibble of byte
``k`` (the NVFP4/MXFP4 order ModelOpt uses, and the order of its INT4 export packer).
An odd last axis is padded with a zero nibble; pass the original shape to unpack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8/uint8 codes (low 4 bits used) into uint8, halving the last axis (rounded up)."""
    c = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes.to(torch.uint8)
    c = c & 0x0F
    if c.dim() == 0:
        c = c.reshape(1)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, last_dim: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`; ``signed`` sign-extends nibbles to int8."""
    p = packed.to(torch.uint8)
    out = torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)[..., :last_dim]
    if signed:
        out = (out.to(torch.int16) ^ 8) - 8  # sign-extend the 4-bit two's complement value
        return out.to(torch.int8)
    return out
