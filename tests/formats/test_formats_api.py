"""QuantSpec construction: error messages, describe(), effective_bits, codes and scales."""

import pytest
import torch

from qpass.errors import QuantConfigError
from qpass.formats import E2M1, E4M3, E8M0, FloatFormat, IntFormat, QuantSpec, pack_nibbles, unpack_nibbles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NVFP4 = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
MX = {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_bits=9), ["num_bits=9", "2..8"]),
        (dict(num_bits=1), ["num_bits=1", "2..8"]),
        (dict(num_bits=True), ["num_bits=True"]),
        (dict(num_bits="nvfp4"), ["num_bits='nvfp4'", "(E, M)"]),
        (dict(num_bits=(3, 3)), ["(3, 3)", "allowed", "(4, 3)"]),
        (dict(num_bits=(3, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}), ["(3, 3)"]),
        (dict(num_bits=(3, 2)), ["(3, 2)", "E3M2", "dynamic", "scale_bits"]),
        (dict(num_bits=(2, 1)), ["(2, 1)", "dynamic", "(4, 3)"]),
        (dict(num_bits=(2, 1), block_sizes={-1: 16}), ["(2, 1)", "dynamic"]),
        (dict(num_bits=8, axis=0, block_sizes={-1: 128}), ["axis=0", "block_sizes", "cannot both"]),
        (dict(num_bits=8, axis="rows"), ["axis='rows'"]),
        (dict(num_bits=4, block_sizes={-1: 0}), ["block_sizes[-1]=0", "positive"]),
        (dict(num_bits=4, block_sizes={-1: 128, "kind": "static"}), ["'kind'", "type"]),
        (dict(num_bits=4, block_sizes={-1: 128, "type": "lazy"}), ["'lazy'", "'static', 'dynamic'"]),
        (dict(num_bits=4, block_sizes={"type": "static"}), ["no axis"]),
        (dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic"}), ["scale_bits", "(8, 0)"]),
        (dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (6, 6)}), ["(6, 6)"]),
        (dict(num_bits=(2, 1), block_sizes={-1: 16, -2: 16, "type": "dynamic", "scale_bits": (4, 3)}), ["one axis"]),
        (dict(num_bits=(2, 1), block_sizes={-2: 16, "type": "dynamic", "scale_bits": (4, 3)}), ["last axis", "-2"]),
        (dict(num_bits=4, block_sizes=MX), ["num_bits=4", "MXINT8"]),
        (dict(num_bits=8, unsigned=True, block_sizes=MX), ["unsigned"]),
        (dict(num_bits=(4, 3), unsigned=True), ["unsigned", "integer"]),
        (dict(num_bits=4, block_sizes={-1: 16, "scale_bits": 8, "scale_block_sizes": {-1: 256}}), ["scale_block_sizes"]),
        (dict(num_bits=(2, 1), block_sizes={-1: 16, -2: 4, "type": "static", "scale_bits": (4, 3)}), ["one int block size", "last axis"]),
        (dict(num_bits=4, block_sizes={-1: 16, "type": "static", "scale_bits": (4, 3)}), ["NVFP4 only", "dynamic"]),
    ],
)
def test_bad_attributes_raise_clear_errors(kwargs, words):
    with pytest.raises(QuantConfigError) as err:
        QuantSpec.from_attributes(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_quant_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        QuantSpec.from_attributes(num_bits=16)


def test_runtime_shape_errors():
    with pytest.raises(QuantConfigError, match="axis 2 is out of range"):
        QuantSpec.from_attributes(8, axis=2).amax_of(torch.randn(3, 4))
    spec = QuantSpec.from_attributes((2, 1), block_sizes={1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    with pytest.raises(QuantConfigError, match="last axis"):
        spec.fake_quant(torch.randn(2, 32, 4), torch.tensor(1.0))
    with pytest.raises(QuantConfigError, match="does not fit"):
        QuantSpec.from_attributes(8, axis=0).fake_quant(torch.randn(4, 5), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, text, bits",
    [
        (dict(num_bits=8), "int8 per-tensor", 8),
        (dict(num_bits=8, axis=0), "int8 per-channel(axis=0)", 8),
        (dict(num_bits=8, axis=(0, 2)), "int8 per-channel(axis=(0, 2))", 8),
        (dict(num_bits=8, unsigned=True), "uint8 per-tensor", 8),
        (dict(num_bits=8, narrow_range=True), "int8 narrow-range per-tensor", 8),
        (dict(num_bits=(4, 3)), "fp8 e4m3 per-tensor", 8),
        (dict(num_bits=(5, 2), axis=0), "fp8 e5m2 per-channel(axis=0)", 8),
        (dict(num_bits=4, block_sizes={-1: 128, "type": "static"}), "int4 block128 static", 4.125),
        (dict(num_bits=(4, 3), block_sizes={-1: 128, -2: 128}), "fp8 e4m3 block(-2:128,-1:128) static", 8 + 16 / 16384),
        (dict(num_bits=(2, 1), block_sizes=NVFP4), "nvfp4 (e2m1, block16, e4m3 scales)", 4.5),
        (dict(num_bits=(4, 3), block_sizes=MX), "mxfp8 (e4m3, block32, e8m0 scales)", 8.25),
        (dict(num_bits=(3, 2), block_sizes=MX), "mxfp6 (e3m2, block32, e8m0 scales)", 6.25),
        (dict(num_bits=(2, 3), block_sizes=MX), "mxfp6 (e2m3, block32, e8m0 scales)", 6.25),
        (dict(num_bits=(2, 1), block_sizes=MX), "mxfp4 (e2m1, block32, e8m0 scales)", 4.25),
        (dict(num_bits=8, block_sizes=MX), "mxint8 (int8, block32, e8m0 scales)", 8.25),
        (dict(num_bits=(4, 3), block_sizes={**NVFP4}), "fp8 e4m3 dynamic (block16, e4m3 scales)", 8.5),
    ],
)
def test_describe_and_effective_bits(kwargs, text, bits):
    spec = QuantSpec.from_attributes(**kwargs)
    assert spec.describe() == text
    assert spec.effective_bits == pytest.approx(bits)
    assert QuantSpec.from_attributes(**spec.to_attributes()) == spec


def test_spec_flags():
    nvfp4 = QuantSpec.from_attributes((2, 1), block_sizes=NVFP4)
    mxfp4 = QuantSpec.from_attributes((2, 1), block_sizes=MX)
    int8 = QuantSpec.from_attributes(8, axis=0)
    assert nvfp4.is_dynamic and nvfp4.needs_amax and nvfp4.fmt == E2M1 and nvfp4.scale_format == E4M3
    assert mxfp4.is_dynamic and not mxfp4.needs_amax and mxfp4.scale_format == E8M0
    assert not int8.is_dynamic and int8.needs_amax and isinstance(int8.fmt, IntFormat)
    assert nvfp4.maxbound == 6 and int8.maxbound == 127
    assert QuantSpec.from_attributes([4, 3]).fmt == FloatFormat(4, 3)  # lists from YAML/JSON
    assert nvfp4.amax_of(torch.randn(3, 32)).shape == ()


def test_codes_and_scales_types_and_shapes():
    x = torch.randn(6, 40)
    cases = [
        (dict(num_bits=8, axis=0), torch.int8, (6, 40), torch.float64, (6, 1)),
        (dict(num_bits=8, unsigned=True), torch.uint8, (6, 40), torch.float64, ()),
        (dict(num_bits=4, block_sizes={-1: 16}), torch.uint8, (6, 20), torch.float64, (18, 1)),
        (dict(num_bits=(4, 3)), torch.float8_e4m3fn, (6, 40), torch.float32, ()),
        (dict(num_bits=(5, 2), axis=0), torch.float8_e5m2, (6, 40), torch.float32, (6, 1)),
        (dict(num_bits=(4, 3), block_sizes=MX), torch.float8_e4m3fn, (6, 40), torch.uint8, (6, 2)),
        (dict(num_bits=(3, 2), block_sizes=MX), torch.uint8, (6, 40), torch.uint8, (6, 2)),
        (dict(num_bits=8, block_sizes=MX), torch.int8, (6, 40), torch.uint8, (6, 2)),
    ]
    for kwargs, cdt, cshape, sdt, sshape in cases:
        spec = QuantSpec.from_attributes(**kwargs)
        xin = x.abs() if kwargs.get("unsigned") else x
        codes, scale = spec.quantize(xin)  # amax=None: computed from x
        assert codes.dtype == cdt and tuple(codes.shape) == cshape, kwargs
        assert scale.dtype == sdt and tuple(scale.shape) == sshape, kwargs
        assert torch.equal(spec.dequantize(codes, scale, shape=x.shape), spec.fake_quant(xin)), kwargs
    # the float64 integer scale is the usual step amax / max_bound
    spec = QuantSpec.from_attributes(8, axis=0)
    _, scale = spec.quantize(x)
    torch.testing.assert_close(scale.float(), spec.amax_of(x) / 127)


def test_odd_last_axis_packs_and_unpacks():
    spec = QuantSpec.from_attributes(4, axis=0)
    x = torch.randn(3, 7)
    codes, scale = spec.quantize(x)
    assert codes.shape == (3, 4)
    assert torch.equal(spec.dequantize(codes, scale, shape=x.shape), spec.fake_quant(x))
    c = torch.tensor([[-8, -1, 0, 7, 3]], dtype=torch.int8)
    assert torch.equal(unpack_nibbles(pack_nibbles(c), 5, signed=True), c)
    assert pack_nibbles(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21  # even index low


def test_nvfp4_codes_use_e2m1_bit_patterns():
    spec = QuantSpec.from_attributes((2, 1), block_sizes=NVFP4)
    x = torch.tensor([[0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6]])
    codes, (bs, g) = spec.quantize(x, torch.tensor(6.0 * 448))
    assert bs.float().item() == 1.0 and g.item() == 1.0
    nibbles = unpack_nibbles(codes, 16, signed=False)
    assert nibbles.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 7]]


def test_mx_zero_block_and_e8m0_codes():
    spec = QuantSpec.from_attributes((4, 3), block_sizes=MX)
    x = torch.zeros(2, 64)
    x[0, :32] = 448.0
    _, scale = spec.quantize(x)
    assert scale.tolist() == [[127, 0], [0, 0]]  # 2**0 for amax 448; an all-zero block stores 2**-127
    assert torch.equal(spec.fake_quant(x), x)


def test_fake_quant_keeps_dtype_and_handles_none_amax():
    for dt in [torch.float32, torch.bfloat16, torch.float16]:
        x = torch.randn(4, 32).to(dt)
        spec = QuantSpec.from_attributes(8)
        assert spec.fake_quant(x).dtype == dt
        assert torch.equal(spec.fake_quant(x), spec.fake_quant(x, spec.amax_of(x)))
        assert torch.equal(spec.fake_quant(x, 2.0), spec.fake_quant(x, torch.tensor(2.0)))
