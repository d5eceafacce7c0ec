"""auto_quantize on SmolLM2-135M: held-out perplexity, achieved bits and wall time, qpass vs ModelOpt.

    python tools/bench.py --auto-quantize [--layers 8] [--bits 4.8] [--libs qpass,modelopt] [--sets 0,1]
        [--sweep 4.5,5,5.5,6,6.5,7,7.5,8 --sweep-png sweep.png] [--json out.json]

Data: ``--batches`` (default 4) calibration = score batches of 4 x ``--seq`` (256) tokens from the
start of Python's pydoc text; loss = causal-LM cross-entropy; evaluation: ``--eval`` windows
from the held-out end. Format sets: ["W4A8_AWQ_BETA_CFG", "FP8_DEFAULT_CFG", None] and
["INT4_AWQ_CFG", "FP8_DEFAULT_CFG", None]. A budget below a library's minimum is reported and
raised to that minimum. Times: wall and process CPU seconds of the search call alone (the CPU time
is the fairer ratio on a shared machine). ``--sweep 4.5,5,...,8`` re-solves qpass's one scoring pass
of the first format set per budget, plots perplexity vs achieved bits (``--sweep-png``) and exits 1
when the perplexity does not fall as the budget grows (beyond 1% noise). Not a test.
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
    """The effective bits of the chosen recipe (ModelOpt keeps it in best['constraints'])."""
    if lib == "qpass":
        return sd["best"]["effective_bits"]
    return float(sd["best"]["constraints"]["effective_bits"])


def sweep(model, sd, bits, evaluate, png):
    """Re-solve qpass's one scoring pass for each budget; perplexity must fall as bits grow (1% noise)."""
    from qpass.auto_quantize import auto_quantize_sweep

    rows = auto_quantize_sweep(model, sd, bits, evaluate, png)
    bad = [(a, b) for a, b in zip(rows, rows[1:]) if b[2] > a[2] * 1.01]
    for req, got, ppl in rows:
        print(f"  sweep: budget {req:.2f} -> achieved {got:.3f} bits, ppl {ppl:.3f}", flush=True)
    print(f"  sweep plot: {png}; perplexity falls as the budget grows (within 1%): {not bad}"
          + "".join(f"; rises {a[1]:.3f}->{b[1]:.3f} bits: {a[2]:.3f}->{b[2]:.3f}" for a, b in bad), flush=True)
    return dict(points=[dict(budget=r[0], achieved=r[1], ppl=r[2]) for r in rows], monotone=not bad, png=png)


def one(lib, base, formats, bits, data, evaluate, sweep_bits=None, sweep_png=None):
    model = copy.deepcopy(base)
    gc.collect()
    runner = run_qpass if lib == "qpass" else run_modelopt
    t, c = time.perf_counter(), time.process_time()
    note = ""
    try:
        (model, sd), used = runner(model, formats, bits, data)
    except Infeasible as e:
        note = f"{bits} infeasible; minimum {e.minimum}"
        model = copy.deepcopy(base)
        t, c = time.perf_counter(), time.process_time()
        (model, sd), used = runner(model, formats, e.minimum + 1e-6, data)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    ppl = evaluate(model)
    recipe = sd["best"]["recipe"] if lib == "qpass" else sd.get("best", {}).get("recipe")
    counts = {}
    for v in (recipe or {}).values():
        v = str(v)
        counts[v] = counts.get(v, 0) + 1
    row = dict(lib=lib, formats=[str(f) for f in formats], budget=used, achieved=achieved_bits(lib, sd),
               ppl=ppl, wall_s=wall, cpu_s=cpu, note=note, recipe_counts=counts)
    print(json.dumps(row), flush=True)
    if lib == "qpass" and sweep_bits:
        row["sweep"] = sweep(model, sd, sweep_bits, evaluate, sweep_png)
    return row


def print_table(rows):
    fp32 = rows[0]["ppl"]
    print(f"\n{'formats':44} {'lib':9} {'ppl':>8} {'xFP32':>6} {'bits':>6} {'wall s':>7} {'cpu s':>7}")
    for r in rows[1:]:
        if "error" in r:
            print(f"{','.join(r['formats']):44} {r['lib']:9} {r['error']}")
            continue
        print(f"{','.join(r['formats']):44} {r['lib']:9} {r['ppl']:8.3f} {r['ppl'] / fp32:6.2f} "
              f"{r['achieved']:6.3f} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['note']}")
    for fm in {tuple(r["formats"]) for r in rows[1:]}:
        q = [r for r in rows if r.get("lib") == "qpass" and tuple(r["formats"]) == fm and "error" not in r]
        m = [r for r in rows if r.get("lib") == "modelopt" and tuple(r["formats"]) == fm and "error" not in r]
        if q and m:
            q, m = q[0], m[0]
            print(f"{','.join(fm)}: qpass/modelopt ppl {q['ppl'] / m['ppl']:.3f}, wall {q['wall_s'] / m['wall_s']:.2f}x, "
                  f"cpu {q['cpu_s'] / m['cpu_s']:.2f}x; qpass bits within budget: {q['achieved'] <= q['budget'] + 1e-9}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2 decoder layers kept (30: the whole model)")
    ap.add_argument("--bits", type=float, default=4.8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--libs", default="qpass,modelopt")
    ap.add_argument("--sets", default="0,1")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", default="", help="comma-separated budgets, e.g. 4.5,5,5.5,6,6.5,7,7.5,8: "
                    "re-solve qpass's first format set for each and plot perplexity vs bits")
    ap.add_argument("--sweep-png", default="auto_quantize_sweep.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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
    sweep_bits = [float(b) for b in args.sweep.split(",") if b.strip()]
    for k, s in enumerate(args.sets.split(",")):
        formats = FORMAT_SETS[int(s)]
        for lib in args.libs.split(","):
            try:
                row = one(lib, base, formats, args.bits, data, evaluate, sweep_bits if k == 0 else None,
                          os.path.abspath(args.sweep_png))
            except Exception as e:  # noqa: BLE001 - report and continue
                row = dict(lib=lib, formats=[str(f) for f in formats], error=f"{type(e).__name__}: {bc.first_line(e)}")
                print(json.dumps(row), flush=True)
            rows.append(row)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if any(not r["sweep"]["monotone"] for r in rows if "sweep" in r):
        sys.exit("FAIL: the perplexity-vs-bits sweep does not fall as the budget grows (beyond 1% noise)")


if __name__ == "__main__":
    main()
