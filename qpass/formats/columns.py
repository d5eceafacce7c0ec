"""Column-by-column quantization of a 2-d weight with the scales its spec would use.

GPTQ quantizes one input column at a time and feeds each column's rounding error into the
columns not yet quantized, so it needs every element's grid before the whole matrix is
final. :class:`ColumnGrid` provides it, with the arithmetic of :meth:`QuantSpec.fake_quant`
element for element (so a matrix built from its columns is a fixed point of the spec):

* static formats (per tensor, per channel, static blocks): the calibrated amax, broadcast
  to one value per element, fixes every scale up front;
* dynamic block formats along the last axis (NVFP4, MX): a block's scale comes from the
  block's own values, so it is fixed by :meth:`ColumnGrid.start_block` from the block's
  current (error-updated) values when the first column of the block is reached.
"""

from __future__ import annotations

import torch

from . import dynamic, scaled
from .integer import IntFormat

__all__ = ["ColumnGrid"]


class ColumnGrid:
    """Per-element quantization grid of a ``[rows, cols]`` weight under ``spec``."""

    def __init__(self, spec, weight: torch.Tensor, amax) -> None:
        if weight.dim() != 2:
            raise ValueError(f"ColumnGrid needs a 2-d weight, got shape {tuple(weight.shape)}")
        self.spec = spec
        self.shape = weight.shape
        self.amax = amax
        rows, cols = weight.shape
        if spec.is_dynamic:
            self.block = spec._dyn_block(weight.shape)
            self._d = torch.zeros(rows, 1, device=weight.device)  # current block's dequant scale
            self._started = None
        else:
            self.block = spec.block_size if spec.block_sizes and list(spec.block_sizes) in ([-1], [1]) else None
            lay = spec._layout(weight.shape)
            a = spec._amax_or_stat(weight.detach().float(), amax)
            a = lay.broadcast_amax(a, weight.device).expand(lay.blocked_shape)
            a = lay.from_blocks(a.contiguous()).t().contiguous()  # [cols, rows]: one row per column
            # scaled.fake_quant's multiplier and divisor, computed once per element
            if isinstance(spec.fmt, IntFormat):
                self._mult, self._div = scaled._int_divisor(spec.fmt, a)
            else:
                self._mult, self._inv = scaled._float_scale(spec.fmt, a)

    @property
    def is_dynamic(self) -> bool:
        return self.spec.is_dynamic

    @classmethod
    def stacked(cls, grids: list["ColumnGrid"]) -> "ColumnGrid | None":
        """One grid for the weights of ``grids`` concatenated along rows (modules reading one input,
        rounded together), or None unless all are static grids of the same number format."""
        first = grids[0]
        if any(g.is_dynamic or type(g) is not cls or g.spec.fmt != first.spec.fmt for g in grids):
            return None
        out = cls.__new__(cls)
        out.spec, out.amax, out.block = first.spec, None, first.block
        out.shape = torch.Size([sum(g.shape[0] for g in grids), first.shape[1]])
        out._mult = torch.cat([g._mult for g in grids], 1)
        other = "_div" if isinstance(first.spec.fmt, IntFormat) else "_inv"
        setattr(out, other, torch.cat([getattr(g, other) for g in grids], 1))
        return out

    def start_block(self, values: torch.Tensor, col: int) -> None:
        """Fix the scales of the dynamic block that starts at ``col`` from ``values`` (its
        columns' current values, ``[rows, <= block]``). No-op for static formats."""
        if not self.is_dynamic:
            return
        xb = values.detach().float().reshape(values.shape[0], 1, -1)
        if xb.shape[-1] < self.block:
            xb = torch.nn.functional.pad(xb, (0, self.block - xb.shape[-1]))
        if self.spec.is_mx:
            _, self._scale, self._unscale = dynamic._mx_scales(self.spec.fmt, xb)
            self._scale, self._unscale = self._scale[:, 0], self._unscale[:, 0]
        else:
            _, _, d = dynamic._float_scales(self.spec.fmt, self.spec.scale_format, xb, self.amax)
            self._d = d[:, 0]
        self._started = col

    def quantize(self, column: torch.Tensor, col: int) -> torch.Tensor:
        """Fake-quantized float32 values of column ``col`` (``[rows]``)."""
        v = column.detach().float()
        fmt = self.spec.fmt
        if not self.is_dynamic:
            if isinstance(fmt, IntFormat):
                return fmt.round(v * self._mult[col]) / self._div[col]
            return fmt.round(v * self._mult[col]) * self._inv[col]
        if self._started is None or not (self._started <= col < self._started + self.block):
            raise RuntimeError(f"column {col} is outside the started block (start_block first)")
        if self.spec.is_mx:
            return fmt.decode(fmt.encode(v[:, None] * self._scale))[:, 0] * self._unscale[:, 0]
        d = self._d[:, 0]
        zero = d == 0
        codes = fmt.encode(torch.where(zero, 0.0, v / torch.where(zero, 1.0, d)))
        return fmt.decode(codes) * d
