"""torch.compile(backend="qpass") against compiled FP32 and PT2E's X86InductorQuantizer, one run.

CPU (default): MiniLM (all 6 layers) and SmolLM2-135M (first ``--layers`` layers; ``--layers 0``
is the full 30-layer model) prefill at 1 x ``--seq``, ``--threads`` threads (default one):

* **FP32 compiled**: the FP32 model, ``torch.compile(backend="inductor")`` (default inductor
  settings, no freezing);
* **PT2E**: torchao's PT2E flow with ``X86InductorQuantizer`` (its default static config:
  uint8 asymmetric activations with a histogram observer, int8 per-channel weights) -
  ``torch.export`` -> ``prepare_pt2e`` -> calibration on the same data as qpass ->
  ``convert_pt2e`` -> ``torch.compile`` (inductor) with ``torch._inductor.config.freezing =
  True``, as PT2E's x86 inductor docs require;
* **qpass**: ``qpass.quantize(model, INT8_DEFAULT_CFG)`` calibrated on the same data, then
  ``torch.compile(backend="qpass")`` (oneDNN int8 kernels). INT8_DEFAULT_CFG, like ModelOpt's,
  leaves SmolLM2's ``lm_head`` in FP32 (PT2E quantizes it: a quarter of SmolLM2-135M's linear
  work, half of it at 8 layers); ``--lm-head`` adds a qpass row with ``lm_head`` quantized too.

Latency: the compiled models run interleaved (one call of each per round, the order
rotating) so that load on a shared machine hits them alike; median of ``--runs`` rounds after
``--warmup``. Speedup: FP32 compiled median / median. Accuracy: MiniLM mean cosine of
mean-pooled embeddings to the FP32 model's on held-out text windows; SmolLM2 perplexity on
held-out windows and the mean per-token KL divergence of the next-token distribution from FP32's
(all through the compiled models; a truncated SmolLM2's perplexity is meaningless, its KL is not).

    python tools/bench_compile.py [--models minilm,smollm2] [--layers 8] [--seq 256] [--runs 15] [--lm-head]
    python tools/bench_compile.py --gpu      # H100: SmolLM2-shaped bf16 model, 8 x 512, FP8

PT2E needs torchao (the dev extra; torch 2.13 removed ``torch.ao.quantization.quantize_pt2e``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402
from qpass.export import compile_backend as cb  # noqa: E402

def _interleaved_medians(fns: dict, warmup: int, runs: int, sync=None) -> dict:
    """Median seconds per callable; each round calls every callable once, order rotating."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if sync:
                sync()
            t = time.perf_counter()
            fns[n]()
            if sync:
                sync()
            if r >= warmup:
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pt2e_x86(model, example_kwargs: dict, calib_kwargs: list, dynamic_shapes=None):
    """PT2E with X86InductorQuantizer: export, prepare, calibrate, convert (not yet compiled)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"PT2E baseline needs torchao (pip install torchao==0.18.0): {e}")
    exported = torch.export.export(model, (), example_kwargs, dynamic_shapes=dynamic_shapes).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for kw in calib_kwargs:
            prepared(**kw)
    return convert_pt2e(prepared)


def _compile_all(fp32, pt2e, qmodels: dict, call):
    """The compiled callables (fp32, pt2e, then each qpass model); each compiles on its first
    call (timed)."""
    c_fp32 = torch.compile(fp32, backend="inductor", dynamic=False)
    with torch._inductor.config.patch(freezing=True):
        c_pt2e = torch.compile(pt2e, backend="inductor", dynamic=False)
        t_pt2e = _timed(lambda: call(c_pt2e))
    compiled = {"fp32": c_fp32, "pt2e": c_pt2e}
    res = {"compile_s_fp32": _timed(lambda: call(c_fp32)), "compile_s_pt2e": t_pt2e}
    for name, q in qmodels.items():
        compiled[name] = torch.compile(q, backend="qpass", dynamic=False)
        res[f"compile_s_{name}"] = _timed(lambda: call(compiled[name]))
    return compiled, res


def _latency(compiled: dict, call, args) -> dict:
    fns = {n: (lambda c=c: call(c)) for n, c in compiled.items()}
    med = _interleaved_medians(fns, args.warmup, args.runs)
    out = {f"ms_{n}": 1e3 * med[n] for n in compiled}
    for n in compiled:
        if n != "fp32":
            out[f"speedup_{n}"] = med["fp32"] / med[n]
    return out


def _with_lm_head(cfg: dict) -> dict:
    """INT8_DEFAULT_CFG with lm_head quantized too (W8A8, as PT2E's X86InductorQuantizer does)."""
    cfg = copy.deepcopy(cfg)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": "*lm_head.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*lm_head.input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ]
    return cfg


