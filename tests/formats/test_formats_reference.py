"""Formats ModelOpt cannot run on CPU (NVFP4, MX*): qpass against brute-force references.

The references here are written independently of qpass.formats: element values are
enumerated from the bit layout, rounding is nearest-value search over that list with ties
going to the even code (away from zero for E3M0), E8M0 exponents are found by stepping
powers of two, and all scale arithmetic is float32 numpy. The comparisons are exact.

ModelOpt's pure-torch real-quant classes (NVFP4QTensor, MXFP8QTensor, MXFP4QTensor) run on
CPU and serve as a second oracle (marked ``modelopt``): NVFP4 and MXFP8 agree exactly on
ordinary data; MXFP4QTensor rounds every tie down (0.75 -> 0.5) where ModelOpt's fake-quant
kernel and qpass round ties to even, so that comparison is within one step, and exact
away from ties.
"""

import math

import numpy as np
import pytest
import torch

from qpass.formats import E0M3, E1M2, E2M1, E2M3, E3M0, E3M2, E4M3, E5M2, QuantSpec
from qpass.formats.dynamic import e8m0_exponent

pytestmark = pytest.mark.usefixtures("one_thread")

f32 = np.float32




def enumerate_values(e_bits, m_bits):
    """{code: value} for non-negative codes of an (E, M) format, from the bit layout."""
    out = {}
    bias = 2 ** (e_bits - 1) - 1 if e_bits else 0
    for code in range(2 ** (e_bits + m_bits)):
        e, m = divmod(code, 2**m_bits)
        if (e_bits, m_bits) == (4, 3) and code == 0x7F:
            continue  # NaN in e4m3fn
        if (e_bits, m_bits) == (5, 2) and e == 31:
            continue  # inf / NaN
        if e_bits == 0:
            out[code] = float(m)
        elif e == 0:
            out[code] = m * 2.0 ** (1 - bias) / 2**m_bits
        else:
            out[code] = (1 + m / 2**m_bits) * 2.0 ** (e - bias)
    return out


def brute_round(v, e_bits, m_bits):
    """Round float32 numpy values to the format by nearest-value search (saturating)."""
    table = enumerate_values(e_bits, m_bits)
    codes = np.array(sorted(table), dtype=np.int64)
    vals = np.array([table[c] for c in codes], dtype=np.float64)
    a = np.abs(v.astype(np.float64))[..., None]
    dist = np.abs(a - vals)
    best = dist.min(-1, keepdims=True)
    cand = dist == best
    if (e_bits, m_bits) == (3, 0):  # ties away from zero: largest candidate
        idx = np.where(cand, np.arange(len(vals)), -1).max(-1)
    else:  # ties to even code
        even = cand & (codes % 2 == 0)
        idx = np.where(even.any(-1), even.argmax(-1), cand.argmax(-1))
    return (np.sign(v) * vals[idx]).astype(f32) + f32(0)


def ceil_log2_pow(r):
    """Smallest integer e with 2**e >= r, by stepping (exact for float32 r > 0)."""
    e = math.floor(math.log2(r)) - 2
    while 2.0**e < r:
        e += 1
    return e


def ref_mx(x, elem_bits, elem_max, block):
    """MX reference: E8M0 scale 2**ceil(log2(amax/elem_max)), elements rounded at that scale."""
    x = x.astype(f32)
    out = np.zeros_like(x)
    for i in range(0, x.shape[-1], block):
        xb = x[..., i : i + block]
        amax = np.abs(xb).max(-1, keepdims=True)
        e = np.zeros_like(amax, dtype=np.int64)
        for idx in np.ndindex(amax.shape):
            r = f32(amax[idx]) / f32(elem_max)
            e[idx] = -127 if r == 0 else min(max(ceil_log2_pow(float(r)), -127), 127)
        scale = np.ldexp(f32(1), -e).astype(f32)
        unscale = np.ldexp(f32(1), e).astype(f32)
        v = (xb * scale).astype(f32)
        if elem_bits == 8:  # MXINT8: round half even, clamp to +-127
            q = np.clip(np.rint(v), -127, 127).astype(f32)
        else:
            q = brute_round(v, *elem_bits)
        out[..., i : i + block] = q * unscale
    return out


