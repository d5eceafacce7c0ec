"""Random attribute combinations through the TensorQuantizer module (calibrate, then quantize):
error within half a step inside the calibrated range, saturation outside it, idempotence.
tests/formats checks fixed QuantSpecs; this draws the attributes (num_bits, axis, block size,
unsigned, narrow_range) and goes through the module path a model uses."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qpass.nn.compiled_fake_quant import compiled_int_fake_quant
from qpass.nn.tensor_quantizer import TensorQuantizer

N_EXAMPLES = 150
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def quantizer_and_input(draw):
    fp = draw(st.sampled_from([None, None, (4, 3)]))  # the one static float both layers accept
    attrs = {"num_bits": fp if fp else draw(st.integers(2, 8))}
    rows, cols = draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 8, 16, 33]))
    layout = draw(st.sampled_from(["tensor", "axis0", "axis1", "block"]))
    if layout == "axis0":
        attrs["axis"] = 0
    elif layout == "axis1":
        attrs["axis"] = 1
    elif layout == "block":
        attrs["block_sizes"] = {-1: draw(st.sampled_from([4, 8, 16])), "type": "static"}
    if fp is None:
        attrs["unsigned"] = draw(st.booleans())
        attrs["narrow_range"] = draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    x = torch.from_numpy(draw(arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32))).copy()) * scale
    if attrs.get("unsigned"):
        x = x.abs()
    return attrs, x


def _calibrated(attrs, x):
    q = TensorQuantizer(attrs, name="q")
    q.disable_quant()
    q.enable_calib()
    q(x)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    return q


def _limit(q, x):
    lay = q.spec._layout(x.shape)
    a = lay.broadcast_amax(q.amax)
    return lay.from_blocks(torch.broadcast_to(a, lay.blocked_shape).contiguous())


@SETTINGS
@given(case=quantizer_and_input())
def test_module_error_within_half_step_and_idempotent(case):
    attrs, x = case
    q = _calibrated(attrs, x)
    y = q(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    step = q.spec.step(x, q.amax)
    live = _limit(q, x) > 2**-24  # ModelOpt treats a smaller amax as zero
    ok = (y - x).abs() <= step / 2 * (1 + 1e-5) + x.abs() * 2e-7 + 1e-30
    assert ok[live].all(), attrs
    assert torch.equal(q(y), y), attrs


@SETTINGS
@given(case=quantizer_and_input(), factor=st.sampled_from([3.0, 1e3, 1e30]))
def test_module_saturates_outside_the_calibrated_range(case, factor):
    attrs, x = case
    q = _calibrated(attrs, x)
    limit = _limit(q, x)
    big = x * factor
    y = q(big)
    assert torch.isfinite(y).all(), attrs
    live = limit > 2**-24
    # never beyond the range (integers may reach -amax*(2^(b-1))/(2^(b-1)-1) on the negative side)
    bits = attrs["num_bits"]
    reach = 1.0 if isinstance(bits, tuple) or attrs.get("unsigned") or attrs.get("narrow_range") \
        else 2 ** (bits - 1) / (2 ** (bits - 1) - 1)
    assert (y.abs() <= limit * reach * (1 + 1e-6))[live].all(), attrs
    far = big.abs() >= 2 * limit
    assert torch.equal(y[far & live], q(torch.sign(big) * 1e35)[far & live]), attrs


@SETTINGS
@given(case=quantizer_and_input(), shift=st.sampled_from([0.0, 0.7]), zero_point=st.booleans())
def test_compile_path_equals_the_general_path(case, shift, zero_point):
    """What dynamo traces for integer quantizers (a few ops on the quantizer's own buffers) gives
    the general path's values to the bit, zero-point biases and zero amaxes included."""
    attrs, x = case
    x = x + shift * x.abs().max()
    if zero_point and attrs.get("axis") is None and not attrs.get("block_sizes"):
        attrs = {**attrs, "bias": {-1: None, -2: None, "method": "max_min", "zero_point": True}}
    q = _calibrated(attrs, x)
    y = x * 1.5 - 0.1 * x.abs().max()  # also outside the calibrated range
    got = compiled_int_fake_quant(q, y)
    plain = isinstance(q.spec.fmt, type(TensorQuantizer({"num_bits": 8}).spec.fmt)) and not attrs.get("block_sizes")
    assert (got is not None) == plain, attrs
    if got is not None:  # bit for bit (a zero amax under a bias is NaN on both paths)
        torch.testing.assert_close(got, q._fake_quant(y), rtol=0, atol=0, equal_nan=True, msg=str(attrs))
        q.amax = torch.zeros_like(q.amax)
        torch.testing.assert_close(compiled_int_fake_quant(q, y), q._fake_quant(y), rtol=0, atol=0, equal_nan=True,
                                   msg=str(attrs))
