"""Helpers for the ONNX export tests: locate QuantizeLinear/DequantizeLinear nodes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
# Ops a weight DequantizeLinear may feed on its way to a weighted op (layout only).
LAYOUT = {"Transpose", "Reshape"}


class Graph:
    def __init__(self, path_or_proto):
        self.model = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
        g = self.model.graph
        self.init = {t.name: t for t in g.initializer}
        self.consumers: dict[str, list] = {}
        self.producer = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n
        self.nodes = list(g.node)

    @property
    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))

    def count(self, op_type: str) -> int:
        return sum(n.op_type == op_type for n in self.nodes)

    def ops(self) -> Counter:
        return Counter(n.op_type for n in self.nodes)

    def of(self, op_type: str):
        return [n for n in self.nodes if n.op_type == op_type]

    def users(self, node) -> list:
        return [u for o in node.output for u in self.consumers.get(o, [])]

    def const(self, name: str):
        t = self.init.get(name)
        if t is not None:
            return t
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return n.attribute[0].t
        return None

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.const(name))

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def weight_dqs(self):
        return [n for n in self.of("DequantizeLinear") if n.input[0] in self.init]

    def activation_dqs(self):
        return [n for n in self.of("DequantizeLinear") if n.input[0] not in self.init]

    def reaches_weighted(self, node) -> bool:
        """Every user of node is a weighted op, possibly through layout-only ops."""
        users = self.users(node)
        if not users:
            return False
        return all(u.op_type in WEIGHTED or (u.op_type in LAYOUT and self.reaches_weighted(u)) for u in users)


def run_tensorrt_graph(gm, *inputs):
    """Run a :func:`qpass.export.tensorrt_graph` GraphModule on the CPU: ``tensorrt::quantize_op``
    (whose ModelOpt kernel needs CUDA) evaluated with qpass's own fake quantization."""
    import torch

    from qpass.formats import QuantSpec

    def quantize_op(x, amax, num_bits, exponent_bits, unsigned, narrow_range):
        bits = (exponent_bits, num_bits - exponent_bits - 1) if exponent_bits else num_bits
        axes = [i for i, n in enumerate(amax.shape) if n > 1]
        axis = axes[0] if amax.numel() > 1 else None
        spec = QuantSpec.from_attributes(bits, axis=axis, unsigned=unsigned, narrow_range=narrow_range)
        return spec.fake_quant(x, amax)

    class Interp(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.ops.tensorrt.quantize_op.default:
                return quantize_op(*args, **kwargs)
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        return Interp(gm).run(*inputs)