_EXTRA_LABELS = {"INT8_ASYMMETRIC_CFG": "qpass INT8 asym", "INT8_SMOOTHQUANT_CFG": "qpass INT8 SQ"}


def _extra_configs(qmodels: dict, model, args, loop) -> None:
    """``--qpass-configs``: more qpass rows (other W8A8 presets on the same calibration data).
    ``NAME+mse`` (or ``+percentile``): the input quantizers get ``calibrator: "histogram"`` and
    that method (qpass.calib.histogram.calibrate_histogram), as PT2E's histogram observer."""
    from qpass.calib.histogram import calibrate_histogram

    for token in filter(None, args.qpass_configs.split(",")):
        name, _, method = token.partition("+")
        cfg = copy.deepcopy(qpass.config.get_preset(name))
        if not method:
            qmodels[f"qpass_{token}"] = qpass.quantize(copy.deepcopy(model), cfg, loop)
            continue
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*input_quantizer":
                entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
        cfg["algorithm"] = None
        q = qpass.quantize(copy.deepcopy(model), cfg, None)
        calibrate_histogram(q, loop, method)
        qmodels[f"qpass_{token}"] = q


def bench_minilm(args) -> dict:
    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, 64), batch_size=16)
    calib = [dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in calib]
    windows = zoo.token_windows(tok, split.held_out, args.eval_windows + 1, args.seq)
    fp32 = model
    q = copy.deepcopy(model)
    qpass.quantize(q, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in calib])
    qmodels = {"qpass": q}
    _extra_configs(qmodels, model, args, lambda m: [m(**b) for b in calib])
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    pt2e = pt2e_x86(copy.deepcopy(model), calib[0], calib,
                    dynamic_shapes=dict(input_ids={0: batch, 1: seq}, attention_mask={0: batch, 1: seq}))

    def inputs(i):
        ids = windows[i : i + 1]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    x = inputs(0)
    res = {"model": "MiniLM-L6", "shape": f"1x{args.seq}"}
    with torch.no_grad():
        compiled, times = _compile_all(fp32, pt2e, qmodels, lambda c: c(**x))
        res.update(times)
        res.update(_latency(compiled, lambda c: c(**x), args))
        runs = [("pt2e", compiled["pt2e"])] + [(n, compiled[n]) for n in qmodels] + [("qpass_fake_quant_eager", q)]
        cos = {n: [] for n, _ in runs}
        for i in range(1, args.eval_windows + 1):
            xi = inputs(i)
            ref = zoo.mean_pool(fp32(**xi).last_hidden_state, xi["attention_mask"])
            for n, fn in runs:
                cos[n].append(zoo.mean_cosine(zoo.mean_pool(fn(**xi).last_hidden_state, xi["attention_mask"]), ref))
    for n, v in cos.items():
        res[f"cosine_{n}"] = statistics.mean(v)
    rep = cb.report(q)
    res["lowered"], res["fell_back"] = len(rep.lowered), len(rep.fell_back)
    return res


