"""ONNX export of real models: Q/DQ placement on MiniLM, ORT parity on MiniLM and SmolLM2.

Parity. Every QuantizeLinear of the export gives, for the input ONNX Runtime feeds it, the
same codes as qpass's quantizer (``compare_quantizers``: 0 of 4.9M codes differ on MiniLM
INT8; FP8 at most an exact rounding tie), with ORT's graph optimizations on or off. The final
outputs still differ more than float rounding on MiniLM (last hidden state cosine about 0.992
INT8, 0.998 FP8) because the model's chain of 25 activation quantizers amplifies float
rounding: ORT's float kernels (MatMul accumulation order, softmax, erf, LayerNorm) differ
from PyTorch's by about 1e-7 relative, a value that sits on a rounding boundary flips one
code, each flipped code perturbs the next quantizer's input, and after six layers a third of
the codes differ by one step (``input_rel_err`` grows 1e-7 -> 1e-1 along the chain). The
fake-quant PyTorch model does the same to itself: scaling its embedding LayerNorm weight by
1 + 1e-7 moves its own output to a cosine of 0.993 (INT8) / 0.9997 (FP8). Weight-only
formats and shallow models (no long quantizer chain) agree to 0.9999 and beyond. The
end-to-end thresholds below are the measured values with a margin; the quantizer test is exact.
"""

import os

import numpy as np
import pytest
import torch

import qpass
from qpass import zoo
from qpass.export.compare import compare, compare_quantizers

from conftest import needs_minilm, needs_smollm2
from export_helpers import Graph

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _embedding_cosine(model, path, batch):
    from qpass.export.compare import ort_session

    sess = ort_session(path)
    feed = dict(zip([i.name for i in sess.get_inputs()], [batch[k].numpy() for k in sorted(batch)]))
    hidden = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    a = zoo.mean_pool(hidden, batch["attention_mask"])
    b = zoo.mean_pool(ref, batch["attention_mask"])
    return zoo.mean_cosine(a, b)


@pytest.fixture(scope="module")
def minilm_data():
    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, 8), batch_size=8, max_length=64)
    held = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, 4), batch_size=4, max_length=128)[0]
    return model, calib, dict(held)


@pytest.fixture(scope="module")
def minilm_int8(minilm_data, tmp_path_factory):
    import copy

    model, calib, held = minilm_data
    model = copy.deepcopy(model)
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in calib])
    d = tmp_path_factory.mktemp("minilm")
    # (target="onnxruntime" is covered on the small attention model: one more MiniLM export
    # would cost the test budget another 20 s)
    return model, held, qpass.export_onnx(model, str(d / "minilm_int8.onnx"))


@needs_minilm
def test_minilm_int8_qdq_placement(minilm_int8):
    model, held, path = minilm_int8
    g = Graph(path)
    assert g.opset >= 13
    # 6 layers x (q/k/v shared, attention output, intermediate, output) + pooler = 25 activation Q/DQ
    assert g.count("QuantizeLinear") == 25
    # 6 x 6 Linear weights + pooler = 37 weight DQs, int8 per output channel, zero point 0. The
    # encoder's MatMuls read W.T [in, out] per channel on axis 1, straight from the DequantizeLinear
    # (no Transpose, as quantize_static and TensorRT have it); the pooler's Gemm reads W on axis 0.
    assert len(g.weight_dqs()) == 37 and len(g.activation_dqs()) == 25
    for dq in g.weight_dqs():
        codes, (user,) = g.init[dq.input[0]], g.users(dq)
        assert not g.value(dq.input[2]).any() and g.value(dq.input[1]).ndim == 1
        if user.op_type == "MatMul":
            assert g.attr(dq, "axis", 1) == 1 and g.value(dq.input[1]).shape == (codes.dims[1],)
        else:
            assert user.op_type == "Gemm" and g.attr(dq, "axis", 1) == 0
    assert sum(g.users(dq)[0].op_type == "MatMul" for dq in g.weight_dqs()) == 36
    assert not any(g.producer.get(t.input[0]) in g.weight_dqs() for t in g.of("Transpose"))
    for q in g.of("QuantizeLinear"):
        assert q.input[0] not in g.init and [u.op_type for u in g.users(q)] == ["DequantizeLinear"]
        assert g.value(q.input[2]) == 0 and g.value(q.input[2]).dtype == np.int8
    for dq in g.of("DequantizeLinear"):
        assert g.reaches_weighted(dq), dq.name  # only inputs of MatMul/Gemm; LayerNorm, Softmax, Add untouched
    for q in g.of("QuantizeLinear"):  # never on a MatMul/Gemm output (outputs stay float)
        prod = g.producer.get(q.input[0])
        assert prod is None or prod.op_type not in ("MatMul", "Gemm"), q.name
    fanout = sorted(len(g.users(dq)) for dq in g.activation_dqs())
    assert fanout.count(3) == 6  # one shared Q/DQ pair feeds the q, k and v MatMuls of each layer
    # no float32 2-D weight left except the embeddings
    big = [t.name for t in g.model.graph.initializer if t.data_type == 1 and len(t.dims) == 2]
    assert all("embeddings" in n for n in big), big


