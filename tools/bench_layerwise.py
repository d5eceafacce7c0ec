"""Whole-model vs. layer-by-layer calibration on SmolLM2-135M: peak memory, time, identical result.

    python tools/bench_layerwise.py                      # CPU: peak live tensors + RSS high-water
    python tools/bench_layerwise.py --gpu                # CUDA: torch.cuda.max_memory_allocated
    python tools/bench_layerwise.py --layers 4 --batches 4 --config INT4_AWQ_CFG
    python tools/bench_layerwise.py --gpu --random-weights   # no model package (the GPU machine)

Each mode runs in its own child process (same model, config and data), so one mode's
allocations cannot hide in the other's high-water mark. The model is traced first
(``quantize`` on an example batch: the same fixed cost in both modes); the time and memory
shown are ``calibrate``'s. CPU: the model lives in host memory in both modes, and memory is
counted twice: the peak bytes of live tensors allocated during the calibration
(``tools/tensor_memory.py``, the torch analogue of tracemalloc, which does not see torch's
allocations) and the RSS high-water mark above the RSS before it (``VmHWM`` from
``/proc/self/status`` after a reset through ``/proc/self/clear_refs``; it also shows what the
C allocator kept from earlier work, so it is the coarser of the two).
GPU: whole-model calibration has the model on the GPU; layerwise keeps it on the CPU, feeds
CUDA batches and moves one block at a time; the number is the peak GPU memory allocated
during the calibration, weights included. Both modes' quantized state (every amax,
pre_quant_scale and weight) is hashed and compared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import format_table, quiet  # noqa: E402  (sets the offline env first)
from tensor_memory import TensorMemory  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _state_digest(model) -> dict:
    import torch

    out = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous().view(-1)
        out[k] = hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else ""
    return out


def _random_smollm2(layers):
    """SmolLM2-135M's architecture and FP32 dtype with random weights (for machines without the
    model package: memory and time depend on the shapes alone)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval()


def child(args) -> dict:
    import torch

    import qpass
    from qpass import zoo

    torch.set_num_threads(args.threads)
    if args.random_weights:
        model = _random_smollm2(args.layers)
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(0, model.config.vocab_size, (args.batches * args.batch_size, args.seq_len), generator=g)
    else:
        with quiet():
            model, tok = zoo.load_smollm2(args.layers)
        zoo._SMOLLM2_CACHE.clear()  # keep one copy of the weights in this process
        windows = zoo.token_windows(tok, zoo.text_split().calib, args.batches * args.batch_size, args.seq_len)
    batches = list(windows.split(args.batch_size))
    cfg = copy.deepcopy(qpass.config.get_preset(args.config))
    algorithm = cfg["algorithm"]
    algorithm = {"method": algorithm} if isinstance(algorithm, str) else dict(algorithm)
    algorithm["layerwise"] = {"enable": args.mode == "layerwise"}
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and args.mode == "whole":
        model.cuda()

    def loop(m):
        for b in batches:
            m(input_ids=b.to(device))  # outputs discarded: a list of 8 logits would dominate whole-model memory
    # Trace and place the quantizers first (the same fixed cost in both modes), so the numbers
    # below are the calibration's alone; the max calibration drops the fake-quantized weight
    # copies the example forward cached (they would sit on the GPU in whole-model mode).
    cfg["algorithm"] = None
    with quiet():
        qpass.quantize(model, cfg, example_inputs={"input_ids": batches[0].to(next(model.parameters()).device)})
        qpass.calibrate(model, {"method": "max", "layerwise": algorithm["layerwise"]},
                        lambda m: m(input_ids=batches[0].to(device)))
    result = {"mode": args.mode, "device": device}
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["base_mib"] = torch.cuda.memory_allocated() / 2**20
    else:
        import gc

        gc.collect()
        result["base_mib"] = _status_kib("VmRSS") / 1024
        result["hwm_reset"] = _reset_high_water()
    tracker = TensorMemory() if not args.gpu else contextlib.nullcontext()
    t0 = time.perf_counter()
    with quiet(), tracker:
        qpass.calibrate(model, algorithm, loop)
    if args.gpu:
        torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - t0
    if args.gpu:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20  # weights included
        result["name"] = torch.cuda.get_device_name()
    else:
        result["peak_mib"] = tracker.peak / 2**20
        result["rss_mib"] = _status_kib("VmHWM") / 1024 - (result["base_mib"] if result["hwm_reset"] else 0.0)
    result["digest"] = _state_digest(model)
    return result


def run_mode(args, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--layers", str(args.layers or 0),
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--config", args.config, "--threads", str(args.threads)] + (["--gpu"] if args.gpu else []) \
        + (["--random-weights"] if args.random_weights else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_layerwise: the {mode} child failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="INT8_DEFAULT_CFG")
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default: all 30)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2's architecture with random weights and random tokens (no model package needed)")
    p.add_argument("--child", choices=["whole", "layerwise"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layers == 0:
        args.layers = None
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    whole, lw = run_mode(args, "whole"), run_mode(args, "layerwise")
    same = whole["digest"] == lw["digest"]
    differ = [k for k in whole["digest"] if whole["digest"][k] != lw["digest"].get(k)]
    what = "GPU peak allocated MiB (weights incl.)" if args.gpu else "peak live tensors MiB"
    headers = ["mode", "calibrate s", what] + ([] if args.gpu else ["RSS high-water MiB"])
    rows = [[r["mode"], f"{r['seconds']:.1f}", f"{r['peak_mib']:.1f}"] + ([] if args.gpu else [f"{r['rss_mib']:.1f}"])
            for r in (whole, lw)]
    ratio = lambda key: f"{lw[key] / whole[key]:.2f}x" if whole[key] > 0 else "-"  # noqa: E731
    rows.append(["layerwise / whole", ratio("seconds"), ratio("peak_mib")] + ([] if args.gpu else [ratio("rss_mib")]))
    device = whole.get("name", "CPU") if args.gpu else f"CPU, {args.threads} thread(s)"
    print(f"SmolLM2-135M{' architecture, random weights,' if args.random_weights else ''} ({args.layers or 30} layers), {args.config}, {args.batches} batches of "
          f"{args.batch_size}x{args.seq_len} tokens, {device}")
    print(format_table(headers, rows, right={1, 2, 3}))
    if not args.gpu:
        print("peak live tensors: bytes of tensors allocated during calibrate() and alive at once "
              "(tools/tensor_memory.py); RSS high-water: above the RSS before calibrate() "
              + ("" if whole["hwm_reset"] and lw["hwm_reset"] else "(absolute: /proc/self/clear_refs not writable) ")
              + "(includes what the C allocator keeps from earlier work)")
    print(f"identical quantized state (every amax, pre_quant_scale, weight): "
          f"{'yes' if same else 'NO'} ({len(whole['digest'])} tensors{', differ: ' + ', '.join(differ[:5]) if differ else ''})")
    if args.gpu:
        verdict = "meets" if lw["peak_mib"] < 0.25 * whole["peak_mib"] else "misses"
        print(f"GPU peak of layerwise is {lw['peak_mib'] / whole['peak_mib']:.1%} of whole-model ({verdict} the < 25% target)")


if __name__ == "__main__":
    main()
