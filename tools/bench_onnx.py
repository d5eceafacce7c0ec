"""ONNX Runtime (CPU, one thread): qpass's INT8 export vs ORT's own quantize_static vs FP32.

MiniLM (all-MiniLM-L6-v2). Every quantized model is calibrated on the same ``--calib`` text
chunks (``zoo.sentence_chunks`` of the calibration split, max 128 tokens):

* ``fp32``: the FP32 model exported with ``torch.onnx.export(dynamo=True)``;
* ``qpass``: each of ``--qpass-configs`` (default ``INT8_DEFAULT_CFG`` and
  ``INT8_SMOOTHQUANT_CFG``, both W8A8: per-tensor int8 activations, per-channel int8 weights),
  ``qpass.export_onnx(target="onnxruntime")`` (uint8 activations with zero point 128; SmoothQuant's
  scales folded into the LayerNorms where the graph allows, else a Mul before the Q/DQ);
* ``ort static``: ``onnxruntime.quantization.quantize_static`` on the FP32 ONNX, QDQ format,
  uint8 activations / int8 weights, ``per_channel=True``, MinMax calibration, restricted to the
  MatMuls of the linear layers (those with a weight initializer), whose outputs stay float;
* ``ort static all`` (``--ort-all``): quantize_static with its defaults (every op it knows);
* ``--s8``: qpass's ``target="tensorrt"`` file too (int8 activations, zero point 0).

Latency: median of ``--runs`` runs after warm-up at 1 x 128 and 8 x 128 (real text windows; the
models take turns run by run),
``ORT_ENABLE_ALL``, ``intra_op_num_threads=1``; the ratio column is latency / FP32 latency.
Accuracy: mean cosine of mean-pooled embeddings to those of the FP32 PyTorch model on held-out
text; for qpass also the fake-quant PyTorch model's cosine (the export should keep it).

    python tools/bench_onnx.py [--calib 128] [--held 64] [--runs 20] [--qpass-configs A,B] [--ort-all] [--s8] [--keep DIR]
    python tools/bench_onnx.py --parity [--models minilm,smollm2] [--configs INT8_DEFAULT_CFG,...]

``--parity`` prints, per model and config, ONNX Runtime (or, where ORT has no kernel, ONNX's
reference evaluator) vs qpass's fake-quant PyTorch model: cosine and max abs error of the first
output, the number of QuantizeLinear codes that differ from qpass's for ORT's own input
(:func:`qpass.export.compare.compare_quantizers`) and the "noise floor": the fake-quant model's
cosine to itself after scaling each element of its input embeddings by ``1 + 1e-6 * N(0, 1)``
- how far float-rounding-sized changes alone move this model's output through its chain of
quantizers (a uniform scale would be invisible to dynamic block formats). ``--pooled N`` adds, for
MiniLM, the cosine of ORT's and the fake-quant model's mean-pooled sentence embeddings (the model's
product output) on N held-out chunks: mean and min over the sentences.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402
from qpass.export.compare import ort_session  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Hidden(torch.nn.Module):
    """The HF model with keyword tensor inputs and the last hidden state as its one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_fp32(model, example: dict, path: str) -> str:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {k: {0: batch, 1: seq} for k in INPUTS}
    torch.onnx.export(_Hidden(model), (), path, kwargs={k: example[k] for k in INPUTS}, dynamo=True,
                      dynamic_shapes=dims, input_names=list(INPUTS), output_names=["last_hidden_state"],
                      optimize=True, verbose=False, report=False, external_data=False)
    return path


def linear_matmuls(path: str) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight initializer (the Linears)."""
    import onnx

    m = onnx.load(path)
    inits = {t.name for t in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


class _Reader:
    """quantize_static's CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: list[dict], names: list[str]):
        self._it = iter([{n: b[n].numpy() for n in names} for b in batches])

    def get_next(self):
        return next(self._it, None)


