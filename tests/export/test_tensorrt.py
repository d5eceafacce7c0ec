"""TensorRT entry points up to the TensorRT call (no machine here has TensorRT): the ONNX file
handed to build_tensorrt_engine passes its checks, the torch-tensorrt graph holds only ops
torch-tensorrt converts and computes the fake-quant outputs; both skip the build without it."""

import importlib.util
import os

import onnx
import pytest
import torch

import qpass
from qpass.errors import ExportError
from qpass.export.tensorrt import (TENSORRT_ONNX_OPS, build_tensorrt_engine, check_tensorrt_onnx,
                                   compile_torch_tensorrt, tensorrt_graph)

from conftest import MLP, Attention, SmallCNN
from export_helpers import Graph, run_tensorrt_graph

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TORCH_TRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


def _quantized(cls, shape, cfg):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    qpass.quantize(model, getattr(qpass, cfg), lambda m: m(x))
    return model, x


@pytest.mark.parametrize("cls,shape,cfg", [(Attention, (2, 8, 32), "INT8_DEFAULT_CFG"),
                                           (SmallCNN, (2, 3, 8, 8), "FP8_DEFAULT_CFG"),
                                           (MLP, (4, 256), "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")])
def test_onnx_for_tensorrt_passes_checks(cls, shape, cfg, tmp_path):
    if cls is MLP:
        torch.manual_seed(0)
        model, x = MLP(d=256, h=64).eval(), torch.randn(*shape)
        qpass.quantize(model, getattr(qpass, cfg))
        path = qpass.export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=x)
    else:
        model, x = _quantized(cls, shape, cfg)
        path = qpass.export_onnx(model, str(tmp_path / "m.onnx"))
    g = Graph(path)
    assert set(g.ops()) <= TENSORRT_ONNX_OPS
    name = g.model.graph.input[0].name
    with pytest.raises(ExportError, match=f"'{name}' has dynamic dimensions.*input_shapes"):
        check_tensorrt_onnx(path)
    dims = tuple(x.shape)
    shapes = {name: ((1,) + dims[1:], dims, (8,) + dims[1:])}
    assert check_tensorrt_onnx(path, shapes) == [name]
    if not HAS_TRT:
        with pytest.raises(ExportError, match="needs TensorRT's Python package"):
            build_tensorrt_engine(path, input_shapes=shapes)
        return
    engine = tmp_path / "m.engine"  # pragma: no cover - needs TensorRT
    data = build_tensorrt_engine(path, engine, input_shapes=shapes)
    assert data and engine.read_bytes() == data


def test_check_refuses_what_tensorrt_cannot_parse(tmp_path):
    model, x = _quantized(Attention, (2, 8, 32), "INT8_DEFAULT_CFG")
    ort_path = qpass.export_onnx(model, str(tmp_path / "ort.onnx"), target="onnxruntime", dynamic=False)
    with pytest.raises(ExportError, match=r"node '.*quantize_per_tensor.*'.*uint8.*target='tensorrt'"):
        check_tensorrt_onnx(ort_path)
    path = qpass.export_onnx(model, str(tmp_path / "trt.onnx"), dynamic=False)
    assert check_tensorrt_onnx(path) == []
    m = onnx.load(path)
    m.graph.node[-1].op_type = "NonExistingOp"
    m.graph.node[-1].domain = "com.example"
    bad = str(tmp_path / "bad.onnx")
    onnx.save(m, bad)
    with pytest.raises(ExportError, match="not a valid ONNX model|custom domain 'com.example'"):
        check_tensorrt_onnx(bad)
    with pytest.raises(ExportError, match=r"names \['nope'\]"):
        check_tensorrt_onnx(path, {"nope": ((1,), (1,), (1,))})
    dyn = qpass.export_onnx(model, str(tmp_path / "dyn.onnx"))
    name = onnx.load(dyn).graph.input[0].name
    with pytest.raises(ExportError, match="min <= opt <= max"):
        check_tensorrt_onnx(dyn, {name: ((4, 8, 32), (2, 8, 32), (8, 8, 32))})


@pytest.mark.parametrize("cls,shape,cfg", [(Attention, (2, 8, 32), "INT8_DEFAULT_CFG"),
                                           (SmallCNN, (2, 3, 8, 8), "FP8_DEFAULT_CFG"),
                                           (SmallCNN, (2, 3, 8, 8), "INT8_DEFAULT_CFG")])
def test_torch_tensorrt_graph(cls, shape, cfg):
    model, x = _quantized(cls, shape, cfg)
    gm, tensors = tensorrt_graph(model)
    qop = torch.ops.tensorrt.quantize_op.default
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert qop in targets
    assert all(t is qop or getattr(t, "namespace", None) == "aten" for t in targets), targets  # no qpass ops left
    n_quant = sum(n.target is qop for n in gm.graph.nodes)
    weighted = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())
    shared = 2 if cls is Attention else 0  # k and v read q's input quantizer (one quantize_op for three)
    assert n_quant == 2 * weighted - shared
    with torch.no_grad():
        want = model(x)
    got = run_tensorrt_graph(gm, *tensors)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    torch.export.export(gm, tuple(tensors))  # what compile_torch_tensorrt hands to torch-tensorrt
    if not HAS_TORCH_TRT:
        with pytest.raises(ExportError, match="needs torch-tensorrt"):
            compile_torch_tensorrt(model)
        return
    trt_mod = compile_torch_tensorrt(model)  # pragma: no cover - needs torch-tensorrt and a GPU
    out = trt_mod(*[t.cuda() for t in tensors])
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.nn.functional.cosine_similarity(out.float().cpu().flatten(), want.flatten(), dim=0) > 0.999


def test_reachable_as_qpass_export():
    assert qpass.export.build_tensorrt_engine is build_tensorrt_engine
    assert qpass.export.compile_torch_tensorrt is compile_torch_tensorrt


def test_torch_tensorrt_graph_refuses_blocks():
    torch.manual_seed(0)
    model, x = MLP(d=256, h=64).eval(), torch.randn(4, 256)
    qpass.quantize(model, qpass.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    with pytest.raises(ExportError, match=r"fc1\.weight_quantizer.*export this model to ONNX"):
        tensorrt_graph(model, x)


def test_engine_write_is_atomic(tmp_path):
    from qpass.export import tensorrt as t

    target = tmp_path / "e.engine"
    t._write_bytes_atomically(b"abc", str(target))
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["e.engine"]
    blocked = tmp_path / "dir.engine"
    blocked.mkdir()
    (blocked / "x").write_bytes(b"")
    with pytest.raises(OSError):
        t._write_bytes_atomically(b"abc", str(blocked))  # cannot replace a directory: no temp file left
    assert sorted(os.listdir(tmp_path)) == ["dir.engine", "e.engine"]
