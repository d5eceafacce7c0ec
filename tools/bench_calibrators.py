"""Calibrators side by side: max, histogram percentile / entropy / mse, and the mse algorithm.

    python tools/bench_calibrators.py [--models minilm,smollm2] [--methods ...] [--no-modelopt]
                                      [--modelopt-entropy] [--smollm2-layers 8] [--json out.json]

INT8_DEFAULT_CFG on all-MiniLM-L6-v2 (mean cosine of embeddings to FP32 on held-out pydoc
text, higher is better) and the first SmolLM2-135M layers (held-out perplexity, lower is
better), qpass and ModelOpt 0.47 on the same calibration batches. Rows:

* ``max``: INT8_DEFAULT_CFG as is (``quantize``).
* ``hist:<method>``: input quantizers get ``"calibrator": "histogram"``. ModelOpt 0.47 has no
  ``calibrate()`` spelling for histogram methods (``algorithm="max"`` raises a TypeError), so
  its column runs ModelOpt's own per-quantizer flow: ``quantize`` with ``algorithm=None``, then
  every quantizer ``disable_quant(); enable_calib()``, ``forward_loop``, and
  ``load_calib_amax(method, **options)`` (``load_calib_amax()`` for max calibrators). The
  qpass column runs ``quantize(..., algorithm=None)`` then
  ``qpass.calib.histogram.calibrate_histogram(model, forward_loop, method, **options)``.
* ``algo:mse``: ``algorithm={"method": "mse"}`` (max, then MSE search of the weight amax).

Times are wall seconds for quantize+calibrate ("quant") and nothing is warmed up. ModelOpt's
entropy search is a Python loop (seconds per quantizer), so it runs only with --modelopt-entropy.
ModelOpt 0.47's histogram ``mse`` passes num_bits into fake_tensor_quant's ``bias`` argument: its
column is what ModelOpt returns, not a meaningful MSE search.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import bench_common as bc
import torch

METHODS = {
    "max": None,
    "hist:percentile": ("percentile", {"percentile": 99.99}),
    "hist:percentile99.999": ("percentile", {"percentile": 99.999}),
    "hist:entropy": ("entropy", {}),
    "hist:mse": ("mse", {}),
    "algo:mse": None,
}


def _config(lib_module, row: str):
    cfg = copy.deepcopy(lib_module.INT8_DEFAULT_CFG)
    if row.startswith("hist:"):
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}}
        ]
        cfg["algorithm"] = None
    elif row == "algo:mse":
        cfg["algorithm"] = {"method": "mse"}
    return cfg


def qpass_run(model, row, loop, rules):
    import qpass
    from qpass.calib.histogram import calibrate_histogram

    qpass.quantize(model, _config(qpass, row), loop, rules=rules)
    if row.startswith("hist:"):
        method, options = METHODS[row]
        calibrate_histogram(model, loop, method, **options)


def modelopt_run(model, row, loop):
    mtq = bc.import_modelopt()
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    mtq.quantize(model, _config(mtq, row), loop)
    if not row.startswith("hist:"):
        return
    method, options = METHODS[row]
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer) and not m._disabled]
    for q in quantizers:
        if q._calibrator is not None and not getattr(q, "_dynamic", False):
            q.disable_quant()
            q.enable_calib()
    with torch.no_grad():
        loop(model)
    for q in quantizers:
        if q._calibrator is None or getattr(q, "_dynamic", False):
            continue
        if isinstance(q._calibrator, HistogramCalibrator):
            q.load_calib_amax(method, **options)
        else:
            q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def run_cell(lib, task, row, rules) -> dict:
    res = dict(metric=None, quant_s=None, error=None)
    model = copy.deepcopy(task.model)
    gc.collect()
    try:
        with bc.quiet():
            t0 = time.perf_counter()
            if lib == "qpass":
                qpass_run(model, row, task.forward_loop, rules)
            else:
                modelopt_run(model, row, task.forward_loop)
            res["quant_s"] = time.perf_counter() - t0
            res["metric"] = float(task.evaluate(model))
    except Exception as e:  # noqa: BLE001 - one cell, never the whole table
        res["error"] = bc.short_reason(e, 40)
        res["traceback"] = bc.format_tb(e)
    del model
    gc.collect()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--modelopt-entropy", action="store_true", help="also run ModelOpt's (slow) entropy search")
    p.add_argument("--rules", default="default", help="qpass rules ('modelopt' adds ModelOpt's LayerNorm etc. slots)")
    p.add_argument("--smollm2-layers", type=int, default=8)
    p.add_argument("--minilm-calib", type=int, default=64)
    p.add_argument("--minilm-eval", type=int, default=128)
    p.add_argument("--smollm2-calib", type=int, default=16)
    p.add_argument("--smollm2-eval", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from bench import minilm_task, smollm2_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    unknown = [r for r in rows if r not in METHODS]
    if unknown:
        print(f"unknown method rows {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    with_mo = not args.no_modelopt and bc.import_modelopt() is not None
    s = dict(smollm2_layers=args.smollm2_layers, smollm2_calib=args.smollm2_calib, smollm2_eval=args.smollm2_eval,
             smollm2_seq=args.seq_len, minilm_calib=args.minilm_calib, minilm_eval=args.minilm_eval)
    print(f"calibrator bench: INT8_DEFAULT_CFG, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"modelopt {bc.modelopt_version() if with_mo else 'off'}, qpass rules={args.rules}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    out = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        task = minilm_task(s) if name == "minilm" else smollm2_task(s)
        print(f"\n[{task.name}] {task.info}; FP32 {task.metric} {task.fp32:.{task.digits}f}", flush=True)
        table = []
        for row in rows:
            cells = {"qpass": run_cell("qpass", task, row, args.rules)}
            if with_mo and (row != "hist:entropy" or args.modelopt_entropy):
                cells["modelopt"] = run_cell("modelopt", task, row, None)
            line = [row]
            for lib in ("qpass", "modelopt"):
                r = cells.get(lib)
                if r is None:
                    line += ["skipped", "-"]
                elif r["error"]:
                    line += [f"error ({r['error']})", "-"]
                else:
                    line += [f"{r['metric']:.{task.digits}f}", f"{r['quant_s']:.1f}"]
            table.append(line)
            print("  " + " | ".join(line), flush=True)
            out.append({"model": task.name, "row": row, "fp32": task.fp32, "metric": task.metric,
                        **{f"{lib}_{k}": v for lib, r in cells.items() for k, v in r.items() if k != "traceback"}})
            for lib, r in cells.items():
                if r["error"]:
                    print(f"    {lib} traceback:\n{r['traceback']}", flush=True)
        print()
        print(bc.format_table([task.name, f"qpass {task.metric}", "qpass quant s",
                               f"modelopt {task.metric}", "modelopt quant s"], table, right={1, 2, 3, 4}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