def ort_static(fp32_path: str, out_path: str, calib: list[dict], linear_only: bool) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path + ".pre.onnx"
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
    kwargs = {}
    if linear_only:
        kwargs = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=linear_matmuls(pre),
                      extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    quantize_static(pre, out_path, _Reader(calib, list(INPUTS)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, **kwargs)
    os.unlink(pre)
    return out_path


def _feed(sess, batch: dict) -> dict:
    names = [i.name for i in sess.get_inputs()]
    return {n: batch[n].numpy() for n in names}


def ort_embeddings(sess, batches: list[dict]) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = torch.from_numpy(sess.run(None, _feed(sess, b))[0])
        out.append(zoo.mean_pool(hidden, b["attention_mask"]))
    return torch.cat(out)


def latencies_ms(sessions: list, batch: dict, runs: int) -> list[float]:
    """Median latency of each session on ``batch``; the sessions take turns run by run, so
    load from other processes on the machine hits them alike."""
    feeds = [_feed(s, batch) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
    ts = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in ts]


def timing_batch(tok, text: str, batch: int, seq: int) -> dict:
    ids = zoo.token_windows(tok, text, batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


QPASS_LABELS = {"INT8_DEFAULT_CFG": "int8", "INT8_SMOOTHQUANT_CFG": "int8 smoothquant",
                "INT8_ASYMMETRIC_CFG": "int8 asymmetric"}
PARITY_CONFIGS = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4_AWQ_CFG",
                  "NVFP4_DEFAULT_CFG"]




def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _run_reference(path: str, feed: dict) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(path).run(None, feed)[0]


def parity(args) -> None:
    from qpass.export.compare import compare, compare_quantizers

    models = {}
    split = zoo.text_split()
    if "minilm" in args.models:
        model, tok = zoo.load_minilm()
        calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, 32), batch_size=16, max_length=128)
        held = dict(zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, 4), batch_size=4, max_length=128)[0])
        models["MiniLM"] = (model, lambda m, c=calib: [m(**b) for b in c], held)
        pooled_batches = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, args.pooled), batch_size=16,
                                            max_length=128) if args.pooled else None
    if "smollm2" in args.models:
        model, tok = zoo.load_smollm2(num_layers=4)
        windows = zoo.token_windows(tok, split.calib, 8, 128)
        held = {"input_ids": zoo.token_windows(tok, split.held_out, 2, 128)}
        models["SmolLM2 (4 layers)"] = (model, lambda m, w=windows: [m(input_ids=w[i:i + 4]) for i in (0, 4)], held)
    d = args.keep or tempfile.mkdtemp(prefix="qpass-parity-")
    os.makedirs(d, exist_ok=True)
    print(f"{'model':20s}{'config':32s}{'runner':8s}{'cosine':>10s}{'max abs err':>13s}{'Q codes off':>14s}"
          f"{'floor cos':>11s}{'export s':>10s}" + (f"{'pooled mean/min':>20s}" if args.pooled else ""))
    for mname, (base, loop, held) in models.items():
        for cfg in args.configs:
            model = copy.deepcopy(base)
            qpass.quantize(model, getattr(qpass, cfg), loop)
            path = os.path.join(d, f"{mname.split()[0].lower()}_{cfg}.onnx")
            t = time.perf_counter()
            qpass.export_onnx(model, path, example_inputs=held)
            secs = time.perf_counter() - t
            runner = "ort"
            try:
                rep = compare(model, path, held, session=ort_session(path, threads=1))[0]
                cos, err = rep["cosine"], rep["max_abs_err"]
            except Exception as e:  # noqa: BLE001 - ORT has no kernel (NVFP4: DequantizeLinear-23)
                if "NOT_IMPLEMENTED" not in str(e):
                    raise
                runner = "onnxref"
                names = [i.name for i in __import__("onnx").load(path).graph.input]
                got = torch.from_numpy(_run_reference(path, {n: held[n].numpy() for n in names}))
                with torch.no_grad():
                    want = torch.utils._pytree.tree_leaves(model(**held))[0]
                cos, err = _cos(got, want), float((got - want).abs().max())
            codes = "-"
            if runner == "ort":
                q = compare_quantizers(model, path, held)
                codes = f"{sum(r['mismatches'] for r in q)}/{sum(r['total'] for r in q)}" if q else "no Q"
            with torch.no_grad():
                want = torch.utils._pytree.tree_leaves(model(**held))[0]
                w = model.get_input_embeddings().weight
                exported = w.clone()
                noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
                w.mul_(1 + 1e-6 * noise)
                moved = torch.utils._pytree.tree_leaves(model(**held))[0]
                w.copy_(exported)  # the model as exported again
            floor = _cos(want, moved)
            pooled = ""
            if args.pooled and mname == "MiniLM" and runner == "ort":
                with torch.no_grad():
                    sims = torch.nn.functional.cosine_similarity(
                        ort_embeddings(ort_session(path, threads=1), pooled_batches).double(),
                        zoo.embed(model, pooled_batches).double(), dim=-1)
                pooled = f"{float(sims.mean()):.6f}/{float(sims.min()):.6f}"
            print(f"{mname:20s}{cfg:32s}{runner:8s}{cos:10.6f}{err:13.3g}{codes:>14s}{floor:11.6f}{secs:10.1f}"
                  f"{pooled:>20s}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration text chunks")
    ap.add_argument("--held", type=int, default=64, help="held-out text chunks for the cosine")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per shape (median)")
    ap.add_argument("--qpass-configs", default="INT8_DEFAULT_CFG,INT8_SMOOTHQUANT_CFG",
                    help="qpass presets exported with target='onnxruntime' (comma list)")
    ap.add_argument("--ort-all", action="store_true", help="also quantize_static with its defaults")
    ap.add_argument("--s8", action="store_true", help="also qpass's target='tensorrt' file (int8 activations)")
    ap.add_argument("--keep", default=None, help="write the ONNX files here (default: a temp dir)")
    ap.add_argument("--parity", action="store_true", help="parity table instead of the speed table")
    ap.add_argument("--models", default="minilm,smollm2", help="--parity: minilm,smollm2")
    ap.add_argument("--configs", default=",".join(PARITY_CONFIGS), help="--parity: preset names")
    ap.add_argument("--pooled", type=int, default=0,
                    help="--parity: also MiniLM's pooled sentence embeddings, ORT vs fake quant, on N held-out chunks")
    args = ap.parse_args(argv)
    args.models = args.models.split(",")
    args.configs = args.configs.split(",")
    torch.set_num_threads(1)
    if args.parity:
        parity(args)
        return

    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, args.calib), batch_size=16, max_length=128)
    held = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, args.held), batch_size=16, max_length=128)
    shapes = {f"{b}x128": timing_batch(tok, split.held_out, b, 128) for b in (1, 8)}
    ref = zoo.embed(model, held)

    d = args.keep or tempfile.mkdtemp(prefix="qpass-bench-onnx-")
    os.makedirs(d, exist_ok=True)
    rows = []  # (label, path, fake-quant cosine or None, seconds to produce)
    t = time.perf_counter()
    fp32 = export_fp32(model, calib[0], os.path.join(d, "minilm_fp32.onnx"))
    rows.append(("fp32", fp32, None, time.perf_counter() - t))

    for cfg_name in args.qpass_configs.split(","):
        short = QPASS_LABELS.get(cfg_name, cfg_name)
        t = time.perf_counter()
        qmodel = copy.deepcopy(model)
        qpass.quantize(qmodel, copy.deepcopy(getattr(qpass, cfg_name)), lambda m: [m(**b) for b in calib])
        fq_cos = zoo.mean_cosine(zoo.embed(qmodel, held), ref)
        path = qpass.export_onnx(qmodel, os.path.join(d, f"minilm_qpass_{cfg_name}_ort.onnx"), target="onnxruntime")
        rows.append((f"qpass {short} (onnxruntime)", path, fq_cos, time.perf_counter() - t))
        if args.s8:
            t = time.perf_counter()
            path = qpass.export_onnx(qmodel, os.path.join(d, f"minilm_qpass_{cfg_name}_trt.onnx"), target="tensorrt")
            rows.append((f"qpass {short} (tensorrt form: s8)", path, fq_cos, time.perf_counter() - t))

    t = time.perf_counter()
    path = ort_static(fp32, os.path.join(d, "minilm_ort_static_linear.onnx"), calib, linear_only=True)
    rows.append(("ort quantize_static (linear MatMuls)", path, None, time.perf_counter() - t))
    if args.ort_all:
        t = time.perf_counter()
        path = ort_static(fp32, os.path.join(d, "minilm_ort_static_all.onnx"), calib, linear_only=False)
        rows.append(("ort quantize_static (defaults)", path, None, time.perf_counter() - t))

    sessions = [ort_session(path, threads=1) for _, path, _, _ in rows]
    cosines = [zoo.mean_cosine(ort_embeddings(sess, held), ref) for sess in sessions]
    per_shape = {k: latencies_ms(sessions, b, args.runs) for k, b in shapes.items()}
    results = []
    for i, (label, path, fq, secs) in enumerate(rows):
        results.append((label, {k: v[i] for k, v in per_shape.items()}, cosines[i], fq, secs))
    base = results[0][1]
    print(f"MiniLM, ONNX Runtime {_ort_version()} CPU, 1 thread, median of {args.runs} runs; "
          f"calibration {args.calib} chunks, cosine on {args.held} held-out chunks (to FP32 PyTorch)")
    head = f"{'model':40s}" + "".join(f"{k + ' ms':>11s}{'ratio':>7s}" for k in shapes) + f"{'cosine':>9s}{'fq cos':>9s}{'build s':>9s}"
    print(head)
    for label, lat, cos, fq, secs in results:
        cells = "".join(f"{lat[k]:11.2f}{lat[k] / base[k]:7.2f}" for k in shapes)
        print(f"{label:40s}{cells}{cos:9.4f}{'' if fq is None else f'{fq:9.4f}':>9s}{secs:9.1f}")
    if args.keep is None:
        print(f"(ONNX files in {d})")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
