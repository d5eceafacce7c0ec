"""The ``qpass`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _load_config(text: str):
    if text.endswith(".json"):
        with open(text) as f:
            return json.load(f)
    return text  # a preset name, validated by qpass.quantize


def _minilm_job(args, config):
    import qpass
    from qpass import zoo

    model, tok = zoo.load_minilm()
    split = zoo.text_split()
    calib = zoo.minilm_batches(tok, zoo.sentence_chunks(split.calib, args.calib_samples))
    evals = zoo.minilm_batches(tok, zoo.sentence_chunks(split.held_out, args.eval_samples))
    reference = zoo.embed(model, evals)
    t0 = time.perf_counter()
    qpass.quantize(model, config, lambda m: [m(**b) for b in calib], rules=args.rules)
    elapsed = time.perf_counter() - t0
    qpass.print_quant_summary(model)
    cos = zoo.mean_cosine(reference, zoo.embed(model, evals))
    print(f"\nall-MiniLM-L6-v2  config={args.config}  mean cosine to FP32 embeddings: {cos:.4f} "
          f"({len(reference)} held-out texts)  quantize+calibrate: {elapsed:.1f} s")
    return model


def _smollm2_job(args, config):
    import qpass
    from qpass import zoo

    model, tok = zoo.load_smollm2(args.layers)
    split = zoo.text_split()
    calib = zoo.token_windows(tok, split.calib, args.calib_samples, args.seq_len)
    evals = zoo.token_windows(tok, split.held_out, args.eval_samples, args.seq_len)
    ppl_fp = zoo.perplexity(model, evals)
    t0 = time.perf_counter()
    qpass.quantize(model, config, lambda m: [m(input_ids=calib[i : i + 4], use_cache=False)
                                            for i in range(0, len(calib), 4)], rules=args.rules)
    elapsed = time.perf_counter() - t0
    qpass.print_quant_summary(model)
    ppl = zoo.perplexity(model, evals)
    print(f"\nSmolLM2-135M  config={args.config}  perplexity: {ppl:.3f} (FP32 {ppl_fp:.3f}) "
          f"on {len(evals)}x{args.seq_len} held-out tokens  quantize+calibrate: {elapsed:.1f} s")
    return model


def _cmd_quantize(args) -> int:
    config = _load_config(args.config)
    torch.manual_seed(0)
    if args.model == "minilm":
        _minilm_job(args, config)
    elif args.model == "smollm2":
        _smollm2_job(args, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpass", description="Post-training quantization of PyTorch models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize and calibrate a model, report accuracy against FP32")
    q.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    q.add_argument("--config", default="FP8_DEFAULT_CFG", help="preset name or a JSON config file")
    q.add_argument("--rules", default="default", choices=["default", "modelopt"])
    q.add_argument("--calib-samples", type=int, default=64)
    q.add_argument("--eval-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=256, help="SmolLM2 window length")
    q.add_argument("--layers", type=int, default=None, help="SmolLM2: keep only the first N layers")
    q.set_defaults(func=_cmd_quantize)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quantize" and args.model == "smollm2":
        if args.calib_samples == 64:
            args.calib_samples = 16
        if args.eval_samples == 128:
            args.eval_samples = 16
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        from qpass.errors import QpassError

        kind = "error" if isinstance(e, QpassError) else f"error ({type(e).__name__})"
        print(f"qpass: {kind}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
