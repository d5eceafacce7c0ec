"""What dynamo traces for a TensorQuantizer under torch.compile, where it can be lean.

Traced through its spec and format objects, a quantizer costs dynamo about a hundred guards
(attribute and type checks), evaluated on every call of the compiled model: 7.5k guard lines
for MiniLM, ~0.8 ms per call. Static integer quantizers (one amax per tensor or per channel,
an affine ``zero_point`` bias included) instead trace as a few ops on their own buffers and a
constant tuple fixed when the attributes are set (:func:`int_compile_plan`). The values are
the general path's, to the bit (``tests/robustness/test_quantizer_properties.py``).
"""

from __future__ import annotations

import torch

from qpass.formats.scaled import int_divisor_for_bound


def int_compile_plan(q) -> tuple[float, float, bool] | None:
    """(min_bound, max_bound, zero_point) for a static integer fake quantizer ``q`` with one amax
    per tensor or per channel (with or without a ``zero_point`` bias), else None."""
    from qpass.formats.integer import IntFormat

    a = q._attrs
    bias = a.get("bias")
    try:
        spec = q.spec
    except Exception:  # noqa: BLE001 - an invalid format is reported where it is used
        return None
    if (a.get("type") == "dynamic" or not a.get("fake_quant", True) or not isinstance(spec.fmt, IntFormat)
            or spec.block_sizes or spec.is_dynamic or (bias and not q._zero_point_format())):
        return None
    return float(spec.fmt.min_bound), float(spec.fmt.max_bound), bool(bias)


def compiled_int_fake_quant(q, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (float32) fake-quantized by ``q`` from its plan and own buffers (``_amax`` in kept
    dims, as calibration stores it; ``_bias_value``); None where the general path applies."""
    plan = q.__dict__.get("_compile_plan")
    amax = q._buffers.get("_amax")
    if (plan is None or amax is None or x.dtype != torch.float32 or not (amax.numel() == 1 or (
            amax.dim() == x.dim() and all(a in (1, n) for a, n in zip(amax.shape, x.shape))))):
        return None
    lo, hi, zero_point = plan
    a = amax.float()
    mult, div = int_divisor_for_bound(hi, a)
    if not zero_point:
        return torch.clamp(torch.round(x * mult), lo, hi) / div
    b = q._buffers.get("_bias_value")
    if b is None:
        return None
    step = (a.double() / hi).float()  # TensorQuantizer.zero_point_step, in the dtype it divides in
    b = (torch.round(b.to(x.device) / step) * step).to(x.dtype)
    return torch.clamp(torch.round((x - b) * mult), lo, hi) / div + b
