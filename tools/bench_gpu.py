"""``tools/bench.py --gpu``: CUDA timings of qpass and ModelOpt on a SmolLM2-shaped bf16 Llama.

Random weights (no download): hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads,
vocab 49152. Forward timings use CUDA events on an 8x512 input: ``--warmup`` untimed forwards,
then the median of ``--iters`` timed ones. Rows:

* bf16 eager: the plain model;
* qpass unquantized graph: qpass's captured graph with every quantizer disabled;
* qpass / modelopt CONFIG: the fake-quantized forward.

qpass rows replay CUDA graphs after the warm-up (its default for inference forwards on CUDA, see
qpass.graph.cuda_graphs); the "no CUDA graphs" column times the same model with them off.

Quantize+calibrate is timed (CUDA events around the whole call, after a synchronize) over 16
batches of 4x512, against a plain bf16 pass over the same 16 batches.
ModelOpt's CUDA extensions are built/loaded once before any timing (a one-time install cost).
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import time

import bench_common as bc
import torch

DEFAULT_GPU_CONFIGS = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"]
ALL_OFF_CFG = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None}
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3)
CALIB_BATCHES, CALIB_BATCH, SEQ, EVAL_BATCH = 16, 4, 512, 8
# --gpu-dry-run: the same code path on the CPU, tiny, to check the script without a GPU (timings meaningless)
DRY = dict(layers=2, calib_batches=2, seq=32)
DEVICE = "cuda"


def build_model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=100000.0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def _sync_time(fn) -> float:
    """Seconds of ``fn()`` measured with CUDA events (host work included: we synchronize first)."""
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


@torch.no_grad()
def forward_ms(model, x, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        model(input_ids=x, use_cache=False)
    times = [_sync_time(lambda: model(input_ids=x, use_cache=False)) * 1000.0 for _ in range(iters)]
    return statistics.median(times)


@torch.no_grad()
def profile_forward(model, x, top: int = 12) -> str:
    """One forward under torch.profiler: the ops that take the most device time and host time,
    with their call counts (what a fake-quantized forward spends beyond the unquantized one)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=acts) as prof:
        model(input_ids=x, use_cache=False)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    ev = prof.key_averages()
    out = []
    if DEVICE == "cuda":
        out.append(ev.table(sort_by="self_cuda_time_total", row_limit=top))
    out.append(ev.table(sort_by="self_cpu_time_total", row_limit=top))
    return "\n".join(out)


def _quantize_without_cuda_graphs(base, cfg, loop, extra) -> float:
    """Seconds of quantize+calibrate of a fresh copy with CUDA-graph replay off (QPASS_CUDA_GRAPHS=0)."""
    import os
    from unittest import mock

    import qpass

    model = copy.deepcopy(base)
    with mock.patch.dict(os.environ, {"QPASS_CUDA_GRAPHS": "0"}), bc.quiet():
        return _sync_time(lambda: qpass.quantize(model, copy.deepcopy(cfg), loop, **(extra or {})))


@torch.no_grad()
def split_forward(model, x, args) -> str:
    """Forward time with only the input quantizers, then only the weight quantizers enabled, and
    the host's share of one forward (time to enqueue it, before the closing synchronize)."""
    import qpass

    lines = []
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(input_ids=x, use_cache=False)
    host = time.perf_counter() - t0
    total = _sync_time(lambda: model(input_ids=x, use_cache=False))
    lines.append(f"host enqueue {1e3 * host:.2f} ms of a {1e3 * total:.2f} ms forward")
    for keep, off in (("input quantizers only", "*weight_quantizer"), ("weight quantizers only", "*input_quantizer")):
        with bc.quiet():
            qpass.disable_quantizer(model, off)
        lines.append(f"{keep}: {forward_ms(model, x, args.warmup, args.iters):.2f} ms")
        with bc.quiet():
            qpass.enable_quantizer(model, off)
    return "\n".join(lines)


def profile_quantize(base, cfg, loop, extra, top: int = 25) -> str:
    """cProfile of one more quantize+calibrate of a fresh copy (the host's view of where it goes)."""
    import cProfile
    import io
    import pstats

    import qpass

    model = copy.deepcopy(base)
    prof = cProfile.Profile()
    with bc.quiet():
        prof.enable()
        qpass.quantize(model, copy.deepcopy(cfg), loop, **(extra or {}))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    del model
    return "quantize+calibrate under cProfile (cumulative):\n" + "\n".join(buf.getvalue().splitlines()[:top + 12])


