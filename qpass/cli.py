"""The ``qpass`` command line.

::

    qpass quantize --model {minilm,smollm2,<HF dir>,python:module.fn} --config <preset|file.json>
                   [--algorithm NAME|JSON] [--rules default|modelopt] [--capture auto|export]
                   [--calib-text FILE]
                   [--calib-samples N] [--save out.qpass] [--export out.onnx]
    qpass summary <saved.qpass> [--json]
    qpass export <saved.qpass> out.onnx --model ...
    qpass bench [bench.py flags]            (tools/bench.py --quick from a source checkout)
    qpass auto-quantize ...                 (when this qpass has qpass.auto_quantize)

Errors print one line ``qpass: error: ...`` and exit with status 1 (``--debug`` shows the
traceback); usage mistakes exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from qpass.cli_models import CliError

EPILOG = "Model specs: minilm, smollm2, a Hugging Face model directory, python:module.fn or python:file.py:fn."


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else "minilm", required=required,
                   help="minilm, smollm2, a Hugging Face model directory, or python:module.fn")
    p.add_argument("--calib-text", default=None, help="calibrate on this text file instead of pydoc's text")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration texts (minilm: 64) or token windows (causal LMs: 16)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="held-out texts (minilm: 64) or token windows (causal LMs: 8) for the accuracy")
    p.add_argument("--seq-len", type=int, default=256, help="causal LMs: token window length")
    p.add_argument("--layers", type=int, default=None, help="smollm2: keep only the first N layers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpass", description="Post-training quantization of PyTorch models.",
                                epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize and calibrate a model, report accuracy against FP32, "
                       "save and export it", epilog=EPILOG)
    _add_model_args(q)
    q.add_argument("--config", default="FP8_DEFAULT_CFG", help="preset name (INT8_DEFAULT_CFG, ...) or a JSON file")
    q.add_argument("--algorithm", default=None,
                   help="override the config's algorithm: a name (max, smoothquant, awq_lite, ...) or JSON")
    q.add_argument("--rules", default="default", choices=["default", "modelopt"])
    q.add_argument("--capture", default="auto", choices=["auto", "export"],
                   help="auto: a model torch.export cannot trace whole is captured with torch.compile instead; "
                        "export: that is an error")
    q.add_argument("--save", default=None, help="qpass checkpoint path (default out/<model>.qpass)")
    q.add_argument("--export", default=None, help="ONNX path (default out/<model>.onnx)")
    q.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    q.add_argument("--no-export", action="store_true", help="do not export ONNX")
    q.add_argument("--target", default="tensorrt", choices=["tensorrt", "onnxruntime"], help="ONNX flavour")
    q.add_argument("--no-summary", action="store_true", help="do not print the per-quantizer summary")
    q.set_defaults(func="quantize")

    s = sub.add_parser("summary", help="print the quantizers stored in a saved .qpass file")
    s.add_argument("saved")
    s.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    s.set_defaults(func="summary")

    e = sub.add_parser("export", help="restore a saved .qpass file onto its model and export ONNX", epilog=EPILOG)
    e.add_argument("saved")
    e.add_argument("output", help="ONNX file to write")
    _add_model_args(e, required=True)
    e.add_argument("--target", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    e.set_defaults(func="export")

    b = sub.add_parser("bench", help="qpass vs ModelOpt on MiniLM and SmolLM2 (tools/bench.py --quick)",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on to tools/bench.py")
    b.set_defaults(func="bench")

    a = sub.add_parser("auto-quantize", help="search per-layer formats under a bit budget "
                       "(needs qpass.auto_quantize)", epilog=EPILOG)
    _add_model_args(a)
    a.add_argument("--effective-bits", type=float, default=6.0, help="weight bits per parameter budget")
    a.add_argument("--formats", default="FP8_DEFAULT_CFG,INT4_AWQ_CFG",
                   help="comma list of candidate presets")
    a.add_argument("--report", default=None, metavar="PNG",
                   help="write the sensitivity heat map (layer group x format, chosen marked) to this PNG")
    a.add_argument("--save", default=None)
    a.add_argument("--no-save", action="store_true")
    a.set_defaults(func="auto-quantize")
    return p


def _defaults(args) -> None:
    if getattr(args, "model", None) is None:
        return
    causal = args.model == "smollm2"
    if getattr(args, "calib_samples", None) is None:
        args.calib_samples = 16 if causal else 64
    if getattr(args, "eval_samples", None) is None:
        args.eval_samples = 8 if causal else 64


def _quiet_libraries(debug: bool) -> None:
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not debug:
        for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars
        except ImportError:
            pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _defaults(args)
    _quiet_libraries(args.debug)
    try:
        from qpass import cli_commands

        return cli_commands.run(args)
    except BrokenPipeError:  # `qpass summary x | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("qpass: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return 1


def error_line(e: BaseException) -> str:
    from qpass.errors import QpassError

    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > 600:
        text = text[:600] + " ..."
    if isinstance(e, QpassError):
        return f"qpass: error: {text}"
    return f"qpass: error: {type(e).__name__}: {text} (run with --debug for the traceback)"


__all__ = ["main", "build_parser", "CliError"]

if __name__ == "__main__":
    sys.exit(main())
