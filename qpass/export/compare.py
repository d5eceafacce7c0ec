"""Compare a quantized PyTorch model (fake quantization) with its ONNX export in ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils import _pytree as pytree

from qpass.errors import ExportError

__all__ = ["compare", "compare_quantizers", "ort_session", "session_options"]


#: ONNX Runtime's extended graph optimizations mis-handle FP8 Q/DQ. 1.30 fuses an FP8 Q/DQ pair in
#: front of a MatMul into MatMulIntegerToFloat, which takes integers only, and the session refuses
#: the model ("Type 'tensor(float8e4m3fn)' ... of operator (MatMulIntegerToFloat) is invalid").
#: 1.32 loads it, but an FP8 Q/DQ Gemm (a 2-D linear layer) then computes wrong values (cosine
#: 0.76 to the fake-quant model, against 0.9999998 with basic optimizations; tested). FP8 models
#: therefore get basic optimizations on every version so far.
_FP8_TYPES = {17, 18, 19, 20}  # onnx.TensorProto FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ


def _has_fp8(proto) -> bool:
    graph = proto.graph
    return any(t.data_type in _FP8_TYPES for t in graph.initializer) or any(
        a.t.data_type in _FP8_TYPES for n in graph.node for a in n.attribute if a.HasField("t"))


def _has_affine_add(proto) -> bool:
    """An affine quantizer left as ``Sub(x, b) -> QuantizeLinear -> DequantizeLinear -> Add(., b)``
    (a bias that is no whole number of steps, or any affine quantizer with ``target="tensorrt"``).
    ONNX Runtime 1.32's extended optimizations compute that ``Add(b) -> MatMul`` wrong (max error
    0.022 against 2e-7 with basic optimizations on a two-layer MLP; tested)."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}

    def source(name, op):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        dq = source(add.input[0], "DequantizeLinear")
        q = source(dq.input[0], "QuantizeLinear") if dq is not None else None
        sub = source(q.input[0], "Sub") if q is not None else None
        if sub is not None and sub.input[1] == add.input[1]:
            return True
    return False


def session_options(ort, proto):
    """SessionOptions for ``proto``: basic graph optimizations for models with FP8 Q/DQ, which
    ONNX Runtime's extended optimizations mis-fuse (see the comment above ``_FP8_TYPES``), and
    for models with an affine quantizer's Sub/Add left in (:func:`_has_affine_add`)."""
    opts = ort.SessionOptions()
    if _has_fp8(proto) or _has_affine_add(proto):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return opts


def ort_session(onnx_path, threads: int | None = None):
    """An ONNX Runtime CPU session (``threads`` sets intra_op_num_threads)."""
    import onnx
    import onnxruntime as ort

    opts = session_options(ort, onnx.load(os.fspath(onnx_path), load_external_data=False))
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(onnx_path), opts, providers=["CPUExecutionProvider"])


def _flat_tensors(obj) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(obj) if isinstance(x, torch.Tensor)]


def compare(model, onnx_path, inputs, session=None) -> list[dict]:
    """Run ``model`` (fake quant) and the ONNX file (ONNX Runtime, CPUExecutionProvider) on
    ``inputs`` and return, per output, ``{"name", "shape", "max_abs_err", "cosine"}``.

    ``inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs or
    ``(args, kwargs)``, as for :func:`qpass.export_onnx`. ONNX inputs are fed in the
    exported order (tensor leaves of ``(args, sorted kwargs)``); outputs are matched to the
    tensor leaves of the model's output in order.
    """
    from qpass.export.onnx import _split_inputs

    args, kwargs = _split_inputs(inputs)
    flat_in = _flat_tensors((args, dict(sorted(kwargs.items()))))
    with torch.no_grad():
        ref = _flat_tensors(model(*args, **kwargs))
    sess = session if session is not None else ort_session(onnx_path)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(flat_in):
        raise ExportError(f"the ONNX model takes {len(names)} inputs but {len(flat_in)} tensors were given")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, flat_in)}
    outs = sess.run(None, feed)
    onames = [o.name for o in sess.get_outputs()]
    if len(outs) != len(ref):
        raise ExportError(f"the ONNX model has {len(outs)} outputs, the PyTorch model {len(ref)}")
    report = []
    for name, got, want in zip(onames, outs, ref):
        w = want.detach().float().cpu().numpy().astype(np.float64)
        g = np.asarray(got).astype(np.float64)
        if g.shape != w.shape:
            raise ExportError(f"output '{name}': ONNX shape {g.shape} != PyTorch shape {w.shape}")
        err = float(np.abs(g - w).max()) if w.size else 0.0
        denom = float(np.linalg.norm(g) * np.linalg.norm(w))
        cos = float(np.dot(g.ravel(), w.ravel()) / denom) if denom > 0 else float(np.array_equal(g, w))
        report.append({"name": name, "shape": tuple(w.shape), "max_abs_err": err, "cosine": cos})
    return report


