"""Compare a quantized PyTorch model (fake quantization) with its ONNX export in ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils import _pytree as pytree

from qpass.errors import ExportError

__all__ = ["compare", "ort_session"]


def ort_session(onnx_path, threads: int | None = None):
    """An ONNX Runtime CPU session (``threads`` sets intra_op_num_threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
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
