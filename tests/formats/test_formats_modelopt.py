"""Differential tests: qpass.formats against ModelOpt's own CPU fake quantization.

ModelOpt runs integers, FP8 E4M3 and static blocks on CPU (``_tensor_quant`` and
``fp8_eager``); for those qpass reproduces the arithmetic operation for operation, so every
comparison here is exact (``torch.equal``; the only allowed difference is the sign of a
zero, which ``torch.equal`` ignores: qpass returns +0.0 where ModelOpt's integer path
returns -0.0, so that ``dequantize`` can reproduce ``fake_quant`` bit for bit). That
includes INT4 static blocks of 128: both sides round half to even with ``torch.round``,
so ties agree too and no within-one-step allowance is needed.

The calibration statistic is compared with what ModelOpt's ``TensorQuantizer`` stores in
``_amax`` after max calibration (shape and value; ModelOpt keeps the input dtype, qpass
float32, and the values are equal because an abs-max is exact in any dtype).
"""

import warnings

import pytest
import torch

from qpass.formats import QuantSpec

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.config import QuantizerAttributeConfig  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

pytestmark = [pytest.mark.modelopt, pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

warnings.filterwarnings("ignore", module="modelopt")



DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 256), (3, 40, 200), (1, 128), (100, 300)]

CASES = [
    dict(num_bits=8),
    dict(num_bits=8, axis=0),
    dict(num_bits=8, axis=-1),
    dict(num_bits=8, axis=(0, -1)),  # all axes kept on 2-d inputs: ModelOpt reduces to per-tensor
    dict(num_bits=8, narrow_range=True),
    dict(num_bits=8, unsigned=True),
    dict(num_bits=4, axis=0, narrow_range=True),
    dict(num_bits=2, axis=0),
    dict(num_bits=6, unsigned=True, axis=-1),
    dict(num_bits=(4, 3)),
    dict(num_bits=(4, 3), axis=0),
    dict(num_bits=(4, 3), axis=-1),
    dict(num_bits=4, block_sizes={-1: 128, "type": "static"}),
    dict(num_bits=8, block_sizes={-1: 64}),
    dict(num_bits=4, block_sizes={-1: 128, -2: 64}),
    dict(num_bits=4, block_sizes={0: 32}),
    dict(num_bits=4, block_sizes={-1: 128, 0: None}),
    dict(num_bits=(4, 3), block_sizes={-1: 128, -2: 128}),
    dict(num_bits=(4, 3), block_sizes={-1: None}),  # per-token: ModelOpt turns it into axis
    dict(num_bits=8, block_sizes={0: None, 1: None}),
]


def _ids(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def modelopt_quantizer(attrs, amax=None):
    return TensorQuantizer(QuantizerAttributeConfig(**attrs), amax=amax)


def modelopt_calibrate(attrs, x):
    """Max-calibrate a fresh ModelOpt quantizer on x; returns it ready to quantize."""
    tq = TensorQuantizer(QuantizerAttributeConfig(**attrs), if_calib=True, if_quant=False)
    tq(x)
    tq.load_calib_amax()
    tq._if_calib, tq._if_quant = False, True
    return tq


def make_input(attrs, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    # a few exact ties and outliers
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, 0.5, -0.5, 1e-8, -1e-8, 40.0, -40.0])
    if attrs.get("unsigned"):
        x = x.abs()
    return x.to(dtype)


@pytest.mark.parametrize("attrs", CASES, ids=_ids)
def test_amax_and_fake_quant_match_modelopt(attrs):
    spec = QuantSpec.from_attributes(**attrs)
    for i, shape in enumerate(SHAPES):
        for dtype in DTYPES:
            x = make_input(attrs, shape, dtype, seed=i)
            tq = modelopt_calibrate(attrs, x)
            ours = spec.amax_of(x)
            assert ours.dtype == torch.float32
            assert ours.shape == tq._amax.shape, (shape, dtype)
            assert torch.equal(ours, tq._amax.float()), (shape, dtype)
            y_ref = tq(x)
            y = spec.fake_quant(x, ours)
            assert y.dtype == x.dtype and y.shape == x.shape
            assert torch.equal(y, y_ref), (shape, dtype, (y.float() - y_ref.float()).abs().max())
            # real quantization reproduces the same values bit for bit
            codes, scale = spec.quantize(x, ours)
            back = spec.dequantize(codes, scale, dtype=dtype, shape=x.shape)
            assert torch.equal(back.view(torch.uint8) if dtype != torch.float32 else back.view(torch.int32),
                               y.view(torch.uint8) if dtype != torch.float32 else y.view(torch.int32))


