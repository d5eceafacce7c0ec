"""Back ends for quantized models: ONNX export (:func:`qpass.export_onnx`) and
:func:`qpass.export.compare` (fake quant vs ONNX Runtime)."""

from qpass.export.compare import compare  # noqa: F401 - qpass.export.compare(model, onnx_path, inputs)