def _measure(lib: str, base, cfg, loop, x, args, extra: dict | None = None) -> dict:
    """Quantize a copy of ``base`` with ``lib``, time it and its forward; never raises."""
    res = dict(quant_s=None, forward_ms=None, error=None, warnings=[])
    model = copy.deepcopy(base)
    try:
        if lib == "qpass":
            import qpass

            with bc.quiet(res["warnings"]):
                res["quant_s"] = _sync_time(lambda: qpass.quantize(model, cfg, loop, **(extra or {})))
        else:
            mtq = bc.import_modelopt()
            with bc.quiet():
                res["quant_s"] = _sync_time(lambda: mtq.quantize(model, cfg, loop))
        with bc.quiet(res["warnings"] if lib == "qpass" else None):
            res["forward_ms"] = forward_ms(model, x, args.warmup, args.iters)
            if lib == "qpass":
                # the same model with CUDA-graph replay off: what the host costs without it
                import qpass

                from qpass.graph.quantized_model import state_of

                graphs = state_of(model).cuda_graphs
                res["cuda_graph_replays"], res["cuda_graph_refused"] = graphs.replays, list(graphs.refused.values())
                qpass.set_cuda_graphs(model, False)
                res["forward_ms_no_cuda_graphs"] = forward_ms(model, x, args.warmup, args.iters)
                res["quant_s_no_cuda_graphs"] = _quantize_without_cuda_graphs(base, cfg, loop, extra)
            if getattr(args, "profile", False):
                res["profile"] = profile_forward(model, x)
                if lib == "qpass":
                    res["profile"] += "\n" + split_forward(model, x, args) + "\n" + profile_quantize(base, cfg, loop, extra)
    except Exception as e:  # noqa: BLE001 - one cell, never the whole table
        res["error"] = bc.short_reason(e, 40)
        res["traceback"] = bc.format_tb(e)
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


