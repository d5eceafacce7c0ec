"""Integer element formats (2 to 8 bits, signed or unsigned, full or narrow range).

The bounds follow ModelOpt's ``_tensor_quant``: ``max = 2**(bits - 1 + unsigned) - 1``;
``min = 0`` when unsigned, ``-max`` with narrow range, ``-max - 1`` otherwise.
Rounding is ``torch.round`` (half to even), then clamping.
"""

from __future__ import annotations

import torch

__all__ = ["IntFormat"]


class IntFormat:
    """A ``num_bits`` integer grid."""

    def __init__(self, num_bits: int, unsigned: bool = False, narrow_range: bool = False):
        self.num_bits = int(num_bits)
        self.unsigned = bool(unsigned)
        self.narrow_range = bool(narrow_range)

    @property
    def bits(self) -> int:
        """The ModelOpt ``num_bits`` spelling."""
        return self.num_bits

    @property
    def total_bits(self) -> int:
        return self.num_bits

    @property
    def name(self) -> str:
        return f"{'u' if self.unsigned else ''}int{self.num_bits}"

    @property
    def max_bound(self) -> float:
        return float(2 ** (self.num_bits - 1 + int(self.unsigned)) - 1)

    @property
    def min_bound(self) -> float:
        if self.unsigned:
            return 0.0
        return -self.max_bound if self.narrow_range else -self.max_bound - 1

    @property
    def max(self) -> float:
        """Largest magnitude used to map amax (the ModelOpt ``maxbound``)."""
        return self.max_bound

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.unsigned else torch.int8

    def __eq__(self, other):
        return isinstance(other, IntFormat) and (
            self.num_bits,
            self.unsigned,
            self.narrow_range,
        ) == (other.num_bits, other.unsigned, other.narrow_range)

    def __hash__(self):
        return hash(("int", self.num_bits, self.unsigned, self.narrow_range))

    def __repr__(self):
        return f"IntFormat({self.num_bits}, unsigned={self.unsigned}, narrow_range={self.narrow_range})"

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Round half to even and clamp; returns float32 with +0.0 for zero (never -0.0)."""
        return torch.clamp(torch.round(v), self.min_bound, self.max_bound) + 0.0

    def round_(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`round` in place on ``v`` (a float32 temporary the caller owns)."""
        return v.round_().clamp_(self.min_bound, self.max_bound).add_(0.0)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        return self.round(v).to(self.code_dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()

    def gap(self, v: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(v)
