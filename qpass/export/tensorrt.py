"""TensorRT entry points: an engine from a qpass ONNX file, and torch-tensorrt on the lowered graph.

* :func:`build_tensorrt_engine` parses an ONNX file written by :func:`qpass.export_onnx`
  (``target="tensorrt"``) into a **strongly typed** TensorRT network (every tensor keeps the
  type the ONNX file gives it: explicit quantization, no precision flags) and builds a
  serialized engine. :func:`check_tensorrt_onnx` runs first and needs no TensorRT: it refuses,
  naming the node, what TensorRT's ONNX parser cannot take (an op it has no importer for,
  uint8 activations with zero point 128 from ``target="onnxruntime"``, FP8 E5M2, a nonzero
  zero point), and dynamic inputs without an optimization-profile shape.
* :func:`tensorrt_graph` rewrites the lowered graph (:mod:`qpass.passes.lower`) for
  torch-tensorrt: each per-tensor activation quantize/dequantize pair and each folded
  per-tensor/per-channel int8/fp8 weight becomes ModelOpt's ``tensorrt::quantize_op`` (a
  fake-quant op with ``amax``, the one torch-tensorrt's converters turn into TensorRT Q/DQ
  layers; the op is registered by importing ModelOpt, which torch-tensorrt needs for
  quantized graphs as well). :func:`compile_torch_tensorrt` hands it to
  ``torch_tensorrt.dynamo.compile`` with ``use_explicit_typing=True``.

Neither TensorRT nor torch-tensorrt is a dependency of qpass; both functions raise
:class:`~qpass.errors.ExportError` saying what to install when they are missing, after every
check that can run without them.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import fx

from qpass.errors import ExportError

__all__ = ["TENSORRT_ONNX_OPS", "build_tensorrt_engine", "check_tensorrt_onnx", "compile_torch_tensorrt",
           "tensorrt_graph"]

# Operators TensorRT 10's ONNX parser imports (onnx-tensorrt's operator list), default domain.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM MatMul Max MaxPool Mean Min Mod Mul Neg NonMaxSuppression NonZero
Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RNN RoiAlign Round Scan ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())

# ONNX element types TensorRT takes as Q/DQ codes (INT4 and FP4: weights only, in DequantizeLinear).
_QDQ_TYPES = {"INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1"}


def _onnx_type_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


def check_tensorrt_onnx(onnx_path, input_shapes: dict | None = None) -> list[str]:
    """Check that TensorRT can parse ``onnx_path`` as a strongly typed network; returns the
    names of the inputs with dynamic dimensions (each needs a shape in ``input_shapes``).

    Raises :class:`ExportError` naming the first offending node or input.
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(os.fspath(onnx_path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - a file that is not a valid model
        raise ExportError(f"{os.fspath(onnx_path)} is not a valid ONNX model: {str(e).strip().splitlines()[0]}") from e
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    for n in g.node:
        where = f"ONNX node '{n.name}' ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            raise ExportError(f"{where}: custom domain '{n.domain}' has no TensorRT importer")
        if n.op_type not in TENSORRT_ONNX_OPS:
            raise ExportError(f"{where}: TensorRT's ONNX parser has no importer for {n.op_type}")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        codes = n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None:
            ztype = _onnx_type_name(zp.data_type)
            if ztype == "UINT8":
                raise ExportError(f"{where}: uint8 codes (zero point 128) are ONNX Runtime's form; export with "
                                  "qpass.export_onnx(..., target='tensorrt') for TensorRT")
            if ztype not in _QDQ_TYPES:
                raise ExportError(f"{where}: TensorRT has no {ztype} quantization (it takes "
                                  f"{sorted(_QDQ_TYPES)})")
            if numpy_helper.to_array(zp).astype("float64").any():
                raise ExportError(f"{where}: TensorRT needs a zero point of 0 (symmetric quantization)")
        if n.op_type == "DequantizeLinear" and codes in consts:
            ctype = _onnx_type_name(consts[codes].data_type)
            if ctype not in _QDQ_TYPES:
                raise ExportError(f"{where}: TensorRT has no {ctype} weights (it takes {sorted(_QDQ_TYPES)})")
    dynamic = []
    init_names = set(consts)
    for i in g.input:
        if i.name in init_names:
            continue
        dims = i.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            dynamic.append(i.name)
    shapes = input_shapes or {}
    for name in dynamic:
        if name not in shapes:
            raise ExportError(f"ONNX input '{name}' has dynamic dimensions: pass input_shapes={{'{name}': "
                              "(min_shape, opt_shape, max_shape)}} for TensorRT's optimization profile")
        _check_profile(name, shapes[name])
    unknown = sorted(set(shapes) - {i.name for i in g.input})
    if unknown:
        raise ExportError(f"input_shapes names {unknown}, not inputs of the ONNX model "
                          f"({[i.name for i in g.input if i.name not in init_names]})")
    return dynamic


def _check_profile(name: str, shapes) -> None:
    try:
        lo, opt, hi = (tuple(int(d) for d in s) for s in shapes)
    except (TypeError, ValueError):
        raise ExportError(f"input_shapes['{name}'] must be (min_shape, opt_shape, max_shape), got {shapes!r}") from None
    if not (len(lo) == len(opt) == len(hi)) or any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi)):
        raise ExportError(f"input_shapes['{name}']: need min <= opt <= max in every dimension, got {shapes!r}")