def ref_nvfp4(x, amax, block=16):
    """NVFP4 reference: fp32 global scale, E4M3 block scales, E2M1 elements."""
    x = x.astype(f32)
    out = np.zeros_like(x)
    g = f32(amax) / f32(6.0 * 448.0)
    for i in range(0, x.shape[-1], block):
        xb = x[..., i : i + block]
        bamax = np.abs(xb).max(-1, keepdims=True)
        s = np.minimum(bamax / (f32(6.0) * g), f32(448.0)) if g > 0 else np.zeros_like(bamax)
        d = (brute_round(s.astype(f32), 4, 3) * g).astype(f32)
        safe = np.where(d == 0, f32(1), d)
        q = np.where(d == 0, f32(0), brute_round((xb / safe).astype(f32), 2, 1))
        out[..., i : i + block] = q * d
    return out


def sample(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1]).reshape(1, -1)
    x.view(-1)[:6] = torch.tensor([0.0, 0.75, -1.75, 3.5, 5.0, -0.25])  # exact ties at scale 1
    x[0, 16:32] = 0.0  # an all-zero block
    return x.to(dtype)


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E3M2, E2M3, E2M1, E1M2, E0M3, E3M0], ids=lambda f: f.name)
def test_element_rounding_matches_brute_force(fmt):
    vals = fmt.values()
    mids = (vals[:-1] + vals[1:]) / 2
    v = torch.cat([vals, -vals, mids, -mids, torch.randn(2000) * fmt.max * 0.6,
                   torch.tensor([fmt.max * 1.5, -fmt.max * 4, 1e-30, -1e-30])])
    ref = brute_round(v.numpy(), *fmt.bits)
    assert np.array_equal(fmt.round(v).numpy(), ref)
    assert torch.equal(fmt.decode(fmt.encode(v)), fmt.round(v))


def test_value_tables_match_enumeration():
    for fmt in [E4M3, E5M2, E3M2, E2M3, E2M1, E1M2, E0M3, E3M0]:
        expect = sorted(enumerate_values(*fmt.bits).values())
        assert fmt.values().tolist() == expect, fmt
    assert E4M3.max == 448 and E5M2.max == 57344 and E2M1.max == 6 and E3M2.max == 28 and E2M3.max == 7.5
    assert E2M1.values().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_e8m0_exponent_is_exact_ceil_log2():
    base = torch.tensor([1.0, 2.0, 0.75, 3.0, 448.0, 6.0, 1e-38, 1e-44, 3e38, 1.5e-45])
    nudged = torch.cat([base, torch.nextafter(base, torch.full_like(base, math.inf)),
                        torch.nextafter(base, torch.zeros_like(base))])
    got = e8m0_exponent(nudged).tolist()
    for r, e in zip(nudged.tolist(), got):
        expect = min(max(ceil_log2_pow(r), -127), 127) if r > 0 else -127
        assert e == expect, r
    assert e8m0_exponent(torch.tensor([0.0])).item() == -127


MX_CASES = {
    "mxfp8": ((4, 3), (4, 3), 448.0),
    "mxfp8-e5m2": ((5, 2), (5, 2), 57344.0),
    "mxfp6-e3m2": ((3, 2), (3, 2), 28.0),
    "mxfp6-e2m3": ((2, 3), (2, 3), 7.5),
    "mxfp4": ((2, 1), (2, 1), 6.0),
    "mxint8": (8, 8, 127.0),
    "mx-e3m0": ((3, 0), (3, 0), 16.0),
}


