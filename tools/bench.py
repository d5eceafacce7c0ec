"""qpass vs ModelOpt: accuracy and speed on real models, measured side by side in one run.

    python tools/bench.py [--quick] [--models minilm,smollm2] [--configs A,B:modelopt,...]
                          [--threads 1] [--json out.json] [--gpu]

CPU mode (default): for each model and config, a fresh deepcopy of one loaded FP32 model is
quantized and calibrated by qpass and by ModelOpt on the same calibration batches, then
evaluated on the same held-out pydoc text:

* all-MiniLM-L6-v2: mean cosine of mean-pooled embeddings to the FP32 embeddings (higher is better);
* SmolLM2-135M: perplexity on held-out token windows (lower is better).

Timed regions hold exactly what a user pays: ``quantize(model, config, forward_loop)`` (with
the model copy made before the clock starts) and the evaluation forwards. Nothing is warmed up,
so the first row of each library also carries its one-time, per-process costs, except its import:
the header gives each library's import time in a fresh process, and the notes add it to the first
row (ModelOpt sets up most of its machinery when imported; qpass sets up torch.export on its first
trace, inside the first quantize).
A config written ``NAME+gptq`` runs preset NAME with algorithm ``gptq`` in both libraries, and
``INT8_DEFAULT_CFG+percentile`` (``+entropy``, ``+mse``) gives the input quantizers a histogram
calibrator with that method (as ``tools/bench_calibrators.py`` does), so one run can print the
algorithm table: e.g. ``--configs INT8_SMOOTHQUANT_CFG,INT4_AWQ_CFG,W4A8_AWQ_BETA_CFG,
NVFP4_AWQ_LITE_CFG,INT4_BLOCKWISE_WEIGHT_ONLY_CFG+gptq,INT8_DEFAULT_CFG+percentile,
INT8_DEFAULT_CFG+entropy,INT8_DEFAULT_CFG+mse``.
A config written ``NAME:modelopt`` runs qpass with ``rules="modelopt"``; its ModelOpt columns
repeat ModelOpt's run of NAME (marked *). ModelOpt failures (MXFP8/NVFP4 need CUDA) show
"n/a (reason)"; qpass failures show "error (reason)" with the traceback after the table.

--gpu: CUDA forward/calibration timings on a random bf16 SmolLM2-shaped Llama (tools/bench_gpu.py).

--auto-quantize [options]: qpass's and ModelOpt's auto_quantize side by side on SmolLM2
(tools/bench_auto_quantize.py; the options after it are that tool's, e.g. ``--layers 30``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import bench_calibrators
import bench_common as bc
import torch

MODELS = ("minilm", "smollm2")


@dataclass
class Task:
    name: str  # table label
    metric: str  # "cosine" or "ppl"
    digits: int
    model: torch.nn.Module
    forward_loop: Callable
    evaluate: Callable  # model -> metric
    fp32: float = 0.0
    fp32_eval_s: float = 0.0
    load_s: float = 0.0
    info: dict = field(default_factory=dict)


def settings_for(args) -> dict:
    if args.quick:
        return dict(smollm2_layers=4, smollm2_calib=8, smollm2_eval=8, smollm2_seq=128,
                    minilm_calib=32, minilm_eval=64)
    return dict(smollm2_layers=None, smollm2_calib=16, smollm2_eval=16, smollm2_seq=256,
                minilm_calib=64, minilm_eval=128)


def minilm_task(s: dict) -> Task:
    from qpass import zoo

    t0 = time.perf_counter()
    with bc.quiet():
        model, tok = zoo.load_minilm()
    load_s = time.perf_counter() - t0
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, s["minilm_calib"]))
    evals = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, s["minilm_eval"]))
    t0 = time.perf_counter()
    reference = zoo.embed(model, evals)
    fp32_eval_s = time.perf_counter() - t0
    n_calib = sum(len(b["input_ids"]) for b in calib)
    return Task(
        name="MiniLM-L6", metric="cosine", digits=4, model=model,
        forward_loop=lambda m: [m(**b) for b in calib],
        evaluate=lambda m: zoo.mean_cosine(reference, zoo.embed(m, evals)),
        fp32=1.0, fp32_eval_s=fp32_eval_s, load_s=load_s,
        info=dict(calib_texts=n_calib, eval_texts=len(reference), batch_size=16, max_length=128),
    )


def smollm2_task(s: dict) -> Task:
    from qpass import zoo

    t0 = time.perf_counter()
    with bc.quiet():
        model, tok = zoo.load_smollm2(s["smollm2_layers"])
    load_s = time.perf_counter() - t0
    split = zoo.text_split()
    calib = zoo.token_windows(tok, split.calib, s["smollm2_calib"], s["smollm2_seq"])
    evals = zoo.token_windows(tok, split.held_out, s["smollm2_eval"], s["smollm2_seq"])
    t0 = time.perf_counter()
    fp32 = zoo.perplexity(model, evals)
    fp32_eval_s = time.perf_counter() - t0
    layers = len(model.model.layers)
    return Task(
        name=f"SmolLM2-135M/{layers}L", metric="ppl", digits=3, model=model,
        forward_loop=lambda m: [m(input_ids=calib[i : i + 4], use_cache=False) for i in range(0, len(calib), 4)],
        evaluate=lambda m: zoo.perplexity(m, evals),
        fp32=fp32, fp32_eval_s=fp32_eval_s, load_s=load_s,
        info=dict(layers=layers, calib_windows=len(calib), eval_windows=len(evals), seq_len=calib.shape[1],
                  batch_size=4),
    )


def run_best(lib: str, task: Task, cfg_name: str, rules: str, repeat: int) -> dict:
    """run_one ``repeat`` times; the fastest quantize and eval times (metrics are deterministic)."""
    best = run_one(lib, task, cfg_name, rules)
    for _ in range(repeat - 1):
        if best["error"] is not None:
            break
        again = run_one(lib, task, cfg_name, rules)
        if again["quant_s"] is not None and best["quant_s"] is not None and again["quant_s"] < best["quant_s"]:
            best["quant_s"], best["trace_s"] = again["quant_s"], again["trace_s"]  # the trace share of that run
        if again["eval_s"] is not None and best["eval_s"] is not None:
            best["eval_s"] = min(best["eval_s"], again["eval_s"])
        if again["metric"] != best["metric"]:
            best["warnings"].append(f"bench: metric differs between repeats: {best['metric']} vs {again['metric']}")
    return best


#: ``NAME+VARIANT`` configs: histogram calibration of the input quantizers, or another algorithm
HISTOGRAM = ("percentile", "entropy", "mse")
VARIANTS = HISTOGRAM + ("gptq",)


def _with_variant(cfg: dict, variant: str) -> dict:
    if variant == "gptq":
        cfg["algorithm"] = "gptq"
    return cfg


def run_one(lib: str, task: Task, cfg_name: str, rules: str) -> dict:
    """Quantize a fresh copy with one library, evaluate it; never raises."""
    res = dict(metric=None, quant_s=None, eval_s=None, trace_s=None, error=None, traceback=None, warnings=[])
    model = copy.deepcopy(task.model)
    gc.collect()
    name, _, variant = cfg_name.partition("+")
    try:
        if variant and variant not in VARIANTS:
            raise ValueError(f"unknown config variant '+{variant}'; choose from {sorted(VARIANTS)}")
        if variant in HISTOGRAM and name != "INT8_DEFAULT_CFG":
            raise ValueError(f"'+{variant}' (histogram calibration) is measured on INT8_DEFAULT_CFG only")
        if lib == "qpass":
            import qpass

            with bc.quiet(res["warnings"]):
                t0 = time.perf_counter()
                if variant in HISTOGRAM:
                    bench_calibrators.qpass_run(model, f"hist:{variant}", task.forward_loop, rules)
                else:
                    cfg = _with_variant(copy.deepcopy(getattr(qpass, name)), variant)
                    qpass.quantize(model, cfg, task.forward_loop, rules=rules)
                res["quant_s"] = time.perf_counter() - t0
            from qpass.graph.quantized_model import state_of

            res["trace_s"] = state_of(model).trace_s  # of quant_s: torch.export, or a graph-cache hit
        else:
            mtq = bc.import_modelopt()
            with bc.quiet():
                t0 = time.perf_counter()
                if variant in HISTOGRAM:
                    bench_calibrators.modelopt_run(model, f"hist:{variant}", task.forward_loop)
                else:
                    mtq.quantize(model, _with_variant(copy.deepcopy(getattr(mtq, name)), variant), task.forward_loop)
                res["quant_s"] = time.perf_counter() - t0
        with bc.quiet(res["warnings"] if lib == "qpass" else None):
            t0 = time.perf_counter()
            res["metric"] = float(task.evaluate(model))
            res["eval_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - one cell, never the whole table
        res["error"] = bc.short_reason(e)
        res["error_full"] = f"{type(e).__name__}: {bc.first_line(e)}"
        res["traceback"] = bc.format_tb(e)
    del model
    gc.collect()
    return res


def run_cpu(args) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = settings_for(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(f"bench: unknown model(s) {bad}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
    configs = [bc.parse_config(c) for c in args.configs.split(",") if c.strip()]
    mtq = None if args.no_modelopt else bc.import_modelopt()
    import qpass

    print(f"qpass bench ({'quick' if args.quick else 'full'})  qpass {qpass.__version__}  "
          f"modelopt {bc.modelopt_version() if mtq else 'off'}  torch {torch.__version__}  "
          f"python {platform.python_version()}  threads {torch.get_num_threads()}")
    if mtq is None and not args.no_modelopt:
        print(f"  modelopt unavailable ({bc.modelopt_missing_reason()}): qpass columns only")
    if "minilm" in models:
        print(f"  MiniLM: {s['minilm_calib']} calib texts, {s['minilm_eval']} held-out eval texts "
              f"(batches of 16, max 128 tokens); metric: mean cosine to FP32 embeddings (higher is better)")
    if "smollm2" in models:
        layers = s["smollm2_layers"] or "all 30"
        print(f"  SmolLM2: {layers} layers, {s['smollm2_calib']} calib windows x {s['smollm2_seq']} tokens, "
              f"{s['smollm2_eval']} held-out eval windows x {s['smollm2_seq']} (batches of 4); "
              f"metric: perplexity (lower is better)"
              + ("; the first 4 of 30 layers feed the head directly, so FP32 perplexity is huge by "
                 "construction: compare the columns relative to FP32" if s["smollm2_layers"] else ""))
    print(f"  configs: {', '.join(bc.config_label(n, r) for n, r in configs)}")
    print("  times: seconds, wall clock; 'quant' = quantize+calibrate, 'eval' = the held-out forwards; "
          "nothing is warmed up (graph capture and first-call costs are in the times)")
    if args.repeat > 1:
        print(f"  each cell run {args.repeat} times: fastest quantize and fastest eval time shown")
    imports = {"qpass": bc.import_seconds("qpass", args.threads)}
    if mtq is not None:
        imports["modelopt"] = bc.import_seconds("modelopt.torch.quantization", args.threads)
    print("  import time after torch, fresh process (not in the quantize times): "
          + ", ".join(f"{k} {'?' if v is None else f'{v:.2f} s'}" for k, v in imports.items())
          + "; qpass initialises torch.export on its first trace, inside the first quantize", flush=True)
    print(f"  load average at start {_loadavg()} on {os.cpu_count()} CPUs\n", flush=True)

    started = time.perf_counter()
    rows, tasks_json = [], []
    for name in models:
        task = minilm_task(s) if name == "minilm" else smollm2_task(s)
        print(f"[{task.name}] loaded in {task.load_s:.1f} s; FP32 {task.metric} {fmt_metric(task.fp32, task.digits)}, "
              f"FP32 eval {task.fp32_eval_s:.2f} s", flush=True)
        tasks_json.append(dict(model=task.name, metric=task.metric, fp32=task.fp32, fp32_eval_s=task.fp32_eval_s,
                               load_s=task.load_s, **task.info))
        mo_cache: dict = {}
        for cfg_name, rules in configs:
            label = bc.config_label(cfg_name, rules)
            q = run_best("qpass", task, cfg_name, rules, args.repeat)
            mo, mo_repeated = None, False
            if mtq is not None:
                mo_repeated = cfg_name in mo_cache
                if cfg_name not in mo_cache:
                    mo_cache[cfg_name] = run_best("modelopt", task, cfg_name, "default", args.repeat)
                mo = mo_cache[cfg_name]
            row = dict(model=task.name, config=label, config_name=cfg_name, rules=rules, metric=task.metric,
                       digits=task.digits, fp32=task.fp32, fp32_eval_s=task.fp32_eval_s, qpass=q, modelopt=mo,
                       modelopt_repeated=mo_repeated)
            rows.append(row)
            print(f"  {label:<36} qpass {_cell(q, task.digits, 'error'):<20} "
                  f"modelopt {_cell(mo, task.digits, 'n/a') if mo else '-'}", flush=True)
        del task
        gc.collect()
    total_s = time.perf_counter() - started

    print()
    print(render(rows, with_modelopt=mtq is not None))
    print(f"\ntotal runtime {total_s:.1f} s (model loading and FP32 references included); "
          f"load average at end {_loadavg()}")
    _print_notes(rows, imports)
    if args.json:
        doc = dict(mode="quick" if args.quick else "full", threads=torch.get_num_threads(), settings=s,
                   import_s=imports,
                   repeat=args.repeat,
                   versions=dict(qpass=qpass.__version__, modelopt=bc.modelopt_version() if mtq else None,
                                 torch=torch.__version__),
                   models=tasks_json, rows=[_json_row(r) for r in rows], total_s=total_s)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def fmt_metric(x: float, digits: int) -> str:
    """Fixed decimals; a truncated SmolLM2's perplexity (~1e7) in 5 significant digits."""
    return f"{x:.4e}" if abs(x) >= 1e5 else f"{x:.{digits}f}"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cell(res: dict | None, digits: int, fail: str) -> str:
    if res is None:
        return "-"
    if res["error"] is not None:
        return f"{fail} ({res['error']})"
    return fmt_metric(res["metric"], digits)


