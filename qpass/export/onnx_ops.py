"""ONNX translations of the qpass lowering ops (``custom_translation_table`` entries).

One table per (opset, target). Mapping:

==============================  ==============================================================
``quantize_per_tensor``         ``QuantizeLinear(x, scale, zp)``; zp int8 0 / uint8 0 / FP8 0,
                                or uint8 128 for int8 activations when ``target="onnxruntime"``
``dequantize_per_tensor``       ``DequantizeLinear(codes, scale, zp)`` (the zp of its codes)
``dequantize_per_channel``      ``DequantizeLinear(codes, scale[C], zp[C], axis)``
``dequantize_blockwise``        ``DequantizeLinear(codes, scale, axis, block_size)`` (opset 21);
                                4-bit codes are retyped to INT4/UINT4 initializers afterwards
``dequantize_nvfp4``            ``DequantizeLinear(DequantizeLinear(fp8 block scales, global),
                                FLOAT4E2M1 codes, axis=-1, block_size)`` (opset 23)
``fake_quant`` (NVFP4 dynamic)  standard-op decomposition, see :func:`_nvfp4_dynamic`
grouped expert matmul           per expert ``Slice`` of its rows, ``MatMul``, one ``Concat``
                                (:func:`grouped_mm_translations`)
==============================  ==============================================================

The translation functions see graph values, not tensor contents (the exporter attaches
initializer data after translation), so anything that needs the data - 4-bit integer
initializers - is marked with node metadata here and finished in :mod:`qpass.export.onnx`.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qpass.passes.lower import OPS

INT4_META = "qpass.int4_codes"  # node metadata: DequantizeLinear whose input 0 is packed int4 (json)

_NP = {
    "int8": np.int8, "int8n": np.int8, "uint8": np.uint8, "int4": np.int8, "int4n": np.int8, "uint4": np.uint8,
    "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
}

# Formats each opset can express, and the opset each op needs.
MIN_OPSET = {"int8": 13, "int8n": 13, "uint8": 13, "e4m3": 19, "e5m2": 19, "int4": 21, "int4n": 21, "uint4": 21,
             "e2m1": 23}


def _opset(version: int):
    import onnxscript

    return getattr(onnxscript, f"opset{version}")


def make_table(opset: int, target: str) -> dict:
    op = _opset(opset)

    def const(value: np.ndarray):
        return op.Constant(value=ir.tensor(value))

    def zero_point(fmt: str, activation: bool, shape=()):
        if activation and target == "onnxruntime" and fmt == "int8":
            # symmetric int8 with zp 0 is exactly uint8 with zp 128; ORT runs u8s8 kernels fast
            return const(np.full(shape, 128, dtype=np.uint8))
        return const(np.zeros(shape, dtype=_NP[fmt]))

    def cast_out(y, dtype):
        if dtype is not None and int(dtype) != int(ir.DataType.FLOAT):
            y = op.Cast(y, to=int(dtype))
        return y

    def quantize_per_tensor(x, scale, ref, fmt):
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:  # fake quant computes in float32 too
            x = op.Cast(x, to=int(ir.DataType.FLOAT))
        return op.QuantizeLinear(x, scale, zero_point(fmt, True))

    def dequantize_per_tensor(codes, scale, ref, fmt, dtype):
        producer = codes.producer()
        while producer is not None and producer.op_type == "Unsqueeze":  # see onnx_legalize._unsqueeze_codes
            producer = producer.inputs[0].producer()
        activation = producer is not None and producer.op_type == "QuantizeLinear"
        return cast_out(op.DequantizeLinear(codes, scale, zero_point(fmt, activation)), dtype)

    def dequantize_per_channel(codes, scale, ref, fmt, axis, dtype):
        n = scale.shape[0] if scale.shape is not None else None
        zp = zero_point(fmt, False, (int(n),)) if isinstance(n, int) else None
        args = (codes, scale, zp) if zp is not None else (codes, scale)
        return cast_out(op.DequantizeLinear(*args, axis=axis), dtype)

    def dequantize_blockwise(codes, scale, ref, fmt, axis, block_size, shape, dtype):
        y = op.DequantizeLinear(codes, scale, axis=axis, block_size=block_size)
        if fmt in ("int4", "int4n", "uint4"):
            y.producer().metadata_props[INT4_META] = json.dumps({"fmt": fmt, "shape": list(shape)})
        return cast_out(y, dtype)

    def dequantize_nvfp4(codes, block_scale, global_scale, block_size, shape, dtype):
        # a global scale per expert ([E], stacked MoE experts) scales the block scales along axis 0
        per_slice = global_scale.shape is not None and len(global_scale.shape) == 1
        scales = (op.DequantizeLinear(block_scale, global_scale, axis=0) if per_slice
                  else op.DequantizeLinear(block_scale, global_scale))
        return cast_out(op.DequantizeLinear(codes, scales, axis=-1, block_size=block_size), dtype)

    def fake_quant(x, amax, attrs, has_amax):
        a = json.loads(attrs)
        bs = a.get("block_sizes") or {}
        if a.get("num_bits") == [2, 1] and bs.get("type") == "dynamic" and bs.get("scale_bits") == [4, 3]:
            size = int(next(v for k, v in bs.items() if k not in ("type", "scale_bits")))
            return _nvfp4_dynamic(op, x, amax, size)
        # export_onnx checks the graph first; reaching this is a bug
        raise NotImplementedError(f"no ONNX form for fake_quant {attrs}")

    table = {
        **grouped_mm_translations(op),
        OPS["quantize_per_tensor"]: quantize_per_tensor,
        OPS["dequantize_per_tensor"]: dequantize_per_tensor,
        OPS["dequantize_per_channel"]: dequantize_per_channel,
        OPS["dequantize_blockwise"]: dequantize_blockwise,
        OPS["fake_quant"]: fake_quant,
    }
    if opset >= 23:
        table[OPS["dequantize_nvfp4"]] = dequantize_nvfp4
    return table


def _nvfp4_dynamic(op, x, amax, block: int):
    """NVFP4 fake quantization of an activation with standard ops (no FP4 tensor in between).

    Same arithmetic as :mod:`qpass.formats.dynamic`: ``g = amax / (6 * 448)``; per block of
    ``block`` along the last axis, ``s = e4m3(min(block_amax / (6 g), 448))`` (a saturating
    Cast to FLOAT8E4M3FN and back), ``d = s * g``; values are ``e2m1(x / d) * d``, where the
    E2M1 rounding (round half to even, saturating at 6) is ``Round`` on the three binades of
    the format: steps of 0.5 below 2, of 1 below 4, of 2 up to 6. A zero ``d`` gives 0.
    The last axis must be a multiple of ``block``. ONNX Runtime's CPU runs it (it has no FP4
    Cast or QuantizeLinear); TensorRT would rather see its own dynamic-quantize op here.
    """
    def f32(v):
        return op.Constant(value=ir.tensor(np.array(v, dtype=np.float32)))

    g = op.Div(op.ReduceMax(op.Reshape(amax, op.Constant(value=ir.tensor(np.array([-1], np.int64)))), keepdims=0),
               f32(6.0 * 448.0))
    shape = op.Shape(x)
    blocked_shape = op.Concat(op.Shape(x, end=-1), op.Constant(value=ir.tensor(np.array([-1, block], np.int64))), axis=0)
    xb = op.Reshape(x, blocked_shape)
    bamax = op.ReduceMax(op.Abs(xb), op.Constant(value=ir.tensor(np.array([-1], np.int64))), keepdims=1)
    s = op.Min(op.Div(bamax, op.Mul(f32(6.0), g)), f32(448.0))
    s = op.Where(op.Greater(g, f32(0.0)), s, f32(0.0))
    s8 = op.Cast(op.Cast(s, to=int(ir.DataType.FLOAT8E4M3FN)), to=int(ir.DataType.FLOAT))
    d = op.Mul(s8, g)
    zero = op.Equal(d, f32(0.0))
    v = op.Div(xb, op.Where(zero, f32(1.0), d))
    a = op.Min(op.Abs(v), f32(6.0))
    low = op.Div(op.Round(op.Mul(a, f32(2.0))), f32(2.0))
    high = op.Mul(op.Round(op.Div(a, f32(2.0))), f32(2.0))
    r = op.Where(op.Less(a, f32(2.0)), low, op.Where(op.Less(a, f32(4.0)), op.Round(a), high))
    y = op.Where(zero, f32(0.0), op.Mul(op.Mul(op.Sign(v), r), d))
    return op.Reshape(y, shape)


def grouped_mm_translations(op) -> dict:
    """The grouped matmul of fused MoE experts: transformers' ``grouped_mm_fallback`` (its CPU and
    float32 path) and ``aten._grouped_mm``. ``x [M, K]`` holds the tokens sorted by expert, ``w [E,
    K, N]`` the experts' weights and ``offs [E]`` each expert's end row; row ``r`` of the result is
    ``x[r] @ w[e]`` for the expert ``e`` whose rows hold ``r``.

    ONNX has no such op, and the expert count is static, so each expert's rows are a ``Slice``
    between two of the (dynamic) ends, multiplied by that expert's weight, and the products are
    concatenated in order. The weights and the ends are cut with one ``Split`` each: a quantized
    model's expert weights reach it as one dequantized ``[E, K, N]`` tensor, which TensorRT and
    ONNX Runtime then read expert by expert. Nothing ``[M, K, N]``-sized is materialized, as a
    per-token weight gather (``experts_implementation="batched_mm"``) does."""
    import torch

    def grouped_mm(x, w, offs, bias=None, out_dtype=None):
        experts = w.shape[0] if w.shape is not None else None
        if not isinstance(experts, int):
            raise NotImplementedError("grouped matmul: the expert count (weight dim 0) must be static")
        axis0 = op.Constant(value=ir.tensor(np.array([0], dtype=np.int64)))
        ends = op.Cast(offs, to=int(ir.DataType.INT64))

        def split(v):
            if op.version >= 18:
                return op.Split(v, axis=0, num_outputs=experts)
            ones = op.Constant(value=ir.tensor(np.ones(experts, dtype=np.int64)))
            return op.Split(v, ones, axis=0)  # the outputs counted from the sizes

        if experts > 1:
            ends, weights = split(ends), split(w)
            biases = split(bias) if bias is not None else None
        else:
            ends, weights, biases = [ends], [w], [bias] if bias is not None else None
        rows = _dequantized_rows(op, x, axis0)
        start = axis0
        outs = []
        for e in range(experts):
            y = op.MatMul(rows(start, ends[e]), op.Squeeze(weights[e], axis0))
            if biases is not None:
                y = op.Add(y, op.Squeeze(biases[e], axis0))
            outs.append(y)
            start = ends[e]
        y = op.Concat(*outs, axis=0) if experts > 1 else outs[0]
        if out_dtype is not None:  # a torch dtype, or the ONNX dtype the exporter already made of it
            if isinstance(out_dtype, torch.dtype):
                from torch.onnx._internal.exporter._core import torch_dtype_to_onnx_dtype

                out_dtype = torch_dtype_to_onnx_dtype(out_dtype)
            y = op.Cast(y, to=int(out_dtype))
        return y

    table = {}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    for packet in (fallback, getattr(torch.ops.aten, "_grouped_mm", None)):
        overload = getattr(packet, "default", None) if packet is not None else None
        if overload is not None:
            table[overload] = grouped_mm
    return table


def _dequantized_rows(op, x, axis0):
    """``rows(start, end)``: rows ``start:end`` of ``x``. Where ``x`` is a per-tensor int8/uint8
    ``DequantizeLinear``'s output, the codes are sliced and each slice dequantized, so every expert's
    MatMul reads a DequantizeLinear directly (the form TensorRT and ONNX Runtime fuse; ONNX
    Runtime's Q/DQ propagation also fails to load an int8 ``DequantizeLinear -> Slice``). FP8 codes
    stay as they are: ONNX's Slice has no float8 type."""
    dq = x.producer()
    if (dq is not None and dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx")
            and dq.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8)  # ONNX's Slice takes no float8
            and len(dq.inputs) > 1 and dq.inputs[1] is not None and dq.inputs[1].shape is not None
            and dq.inputs[1].shape.rank() == 0  # one scale: per tensor (axis then means nothing)
            and not getattr(dq.attributes.get("block_size"), "value", 0)):
        codes, params = dq.inputs[0], list(dq.inputs[1:])
        return lambda start, end: op.DequantizeLinear(op.Slice(codes, start, end, axis0), *params)
    return lambda start, end: op.Slice(x, start, end, axis0)