@pytest.mark.parametrize("name", list(MX_CASES))
@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 70)])
def test_mx_matches_reference(name, shape):
    num_bits, ref_bits, emax = MX_CASES[name]
    spec = QuantSpec.from_attributes(num_bits, block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)})
    x = sample((int(np.prod(shape[:-1])), shape[-1]), seed=len(shape)).reshape(shape)
    ref = ref_mx(x.numpy(), ref_bits, emax, 32)
    y = spec.fake_quant(x)
    assert np.array_equal(y.numpy(), ref)
    codes, scale = spec.quantize(x)
    assert scale.dtype == torch.uint8 and scale.shape == (*shape[:-1], math.ceil(shape[-1] / 32))
    assert torch.equal(spec.dequantize(codes, scale, shape=x.shape), y)


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 40)])
@pytest.mark.parametrize("amax_scale", [1.0, 7.0, 0.0])
def test_nvfp4_matches_reference(shape, amax_scale):
    spec = QuantSpec.from_attributes((2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    x = sample((int(np.prod(shape[:-1])), shape[-1]), seed=7).reshape(shape)
    amax = spec.amax_of(x) * amax_scale
    assert amax.shape == ()
    ref = ref_nvfp4(x.numpy(), amax.item())
    y = spec.fake_quant(x, amax)
    assert np.array_equal(y.numpy(), ref)
    codes, (block_scales, global_scale) = spec.quantize(x, amax)
    assert block_scales.dtype == torch.float8_e4m3fn and global_scale.dtype == torch.float32
    assert block_scales.shape == (*shape[:-1], math.ceil(shape[-1] / 16))
    assert codes.dtype == torch.uint8 and codes.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert torch.equal(spec.dequantize(codes, (block_scales, global_scale), shape=x.shape), y)


def test_nvfp4_without_amax_uses_the_tensor_amax():
    spec = QuantSpec.from_attributes((2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    x = sample((4, 48), seed=1)
    assert torch.equal(spec.fake_quant(x), spec.fake_quant(x, x.abs().max()))


@pytest.mark.modelopt
def test_nvfp4_matches_modelopt_nvfp4qtensor():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    spec = QuantSpec.from_attributes((2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    for seed, dtype in [(0, torch.float32), (1, torch.bfloat16), (2, torch.float16)]:
        x = (torch.randn(32, 128, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
        qt, s, s2 = NVFP4QTensor.quantize(x, 16)
        ref = qt.dequantize(dtype=dtype, scale=s, double_scale=s2, block_sizes={-1: 16})
        codes, (bs, g) = spec.quantize(x, spec.amax_of(x))
        assert torch.equal(codes, qt._quantized_data)
        assert torch.equal(bs.view(torch.uint8), s.view(torch.uint8))
        assert torch.equal(spec.fake_quant(x, spec.amax_of(x)), ref)


@pytest.mark.modelopt
def test_mxfp8_and_mxfp4_match_modelopt_qtensors():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor

    mx = {"type": "dynamic", "scale_bits": (8, 0)}
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)) * 3
    spec8 = QuantSpec.from_attributes((4, 3), block_sizes={-1: 32, **mx})
    qt, s = MXFP8QTensor.quantize(x)
    codes, scale = spec8.quantize(x)
    assert torch.equal(scale, s) and torch.equal(codes.view(torch.uint8), qt._quantized_data.view(torch.uint8))
    assert torch.equal(spec8.fake_quant(x), qt.dequantize(dtype=torch.float32, scale=s))

    spec4 = QuantSpec.from_attributes((2, 1), block_sizes={-1: 32, **mx})
    qt, s = MXFP4QTensor.quantize(x, 32)
    ref = qt.dequantize(dtype=torch.float32, scale=s, block_sizes={-1: 32})
    y = spec4.fake_quant(x)
    _, scale = spec4.quantize(x)
    assert torch.equal(scale.reshape(-1), s.reshape(-1).to(torch.uint8))
    step = spec4.step(x)
    diff = (y - ref).abs()
    assert (diff <= step).all()  # within one step: MXFP4QTensor rounds ties down
    scaled = x.reshape(-1, 32) / torch.exp2(s.float() - 127).reshape(-1, 1)
    tie = torch.isin(scaled.abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).reshape(x.shape)
    assert torch.equal(y[~tie], ref[~tie])