def _timed(res: dict | None) -> dict | None:
    """A failed run's seconds stay in the JSON but not in the table (no ratio to a run that broke)."""
    if res is None or res["error"] is None:
        return res
    return {**res, "quant_s": None, "eval_s": None, "trace_s": None}


def render(rows: list[dict], with_modelopt: bool = True) -> str:
    if with_modelopt:
        headers = ["model", "config", "FP32", "qpass", "modelopt", "qpass quant s", "of which trace",
                   "modelopt quant s", "quant q/mo", "qpass eval s", "modelopt eval s", "eval q/mo"]
    else:
        headers = ["model", "config", "FP32", "qpass", "qpass quant s", "qpass eval s", "FP32 eval s"]
    out = []
    for r in rows:
        q, mo, d = _timed(r["qpass"]), _timed(r["modelopt"]), r["digits"]
        cells = [r["model"], r["config"], fmt_metric(r["fp32"], d), _cell(q, d, "error")]
        if with_modelopt:
            star = "*" if r["modelopt_repeated"] and mo and mo["error"] is None else ""
            cells += [_cell(mo, d, "n/a") + star, bc.fmt_num(q["quant_s"], 2), bc.fmt_num(q.get("trace_s"), 2),
                      bc.fmt_num(mo and mo["quant_s"], 2),
                      bc.fmt_ratio(q["quant_s"], mo and mo["quant_s"]), bc.fmt_num(q["eval_s"], 2),
                      bc.fmt_num(mo and mo["eval_s"], 2), bc.fmt_ratio(q["eval_s"], mo and mo["eval_s"])]
        else:
            cells += [bc.fmt_num(q["quant_s"], 2), bc.fmt_num(q["eval_s"], 2), bc.fmt_num(r["fp32_eval_s"], 2)]
        out.append(cells)
    right = set(range(2, len(headers)))
    return bc.format_table(headers, out, right)


