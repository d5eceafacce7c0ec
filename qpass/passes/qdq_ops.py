"""The ops of a lowered graph: format tokens and the ``qpass::`` quantize / dequantize custom ops
(each with a fake kernel), which :mod:`qpass.passes.lower` emits and every back end translates."""

from __future__ import annotations

import functools
import json

import torch

from qpass.formats import QuantSpec
from qpass.formats.floating import E2M1, E4M3, E5M2
from qpass.formats.integer import IntFormat

__all__ = ["OPS", "format_token", "spec_of_token"]

# ---------------------------------------------------------------------------------------------
# format tokens: the element format of codes, as a string op argument
# ---------------------------------------------------------------------------------------------
_TOKENS = {
    "int8": (8, False, False), "int8n": (8, False, True), "uint8": (8, True, False),
    "int4": (4, False, False), "int4n": (4, False, True), "uint4": (4, True, False),
    "e4m3": ((4, 3), False, False), "e5m2": ((5, 2), False, False), "e2m1": ((2, 1), False, False),
}


def format_token(spec: QuantSpec) -> str | None:
    """The token of a spec's element format, or None if lowering has no op for it."""
    f = spec.fmt
    if isinstance(f, IntFormat):
        if f.num_bits not in (4, 8) or (f.unsigned and f.narrow_range):
            return None
        return f"{'u' if f.unsigned else ''}int{f.num_bits}{'n' if f.narrow_range else ''}"
    return {E4M3: "e4m3", E5M2: "e5m2", E2M1: "e2m1"}.get(f)


@functools.lru_cache(maxsize=None)
def spec_of_token(fmt: str, axis: int | None = None, block_axis: int | None = None, block_size: int = 0) -> QuantSpec:
    num_bits, unsigned, narrow = _TOKENS[fmt]
    blocks = {block_axis: block_size} if block_size else None
    return QuantSpec.from_attributes(num_bits, axis=axis, block_sizes=blocks, unsigned=unsigned, narrow_range=narrow)


@functools.lru_cache(maxsize=None)
def _spec_of_json(attrs: str) -> QuantSpec:
    a = json.loads(attrs)
    bs = a.get("block_sizes")
    if bs is not None:
        bs = {(int(k) if k.lstrip("-").isdigit() else k): v for k, v in bs.items()}
    axis = a.get("axis")
    if isinstance(axis, list):
        axis = tuple(axis)
    num_bits = tuple(a["num_bits"]) if isinstance(a["num_bits"], list) else a["num_bits"]
    return QuantSpec.from_attributes(num_bits, axis=axis, block_sizes=bs, unsigned=a.get("unsigned", False),
                                     narrow_range=a.get("narrow_range", False))


def _code_dtype(fmt: str) -> torch.dtype:
    return {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}.get(fmt, torch.uint8 if fmt.startswith("u") else torch.int8)


# ---------------------------------------------------------------------------------------------
# the qpass custom ops (torch.library), each with a fake (meta) kernel
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("qpass::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes of ``x`` (int8/uint8/float8), per-tensor ``amax = ref``; ``scale`` is for back ends."""
    return spec_of_token(fmt).quantize(x, ref)[0]


@quantize_per_tensor.register_fake
def _(x, scale, ref, fmt):
    return x.new_empty(x.shape, dtype=_code_dtype(fmt))


@torch.library.custom_op("qpass::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(codes: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, fmt: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """Values of 8-bit codes under one scale (``ref``: the scale QuantSpec.quantize gave)."""
    return spec_of_token(fmt).dequantize(codes, ref, dtype)


@dequantize_per_tensor.register_fake
def _(codes, scale, ref, fmt, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("qpass::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, fmt: str, axis: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """Values of 8-bit codes with one scale per index of ``axis`` (``scale``: 1-D)."""
    return spec_of_token(fmt, axis=axis).dequantize(codes, ref, dtype)


@dequantize_per_channel.register_fake
def _(codes, scale, ref, fmt, axis, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("qpass::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, fmt: str, axis: int,
                         block_size: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Values of codes (4-bit: packed two per byte on the last axis) with one scale per
    ``block_size`` run along ``axis``; ``scale`` has ``shape`` with ``axis`` shrunk to
    ``ceil(n / block_size)``, ONNX's blocked layout."""
    return spec_of_token(fmt, block_axis=axis, block_size=block_size).dequantize(codes, ref, dtype, shape)


@dequantize_blockwise.register_fake
def _(codes, scale, ref, fmt, axis, block_size, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qpass::dequantize_nvfp4", mutates_args=())
def dequantize_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, block_size: int,
                     shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 values: E2M1 codes (``float4_e2m1fn_x2``, two per byte) times float8 E4M3 block
    scales (one per ``block_size`` on the last axis) times a float32 global scale: 0-dim, or one
    per slice of the first axis (``[E]``: stacked MoE experts, each with its own global amax)."""
    spec = _nvfp4_spec(block_size)
    if global_scale.dim() == 1:
        return torch.stack([spec.dequantize(c.view(torch.uint8), (s, g), dtype, shape[1:])
                            for c, s, g in zip(codes, block_scale, global_scale)])
    return spec.dequantize(codes.view(torch.uint8), (block_scale, global_scale), dtype, shape)


@dequantize_nvfp4.register_fake
def _(codes, block_scale, global_scale, block_size, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qpass::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, amax: torch.Tensor, attrs: str, has_amax: bool) -> torch.Tensor:
    """Fake quantization with the QuantSpec of ModelOpt attributes ``attrs`` (JSON). For
    formats with no dedicated op; back ends refuse it."""
    return _spec_of_json(attrs).fake_quant(x, amax if has_amax else None)


@fake_quant.register_fake
def _(x, amax, attrs, has_amax):
    return torch.empty_like(x)


OPS = {
    "quantize_per_tensor": torch.ops.qpass.quantize_per_tensor.default,
    "dequantize_per_tensor": torch.ops.qpass.dequantize_per_tensor.default,
    "dequantize_per_channel": torch.ops.qpass.dequantize_per_channel.default,
    "dequantize_blockwise": torch.ops.qpass.dequantize_blockwise.default,
    "dequantize_nvfp4": torch.ops.qpass.dequantize_nvfp4.default,
    "fake_quant": torch.ops.qpass.fake_quant.default,
}


@functools.lru_cache(maxsize=None)
def _nvfp4_spec(block_size: int) -> QuantSpec:
    return QuantSpec.from_attributes((2, 1), block_sizes={-1: block_size, "type": "dynamic", "scale_bits": (4, 3)})


def _is_nvfp4(spec: QuantSpec) -> bool:
    """E2M1 values with E4M3 block scales: dynamic NVFP4, or a static NVFP4 weight."""
    return spec.fmt == E2M1 and spec.scale_format == E4M3
