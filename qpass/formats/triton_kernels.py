"""One-kernel fake quantization of CUDA activations (Triton), for the formats the forward pass
quantizes most: per-tensor INT (8 bits or fewer), per-tensor FP8 E4M3, and NVFP4 blocks (E2M1
elements, E4M3 block scales under a calibrated global amax).

On a GPU the host launches every kernel of every quantizer, and at LLM prefill sizes those
launches, not the arithmetic, set the pace: the torch expression of these formats is 4 (INT8),
5 (FP8) and about 20 (NVFP4) kernels per quantizer, each one reading and writing the tensor.
Each kernel here reads the input once and writes the output once.

The arithmetic is the torch path's, operation for operation (float32 products, IEEE-rounded
divisions, round-half-even, saturating casts, NaN propagated the same way). It is still checked
rather than trusted: the first call for each (format kind, dtype, device) also runs the torch
path on the same input and compares the bits; a mismatch turns the kernel off for that case with
a warning, and the torch result is used. ``QPASS_TRITON=0`` turns the kernels off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["fake_quant_blocks", "fake_quant_per_tensor", "usable"]

_STATE: dict = {}  # (kind, dtype, device index) -> True (verified) / False (off)


def usable(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.is_contiguous() and os.environ.get("QPASS_TRITON", "1") != "0"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _kernels() is not None)


@functools.lru_cache(maxsize=None)
def _kernels():
    try:
        from qpass.formats import _triton_impl
    except Exception:  # noqa: BLE001 - no Triton (or no usable one): the torch path runs
        return None
    return _triton_impl.per_tensor, _triton_impl.blocks


def _checked(kind: str, x: torch.Tensor, fast, reference):
    """Run ``fast()``; the first time for this (kind, dtype, device) compare it with ``reference()``."""
    key = (kind, x.dtype, x.device.index)
    state = _STATE.get(key)
    if state is False:
        return None
    out = fast()
    if state is None:
        ref = reference()
        bits = {torch.float32: torch.int32}.get(x.dtype, torch.int16)
        same = ref is not None and torch.equal(out.view(bits), ref.view(bits))
        _STATE[key] = same
        if not same:
            warnings.warn(f"qpass: the Triton {kind} fake-quant kernel differs from the torch path for "
                          f"{x.dtype} on {x.device}; using the torch path", stacklevel=3)
            return ref
    return out


def fake_quant_per_tensor(x, mult, div, lo: float, hi: float, fp8: bool, reference):
    """INT (``fp8=False``: round, clamp to [lo, hi], divide by ``div``) or E4M3 (clamp to
    [lo, hi], cast, times ``div``) of ``x * mult``; None where the kernel is off."""
    per_tensor, _ = _kernels()
    n = x.numel()

    def fast():
        out = torch.empty_like(x)
        block = 2048
        per_tensor[(triton_cdiv(n, block),)](x, out, n, mult, div, float(lo), float(hi), FP8=fp8, BLOCK=block)
        return out

    return _checked("fp8" if fp8 else "int", x, fast, reference)


def fake_quant_blocks(x, elem, scale_fmt, block: int, g, denom, reference):
    """NVFP4-style blocks of ``block`` elements along the last axis (E4M3 scales)."""
    _, kernel = _kernels()
    n_blocks = x.numel() // block

    def fast():
        out = torch.empty_like(x)
        rows = 64
        kernel[(triton_cdiv(n_blocks, rows),)](
            x, out, n_blocks, g, denom, SCALE_MAX=float(scale_fmt.max), ELEM_MAX=float(elem.max),
            EMIN_FIELD=(127 + elem.min_normal_exponent) << 23, MANT_SHIFT=elem.mantissa_bits << 23, BS=block, ROWS=rows)
        return out

    return _checked(f"{elem.name}/{scale_fmt.name} blocks", x, fast, reference)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