def _print_notes(rows: list[dict], imports: dict | None = None) -> None:
    first = rows[0] if rows else None
    imports = imports or {}
    if first and first["modelopt"] and None not in (first["qpass"]["quant_s"], first["modelopt"]["quant_s"],
                                                   imports.get("qpass"), imports.get("modelopt")):
        q = imports["qpass"] + first["qpass"]["quant_s"]
        mo = imports["modelopt"] + first["modelopt"]["quant_s"]
        print(f"first row with each library's import (what a fresh process pays): qpass {q:.2f} s, "
              f"modelopt {mo:.2f} s, {bc.fmt_ratio(q, mo)}")
    if any(r["modelopt_repeated"] for r in rows):
        print("* modelopt columns repeat ModelOpt's own run of the same preset (ModelOpt has one rule set)")
    fp32 = {}
    for r in rows:
        fp32.setdefault(r["model"], r["fp32_eval_s"])
    print("FP32 eval s: " + ", ".join(f"{m} {t:.2f}" for m, t in fp32.items()))
    reasons = {}
    for r in rows:
        mo = r["modelopt"]
        if mo and mo["error"] is not None:
            reasons.setdefault(mo["error_full"], []).append(r["config"])
    for msg, cfgs in reasons.items():
        print(f"modelopt n/a: {', '.join(sorted(set(cfgs)))}: {msg}")
    warned = {}
    for r in rows:
        for w in r["qpass"]["warnings"]:
            warned.setdefault(w, []).append(f"{r['model']} {r['config']}")
    for w, where in warned.items():
        print(f"qpass warning ({len(where)}x, first: {where[0]}): {w[:300]}")
    seen = set()
    for r in rows:
        q = r["qpass"]
        if q["error"] is not None and q["traceback"] not in seen:
            seen.add(q["traceback"])
            print(f"\nqpass error in {r['model']} {r['config']}:\n{q['traceback']}")