@needs_minilm
def test_minilm_int8_parity(minilm_int8):
    model, held, path = minilm_int8
    rep = compare(model, path, held)
    assert rep[0]["cosine"] >= 0.98, rep  # see the module docstring
    assert _embedding_cosine(model, path, held) >= 0.99
    _assert_quantizers_agree(model, path, held)


def _assert_quantizers_agree(model, path, held):
    """ORT's codes equal qpass's for ORT's own inputs, up to exact rounding ties (QuantizeLinear
    divides by the scale, ModelOpt multiplies by its inverse: measured 1-3 in 8.3M codes)."""
    q = compare_quantizers(model, path, held)
    assert len(q) == 25
    assert sum(r["mismatches"] for r in q) <= 1e-5 * sum(r["total"] for r in q), q
    for r in q:
        assert r["mismatches"] <= r["total"] * 1e-4, r
    assert q[0]["input_rel_err"] < 1e-5  # upstream of the first quantizer only float rounding


@needs_minilm
def test_minilm_fp8_parity(minilm_data, tmp_path):
    import copy

    model, calib, held = minilm_data
    model = copy.deepcopy(model)
    qpass.quantize(model, qpass.FP8_DEFAULT_CFG, lambda m: [m(**b) for b in calib[:1]])
    path = qpass.export_onnx(model, str(tmp_path / "minilm_fp8.onnx"))
    g = Graph(path)
    assert g.opset >= 19 and g.count("QuantizeLinear") == 25 and len(g.weight_dqs()) == 37
    rep = compare(model, path, held)
    assert rep[0]["cosine"] >= 0.995, rep
    assert _embedding_cosine(model, path, held) >= 0.998
    _assert_quantizers_agree(model, path, held)


# SmolLM2 costs over a minute just to parse its GGUF file, which alone would break the
# test budget of tests/export: it runs (first 4 layers) with QPASS_EXPORT_SMOLLM2=1. The tiny random Llama
# below checks the same graph structure in the default run.
needs_smollm2_opt_in = pytest.mark.skipif(os.environ.get("QPASS_EXPORT_SMOLLM2") != "1",
                                          reason="set QPASS_EXPORT_SMOLLM2=1 (parsing SmolLM2 takes over a minute)")


@pytest.fixture(scope="module")
def smollm2():
    model, tok = zoo.load_smollm2(num_layers=4)
    split = zoo.text_split()
    return model, zoo.token_windows(tok, split.calib, 2, 64), zoo.token_windows(tok, split.held_out, 2, 96)


@needs_smollm2
@needs_smollm2_opt_in
@pytest.mark.parametrize("cfg", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_smollm2_parity(smollm2, cfg, tmp_path):
    import copy

    base, calib, held = smollm2
    model = copy.deepcopy(base)
    qpass.quantize(model, getattr(qpass, cfg), lambda m: m(input_ids=calib))
    path = qpass.export_onnx(model, str(tmp_path / f"smollm2_{cfg}.onnx"))
    g = Graph(path)
    # 4 layers x (q/k/v shared, o_proj, gate/up shared, down_proj); lm_head is off in the presets
    assert g.count("QuantizeLinear") == 16 and len(g.weight_dqs()) == 28
    rep = compare(model, path, {"input_ids": held})
    # measured (2 x 128 tokens): INT8 0.99980, FP8 0.99997 - the quantizer chain again
    assert rep[0]["cosine"] >= {"INT8_DEFAULT_CFG": 0.999, "FP8_DEFAULT_CFG": 0.9998}[cfg], rep
    q = compare_quantizers(model, path, {"input_ids": held})
    assert len(q) == 16 and sum(r["mismatches"] for r in q) <= 1e-5 * sum(r["total"] for r in q), q


def test_tiny_llama_structure_and_parity(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 24))
    qpass.quantize(model, qpass.INT8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    path = qpass.export_onnx(model, str(tmp_path / "llama.onnx"))
    g = Graph(path)
    assert g.count("QuantizeLinear") == 8 and len(g.weight_dqs()) == 14
    fanout = sorted(len(g.users(dq)) for dq in g.activation_dqs())
    assert fanout == [1] * 4 + [2] * 2 + [3] * 2  # gate/up share one pair, q/k/v another
    for dq in g.of("DequantizeLinear"):
        assert g.reaches_weighted(dq), dq.name
    rep = compare(model, path, {"input_ids": torch.randint(0, 128, (3, 40))})
    assert rep[0]["cosine"] >= 0.9999, rep
