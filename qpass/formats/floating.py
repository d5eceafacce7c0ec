"""Small floating-point element formats (FP8, FP6, FP4) and the E8M0 scale format.

A :class:`FloatFormat` knows its representable magnitudes and rounds an already
scaled float32 tensor to them: round to nearest, ties to even, saturating at
``+-max``. FP8 formats go through torch's own ``float8`` dtypes (the same casts
ModelOpt uses); sub-byte formats round against an enumerated value table. E3M0
rounds ties away from zero, as ModelOpt's MX kernel does.

Sub-byte codes are ``sign << (E + M) | index`` where ``index`` is the position of
the magnitude in the sorted value table (for these formats that is also the
magnitude's bit pattern).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["E0M3", "E1M2", "E2M1", "E2M3", "E3M0", "E3M2", "E4M3", "E5M2", "E8M0", "FloatFormat"]


class FloatFormat:
    """A sign + E exponent bits + M mantissa bits float, no inf (except E5M2), finite saturation."""

    def __init__(self, exponent_bits: int, mantissa_bits: int):
        self.exponent_bits = int(exponent_bits)
        self.mantissa_bits = int(mantissa_bits)
        self._mags = _magnitudes(self.exponent_bits, self.mantissa_bits)
        vals = torch.tensor(self._mags, dtype=torch.float64)
        self._tables = {"values": vals.float(), "mids": ((vals[:-1] + vals[1:]) / 2).float()}
        if self.torch_dtype is not None:  # every float8 code's float32 value, by torch's own cast
            single = torch.arange(256, dtype=torch.uint8).view(self.torch_dtype).float()
            self._tables["float8"] = single
            # entry k: the pair of codes whose little-endian int16 is k - 32768, as one int64
            k = (torch.arange(65536) - 32768) & 0xFFFF
            pair = torch.stack([single[k & 0xFF], single[k >> 8]], 1).contiguous()
            self._tables["float8_pairs"] = pair.view(torch.int64).reshape(-1)
        self._on_device: dict = {}

    # -- identity ---------------------------------------------------------------------------
    @property
    def bits(self) -> tuple[int, int]:
        """The ModelOpt ``num_bits`` spelling, ``(E, M)``."""
        return (self.exponent_bits, self.mantissa_bits)

    @property
    def name(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}"

    @property
    def total_bits(self) -> int:
        """Storage bits per element (E8M0 has no sign bit)."""
        if self.is_scale_only:
            return 8
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def is_scale_only(self) -> bool:
        """E8M0: unsigned powers of two, used only for MX block scales."""
        return self.bits == (8, 0)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The native torch dtype that holds this format exactly, if there is one."""
        return {(4, 3): torch.float8_e4m3fn, (5, 2): torch.float8_e5m2}.get(self.bits)

    def __eq__(self, other):
        return isinstance(other, FloatFormat) and self.bits == other.bits

    def __hash__(self):
        return hash(("float", self.bits))

    def __repr__(self):
        return f"FloatFormat({self.exponent_bits}, {self.mantissa_bits})"

    # -- value set --------------------------------------------------------------------------
    @property
    def max(self) -> float:
        """Largest finite magnitude."""
        return self._mags[-1]

    def values(self, device=None) -> torch.Tensor:
        """Sorted non-negative representable magnitudes as float32."""
        return self._table("values", device)

    # -- rounding ---------------------------------------------------------------------------
    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Round a float32 tensor to this format (RNE, saturating); returns float32."""
        if self.is_scale_only:
            raise TypeError("E8M0 is a scale format; use qpass.formats.dynamic.e8m0_exponent")
        dt = self.torch_dtype
        if dt is not None:
            if self._arithmetic(v):
                return self._round_by_quantum(v.clamp(-self.max, self.max))
            return self.decode(v.clamp(-self.max, self.max).to(dt))
        if self._sub_byte_arithmetic(v):
            return self.round_(v.clone())
        return self.decode(self.encode(v))

    def round_(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`round` that may reuse ``v`` (a float32 temporary the caller owns) for the result."""
        if self.torch_dtype is not None:
            if self._arithmetic(v):
                return self._round_by_quantum(v.clamp_(-self.max, self.max))
            return self.decode(v.clamp_(-self.max, self.max).to(self.torch_dtype))
        if self._sub_byte_arithmetic(v):
            # the quantum arithmetic of the FP8 path, on any device: a handful of elementwise
            # kernels instead of a table search (bucketize, tie fix-up, sign, gather); NaN
            # saturates to +max as the table search does
            return self._round_by_quantum(v.clamp_(-self.max, self.max)).nan_to_num_(nan=self.max)
        return self.round(v)

    @staticmethod
    def _arithmetic(v: torch.Tensor) -> bool:
        return v.device.type == "cpu" and v.dtype == torch.float32 and not torch.compiler.is_compiling()

    @property
    def rounds_by_quantum(self) -> bool:
        """Sub-byte formats with an exponent field and ties to even (FP4 E2M1, FP6 E2M3/E3M2,
        E1M2) round by quantum arithmetic; E0M3 (integers), E3M0 (ties away) use the table."""
        return self.torch_dtype is None and self.exponent_bits >= 1 and self.bits not in ((3, 0), (8, 0))

    @property
    def min_normal_exponent(self) -> int:
        """The exponent of the smallest normal value, ``1 - bias``."""
        return 2 - (1 << (self.exponent_bits - 1))

    def _sub_byte_arithmetic(self, v: torch.Tensor) -> bool:
        return self.rounds_by_quantum and v.dtype == torch.float32 and not torch.compiler.is_compiling()

    def _round_by_quantum(self, v: torch.Tensor) -> torch.Tensor:
        """In place: ``v`` (float32, already within +-max) rounded to the nearest multiple of its
        quantum, ties to even: for FP8 the same bits as torch's cast there and back
        (exhaustive-style test), about 2x faster on CPU than cast + table decode; for the
        sub-byte formats the same values as the table search. The quantum is 2^(e - M) for the
        exponent e of max(|v|, smallest normal), built directly in the float32 exponent field;
        dividing and multiplying by a power of two is exact, and ``round_`` is half-to-even."""
        smallest = (127 + self.min_normal_exponent) << 23  # the smallest normal's exponent field
        field = torch.bitwise_and(v.view(torch.int32), 0x7F800000).clamp_min_(smallest)
        quantum = field.sub_(self.mantissa_bits << 23).view(torch.float32)
        return v.div_(quantum).round_().mul_(quantum)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """Round and return codes: a float8 tensor for FP8, else uint8 ``sign|index`` codes."""
        dt = self.torch_dtype
        if dt is not None:
            return v.clamp(-self.max, self.max).to(dt)
        a = v.abs()
        mids = self._table("mids", v.device)
        # bucketize(right=False): a == mids[i] lands in bucket i (round down)
        idx = torch.bucketize(a, mids, right=self.bits == (3, 0))
        if self.bits != (3, 0):  # ties to even: a tie at an odd midpoint rounds up
            i = idx.clamp(max=mids.numel() - 1)
            idx = idx + ((a == mids[i]) & (i % 2 == 1)).to(idx.dtype)
        nan = torch.isnan(a)
        idx = torch.where(nan, mids.numel(), idx)  # NaN saturates (to +max) like ModelOpt
        # the sign bit of v, so -0.0 keeps its sign as in an FP8 cast (and in round_)
        sign = (torch.signbit(v) & ~nan).to(torch.uint8) << (self.exponent_bits + self.mantissa_bits)
        return sign | idx.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (from :meth:`encode`) back to float32 values; keeps the sign of zero."""
        if codes.dtype == self.torch_dtype:
            if codes.device.type == "cpu" and not torch.compiler.is_compiling():
                return self._decode_float8_cpu(codes)
            return codes.float()  # CUDA, and graphs being captured (the compile backend matches the cast)
        shift = self.exponent_bits + self.mantissa_bits
        mag = self._table("values", codes.device)[(codes & ((1 << shift) - 1)).long()]
        return torch.where((codes >> shift) & 1 == 1, -mag, mag)

    def _decode_float8_cpu(self, codes: torch.Tensor) -> torch.Tensor:
        """torch's CPU float8 -> float32 cast is scalar code. A table of its own results gives the
        same bits faster: two codes at a time (a 65536-entry table of float32 pairs, gathered as
        int64 so every bit pattern, NaNs included, is copied as is), else one at a time."""
        flat = codes.reshape(-1)
        if flat.numel() % 2 == 0 and flat.is_contiguous() and flat.numel() and sys.byteorder == "little":
            pairs = flat.view(torch.uint8).view(torch.int16).long().add_(32768)
            return torch.take(self._table("float8_pairs", None), pairs).view(torch.float32).view(codes.shape)
        return torch.take(self._table("float8", None), codes.view(torch.uint8).long())

    def gap(self, v: torch.Tensor) -> torch.Tensor:
        """Distance between the two representable magnitudes around ``|v|`` (the last gap above max)."""
        vals = self.values(v.device)
        i = (torch.bucketize(v.abs(), vals, right=True) - 1).clamp(0, vals.numel() - 2)
        return vals[i + 1] - vals[i]

    def _table(self, kind: str, device) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cpu":
            return self._tables[kind]
        key = (kind, device)
        if key not in self._on_device:
            self._on_device[key] = self._tables[kind].to(device)
        return self._on_device[key]


def _magnitudes(e_bits: int, m_bits: int) -> tuple[float, ...]:
    """Sorted non-negative finite values of an (E, M) format, from its bit layout."""
    if (e_bits, m_bits) == (8, 0):  # E8M0: 2**-127 .. 2**127 (0xFF is NaN)
        return tuple(2.0**e for e in range(-127, 128))
    if (e_bits, m_bits) == (4, 3):  # fn variant: S.1111.111 is NaN, so max is 1.75 * 2**8 = 448
        codes = range(0, 0x7F)
    elif (e_bits, m_bits) == (5, 2):  # IEEE-like: exponent 31 is inf/NaN
        codes = range(0, 0x7C)
    else:  # OCP MX sub-byte formats: every code is finite
        codes = range(0, 1 << (e_bits + m_bits))
    if e_bits == 0:  # E0M3: plain integers 0..7 (ModelOpt's table)
        return tuple(float(c) for c in codes)
    bias = (1 << (e_bits - 1)) - 1
    out = []
    for c in codes:
        e, m = c >> m_bits, c & ((1 << m_bits) - 1)
        if e == 0:
            out.append(m * 2.0 ** (1 - bias - m_bits))
        else:
            out.append((1 + m / (1 << m_bits)) * 2.0 ** (e - bias))
    return tuple(out)


E4M3 = FloatFormat(4, 3)
E5M2 = FloatFormat(5, 2)
E3M2 = FloatFormat(3, 2)
E2M3 = FloatFormat(2, 3)
E2M1 = FloatFormat(2, 1)
E1M2 = FloatFormat(1, 2)
E0M3 = FloatFormat(0, 3)
E3M0 = FloatFormat(3, 0)
E8M0 = FloatFormat(8, 0)