def _json_row(r: dict) -> dict:
    def side(res):
        if res is None:
            return None
        return {k: res.get(k) for k in ("metric", "quant_s", "trace_s", "eval_s", "error", "error_full", "warnings")}

    q, mo = _timed(r["qpass"]), _timed(r["modelopt"])
    ratio = lambda a, b: None if a is None or b is None or not b else a / b  # noqa: E731
    return dict(model=r["model"], config=r["config"], config_name=r["config_name"], rules=r["rules"],
                metric=r["metric"], fp32=r["fp32"], fp32_eval_s=r["fp32_eval_s"], qpass=side(r["qpass"]),
                modelopt=side(r["modelopt"]), modelopt_repeated=r["modelopt_repeated"],
                quant_ratio=ratio(q["quant_s"], mo and mo["quant_s"]),
                eval_ratio=ratio(q["eval_s"], mo and mo["eval_s"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4-layer SmolLM2, fewer samples")
    p.add_argument("--models", default="minilm,smollm2", help="comma list of minilm, smollm2")
    p.add_argument("--configs", default=None,
                   help="comma list of preset names; NAME:modelopt runs qpass with rules='modelopt' "
                        f"(default CPU: {','.join(bc.DEFAULT_CONFIGS)})")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeat", type=int, default=1,
                   help="CPU: quantize+evaluate each cell N times, report the fastest times (noisy machines)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-modelopt", action="store_true", help="qpass columns only")
    p.add_argument("--gpu", action="store_true", help="CUDA timings on a random bf16 SmolLM2-shaped Llama")
    p.add_argument("--gpu-dry-run", action="store_true",
                   help="run the --gpu code path on the CPU with a tiny model (checks the script; no timings)")
    p.add_argument("--iters", type=int, default=20, help="--gpu: timed forwards per measurement (median)")
    p.add_argument("--profile", action="store_true",
                   help="--gpu: also profile one forward of each qpass row (torch.profiler; top ops by device and host time)")
    p.add_argument("--warmup", type=int, default=3, help="--gpu: untimed forwards before each measurement")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--auto-quantize" in argv:
        import bench_auto_quantize

        argv.remove("--auto-quantize")
        return bench_auto_quantize.main(argv) or 0
    args = build_parser().parse_args(argv)
    if args.gpu or args.gpu_dry_run:
        import bench_gpu

        if args.configs is None:
            args.configs = ",".join(bench_gpu.DEFAULT_GPU_CONFIGS)
        return bench_gpu.run_gpu(args)
    if args.configs is None:
        args.configs = ",".join(bc.DEFAULT_CONFIGS)
    return run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
