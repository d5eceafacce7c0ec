"""torch.compile(backend="qpass") against compiled FP32/BF16: speed and accuracy.

CPU (default): MiniLM (all 6 layers) and SmolLM2-135M (first ``--layers`` layers) prefill at
1 x ``--seq``, one thread, INT8_DEFAULT_CFG compiled with backend="qpass" (oneDNN int8) vs the
FP32 model compiled with backend="inductor", in the same process; median of ``--runs`` timed
runs after warm-up. Accuracy: MiniLM mean cosine of mean-pooled embeddings to FP32 on held-out
text windows; SmolLM2 perplexity on held-out windows (FP32, fake-quant eager, qpass compiled).

    python tools/bench_compile.py [--models minilm,smollm2] [--layers 8] [--seq 256] [--runs 7]
    python tools/bench_compile.py --gpu      # H100: SmolLM2-shaped bf16 model, 8 x 512, FP8

PT2E's X86InductorQuantizer flow is not compared: torch 2.13 removed
torch.ao.quantization.quantize_pt2e and torchao is not installed in this venv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import qpass  # noqa: E402
from qpass import zoo  # noqa: E402
from qpass.export import compile_backend as cb  # noqa: E402


def _median_time(fn, warmup: int, runs: int, sync=None) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _compile_time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_minilm(args) -> dict:
    import copy

    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, 64), batch_size=16)
    windows = zoo.token_windows(tok, split.held_out, args.eval_windows + 1, args.seq)
    fp32 = model
    q = copy.deepcopy(model)
    qpass.quantize(q, qpass.INT8_DEFAULT_CFG, lambda m: [m(**b) for b in calib])

    def inputs(i):
        ids = windows[i : i + 1]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    res = {"model": "MiniLM-L6", "shape": f"1x{args.seq}"}
    with torch.no_grad():
        c_fp32 = torch.compile(fp32, backend="inductor", dynamic=False)
        c_q = torch.compile(q, backend="qpass", dynamic=False)
        x = inputs(0)
        res["compile_s_fp32"] = _compile_time(lambda: c_fp32(**x))
        res["compile_s_qpass"] = _compile_time(lambda: c_q(**x))
        res["ms_fp32"] = 1e3 * _median_time(lambda: c_fp32(**x), args.warmup, args.runs)
        res["ms_qpass_int8"] = 1e3 * _median_time(lambda: c_q(**x), args.warmup, args.runs)
        cos_c, cos_e = [], []
        for i in range(1, args.eval_windows + 1):
            x = inputs(i)
            ref = zoo.mean_pool(fp32(**x).last_hidden_state, x["attention_mask"])
            cos_c.append(zoo.mean_cosine(zoo.mean_pool(c_q(**x).last_hidden_state, x["attention_mask"]), ref))
            cos_e.append(zoo.mean_cosine(zoo.mean_pool(q(**x).last_hidden_state, x["attention_mask"]), ref))
    res["cosine_qpass_compiled"] = statistics.mean(cos_c)
    res["cosine_fake_quant_eager"] = statistics.mean(cos_e)
    rep = cb.report(q)
    res["lowered"], res["fell_back"] = len(rep.lowered), len(rep.fell_back)
    return res


def bench_smollm2(args) -> dict:
    import copy

    model, tok = zoo.load_smollm2(num_layers=args.layers)
    split = zoo.text_split()
    calib = zoo.token_windows(tok, split.calib, 8, args.seq)
    windows = zoo.token_windows(tok, split.held_out, args.eval_windows, args.seq)
    fp32 = model
    q = copy.deepcopy(model)
    qpass.quantize(q, qpass.INT8_DEFAULT_CFG, lambda m: [m(input_ids=calib[i : i + 2]) for i in range(0, 8, 2)])
    res = {"model": f"SmolLM2-135M ({args.layers} layers)", "shape": f"1x{args.seq}"}
    with torch.no_grad():
        c_fp32 = torch.compile(fp32, backend="inductor", dynamic=False)
        c_q = torch.compile(q, backend="qpass", dynamic=False)
        x = windows[:1]
        res["compile_s_fp32"] = _compile_time(lambda: c_fp32(input_ids=x, use_cache=False))
        res["compile_s_qpass"] = _compile_time(lambda: c_q(input_ids=x))
        res["ms_fp32"] = 1e3 * _median_time(lambda: c_fp32(input_ids=x, use_cache=False), args.warmup, args.runs)
        res["ms_qpass_int8"] = 1e3 * _median_time(lambda: c_q(input_ids=x), args.warmup, args.runs)

        def ppl(fn):
            total, count = 0.0, 0
            for i in range(len(windows)):
                ids = windows[i : i + 1]
                logits = fn(ids).float()
                total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
            return float(torch.exp(torch.tensor(total / count)))

        res["ppl_fp32"] = ppl(lambda ids: fp32(input_ids=ids, use_cache=False).logits)
        res["ppl_fake_quant_eager"] = ppl(lambda ids: q(input_ids=ids).logits)
        res["ppl_qpass_compiled"] = ppl(lambda ids: c_q(input_ids=ids).logits)
    rep = cb.report(q)
    res["lowered"], res["fell_back"] = len(rep.lowered), len(rep.fell_back)
    return res


def bench_gpu(args) -> dict:
    """H100: SmolLM2-shaped (hidden 576, 9 heads, 3 kv heads, MLP 1536) bf16 Llama with random
    weights at 8 x 512; FP8 compiled (qpass) and fake quant compiled (inductor) vs bf16 compiled."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    bf16 = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 512), device="cuda")
    res = {"model": f"SmolLM2-shaped bf16 ({args.layers} layers)", "shape": "8x512",
           "device": torch.cuda.get_device_name()}
    sync = torch.cuda.synchronize
    with torch.no_grad():
        c_bf16 = torch.compile(bf16, backend="inductor", dynamic=False)
        res["ms_bf16"] = 1e3 * _median_time(lambda: c_bf16(input_ids=ids, use_cache=False), args.warmup, args.runs, sync)
        ref = bf16(input_ids=ids, use_cache=False).logits.float()
        for name, backend in (("fp8_qpass", "qpass"), ("fp8_fake_quant_inductor", "inductor")):
            q = copy.deepcopy(bf16)
            qpass.quantize(q, qpass.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids[:2]))
            torch._dynamo.reset()
            c = torch.compile(q, backend=backend, dynamic=False)
            res[f"ms_{name}"] = 1e3 * _median_time(lambda: c(input_ids=ids), args.warmup, args.runs, sync)
            out = c(input_ids=ids).logits.float()
            res[f"cos_{name}"] = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
            if backend == "qpass":
                rep = cb.report(q)
                res["lowered"], res["fell_back"] = len(rep.lowered), len(rep.fell_back)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    if args.gpu:
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
        for a, b in (("ms_fp32", "ms_qpass_int8"), ("ms_bf16", "ms_fp8_qpass"), ("ms_bf16", "ms_fp8_fake_quant_inductor")):
            if a in r and b in r:
                print(f"    speedup {b} vs {a}: {r[a] / r[b]:.2f}x")


if __name__ == "__main__":
    main()
