"""SmoothQuant and AWQ on SmolLM2-135M: held-out perplexity and wall times, qpass vs ModelOpt.

    python tools/bench_algorithms.py [--layers 8] [--runs fp32,qpass:INT8_DEFAULT_CFG,...] [--repeat 5] [--json out.json]

Calibration: ``--calib`` windows (default 16) of ``--seq`` tokens (default 256) from the start
of Python's pydoc text, fed 4 windows per call; evaluation: ``--eval`` windows from its held-out
end. A run is ``LIB:PRESET`` or ``LIB:PRESET:alpha=VALUE`` (an algorithm option override);
``fp32`` is the unquantized model; ``True``/``False`` values are booleans (``:gptq=False``: AWQ
without qpass's GPTQ rounding, ModelOpt's algorithm). Every run quantizes a fresh copy; the table prints as rows
finish, then qpass/ModelOpt ratios (perplexity, quantize time) for presets run by both.
qpass's smoothquant default is ``alpha="auto"`` (ModelOpt's: 1.0); ``alpha=1.0`` runs ModelOpt's
algorithm in qpass. ``--repeat N`` quantizes every row N times, the rows taking turns, and reports
median quantize times (every qpass run starts from an empty graph cache, so each pays its trace).
``--val N`` also reports perplexity on N validation windows from the middle of the calibration
text (disjoint from the calibration windows and from the held-out end): choose options there, not
on the held-out numbers. ``--seed S`` sets qpass's capture seed (``qpass.algorithms.smoothing.SEED``).
Not a test: ModelOpt's smoothquant/AWQ on the full model take minutes on the CPU.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (sets quiet, offline env vars before transformers)

import torch  # noqa: E402

DEFAULT_RUNS = [
    "fp32",
    "qpass:INT8_DEFAULT_CFG",
    "qpass:INT8_SMOOTHQUANT_CFG",
    "qpass:INT8_SMOOTHQUANT_CFG:alpha=1.0",
    "qpass:INT8_SMOOTHQUANT_CFG:alpha=0.5",
    "qpass:INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "qpass:INT4_AWQ_CFG",
    "qpass:INT4_AWQ_CFG:gptq=False",
    "modelopt:INT8_DEFAULT_CFG",
    "modelopt:INT8_SMOOTHQUANT_CFG",
    "modelopt:INT8_SMOOTHQUANT_CFG:alpha=0.5",
    "modelopt:INT4_AWQ_CFG",
]


def parse_run(token: str):
    parts = token.split(":")
    if parts[0] == "fp32":
        return "fp32", None, {}
    lib, preset, *opts = parts
    options = {}
    for o in opts:
        k, v = o.split("=", 1)
        if v in ("True", "False"):
            v = v == "True"
        else:
            try:
                v = float(v)
            except ValueError:
                pass
        options[k] = v
    return lib, preset, options


def make_config(lib: str, preset: str, options: dict):
    if lib == "qpass":
        import qpass as mod
    else:
        mod = bc.import_modelopt()
    cfg = copy.deepcopy(getattr(mod, preset))
    if options:
        algo = cfg["algorithm"]
        algo = {"method": algo} if isinstance(algo, str) else dict(algo)
        cfg["algorithm"] = {**algo, **options}
    return cfg


def quantize_once(lib: str, preset: str, options: dict, base, loop):
    """A fresh copy of ``base`` quantized; (model, seconds, forward_loop calls). qpass's graph cache
    is emptied first, so every qpass run pays its trace (torch.export), as a first call does."""
    model = copy.deepcopy(base)
    gc.collect()
    calls = [0]

    def counting(m):
        calls[0] += 1
        loop(m)

    cfg = make_config(lib, preset, options)
    with bc.quiet():
        t0 = time.perf_counter()
        if lib == "qpass":
            import qpass
            from qpass.graph import graph_cache

            graph_cache.clear()
            qpass.quantize(model, cfg, counting)
        else:
            bc.import_modelopt().quantize(model, cfg, counting)
        secs = time.perf_counter() - t0
    return model, secs, calls[0]


def run(token: str, base, loop, evaluate, validate=None) -> dict:
    lib, preset, options = parse_run(token)
    res = dict(run=token, ppl=None, quant_s=None, eval_s=None, error=None, loop_calls=None)
    model = base
    try:
        if lib != "fp32":
            model, res["quant_s"], res["loop_calls"] = quantize_once(lib, preset, options, base, loop)
        else:
            model = copy.deepcopy(base)
        with bc.quiet():
            t0 = time.perf_counter()
            res["ppl"] = float(evaluate(model))
            res["eval_s"] = time.perf_counter() - t0
            if validate is not None:
                res["val_ppl"] = float(validate(model))
        if lib == "qpass" and preset and ("SMOOTH" in preset or "AWQ" in preset):
            from qpass.graph.quantized_model import state_of

            applied = getattr(state_of(model), "smoothing", [])
            res["units"] = len(applied)
            res["folded"] = sum(a.site is not None for a in applied)
            alphas = [a.alpha for a in applied if a.alpha is not None]
            if alphas:
                res["alphas"] = {str(a): alphas.count(a) for a in sorted(set(alphas))}
        emb = getattr(getattr(model, "model", None), "embed_tokens", None)
        if emb is not None:
            res["embedding_changed"] = not torch.equal(emb.weight, base.model.embed_tokens.weight)
    except Exception as e:  # noqa: BLE001 - one row, never the whole table
        res["error"] = f"{type(e).__name__}: {bc.first_line(e)}"
    del model
    gc.collect()
    return res


def fmt(res: dict) -> str:
    if res["error"]:
        return f"| {res['run']} | error: {res['error']} | | | | |"
    q = "" if res["quant_s"] is None else f"{res['quant_s']:.1f}"
    extra = []
    if "val_ppl" in res:
        extra.append(f"validation ppl {res['val_ppl']:.3f}")
    if "units" in res:
        extra.append(f"{res['folded']}/{res['units']} folded")
    if "alphas" in res:
        extra.append("alphas " + ",".join(f"{k}x{v}" for k, v in res["alphas"].items()))
    if res.get("embedding_changed"):
        extra.append("EMBEDDING CHANGED")
    calls = "" if res["loop_calls"] is None else str(res["loop_calls"])
    return f"| {res['run']} | {res['ppl']:.3f} | {q} | {calls} | {res['eval_s']:.1f} | {'; '.join(extra)} |"


def main(argv=None) -> int:
    p = bc.smollm2_parser(__doc__)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    p.add_argument("--json", default=None)
    p.add_argument("--repeat", type=int, default=1,
                   help="quantize every row this many times, rows taking turns; report median times")
    p.add_argument("--val", type=int, default=0, help="validation windows from the middle of the calibration text")
    p.add_argument("--seed", type=int, default=None, help="qpass's capture seed (default: qpass's, 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bc.import_modelopt()
    from qpass import zoo

    base, tok, calib, evals, loop = bc.smollm2_case(args.layers, args.calib, args.eval, args.seq)

    evaluate = lambda m: zoo.perplexity(m, evals)  # noqa: E731
    validate = None
    if args.val:
        split = zoo.text_split()
        val = zoo.token_windows(tok, split.calib[len(split.calib) // 2:], args.val, args.seq)
        validate = lambda m: zoo.perplexity(m, val)  # noqa: E731
    if args.seed is not None:
        import qpass.algorithms.smoothing as smoothing

        smoothing.SEED = args.seed
    layers = len(base.model.layers)
    print(f"SmolLM2-135M, {layers} layers; calib {args.calib}x{args.seq} tokens, eval {args.eval}x{args.seq} "
          f"held-out tokens; torch {torch.__version__}, {args.threads} threads, modelopt {bc.modelopt_version()}",
          flush=True)
    print("| run | ppl | quantize s | forward_loop calls | eval s | notes |\n|---|---|---|---|---|---|", flush=True)
    results = []
    tokens = [t.strip() for t in args.runs.split(",") if t.strip()]

    def write_json():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(layers=layers, calib=args.calib, eval=args.eval, seq=args.seq,
                               threads=args.threads, results=results), f, indent=1)

    for token in tokens:
        res = run(token, base, loop, evaluate, validate)
        results.append(res)
        print(fmt(res), flush=True)
        write_json()
    if args.repeat > 1:
        repeat_times(results, base, loop, args.repeat)
        write_json()
    print_ratios(results)
    return 0


def repeat_times(results: list[dict], base, loop, repeat: int) -> None:
    """``repeat - 1`` more quantize runs of every row, the rows taking turns (the machine's slow
    spells fall on all of them alike); each row's quantize time becomes the median of its runs."""
    rows = [r for r in results if not r["error"] and r["quant_s"] is not None]
    for r in rows:
        r["quant_runs"] = [r["quant_s"]]
    for _ in range(repeat - 1):
        for r in rows:
            lib, preset, options = parse_run(r["run"])
            model, secs, _ = quantize_once(lib, preset, options, base, loop)
            del model
            r["quant_runs"].append(secs)
    print(f"\nquantize seconds over {repeat} interleaved runs (median, min-max):")
    for r in rows:
        r["quant_s"] = statistics.median(r["quant_runs"])
        print(f"  {r['run']}: {r['quant_s']:.2f} ({min(r['quant_runs']):.2f}-{max(r['quant_runs']):.2f})", flush=True)


def print_ratios(results: list[dict]) -> None:
    """qpass / ModelOpt for every preset (with the same options) both ran without error."""
    by = {(r["run"].split(":", 1)[0], r["run"].split(":", 1)[-1]): r for r in results if not r["error"]}
    rows = [(key, by[("qpass", key)], by[("modelopt", key)]) for lib, key in by if lib == "qpass" and ("modelopt", key) in by]
    if not rows:
        return
    print("\n| preset | qpass ppl | modelopt ppl | qpass quantize s | modelopt quantize s | time ratio |\n|---|---|---|---|---|---|")
    for key, q, m in rows:
        print(f"| {key} | {q['ppl']:.3f} | {m['ppl']:.3f} | {q['quant_s']:.1f} | {m['quant_s']:.1f} | "
              f"{q['quant_s'] / m['quant_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
