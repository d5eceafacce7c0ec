"""qpass: post-training quantization of PyTorch models as a graph compiler.

The public API mirrors ModelOpt's ``modelopt.torch.quantization``.
"""

from qpass import config
from qpass.config import *  # noqa: F401,F403 - the preset configs (INT8_DEFAULT_CFG, ...)
from qpass.errors import CalibrationError, ExportError, QpassError, QuantConfigError, TraceError
from qpass.model_quant import (
    calibrate,
    disable_quantizer,
    enable_quantizer,
    fold_weight,
    postprocess_amax,
    print_quant_summary,
    quantize,
    set_cuda_graphs,
    set_weight_cache,
    shared_input_groups,
)
from qpass.nn.tensor_quantizer import SequentialQuantizer, TensorQuantizer

__version__ = "0.1.0"
from qpass.checkpoint import save, restore, restore_modelopt
from qpass.export.onnx import export_onnx
from qpass.graph.compile_fallback import graph_breaks
from qpass.auto_quantize import AutoQuantizeSearcher, auto_quantize, auto_quantize_report, auto_quantize_resolve, auto_quantize_sweep
from qpass.export import compile_backend as _compile_backend  # registers torch.compile(backend="qpass")