def bench_smollm2(args) -> dict:
    layers = args.layers or None
    model, tok = zoo.load_smollm2(num_layers=layers)
    split = zoo.text_split()
    calib_ids = zoo.token_windows(tok, split.calib, 8, args.seq)
    calib = [dict(input_ids=calib_ids[i : i + 2]) for i in range(0, 8, 2)]
    windows = zoo.token_windows(tok, split.held_out, args.eval_windows, args.seq)
    fp32 = model
    q = copy.deepcopy(model)
    qpass.quantize(q, qpass.INT8_DEFAULT_CFG, lambda m: [m(**kw) for kw in calib])
    qmodels = {"qpass": q}
    _extra_configs(qmodels, model, args, lambda m: [m(**kw) for kw in calib])
    if args.lm_head:
        qmodels["qpass_lm_head"] = copy.deepcopy(model)
        qpass.quantize(qmodels["qpass_lm_head"], _with_lm_head(qpass.INT8_DEFAULT_CFG),
                       lambda m: [m(**kw) for kw in calib])
    batch = torch.export.Dim("batch", max=64)
    pt2e = pt2e_x86(_NoCache(copy.deepcopy(model)), calib[0], calib, dynamic_shapes=dict(input_ids={0: batch}))
    name = f"SmolLM2-135M ({layers} layers)" if layers else "SmolLM2-135M (30 layers)"
    res = {"model": name, "shape": f"1x{args.seq}"}
    x = windows[:1]
    with torch.no_grad():
        compiled, times = _compile_all(_NoCache(fp32), pt2e, qmodels, lambda c: c(input_ids=x))
        res.update(times)
        res.update(_latency(compiled, lambda c: c(input_ids=x), args))

        ref_logp = [torch.log_softmax(fp32(input_ids=windows[i : i + 1], use_cache=False).logits.float(), -1)
                    for i in range(len(windows))]

        def ppl_kl(fn):
            """(perplexity, mean KL(FP32 || model) per token); KL stays meaningful for a
            truncated model, whose perplexity is not."""
            total, kl, count = 0.0, 0.0, 0
            for i in range(len(windows)):
                ids = windows[i : i + 1]
                logp = torch.log_softmax(_logits(fn(input_ids=ids)).float(), -1)
                total += torch.nn.functional.nll_loss(logp[0, :-1], ids[0, 1:], reduction="sum").item()
                kl += (ref_logp[i].exp() * (ref_logp[i] - logp)).sum().item()
                count += ids.shape[1] - 1
            return float(torch.exp(torch.tensor(total / count))), kl / (count + len(windows))

        res["ppl_fp32"] = ppl_kl(_NoCache(fp32))[0]
        for n in compiled:
            if n != "fp32":
                res[f"ppl_{n}"], res[f"kl_{n}"] = ppl_kl(compiled[n])
        res["ppl_qpass_fake_quant_eager"], res["kl_qpass_fake_quant_eager"] = ppl_kl(q)
    for n, qm in qmodels.items():
        rep = cb.report(qm)
        res[f"lowered_{n}"], res[f"fell_back_{n}"] = len(rep.lowered), len(rep.fell_back)
    return res


