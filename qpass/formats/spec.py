"""QuantSpec: one quantizer's numerics, built from ModelOpt quantizer attributes.

``QuantSpec.from_attributes(num_bits, axis, block_sizes, unsigned, narrow_range)`` takes the
same spellings as ModelOpt's ``QuantizerAttributeConfig`` and checks them; the spec then
computes the calibration statistic (:meth:`amax_of`), fake quantization, real
quantization to codes + scales and back, and the grid step. Every method runs on any
device with plain torch ops and does its arithmetic in float32.
"""

from __future__ import annotations

import math

import torch

from qpass.errors import QuantConfigError

from . import dynamic, scaled
from .floating import E0M3, E1M2, E2M1, E2M3, E3M0, E3M2, E4M3, E5M2, E8M0, FloatFormat
from .integer import IntFormat
from .layout import Layout, normalize_axes
from .packing import pack_nibbles, unpack_nibbles
from .ste import FakeQuantSTE, cast_result
from .validate import parse_attributes

__all__ = ["QuantSpec"]

FLOAT_FORMATS = {f.bits: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1, E1M2, E0M3, E3M0)}
SCALE_FORMATS = {**FLOAT_FORMATS, (8, 0): E8M0}


class QuantSpec:
    """The numerics of one quantizer (element format, granularity, scale scheme)."""

    def __init__(self, fmt, *, axis=None, block_sizes=None, dynamic_block=None, scale_format=None,
                 scale_norm=None):
        self.fmt: IntFormat | FloatFormat = fmt
        self.axis = axis  # int / tuple of kept axes, or None
        self.block_sizes: dict[int, int | None] | None = block_sizes  # static blocks (int keys)
        self.dynamic_block: tuple[int, int] | None = dynamic_block  # (axis key, block size)
        self.scale_format: FloatFormat | None = scale_format  # block scale format (dynamic or static NVFP4)
        # static NVFP4: the E4M3 scale of a block whose amax is the global amax (448; 256 four-over-six)
        self.scale_norm: float | None = scale_norm

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_attributes(cls, num_bits=8, axis=None, block_sizes=None, unsigned=False, narrow_range=False):
        """Build a spec from ModelOpt quantizer attributes; raises QuantConfigError if invalid."""
        p = parse_attributes(num_bits, axis, block_sizes, unsigned, narrow_range)
        if isinstance(p["num_bits"], int):
            fmt = IntFormat(p["num_bits"], p["unsigned"], p["narrow_range"])
        else:
            fmt = FLOAT_FORMATS[p["num_bits"]]
        if p["dynamic_block"] is not None:
            if isinstance(fmt, IntFormat):  # MXINT8: symmetric int8, like ModelOpt's MX kernel
                fmt = IntFormat(8, unsigned=False, narrow_range=True)
            return cls(fmt, dynamic_block=p["dynamic_block"], scale_format=SCALE_FORMATS[p["scale_bits"]])
        if p["scale_norm"] is not None:
            return cls(fmt, block_sizes=p["block_sizes"], scale_format=E4M3, scale_norm=p["scale_norm"])
        return cls(fmt, axis=p["axis"], block_sizes=p["block_sizes"])

    def to_attributes(self) -> dict:
        """The ModelOpt attribute dict this spec stands for."""
        out = {"num_bits": self.fmt.bits}
        if isinstance(self.fmt, IntFormat) and self.dynamic_block is None:
            out.update(unsigned=self.fmt.unsigned, narrow_range=self.fmt.narrow_range)
        if self.axis is not None:
            out["axis"] = self.axis
        if self.block_sizes is not None:
            out["block_sizes"] = {**self.block_sizes, "type": "static"}
            if self.is_static_nvfp4:
                out["block_sizes"]["scale_bits"] = self.scale_format.bits
                if self.scale_norm != E4M3.max:
                    out["block_sizes"]["four_over_six"] = 1
        if self.dynamic_block is not None:
            key, size = self.dynamic_block
            out["block_sizes"] = {key: size, "type": "dynamic", "scale_bits": self.scale_format.bits}
        return out

    def __eq__(self, other):
        return isinstance(other, QuantSpec) and self.to_attributes() == other.to_attributes()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        return f"QuantSpec({self.describe()})"

    # -- properties -----------------------------------------------------------------------------
    @property
    def num_bits(self):
        return self.fmt.bits

    @property
    def is_dynamic(self) -> bool:
        """True for dynamic block formats: block scales come from x at run time."""
        return self.dynamic_block is not None

    @property
    def is_static_nvfp4(self) -> bool:
        """Static block amax (a buffer) with E4M3 block scales under a global amax."""
        return self.scale_format is not None and self.dynamic_block is None

    @property
    def is_mx(self) -> bool:
        return self.is_dynamic and self.scale_format == E8M0

    @property
    def needs_amax(self) -> bool:
        """False only for MX formats; NVFP4 still needs its per-tensor (global) amax."""
        return not self.is_mx

    @property
    def block_size(self) -> int | None:
        """The dynamic block size, or a lone static block size on one axis, else None."""
        if self.dynamic_block is not None:
            return self.dynamic_block[1]
        if self.block_sizes and len(self.block_sizes) == 1:
            return next(iter(self.block_sizes.values()))
        return None

    @property
    def maxbound(self) -> float:
        """Largest element magnitude (ModelOpt's ``maxbound``: 127, 448, 6, ...)."""
        return self.fmt.max

    @property
    def effective_bits(self) -> float:
        """Bits per element including scale overhead (16-bit static block scales)."""
        bits = float(self.fmt.total_bits)
        if self.dynamic_block is not None:
            return bits + self.scale_format.total_bits / self.dynamic_block[1]
        if self.is_static_nvfp4:
            return bits + self.scale_format.total_bits / self.block_sizes[-1]
        if self.block_sizes:
            per_block = math.prod(b for b in self.block_sizes.values() if b)
            return bits + 16 / per_block
        return bits

    def describe(self) -> str:
        f = self.fmt
        if self.dynamic_block is not None:
            b, s = self.dynamic_block[1], self.scale_format
            if f == E2M1 and s == E4M3:
                return f"nvfp4 (e2m1, block{b}, e4m3 scales)"
            if s == E8M0:
                kind = "int8" if isinstance(f, IntFormat) else f"fp{f.total_bits}"
                return f"mx{kind} ({_fmt_name(f, short=True)}, block{b}, e8m0 scales)"
            return f"{_fmt_name(f)} dynamic (block{b}, {s.name} scales)"
        name = _fmt_name(f)
        if self.is_static_nvfp4:
            extra = ", four-over-six" if self.scale_norm != E4M3.max else ""
            return f"nvfp4 (e2m1, block{self.block_sizes[-1]} static, e4m3 scales{extra})"
        if self.block_sizes:
            keyed = {k: v for k, v in self.block_sizes.items() if v}
            if list(keyed) == [-1] and len(self.block_sizes) == 1:
                return f"{name} block{keyed[-1]} static"
            inner = ",".join(f"{k}:{v}" for k, v in sorted(self.block_sizes.items()))
            return f"{name} block({inner}) static"
        if self.axis is not None:
            return f"{name} per-channel(axis={self.axis})"
        return f"{name} per-tensor"

    # -- layouts ----------------------------------------------------------------------------------
    def _layout(self, shape) -> Layout:
        bs = self.block_sizes
        if bs and all(v is None for v in bs.values()):
            # ModelOpt turns {-1: None, ...} into per-channel over the axes not listed
            listed = normalize_axes(tuple(bs), len(shape))
            kept = tuple(i for i in range(len(shape)) if i not in listed)
            return Layout(shape, kept=kept or None)
        return Layout(shape, kept=self.axis, block_sizes=bs)

    def _dyn_block(self, shape) -> int:
        key, size = self.dynamic_block
        if len(shape) == 0 or (key != -1 and key != len(shape) - 1):
            raise QuantConfigError(
                f"dynamic block quantization runs along the last axis; block_sizes key {key} "
                f"is not the last axis of an input of shape {tuple(shape)}"
            )
        return size

    # -- numerics -------------------------------------------------------------------------------
    def amax_of(self, x: torch.Tensor) -> torch.Tensor:
        """The max-calibration statistic of one batch, in ModelOpt's stored ``_amax`` shape."""
        x32 = x.detach().float()
        if self.is_dynamic:
            return x32.abs().amax() if x32.numel() else x32.new_zeros(())
        lay = self._layout(x.shape)
        return lay.reduce_amax(lay.to_blocks(x32))

    def _amax_or_stat(self, x32, amax):
        return self.amax_of(x32) if amax is None else amax

    def with_global(self, amax, global_amax):
        """The amax argument of this spec's methods for a quantizer's stored state: static NVFP4
        takes ``(block amax, global amax)``, every other format its amax alone."""
        if amax is None or not self.is_static_nvfp4:
            return amax
        return amax, None if global_amax is None else global_amax.to(amax.device)

    def _static_scales(self, lay: Layout, x32: torch.Tensor, amax, codes: bool = False):
        """Static NVFP4: the blocks' amax and scales ``d`` (with ``codes``: also the E4M3 scale
        codes and the global scale). ``amax`` is ``(block amax, global amax)`` as a static NVFP4
        quantizer holds them, or the block amax alone, whose max is then the global amax (as
        right after max calibration)."""
        blocks, glob = amax if isinstance(amax, tuple) else (self._amax_or_stat(x32, amax), None)
        a = lay.broadcast_amax(blocks, x32.device)
        glob = a.amax() if glob is None else torch.as_tensor(glob).detach().float().to(x32.device)
        s_codes, g, d = dynamic.block_float_scales(self.fmt, self.scale_format, a, glob, self.scale_norm)
        return (a, d, s_codes, g) if codes else (a, d)

    def _fake32(self, x32: torch.Tensor, amax, want_mask: bool):
        """Float32 fake quantization of a detached float32 tensor (+ clipped-STE mask)."""
        if self.is_dynamic:
            b = self._dyn_block(x32.shape)
            a = None if self.is_mx else self._amax_or_stat(x32, amax)
            out = dynamic.from_blocks(dynamic.fake_quant(self.fmt, self.scale_format, dynamic.to_blocks(x32, b), a), x32.shape)
            mask = None
            if want_mask and a is not None:
                mask = x32.abs() <= torch.as_tensor(a).float().amax().to(x32.device)
            return out, mask
        lay = self._layout(x32.shape)
        xb = lay.to_blocks(x32)
        if self.is_static_nvfp4:
            a, d = self._static_scales(lay, x32, amax)
            out = lay.from_blocks(dynamic.round_scaled(self.fmt, xb, d))
            mask = lay.from_blocks(scaled.clip_mask(xb, a)) if want_mask else None
            return out, mask
        a = lay.broadcast_amax(self._amax_or_stat(x32, amax), x32.device)
        out = lay.from_blocks(scaled.fake_quant(self.fmt, xb, a))
        mask = lay.from_blocks(scaled.clip_mask(xb, a)) if want_mask else None
        return out, mask

    def fake_quant(self, x: torch.Tensor, amax=None, *, pass_through_bwd: bool = True) -> torch.Tensor:
        """Quantize-dequantize ``x``; same shape and dtype; straight-through gradient.

        ``amax=None`` computes it from ``x`` (dynamic quantization). With
        ``pass_through_bwd=False`` the gradient is zeroed where ``|x| > amax`` (ModelOpt's
        clipped STE); by default it passes through unchanged everywhere.
        """
        if x.numel() == 0:  # nothing to quantize (ModelOpt returns such inputs as they are)
            return x
        want_mask = not pass_through_bwd

        def run(t):
            out, mask = self._fake32(t.detach().float(), amax, want_mask)
            return cast_result(out, t.dtype), mask

        if x.requires_grad and torch.is_grad_enabled():
            return FakeQuantSTE.apply(x, run)
        return run(x)[0]

    def quantize(self, x: torch.Tensor, amax=None):
        """Real quantization: ``(codes, scale)``; ``dequantize`` of them equals ``fake_quant``.

        Codes keep x's shape (4-bit formats pack two per byte along the last axis, rounded
        up): int8/uint8 for integers, float8_e4m3fn/float8_e5m2 for FP8, uint8 sign|index
        codes for FP6. Scales: integers, the float64 step ``amax / max_bound`` in amax's
        shape; FP8, float32 ``1 / (fmax / amax)``; NVFP4-style, ``(float8 block scales
        [..., num_blocks], float32 0-dim global scale)``; MX, uint8 E8M0 exponents
        ``[..., num_blocks]``.
        """
        x32 = x.detach().float()
        if self.is_dynamic:
            b = self._dyn_block(x.shape)
            a = None if self.is_mx else self._amax_or_stat(x32, amax)
            codes, scale = dynamic.quantize(self.fmt, self.scale_format, dynamic.to_blocks(x32, b), a)
            codes = dynamic.from_blocks(codes, x.shape)
        elif self.is_static_nvfp4:
            lay = self._layout(x.shape)
            xb = lay.to_blocks(x32)
            _, d, s_codes, g = self._static_scales(lay, x32, amax, codes=True)
            codes = lay.from_blocks(dynamic.encode_scaled(self.fmt, xb, d))
            padded = lay.padded_shape
            scale = (s_codes.reshape(*padded[:-1], padded[-1] // self.block_sizes[-1]), g)
        else:
            lay = self._layout(x.shape)
            a = lay.broadcast_amax(self._amax_or_stat(x32, amax), x32.device)
            codes, scale = scaled.quantize(self.fmt, lay.to_blocks(x32), a)
            codes, scale = lay.from_blocks(codes), lay.stored(scale)
        if self.fmt.total_bits == 4:
            codes = pack_nibbles(codes)
        return codes, scale

    def dequantize(self, codes: torch.Tensor, scale, dtype=torch.float32, shape=None) -> torch.Tensor:
        """Values from :meth:`quantize`'s output, cast to ``dtype``; ``shape`` is the original
        shape (needed for an odd last axis under 4-bit packing)."""
        packed = self.fmt.total_bits == 4
        if shape is None:
            shape = (*codes.shape[:-1], codes.shape[-1] * 2) if packed else codes.shape
        shape = torch.Size(shape)
        if packed:
            signed = isinstance(self.fmt, IntFormat) and not self.fmt.unsigned
            codes = unpack_nibbles(codes, shape[-1], signed).reshape(shape)
        if self.is_dynamic:
            b = self._dyn_block(shape)
            if isinstance(scale, tuple):
                scale = tuple(t.to(codes.device) for t in scale)
            else:
                scale = scale.to(codes.device)
            out = dynamic.dequantize(self.fmt, self.scale_format, _blocks_of_codes(codes, b), scale)
            out = dynamic.from_blocks(out, shape)
        elif self.is_static_nvfp4:
            lay = self._layout(shape)
            s_codes, g = (t.to(codes.device) for t in scale)
            d = self.scale_format.decode(s_codes.reshape(-1, 1)) * g.float()
            out = lay.from_blocks(self.fmt.decode(_padded_codes(codes, lay)) * d)
        else:
            lay = self._layout(shape)
            cb = _padded_codes(codes, lay)
            out = lay.from_blocks(scaled.dequantize(self.fmt, cb, lay.broadcast(scale).to(codes.device)))
        return cast_result(out, dtype)

    def step(self, x: torch.Tensor, amax=None) -> torch.Tensor:
        """Float32 quantization step around each element of x (input units)."""
        x32 = x.detach().float()
        if self.is_dynamic:
            b = self._dyn_block(x.shape)
            a = None if self.is_mx else self._amax_or_stat(x32, amax)
            st = dynamic.step(self.fmt, self.scale_format, dynamic.to_blocks(x32, b), a)
            return dynamic.from_blocks(st, x.shape)
        lay = self._layout(x.shape)
        if self.is_static_nvfp4:
            xb = lay.to_blocks(x32)
            _, d = self._static_scales(lay, x32, amax)
            return lay.from_blocks(dynamic.gap_scaled(self.fmt, xb, d))
        a = lay.broadcast_amax(self._amax_or_stat(x32, amax), x32.device)
        return lay.from_blocks(scaled.step(self.fmt, lay.to_blocks(x32), a))


def _fmt_name(f, short=False) -> str:
    if isinstance(f, IntFormat):
        return f.name + (" narrow-range" if f.narrow_range and not short else "")
    return f.name if short else f"fp{f.total_bits} {f.name}"


def _as_bytes(codes: torch.Tensor):
    """Float8 codes as uint8 (so they can be padded); returns (tensor, restore)."""
    if codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dt = codes.dtype
        return codes.view(torch.uint8), lambda t: t.view(dt)
    return codes, lambda t: t


def _padded_codes(codes, lay: Layout):
    raw, back = _as_bytes(codes)
    return back(lay.to_blocks(raw).contiguous())


def _blocks_of_codes(codes, block):
    raw, back = _as_bytes(codes)
    return back(dynamic.to_blocks(raw, block).contiguous())
