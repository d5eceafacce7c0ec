"""GPTQ and real_quantize on SmolLM2-135M, qpass vs ModelOpt, measured in one run.

    python tools/bench_gptq_realq.py [--layers N] [--part gptq,realq] [--runs fp32,max,gptq,gptq-in-order,modelopt,layerwise]
                                     [--realq-windows 4] [--no-modelopt] [--json out.json]

GPTQ part: held-out perplexity and quantize+calibrate time of INT4 block-128 weight-only
(INT4_BLOCKWISE_WEIGHT_ONLY_CFG) with plain max, with qpass's GPTQ (one pass, act-order; in
ModelOpt's channel order, ``gptq-in-order``; per decoder layer, ``layerwise``) and with ModelOpt's
GPTQ, on the data of tools/bench_algorithms.py:
``--calib`` windows (16) of ``--seq`` tokens (256) from the start of pydoc text, 4 windows
per forward_loop call, ``--eval`` windows (16) from its held-out end.

real_quantize part: per preset, the bytes the Linear layers hold for their weights (every
parameter and buffer of the Linear and its weight quantizer, by storage) before and after
``{"method": "real_quantize", "additional_algorithm": <the preset's>}``, and whether the
packed model's logits equal the fake-quantized model's bit for bit.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (quiet, offline env vars before transformers)

import torch  # noqa: E402
from torch import nn  # noqa: E402

GPTQ_RUNS = {
    "fp32": ("fp32", None, None),
    "max": ("INT4 max (RTN)", "qpass", "max"),
    "gptq": ("INT4 with GPTQ", "qpass", {"method": "gptq"}),
    "gptq-in-order": ("INT4 with GPTQ, act_order=False (ModelOpt's order)", "qpass", {"method": "gptq", "act_order": False}),
    "modelopt": ("INT4 with GPTQ (ModelOpt)", "modelopt", {"method": "gptq"}),
    "layerwise": ("INT4 with GPTQ, layerwise", "qpass", {"method": "gptq", "layerwise": {"enable": True}}),
}
REALQ_PRESETS = ["INT8_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
                 "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG", "MXFP4_DEFAULT_CFG"]


def _config(lib, preset, algorithm):
    mod = bc.import_modelopt() if lib == "modelopt" else __import__("qpass")
    cfg = copy.deepcopy(getattr(mod, preset))
    cfg["algorithm"] = algorithm
    return cfg


def gptq_part(base, loop, evaluate, use_modelopt: bool, runs: list[str], out: list) -> None:
    print("| run | ppl | quantize+calibrate s | forward_loop calls |\n|---|---|---|---|", flush=True)
    for label, lib, algo in (GPTQ_RUNS[r] for r in runs):
        if lib == "modelopt" and not use_modelopt:
            continue
        res = {"run": label, "lib": lib, "algorithm": algo}
        model = copy.deepcopy(base)
        calls = [0]

        def counting(m):
            calls[0] += 1
            loop(m)

        try:
            if lib is not None:
                cfg = _config(lib, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", algo)
                quantize = bc.import_modelopt().quantize if lib == "modelopt" else __import__("qpass").quantize
                with bc.quiet():
                    t0 = time.perf_counter()
                    quantize(model, cfg, counting)
                    res["quant_s"] = time.perf_counter() - t0
            with bc.quiet():
                res["ppl"] = float(evaluate(model))
        except Exception as e:  # noqa: BLE001 - one row, never the whole table
            res["error"] = f"{type(e).__name__}: {bc.first_line(e)}"
        res["calls"] = calls[0]
        out.append(res)
        if "error" in res:
            print(f"| {label} | error: {res['error']} | | |", flush=True)
        else:
            print(f"| {label} | {res['ppl']:.3f} | {bc.fmt_num(res.get('quant_s'), 1)} | {calls[0]} |", flush=True)
        del model
        gc.collect()
    by = {r["run"]: r for r in out}
    ours, theirs = by.get("INT4 with GPTQ"), by.get("INT4 with GPTQ (ModelOpt)")
    if ours and theirs and "quant_s" in ours and "quant_s" in theirs:
        print(f"qpass/ModelOpt quantize+calibrate time: {bc.fmt_ratio(ours['quant_s'], theirs['quant_s'])}; "
              f"ppl {ours['ppl']:.3f} vs {theirs['ppl']:.3f}", flush=True)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def linear_bytes(model) -> int:
    """Bytes held by every Linear with an enabled (or packed) weight quantizer, quantizer state included."""
    tensors = []
    for _, m in model.named_modules():
        q = m._modules.get("weight_quantizer") if isinstance(m, nn.Linear) else None
        if q is None or not q.is_enabled:
            continue
        tensors += [m.weight] + list(q.buffers())
    return _storage_bytes(tensors)


def realq_part(base, loop, evals, out: list) -> None:
    """``evals``: the windows whose logits are compared (and timed)."""
    import qpass

    print("\n| preset + real_quantize | Linear bytes before | after | after/before | logits bit-identical "
          "| eval s fake | eval s packed |\n|---|---|---|---|---|---|---|", flush=True)
    for preset in REALQ_PRESETS:
        res = {"preset": preset}
        try:
            fake = copy.deepcopy(base)
            with bc.quiet():
                qpass.quantize(fake, preset, loop)
            packed = copy.deepcopy(base)
            cfg = copy.deepcopy(getattr(qpass, preset))
            cfg["algorithm"] = {"method": "real_quantize", "additional_algorithm": cfg.get("algorithm")}
            with bc.quiet():
                qpass.quantize(packed, cfg, loop)
            res["before"] = linear_bytes(fake)
            res["after"] = linear_bytes(packed)
            with torch.no_grad(), bc.quiet():
                t0 = time.perf_counter()
                a = fake(input_ids=evals, use_cache=False).logits
                res["eval_fake_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                b = packed(input_ids=evals, use_cache=False).logits
                res["eval_packed_s"] = time.perf_counter() - t0
            res["identical"] = bool(torch.equal(a, b))
            print(f"| {preset} | {res['before']:,} | {res['after']:,} | {res['after'] / res['before']:.4f} | "
                  f"{res['identical']} | {res['eval_fake_s']:.2f} | {res['eval_packed_s']:.2f} |", flush=True)
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {bc.first_line(e)}"
            print(f"| {preset} | error: {res['error']} | | | | | |", flush=True)
        out.append(res)
        gc.collect()


def main(argv=None) -> int:
    p = bc.smollm2_parser(__doc__)
    p.add_argument("--part", default="gptq,realq")
    p.add_argument("--runs", default=",".join(GPTQ_RUNS), help=f"GPTQ part rows, of {','.join(GPTQ_RUNS)}")
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--realq-windows", type=int, default=4, help="eval windows compared in the real_quantize part")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_modelopt = not args.no_modelopt and bc.import_modelopt() is not None
    from qpass import zoo

    base, tok, calib, evals, loop = bc.smollm2_case(args.layers, args.calib, args.eval, args.seq)

    print(f"SmolLM2-135M, {len(base.model.layers)} layers; calib {args.calib}x{args.seq} tokens, eval "
          f"{args.eval}x{args.seq} held-out tokens; torch {torch.__version__}, {args.threads} threads, "
          f"modelopt {bc.modelopt_version() if use_modelopt else 'not used'}", flush=True)
    results = {"gptq": [], "realq": []}
    parts = args.part.split(",")
    if "gptq" in parts:
        gptq_part(base, loop, lambda m: zoo.perplexity(m, evals), use_modelopt, args.runs.split(","),
                  results["gptq"])
    if "realq" in parts:
        realq_part(base, loop, evals[:args.realq_windows], results["realq"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
