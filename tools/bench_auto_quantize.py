"""auto_quantize on SmolLM2-135M: held-out perplexity, achieved bits and wall time, qpass vs ModelOpt.

    python tools/bench_auto_quantize.py [--layers 8] [--bits 4.8] [--libs qpass,modelopt] [--json out.json]

Data: ``--batches`` (default 4) calibration = score batches of 4 x ``--seq`` (256) tokens from the
start of Python's pydoc text; loss = causal-LM cross-entropy; evaluation: ``--eval`` windows
from the held-out end. Format sets: ["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None] and
["INT4_AWQ_CFG", "FP8_DEFAULT_CFG", None]. A budget below a library's minimum is reported and
raised to that minimum. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FORMAT_SETS = [["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None], ["INT4_AWQ_CFG", "FP8_DEFAULT_CFG", None]]


def forward_step(model, batch):
    return model(input_ids=batch, use_cache=False)


def loss_func(out, batch):
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def run_qpass(model, formats, bits, data):
    import qpass
    from qpass.auto_quantize import AutoQuantizeError

    try:
        return qpass.auto_quantize(model, {"effective_bits": bits}, formats, data, forward_step, loss_func,
                                   num_calib_steps=len(data), num_score_steps=len(data)), bits
    except AutoQuantizeError as e:
        m = re.search(r"'effective_bits': ([0-9.]+)", str(e))
        if not m:
            raise
        raise Infeasible(float(m.group(1)), str(e)) from None


class Infeasible(Exception):
    def __init__(self, minimum, msg):
        super().__init__(msg)
        self.minimum = minimum


def run_modelopt(model, formats, bits, data):
    mtq = bc.import_modelopt()
    with bc.quiet():
        model, sd = mtq.auto_quantize(model, constraints={"effective_bits": bits}, quantization_formats=formats,
                                      data_loader=data, forward_step=forward_step, loss_func=loss_func,
                                      num_calib_steps=len(data), num_score_steps=len(data), verbose=False)
    return (model, sd), bits


def achieved_bits(lib, sd):
    if lib == "qpass":
        return sd["best"]["effective_bits"]
    best = sd.get("best", {}) if isinstance(sd, dict) else {}
    for key in ("effective_bits", "constraints"):
        if isinstance(best.get(key), (int, float)):
            return float(best[key])
    return best.get("effective_bits")


def one(lib, base, formats, bits, data, evaluate):
    model = copy.deepcopy(base)
    gc.collect()
    runner = run_qpass if lib == "qpass" else run_modelopt
    t = time.perf_counter()
    note = ""
    try:
        (model, sd), used = runner(model, formats, bits, data)
    except Infeasible as e:
        note = f"{bits} infeasible; minimum {e.minimum}"
        model = copy.deepcopy(base)
        t = time.perf_counter()
        (model, sd), used = runner(model, formats, e.minimum + 1e-6, data)
    wall = time.perf_counter() - t
    ppl = evaluate(model)
    recipe = sd["best"]["recipe"] if lib == "qpass" else sd.get("best", {}).get("recipe")
    counts = {}
    for v in (recipe or {}).values():
        v = str(v)
        counts[v] = counts.get(v, 0) + 1
    return dict(lib=lib, formats=[str(f) for f in formats], budget=used, achieved=achieved_bits(lib, sd),
                ppl=ppl, wall_s=wall, note=note, recipe_counts=counts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bits", type=float, default=4.8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--libs", default="qpass,modelopt")
    ap.add_argument("--sets", default="0,1")
    ap.add_argument("--json")
    args = ap.parse_args()
    from qpass import zoo

    torch.manual_seed(0)
    base, tok = zoo.load_smollm2(args.layers)
    split = zoo.text_split()
    windows = zoo.token_windows(tok, split.calib, 4 * args.batches, args.seq)
    data = [windows[4 * i: 4 * i + 4] for i in range(args.batches)]
    held = zoo.token_windows(tok, split.held_out, args.eval, args.seq)
    evaluate = lambda m: zoo.perplexity(m, held)  # noqa: E731
    rows = [dict(lib="fp32", formats=[], budget=None, achieved=16.0, ppl=evaluate(base), wall_s=0.0, note="")]
    print(f"SmolLM2-135M, {args.layers} layers, {args.batches} calib/score batches of 4x{args.seq}, "
          f"eval {args.eval}x{args.seq}; fp32 ppl {rows[0]['ppl']:.3f}", flush=True)
    for s in args.sets.split(","):
        formats = FORMAT_SETS[int(s)]
        for lib in args.libs.split(","):
            try:
                row = one(lib, base, formats, args.bits, data, evaluate)
            except Exception as e:  # noqa: BLE001 - report and continue
                row = dict(lib=lib, formats=[str(f) for f in formats], error=f"{type(e).__name__}: {bc.first_line(e)}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