def run_gpu(args) -> int:
    global DEVICE, CALIB_BATCHES, SEQ
    shape = dict(SHAPE)
    if args.gpu_dry_run:
        DEVICE, CALIB_BATCHES, SEQ = "cpu", DRY["calib_batches"], DRY["seq"]
        shape["num_hidden_layers"] = DRY["layers"]
        args.warmup, args.iters = 1, 2
        print(f"--gpu-dry-run: the --gpu code path on the CPU, {DRY} (timings meaningless)")
    elif not torch.cuda.is_available():
        print(f"bench --gpu: CUDA is not available here (torch {torch.__version__}, "
              f"torch.version.cuda={torch.version.cuda}); run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch.")
        return 2
    import qpass

    configs = [bc.parse_config(c) for c in args.configs.split(",") if c.strip()]
    mtq = None if args.no_modelopt else bc.import_modelopt()
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"qpass bench --gpu  device {dev}  qpass {qpass.__version__}  "
          f"modelopt {bc.modelopt_version() if mtq else 'off'}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  model: random bf16 LlamaForCausalLM {shape}")
    print(f"  forward: input {EVAL_BATCH}x{SEQ}, {args.warmup} warm-up + median of {args.iters} "
          f"({'CUDA events' if DEVICE == 'cuda' else 'perf_counter'})")
    print(f"  quantize+calibrate: {CALIB_BATCHES} batches of {CALIB_BATCH}x{SEQ} vs a plain bf16 pass over them")
    if mtq is None and not args.no_modelopt:
        print(f"  modelopt unavailable ({bc.modelopt_missing_reason()}): qpass rows only")
    if mtq is not None and DEVICE == "cuda":
        t0 = time.perf_counter()
        try:
            with bc.quiet():
                from modelopt.torch.quantization import extensions

                extensions.precompile()
            print(f"  modelopt CUDA extensions built/loaded in {time.perf_counter() - t0:.1f} s (not timed below)")
        except Exception as e:  # noqa: BLE001 - modelopt falls back to its torch paths
            print(f"  modelopt CUDA extensions unavailable ({bc.first_line(e)[:80]}); its torch fallbacks run")
    print(flush=True)

    base = build_model(shape)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    vocab = shape["vocab_size"]
    x = torch.randint(0, vocab, (EVAL_BATCH, SEQ), device=DEVICE, generator=gen)
    calib = [torch.randint(0, vocab, (CALIB_BATCH, SEQ), device=DEVICE, generator=gen)
             for _ in range(CALIB_BATCHES)]

    @torch.no_grad()
    def loop(m):
        for b in calib:
            m(input_ids=b, use_cache=False)

    eager_ms = forward_ms(base, x, args.warmup, args.iters)
    loop(base)  # warm-up of the plain pass
    plain_s = statistics.median(_sync_time(lambda: loop(base)) for _ in range(3))
    print(f"bf16 eager forward {eager_ms:.2f} ms; plain bf16 pass over the calibration batches {plain_s:.3f} s",
          flush=True)

    rows = [dict(name="bf16 eager", lib="torch", forward_ms=eager_ms, quant_s=plain_s, error=None)]
    r = _measure("qpass", base, copy.deepcopy(ALL_OFF_CFG), loop, x, args)
    rows.append(dict(name="qpass unquantized graph", lib="qpass", **r))
    _progress(rows[-1], eager_ms, plain_s)
    for cfg_name, rules in configs:
        label = bc.config_label(cfg_name, rules)
        cfg = copy.deepcopy(getattr(qpass, cfg_name, None))
        if cfg is None:
            rows.append(dict(name=f"qpass {label}", lib="qpass", forward_ms=None, quant_s=None,
                             error="unknown preset", warnings=[]))
        else:
            r = _measure("qpass", base, cfg, loop, x, args, dict(rules=rules))
            rows.append(dict(name=f"qpass {label}", lib="qpass", **r))
        _progress(rows[-1], eager_ms, plain_s)
        if mtq is not None and rules == "default":
            r = _measure("modelopt", base, copy.deepcopy(getattr(mtq, cfg_name)), loop, x, args)
            rows.append(dict(name=f"modelopt {label}", lib="modelopt", **r))
            _progress(rows[-1], eager_ms, plain_s)

    print()
    print(render_gpu(rows, eager_ms, plain_s))
    from qpass.formats import triton_kernels

    if triton_kernels._STATE:
        used = ", ".join(f"{k[0]} {str(k[1]).replace('torch.', '')}: {'verified, used' if v else 'differs, off'}"
                         for k, v in triton_kernels._STATE.items())
        print(f"Triton fake-quant kernels (checked against the torch path on first use): {used}")
    else:
        print("Triton fake-quant kernels: not used (no Triton, not CUDA, or QPASS_TRITON=0)")
    for row in rows:
        for w in row.get("warnings") or []:
            print(f"{row['name']}: warning: {w[:300]}")
        if row.get("profile"):
            print(f"\n{row['name']}: profile of one forward\n{row['profile']}")
        if row.get("traceback") and row["lib"] == "qpass":
            print(f"\n{row['name']} failed:\n{row['traceback']}")
        elif row.get("traceback"):
            print(f"{row['name']}: n/a: {row['traceback'].splitlines()[-1][:200]}")
    if args.json:
        doc = dict(mode="gpu", device=dev, model=shape, seq=SEQ, calib_batches=CALIB_BATCHES, eager_forward_ms=eager_ms, plain_calib_pass_s=plain_s,
                   warmup=args.warmup, iters=args.iters,
                   rows=[{k: v for k, v in r.items() if k not in ("traceback", "profile")} for r in rows])
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _progress(row: dict, eager_ms: float, plain_s: float) -> None:
    if row["error"]:
        print(f"  {row['name']:<40} {'n/a' if row['lib'] == 'modelopt' else 'error'} ({row['error']})", flush=True)
    else:
        nog, qnog = row.get("forward_ms_no_cuda_graphs"), row.get("quant_s_no_cuda_graphs")
        extra = f" [no CUDA graphs {nog:.2f} ms ({nog / eager_ms:.2f}x)]" if nog else ""
        qextra = f" [no CUDA graphs {qnog:.3f} s ({qnog / plain_s:.2f}x)]" if qnog else ""
        print(f"  {row['name']:<40} forward {row['forward_ms']:.2f} ms ({row['forward_ms'] / eager_ms:.2f}x){extra}  "
              f"quantize+calibrate {row['quant_s']:.3f} s ({row['quant_s'] / plain_s:.2f}x){qextra}", flush=True)
        if row.get("cuda_graph_refused"):
            print(f"    CUDA graphs refused: {row['cuda_graph_refused']}", flush=True)


def render_gpu(rows: list[dict], eager_ms: float, plain_s: float) -> str:
    headers = ["what", "forward ms", "vs bf16 eager", "no CUDA graphs ms", "vs bf16 eager", "quant+calib s", "vs bf16 pass"]
    out = []
    for r in rows:
        if r["error"]:
            out.append([r["name"], f"{'n/a' if r['lib'] == 'modelopt' else 'error'} ({r['error']})", "-", "-", "-", "-", "-"])
            continue
        nog = r.get("forward_ms_no_cuda_graphs")
        out.append([r["name"], bc.fmt_num(r["forward_ms"], 2), bc.fmt_ratio(r["forward_ms"], eager_ms),
                    bc.fmt_num(nog, 2) if nog else "-", bc.fmt_ratio(nog, eager_ms) if nog else "-",
                    bc.fmt_num(r["quant_s"], 3), bc.fmt_ratio(r["quant_s"], plain_s)])
    return bc.format_table(headers, out, right={1, 2, 3, 4, 5, 6})
