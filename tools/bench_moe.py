"""Fused mixture-of-experts models: qpass and ModelOpt side by side, measured in one run.

No MoE checkpoint ships offline, so the models are small random ones of each layout transformers 5
has: Mixtral (``experts.gate_up_proj [E, 2I, H]``, grouped matmul), GPT-OSS (transposed experts,
``is_transposed=True``, with biases) and Llama 4 (transposed, bmm). Every preset calibrates on the
same ``--calib`` batches of random tokens; the error is the mean squared difference of the logits to
the FP32 model on ``--held`` other batches (lower is better), and the time is quantize+calibrate.

    python tools/bench_moe.py [--models mixtral,gpt_oss,llama4] [--configs INT8_DEFAULT_CFG,...]
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,gpt_oss,llama4")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--calib", type=int, default=4, help="calibration batches of 4 x 32 random tokens")
    ap.add_argument("--held", type=int, default=4, help="held-out batches for the error")
    args = ap.parse_args(argv)
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