def compare_quantizers(model, onnx_path, inputs) -> list[dict]:
    """Per QuantizeLinear of a qpass ONNX export: does ONNX Runtime quantize like qpass?

    Runs the ONNX file (every QuantizeLinear's input and codes made graph outputs) and the
    lowered PyTorch graph on ``inputs``, and returns, in graph order, one dict per
    QuantizeLinear: ``{"node", "quantizer", "format", "mismatches", "total", "input_rel_err"}``.
    ``mismatches``: elements whose ONNX Runtime code differs from qpass's code **for ONNX
    Runtime's own input** to that node - the quantization arithmetic alone (0, or a handful
    of exact rounding ties). ``input_rel_err``: ``max|x_ort - x_torch| / max|x_torch|`` of the
    node's input - how far the float computation upstream has drifted. A chain of quantizers
    amplifies that drift (each flipped code perturbs the next quantizer's input), so the final
    outputs of a deep model can differ by more than float rounding even when every quantizer
    agrees; this report tells the two apart.
    """
    import onnx

    from qpass.export.onnx import _split_inputs, lowered_for_export
    from qpass.passes.lower import OPS, spec_of_token

    args, kwargs = _split_inputs(inputs)
    lowered, _, _, _ = lowered_for_export(model, inputs)
    flat_in = _flat_tensors((args, dict(sorted(kwargs.items()))))
    quantize_ops = []  # (quantize node, amax, fmt, scale, affine bias subtracted before it or 0)
    for node in lowered.graph.nodes:
        if node.target is OPS["quantize_per_tensor"]:
            src, bias = node.args[0], 0.0
            if (src.op == "call_function" and src.target is torch.ops.aten.sub.Tensor
                    and isinstance(src.args[1], torch.fx.Node) and src.args[1].op == "get_attr"):
                value = _fetch(lowered, src.args[1].target)
                if value.numel() == 1:
                    bias = float(value)
            quantize_ops.append((node, _fetch(lowered, node.args[2].target), node.args[3],
                                 _fetch(lowered, node.args[1].target).detach().float().reshape(-1), bias))
    torch_in = {}

    class _Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n.target is OPS["quantize_per_tensor"]:
                torch_in[n] = self.env[n.args[0]].detach().float()
            return super().run_node(n)

    with torch.no_grad():
        _Capture(lowered).run(*flat_in)
    proto = onnx.load(os.fspath(onnx_path))
    qnodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    constants.update((c.output[0], onnx.numpy_helper.to_array(c.attribute[0].t))
                     for c in proto.graph.node if c.op_type == "Constant" and c.attribute[0].name == "value")
    outputs = {o.name for o in proto.graph.output}
    for n in qnodes:
        for name in (n.input[0], n.output[0]):
            if name not in outputs:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), session_options(ort, proto),
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, flat_in)})))
    report = []
    for n in qnodes:
        x = torch.from_numpy(np.asarray(got[n.input[0]]).astype(np.float32))
        # the quantize op whose PyTorch input this node received, among those with its scale: the
        # exporter merges equal constants (SmoothQuant with alpha 1 gives many inputs amax 1.0)
        # under one name, and may flatten leading dims
        scale = torch.tensor(np.asarray(constants[n.input[1]], dtype=np.float32)).reshape(-1)
        entries = [e for e in quantize_ops if torch_in[e[0]].numel() == x.numel() and e[3].shape == scale.shape
                   and torch.equal(e[3], scale)]
        if not entries:
            raise ExportError(f"ONNX node '{n.name}': scale '{n.input[1]}' matches no quantize op of the lowered graph")
        # a zero point other than the format's own (0; 128 for uint8) folds an affine bias:
        # ONNX quantizes x where PyTorch quantizes x - b
        zp = np.asarray(constants[n.input[2]]) if len(n.input) > 2 and n.input[2] in constants else None
        folded = (zp is not None and zp.dtype.kind in "iu"
                  and int(zp.reshape(-1)[0]) != (128 if zp.dtype == np.uint8 else 0))
        qnode, amax, fmt, _, bias = min(
            entries, key=lambda e: float((torch_in[e[0]].reshape(x.shape) - (x - e[4] if folded else x)).abs().max()))
        if folded:
            x = x - bias
        x = x.reshape(torch_in[qnode].shape)
        ort_codes = np.asarray(got[n.output[0]]).reshape(x.shape)
        ours = spec_of_token(fmt).quantize(x, amax)[0]
        if ours.dtype.is_floating_point:  # float8 codes: compare the bytes
            a, b = ours.view(torch.uint8).numpy(), ort_codes.view(np.uint8)
        else:
            a = ours.numpy().astype(np.int32)
            b = ort_codes.astype(np.int32) - (128 if ort_codes.dtype == np.uint8 and fmt == "int8" else 0)
        ref = torch_in[qnode]
        rel = float((ref - x).abs().max() / ref.abs().max().clamp(min=1e-30)) if ref.numel() else 0.0
        report.append({"node": n.name, "quantizer": qnode.meta["qpass_lowered"]["quantizer"], "format": fmt,
                       "mismatches": int((a != b).sum()), "total": int(a.size), "input_rel_err": rel})
    return report


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
