"""Fused mixture-of-experts models: qpass and ModelOpt side by side, measured in one run.

No MoE checkpoint ships offline, so the models are small random ones of each layout transformers 5
has: Mixtral (``experts.gate_up_proj [E, 2I, H]``, grouped matmul), GPT-OSS (transposed experts,
``is_transposed=True``, with biases) and Llama 4 (transposed, bmm). Every preset calibrates on the
same ``--calib`` batches of random tokens; the error is the mean squared difference of the logits to
the FP32 model on ``--held`` other batches (lower is better), and the time is quantize+calibrate.

    python tools/bench_moe.py [--models mixtral,gpt_oss,llama4] [--configs INT8_DEFAULT_CFG,...]
    python tools/bench_moe.py --timing [--configs INT8_DEFAULT_CFG,FP8_DEFAULT_CFG] [--threads 2]
    python tools/bench_moe.py --sweep

``--sweep``: other MoE architectures of transformers 5 (tiny random Qwen2-MoE, Qwen3-MoE, OLMoE,
Phi-MoE, GLM-4-MoE, GraniteMoE, DeepSeek-V3) through qpass's INT8_DEFAULT_CFG: output cosine to FP32
and how many expert quantizers are on, or why the model cannot be quantized.

``--timing``: a larger random Mixtral (4 layers, hidden 512, 8 experts, 4 x 128 tokens per batch):
quantize+calibrate and evaluation-forward seconds, qpass (first call with its trace, then warm)
against ModelOpt, with the logits error, in one run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import bench_common as bc  # noqa: E402
import qpass  # noqa: E402

CONFIGS = ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_SMOOTHQUANT_CFG",
           "INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_DEFAULT_CFG")


def models() -> dict:
    from test_moe import tiny_gpt_oss, tiny_llama4, tiny_mixtral

    return {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss, "llama4": tiny_llama4}


def error(model, batches, ref) -> float:
    with torch.no_grad():
        return sum(float((model(x).logits - r).pow(2).mean()) for x, r in zip(batches, ref)) / len(ref)


def run(lib: str, base, cfg_name: str, loop, held, ref) -> tuple[str, str]:
    model = copy.deepcopy(base)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), bc.quiet():
            warnings.simplefilter("ignore")
            if lib == "qpass":
                qpass.quantize(model, copy.deepcopy(getattr(qpass, cfg_name)), loop)
            else:
                mtq = bc.import_modelopt()
                mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)
        secs = time.perf_counter() - t0
        experts = sum(1 for n, q in model.named_modules()  # enabled leaf quantizers of the experts
                      if ".experts." in n and type(q).__name__.endswith("Quantizer") and not list(q.children())
                      and getattr(q, "is_enabled", False))
        return f"{error(model, held, ref):.3e}", f"{secs:.2f} s, {experts} expert quantizers on"
    except Exception as e:  # noqa: BLE001 - one cell, never the whole table
        return "n/a", bc.short_reason(e)


SWEEP = {  # config class, model class, sizes beyond the shared ones
    "Qwen2-MoE": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=32,
                                                                 shared_expert_intermediate_size=32, num_experts=4)),
    "Qwen3-MoE": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=32,
                                                                 num_experts=4, head_dim=16)),
    "OLMoE": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=4)),
    "Phi-MoE": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=32, num_local_experts=4)),
    "GLM-4-MoE": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(intermediate_size=64, moe_intermediate_size=32,
                                                               n_routed_experts=4, n_shared_experts=1,
                                                               first_k_dense_replace=1, head_dim=16, n_group=1,
                                                               topk_group=1)),
    "GraniteMoE": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=32, num_local_experts=4)),
    "DeepSeek-V3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1)),
}


def sweep() -> None:
    import transformers

    torch.set_num_threads(1)
    xs = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    print("| model | INT8_DEFAULT_CFG: cosine to FP32 | expert quantizers on |")
    print("|---|---|---|")
    for name, (cfg_cls, model_cls, sizes) in SWEEP.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, num_experts_per_tok=2, **sizes)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():
            ref = model(xs[0]).logits
        try:
            with warnings.catch_warnings(), bc.quiet():
                warnings.simplefilter("ignore")
                qpass.quantize(model, copy.deepcopy(qpass.INT8_DEFAULT_CFG), lambda m: [m(x) for x in xs])
            with torch.no_grad():
                out = model(xs[0]).logits
            cos = float(torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))
            on = sum(1 for n, q in model.named_modules()
                     if ".experts." in n and isinstance(q, qpass.TensorQuantizer) and q.is_enabled)
            print(f"| {name} | {cos:.6f} | {on} |", flush=True)
        except Exception as e:  # noqa: BLE001 - one row, never the whole table
            print(f"| {name} | not quantized: {bc.first_line(e)[:160]} | |", flush=True)


def timing(configs: list[str], threads: int) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    base = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 1024, (4, 128), generator=g) for _ in range(4)]
    held = [torch.randint(0, 1024, (4, 128), generator=g) for _ in range(4)]

    def evaluate(m):
        with torch.no_grad():
            m(held[0])  # warm-up
            t0 = time.perf_counter()
            out = [m(x).logits for x in held]
        return time.perf_counter() - t0, out

    fp32_s, ref = evaluate(base)
    print(f"Mixtral 4 layers, hidden 512, 8 experts (random), {threads} threads; FP32 eval {fp32_s:.2f} s")
    print("| config | run | quantize s | eval s | logits MSE |")
    print("|---|---|---|---|---|")
    for name in configs:
        for lib, label in (("qpass", "qpass (first: trace)"), ("modelopt", "ModelOpt"), ("qpass", "qpass (warm)")):
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            with warnings.catch_warnings(), bc.quiet():
                warnings.simplefilter("ignore")
                if lib == "qpass":
                    qpass.quantize(m, copy.deepcopy(getattr(qpass, name)), lambda mm: [mm(x) for x in calib])
                else:
                    mtq = bc.import_modelopt()
                    mtq.quantize(m, copy.deepcopy(getattr(mtq, name)), lambda mm: [mm(x) for x in calib])
            q_s = time.perf_counter() - t0
            e_s, out = evaluate(m)
            err = sum(float((o - r).pow(2).mean()) for o, r in zip(out, ref)) / len(ref)
            print(f"| {name} | {label} | {q_s:.2f} | {e_s:.2f} | {err:.3e} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,gpt_oss,llama4")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--calib", type=int, default=4, help="calibration batches of 4 x 32 random tokens")
    ap.add_argument("--held", type=int, default=4, help="held-out batches for the error")
    ap.add_argument("--timing", action="store_true", help="quantize/eval seconds on a larger random Mixtral")
    ap.add_argument("--sweep", action="store_true", help="other MoE architectures through INT8_DEFAULT_CFG")
    ap.add_argument("--threads", type=int, default=2, help="--timing: torch threads")
    args = ap.parse_args(argv)
    if args.sweep:
        sweep()
        return
    if args.timing:
        configs = args.configs.split(",") if args.configs != ",".join(CONFIGS) else ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]
        timing(configs, args.threads)
        return
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    calib = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(args.calib)]
    held = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(args.held)]

    def loop(m):
        for x in calib:
            m(x)

    makers = models()
    print(f"torch {torch.__version__}, 1 thread; logits MSE to FP32 on {args.held} held-out batches (lower is better)")
    print("| model | config | qpass error | ModelOpt error | qpass | ModelOpt |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base = makers[name]()
        with torch.no_grad():
            ref = [base(x).logits for x in held]
        for cfg in args.configs.split(","):
            q_err, q_note = run("qpass", base, cfg, loop, held, ref)
            m_err, m_note = run("modelopt", base, cfg, loop, held, ref)
            print(f"| {name} | {cfg} | {q_err} | {m_err} | {q_note} | {m_note} |", flush=True)


if __name__ == "__main__":
    main()