class _NoCache(torch.nn.Module):
    """A causal LM called without a KV cache (prefill), returning its logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def bench_gpu(args) -> dict:
    """H100: SmolLM2-shaped (hidden 576, 9 heads, 3 kv heads, MLP 1536) bf16 Llama with random
    weights at 8 x 512; FP8 compiled (qpass) and fake quant compiled (inductor) vs bf16 compiled.
    ``--gpu-dry-run``: the same code on the CPU, 2 layers at 2 x 32 (checks the script; the
    "qpass" backend then takes its CPU path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dry = args.gpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = "cpu" if dry else "cuda"
    sync = None if dry else torch.cuda.synchronize
    torch.manual_seed(0)
    layers = 2 if dry else (args.layers or 30)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    bf16 = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    batch, seq = (2, 32) if dry else (8, 512)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    res = {"model": f"SmolLM2-shaped bf16 ({cfg.num_hidden_layers} layers)", "shape": f"{batch}x{seq}",
           "device": "cpu (dry run)" if dry else torch.cuda.get_device_name()}
    with torch.no_grad():
        fns = {"bf16": torch.compile(bf16, backend="inductor", dynamic=False)}
        ref = bf16(input_ids=ids, use_cache=False).logits.float()
        t0 = time.perf_counter()
        fns["bf16"](input_ids=ids, use_cache=False)
        res["compile_s_bf16"] = time.perf_counter() - t0
        # each variant is also timed alone right after its compile, so that a run cut short by a
        # time limit still reports what it measured
        alone = _interleaved_medians({"bf16": lambda: fns["bf16"](input_ids=ids, use_cache=False)}, 2, 10, sync)
        print(f"  bf16: compiled in {res['compile_s_bf16']:.1f} s, {1e3 * alone['bf16']:.2f} ms", flush=True)
        # (name, backend, torch.compile keywords, quantized)
        variants = [("fp8_qpass", "qpass", {}, True), ("fp8_fake_quant_inductor", "inductor", {}, True)]
        if args.fp8_variants:  # the backend's options, A/B on the same machine
            variants += [("fp8_qpass_no_fast_accum", "qpass", {"options": {"fp8_fast_accum": False}}, True),
                         ("fp8_qpass_unfused", "qpass", {"options": {"fuse_shared_inputs": False}}, True)]
        if args.cudagraphs:  # launch overhead out of the way: every side replays CUDA graphs
            variants += [("bf16_cudagraphs", "inductor", {"mode": "reduce-overhead"}, False),
                         ("fp8_qpass_cudagraphs", "qpass", {"mode": "reduce-overhead"}, True),
                         ("fp8_fake_quant_inductor_cudagraphs", "inductor", {"mode": "reduce-overhead"}, True)]
        if args.autotune:  # inductor's tuned GEMM templates (Triton _scaled_mm among them), CUDA graphs on
            variants += [("bf16_autotune", "inductor", {"mode": "max-autotune"}, False),
                         ("fp8_qpass_autotune", "qpass", {"mode": "max-autotune"}, True)]
        for name, backend, kw, quantized in variants:
            q = copy.deepcopy(bf16)
            if quantized:
                qpass.quantize(q, qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids[:2]))
            call_kw = {} if quantized else {"use_cache": False}
            fake = q(input_ids=ids, **call_kw).logits.float()
            compiled = torch.compile(q, backend=backend, dynamic=False, **kw)
            fns[name] = lambda c=compiled, ck=call_kw: c(input_ids=ids, **ck)
            t0 = time.perf_counter()
            out = fns[name]().logits.float()
            res[f"compile_s_{name}"] = time.perf_counter() - t0
            res[f"cos_{name}"] = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
            res[f"cos_to_fake_quant_{name}"] = torch.nn.functional.cosine_similarity(
                out.flatten(), fake.flatten(), dim=0).item()
            if name == "fp8_qpass":
                rep = cb.report(q)
                res["lowered"], res["fell_back"] = len(rep.lowered), len(rep.fell_back)
            one = _interleaved_medians({name: fns[name]}, 2, 10, sync)[name]
            print(f"  {name}: compiled in {res[f'compile_s_{name}']:.1f} s, {1e3 * one:.2f} ms "
                  f"({alone['bf16'] / one:.2f}x bf16 compiled), cosine to bf16 {res[f'cos_{name}']:.5f}", flush=True)
        calls = {"bf16": lambda: fns["bf16"](input_ids=ids, use_cache=False)}
        calls.update({n: f for n, f in fns.items() if n != "bf16"})
        med = _interleaved_medians(calls, args.warmup, args.runs, sync)
        if args.profile and not dry:
            for n, f in calls.items():
                text, res[f"kernel_ms_{n}"] = _kernel_profile(f)
                print(f"  profile {n}: {text}", flush=True)
    for n, s in med.items():
        res[f"ms_{n}"] = 1e3 * s
    for n in med:
        if n != "bf16":
            res[f"speedup_{n}"] = med["bf16"] / med[n]
            if n.endswith("_cudagraphs") and "bf16_cudagraphs" in med and n != "bf16_cudagraphs":
                res[f"speedup_same_mode_{n}"] = med["bf16_cudagraphs"] / med[n]
            if n.endswith("_autotune") and "bf16_autotune" in med and n != "bf16_autotune":
                res[f"speedup_same_mode_{n}"] = med["bf16_autotune"] / med[n]
    res["target"] = "fp8_qpass speedup >= 1.3x; fake quant compiled time <= 1.2x bf16 compiled"
    return res