@pytest.mark.parametrize(
    "attrs",
    [dict(num_bits=8), dict(num_bits=8, axis=0), dict(num_bits=(4, 3)), dict(num_bits=(4, 3), axis=0),
     dict(num_bits=4, block_sizes={-1: 128})],
    ids=_ids,
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_tiny_amax_match_modelopt(attrs, dtype):
    """amax == 0 (and amax <= 2**-24, which ModelOpt treats as zero) never divides by zero."""
    spec = QuantSpec.from_attributes(**attrs)
    x = make_input(attrs, (8, 256), dtype, seed=3)
    amax = spec.amax_of(x)
    flat = amax.reshape(-1)
    flat[::2] = 0.0
    if flat.numel() > 2:
        flat[1] = 2.0**-25
    amax = flat.reshape(amax.shape)
    y_ref = modelopt_quantizer(attrs, amax=amax.to(dtype) if amax.dim() else amax)(x)
    y = spec.fake_quant(x, amax)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_ref)
    codes, scale = spec.quantize(x, amax)
    assert torch.equal(spec.dequantize(codes, scale, dtype=dtype, shape=x.shape), y)


def test_per_tensor_zero_amax_outputs():
    x = torch.randn(4, 32)
    assert torch.equal(QuantSpec.from_attributes(8).fake_quant(x, torch.tensor(0.0)), torch.zeros_like(x))
    # FP8: ModelOpt replaces a zero amax by 1 (so values are clipped to +-1)
    y = QuantSpec.from_attributes((4, 3)).fake_quant(x, torch.tensor(0.0))
    assert y.abs().max() <= 1.0 and torch.isfinite(y).all()


def test_amax_matches_mtq_quantize_of_a_linear():
    """The stored weight/input amax after ``mtq.quantize`` of a one-Linear model."""
    torch.manual_seed(0)
    for cfg_name, w_attrs, i_attrs in [
        ("INT8_DEFAULT_CFG", dict(num_bits=8, axis=0), dict(num_bits=8)),
        ("FP8_DEFAULT_CFG", dict(num_bits=(4, 3)), dict(num_bits=(4, 3))),
        ("INT4_AWQ_CFG", dict(num_bits=4, block_sizes={-1: 128, "type": "static"}), None),
    ]:
        model = torch.nn.Sequential(torch.nn.Linear(256, 48))
        data = [torch.randn(5, 256) for _ in range(3)]
        w = model[0].weight.detach().clone()
        cfg = getattr(mtq, cfg_name)
        if cfg_name == "INT4_AWQ_CFG":  # plain max calibration, not AWQ search
            cfg = {**cfg, "algorithm": "max"}
        mtq.quantize(model, cfg, forward_loop=lambda m: [m(d) for d in data])
        lin = model[0]
        w_spec = QuantSpec.from_attributes(**w_attrs)
        assert torch.equal(w_spec.amax_of(w), lin.weight_quantizer._amax.float()), cfg_name
        assert w_spec.amax_of(w).shape == lin.weight_quantizer._amax.shape
        with torch.no_grad():
            assert torch.equal(w_spec.fake_quant(w, w_spec.amax_of(w)), lin.weight_quantizer(w))
        if i_attrs is not None:
            i_spec = QuantSpec.from_attributes(**i_attrs)
            stat = torch.stack([i_spec.amax_of(d) for d in data]).amax(0)
            assert torch.equal(stat, lin.input_quantizer._amax.float()), cfg_name


def test_maxbound_and_step_match_modelopt():
    for attrs in [dict(num_bits=8), dict(num_bits=4, unsigned=True), dict(num_bits=(4, 3))]:
        assert QuantSpec.from_attributes(**attrs).maxbound == modelopt_quantizer(attrs).maxbound
    tq = modelopt_quantizer(dict(num_bits=8, axis=0), amax=torch.rand(6, 1) + 0.5)
    spec = QuantSpec.from_attributes(8, axis=0)
    x = torch.randn(6, 10)
    torch.testing.assert_close(spec.step(x, tq._amax), tq.step_size.expand_as(x), rtol=1e-6, atol=0)
