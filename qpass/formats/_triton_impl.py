"""The Triton kernels of :mod:`qpass.formats.triton_kernels` (imported only where Triton is)."""

import triton
import triton.language as tl


@triton.jit
def _rint(y):
    # round half to even (torch.round) by the float32 magic number 1.5 * 2^23: below 2^23 the
    # sum's last place is 1, so the addition itself rounds; larger values are integers already.
    # The sign comes back from y's bits, so -0.3 gives -0.0 as torch.round does.
    a = tl.abs(y)
    r = tl.where(a < 8388608.0, (a + 12582912.0) - 12582912.0, a)
    sign = y.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _clamp(y, lo, hi):
    # NaN stays NaN (as in torch.clamp); the hardware min/max would return the other operand
    return tl.where(y != y, y, tl.minimum(tl.maximum(y, lo), hi))


@triton.jit
def per_tensor(x_ptr, out_ptr, n, mult_ptr, div_ptr, lo, hi, FP8: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(mult_ptr)
    if FP8:  # clamp to +-448, cast to E4M3 (RNE, saturating) and back, times 1 / scale
        y = _clamp(y, lo, hi)
        y = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
        out = y * tl.load(div_ptr)
    else:  # round half to even, clamp to the integer range, divide by the scale
        y = _rint(y)
        y = _clamp(y, lo, hi)
        out = tl.div_rn(y, tl.load(div_ptr))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def blocks(x_ptr, out_ptr, n_blocks, g_ptr, denom_ptr, SCALE_MAX: tl.constexpr, ELEM_MAX: tl.constexpr,
           EMIN_FIELD: tl.constexpr, MANT_SHIFT: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    mask = (rows < n_blocks)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    has_nan = tl.max((a != a).to(tl.int32), axis=1)
    bam = tl.where(has_nan > 0, float("nan"), tl.max(a, axis=1))  # NaN carries, as torch's amax
    s = tl.div_rn(bam, tl.load(denom_ptr))
    s = tl.where(s != s, s, tl.minimum(s, SCALE_MAX))
    d = s.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32) * tl.load(g_ptr)
    zero = d == 0.0
    y = tl.div_rn(x, tl.where(zero, 1.0, d)[:, None])
    y = tl.where(zero[:, None], 0.0, y)
    y = _clamp(y, -ELEM_MAX, ELEM_MAX)
    # the element's quantum 2^(e - M), e = max(exponent(|y|), smallest normal's), from the bits
    field = tl.maximum(y.to(tl.int32, bitcast=True) & 0x7F800000, EMIN_FIELD)
    q = (field - MANT_SHIFT).to(tl.float32, bitcast=True)
    r = _rint(tl.div_rn(y, q)) * q
    r = tl.where(r != r, ELEM_MAX, r)  # NaN saturates to +max, as the table search does
    tl.store(out_ptr + offs, (r * d[:, None]).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