def _kernel_profile(fn, calls: int = 3) -> tuple[str, float]:
    """GPU kernels of ``calls`` calls under torch.profiler: kernels per call, kernel time per call
    (against the wall time; a wall time well above the kernel time is launch overhead) and the
    six kernels that took longest."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / calls
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / calls / 1e3  # ms
    count = sum(e.count for e in kernels) / calls
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    tops = "; ".join(f"{e.key[:60]} x{e.count // calls} {e.self_device_time_total / calls / 1e3:.2f} ms" for e in top)
    return f"{count:.0f} kernels, {total:.2f} ms kernel time, {1e3 * wall:.2f} ms wall (profiled) | {tops}", total


def _gpu_table(r: dict) -> str:
    """The --gpu variants: median ms, against bf16 compiled (and against bf16 with CUDA graphs for
    the CUDA-graph variants), GPU kernel time per forward when profiled, cosine to bf16."""
    lines = [f"{'variant':<36} {'ms':>7} {'vs bf16':>8} {'vs same mode':>12} {'kernel ms':>9}  cosine to bf16"]
    for key in r:
        if not key.startswith("ms_"):
            continue
        n = key[3:]
        sp = "1.00x" if n == "bf16" else f"{r[f'speedup_{n}']:.2f}x"
        cg = f"{r[f'speedup_same_mode_{n}']:.2f}x" if f"speedup_same_mode_{n}" in r else "-"
        kern = f"{r[f'kernel_ms_{n}']:.2f}" if f"kernel_ms_{n}" in r else "-"
        cos = f"{r[f'cos_{n}']:.5f}" if f"cos_{n}" in r else "-"
        lines.append(f"{n:<36} {r[key]:>7.2f} {sp:>8} {cg:>12} {kern:>9}  {cos}")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    labels = {"fp32": "FP32 compiled", "pt2e": "PT2E x86", "qpass": "qpass INT8", "qpass_lm_head": "qpass +lm_head"}
    labels.update({f"qpass_{k}": v for k, v in _EXTRA_LABELS.items()})
    labels.update({k[3:]: ("qpass " + k[3:].removeprefix("qpass_").replace("_CFG", "").replace("INT8_", ""))[:15]
                   for r in rows for k in r if k.startswith("ms_qpass_") and k[3:] not in labels})
    lines = [f"{'model':<28} {'variant':<15} {'ms':>9} {'speedup':>8}  accuracy"]
    for r in rows:
        if "ms_fp32" not in r:
            continue
        for n in labels:
            if f"ms_{n}" not in r:
                continue
            if "cosine_pt2e" in r:
                acc = "cosine 1" if n == "fp32" else f"cosine {r[f'cosine_{n}']:.4f}"
            else:
                acc = f"ppl {r[f'ppl_{n}']:.4g}" + ("" if n == "fp32" else f", KL to FP32 {r[f'kl_{n}']:.4f}")
            sp = "1.00x" if n == "fp32" else f"{r[f'speedup_{n}']:.2f}x"
            lines.append(f"{r['model']:<28} {labels[n]:<15} {r[f'ms_{n}']:>9.1f} {sp:>8}  {acc}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--layers", type=int, default=8, help="SmolLM2 layers kept (0: all 30)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lm-head", action="store_true",
                   help="SmolLM2: also qpass with lm_head quantized (INT8_DEFAULT_CFG leaves it FP32; PT2E does not)")
    p.add_argument("--qpass-configs", default="",
                   help="more qpass rows, comma-separated presets (INT8_ASYMMETRIC_CFG: uint8 activations with "
                        "zero points, as PT2E; INT8_SMOOTHQUANT_CFG)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--gpu-dry-run", action="store_true", help="the --gpu code path on the CPU, tiny (no timings)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="--gpu: bf16 and FP8 compiled with CUDA graphs too (mode='reduce-overhead')")
    p.add_argument("--autotune", action="store_true",
                   help="--gpu: bf16 and FP8 compiled with mode='max-autotune' too (tuned GEMMs, CUDA graphs)")
    p.add_argument("--profile", action="store_true", help="--gpu: each variant's GPU kernels under torch.profiler")
    p.add_argument("--fp8-variants", action="store_true",
                   help="--gpu: also the qpass backend without fp8_fast_accum, and without fused groups")
    args = p.parse_args()
    if args.gpu or args.gpu_dry_run:
        rows = [bench_gpu(args)]
    else:
        torch.set_num_threads(args.threads)
        rows = []
        for name in args.models.split(","):
            torch._dynamo.reset()
            rows.append({"minilm": bench_minilm, "smollm2": bench_smollm2}[name](args))
            print(rows[-1], flush=True)
    print()
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print()
    print(_gpu_table(rows[0]) if args.gpu or args.gpu_dry_run else _table(rows))


if __name__ == "__main__":
    main()
