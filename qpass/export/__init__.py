"""Back ends for quantized models: ONNX export (:func:`qpass.export_onnx`),
:func:`qpass.export.compare` (fake quant vs ONNX Runtime) and the TensorRT entry points
(:func:`build_tensorrt_engine`, :func:`compile_torch_tensorrt`)."""

from qpass.export.compare import compare  # noqa: F401 - qpass.export.compare(model, onnx_path, inputs)
from qpass.export.tensorrt import build_tensorrt_engine, compile_torch_tensorrt, tensorrt_graph  # noqa: F401