def build_tensorrt_engine(onnx_path, engine_path=None, *, input_shapes: dict | None = None,
                          workspace_gib: float = 4.0, verbose: bool = False) -> bytes:
    """Build a TensorRT engine from a qpass ONNX export; returns the serialized engine.

    The network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the Q/DQ
    nodes and tensor types of the file decide every precision. ``input_shapes`` maps each
    input with dynamic dimensions to ``(min_shape, opt_shape, max_shape)``. ``engine_path``:
    also write the engine there (atomically). Raises :class:`ExportError` for a file TensorRT
    cannot take (see :func:`check_tensorrt_onnx`), for parser errors (naming the node) and
    when the ``tensorrt`` package is missing.
    """
    onnx_path = os.fspath(onnx_path)
    dynamic = check_tensorrt_onnx(onnx_path, input_shapes)
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("build_tensorrt_engine needs TensorRT's Python package (pip install tensorrt, on a "
                          "machine with an NVIDIA GPU); the ONNX file passed every check that runs without it") from None
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else err.node()
            errors.append(f"node '{node}': {err.desc()}")
        raise ExportError(f"TensorRT's ONNX parser refused {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if dynamic:
        profile = builder.create_optimization_profile()
        for name in dynamic:
            lo, opt, hi = (tuple(int(d) for d in s) for s in input_shapes[name])
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (run with verbose=True for its log)")
    data = bytes(serialized)
    if engine_path is not None:
        _write_bytes_atomically(data, os.fspath(engine_path))
    return data


def _write_bytes_atomically(data: bytes, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qpass-", suffix=".engine.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# torch-tensorrt
# ---------------------------------------------------------------------------------------------
# format token -> (num_bits, exponent_bits, unsigned, narrow_range) of tensorrt::quantize_op
_TRT_FORMATS = {"int8": (8, 0, False, False), "int8n": (8, 0, False, True), "e4m3": (8, 4, False, False)}


def _quantize_op():
    if not hasattr(torch.ops.tensorrt, "quantize_op"):
        try:
            import modelopt.torch.quantization.tensor_quant  # noqa: F401 - registers tensorrt::quantize_op
        except ImportError:
            pass
    if not hasattr(torch.ops.tensorrt, "quantize_op"):
        raise ExportError("the torch-tensorrt path uses ModelOpt's tensorrt::quantize_op, which torch-tensorrt "
                          "converts to Q/DQ layers: pip install nvidia-modelopt")
    return torch.ops.tensorrt.quantize_op.default


def tensorrt_graph(model, example_inputs=None) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """(GraphModule for torch-tensorrt, flat example tensors): the lowered graph of ``model``
    with every qpass quantization op replaced by ``tensorrt::quantize_op``; it computes the
    fake-quant model's outputs. Raises :class:`ExportError` naming the node and the format
    for quantization torch-tensorrt's converters do not take (blocks, INT4, NVFP4: export
    to ONNX and use :func:`build_tensorrt_engine` for those).
    """
    from qpass.export.onnx import lowered_for_export
    from qpass.passes.lower import LOWERED_META, OPS

    lowered, tensors, _, _ = lowered_for_export(model, example_inputs)
    qop = _quantize_op()
    g = lowered.graph
    for node in list(g.nodes):
        meta = node.meta.get(LOWERED_META)
        if meta is None or node.op != "call_function":
            continue
        where = f"node '{meta['node']}' (quantizer '{meta['quantizer']}', format {meta['format']})"
        if node.target is OPS["quantize_per_tensor"]:
            continue  # replaced with its dequantize
        if node.target is OPS["dequantize_per_tensor"] and node.args[0].target is OPS["quantize_per_tensor"]:
            q = node.args[0]
            x, _, amax_node, fmt = q.args
            amax = _fetch(lowered, amax_node.target).reshape(())
            _replace(lowered, node, qop, x, amax, fmt, where, "amax")
        elif node.target in (OPS["dequantize_per_tensor"], OPS["dequantize_per_channel"]):
            codes_node = node.args[0]
            if codes_node.op != "get_attr":
                raise ExportError(f"{where}: dequantized codes that are not a folded weight")
            fmt = node.args[3]
            with torch.no_grad():
                weight = node.target(*[_fetch(lowered, a.target) if isinstance(a, fx.Node) else a for a in node.args])
            scale = _fetch(lowered, node.args[1].target).float()
            if node.target is OPS["dequantize_per_channel"]:
                shape = [1] * weight.dim()
                shape[node.args[4]] = -1
                scale = scale.reshape(shape)
            if fmt not in _TRT_FORMATS:
                raise ExportError(f"{where}: torch-tensorrt takes int8 or fp8 (e4m3) quantization, not {fmt}")
            bound = 448.0 if fmt == "e4m3" else 127.0
            with g.inserting_before(node):
                w = _new_attr(lowered, g, f"{codes_node.target.rsplit('.', 1)[0]}.dequantized", weight)
            _replace(lowered, node, qop, w, scale * bound, fmt, where, "amax")
        else:
            raise ExportError(f"{where}: torch-tensorrt's converters take per-tensor activations and "
                              "per-tensor/per-channel weights; export this model to ONNX and use build_tensorrt_engine")
    g.eliminate_dead_code()
    for node in list(g.nodes):  # drop codes/scales nobody reads any more
        if node.op == "get_attr" and not node.users:
            g.erase_node(node)
    g.lint()
    lowered.recompile()
    return lowered, tensors


def _replace(gm, node, qop, x, amax: torch.Tensor, fmt: str, where: str, suffix: str) -> None:
    if fmt not in _TRT_FORMATS:
        raise ExportError(f"{where}: torch-tensorrt takes int8 or fp8 (e4m3) quantization, not {fmt}")
    num_bits, exp_bits, unsigned, narrow = _TRT_FORMATS[fmt]
    g = gm.graph
    with g.inserting_before(node):
        base = node.name
        a = _new_attr(gm, g, f"{base}_{suffix}", amax.detach().float())
        new = g.call_function(qop, (x, a, num_bits, exp_bits, unsigned, narrow))
    new.meta.update({k: v for k, v in node.meta.items() if k != "qpass_lowered"})
    node.replace_all_uses_with(new)
    g.erase_node(node)


def _new_attr(gm, g, name: str, value: torch.Tensor) -> fx.Node:
    target = name.replace(".", "_")
    n = 1
    while hasattr(gm, target):
        n += 1
        target = f"{name.replace('.', '_')}_{n}"
    gm.register_buffer(target, value.detach().clone().contiguous())
    return g.get_attr(target)


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def compile_torch_tensorrt(model, example_inputs=None, **compile_kwargs):
    """``torch_tensorrt.dynamo.compile`` of :func:`tensorrt_graph` (strongly typed:
    ``use_explicit_typing=True`` unless given); returns torch-tensorrt's module, which takes
    the flat input tensors of the traced graph. ``compile_kwargs`` go to torch-tensorrt.
    """
    gm, tensors = tensorrt_graph(model, example_inputs)
    try:
        import torch_tensorrt
    except ImportError:
        raise ExportError("compile_torch_tensorrt needs torch-tensorrt (pip install torch-tensorrt, on a machine "
                          "with an NVIDIA GPU); qpass.export.tensorrt_graph(model) builds the graph without it") from None
    device = torch.device("cuda")
    gm = gm.to(device)
    inputs = [t.to(device) for t in tensors]
    program = torch.export.export(gm, tuple(inputs))
    compile_kwargs.setdefault("use_explicit_typing", True)
    return torch_tensorrt.dynamo.compile(program, inputs=inputs, **compile_kwargs)
