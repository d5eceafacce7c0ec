"""Shared helpers of tools/bench.py and tools/bench_gpu.py (not part of the qpass package)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
import warnings

# Quiet, offline model loading; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

DEFAULT_CONFIGS = [
    "INT8_DEFAULT_CFG",
    "INT8_DEFAULT_CFG:modelopt",  # qpass with rules="modelopt"
    "FP8_DEFAULT_CFG",
    "INT8_WEIGHT_ONLY_CFG",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "MXFP8_DEFAULT_CFG",
    "NVFP4_DEFAULT_CFG",
]


def parse_config(token: str) -> tuple[str, str]:
    """'NAME' or 'NAME:RULES' (also 'NAME rules=RULES') -> (NAME, RULES)."""
    token = token.strip()
    if " rules=" in token:
        name, rules = token.split(" rules=", 1)
    elif ":" in token:
        name, rules = token.split(":", 1)
    else:
        name, rules = token, "default"
    return name.strip(), rules.strip() or "default"


def config_label(name: str, rules: str) -> str:
    return name if rules == "default" else f"{name} rules={rules}"


@contextlib.contextmanager
def quiet(record: list | None = None):
    """Swallow stdout/stderr prints and warnings; warnings go to ``record`` when given."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            if record is not None:
                seen = set()
                for w in caught:
                    msg = f"{w.category.__name__}: {w.message}"
                    if msg not in seen:
                        seen.add(msg)
                        record.append(msg)


_MTQ: dict = {}


def import_modelopt():
    """``modelopt.torch.quantization`` imported without its warnings, or None (reason in _MTQ)."""
    if "mtq" not in _MTQ:
        try:
            with quiet():
                import modelopt
                import modelopt.torch.quantization as mtq
            _MTQ["mtq"] = mtq
            _MTQ["version"] = getattr(modelopt, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - any failure means "no modelopt columns"
            _MTQ["mtq"] = None
            _MTQ["reason"] = f"{type(e).__name__}: {first_line(e)}"
    return _MTQ["mtq"]


_IMPORT_TIMER = """
import time, warnings, torch
warnings.simplefilter("ignore")
t = time.perf_counter()
import {module}
print(time.perf_counter() - t)
"""


def import_seconds(module: str, threads: int = 1) -> float | None:
    """Seconds to import ``module`` in a fresh Python process that has already imported torch
    (each library's one-time cost before its first quantize), or None if it does not import."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    try:
        done = subprocess.run([sys.executable, "-c", _IMPORT_TIMER.format(module=module)], capture_output=True,
                              text=True, timeout=300, env=env, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def modelopt_version() -> str:
    return _MTQ.get("version", "not installed")


def modelopt_missing_reason() -> str:
    return _MTQ.get("reason", "")


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def short_reason(e: BaseException, width: int = 24) -> str:
    """A few words for a table cell."""
    msg = first_line(e)
    low = msg.lower()
    if "cuda" in low and ("not available" in low or "must be a cuda" in low or "requires cuda" in low):
        return "needs CUDA"
    if "not implemented" in low:
        return "not implemented"
    text = f"{type(e).__name__}: {msg}"
    return text if len(text) <= width else text[: width - 3] + "..."


def format_tb(e: BaseException, limit_lines: int = 30) -> str:
    lines = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()
    if len(lines) > limit_lines:
        lines = lines[:4] + ["    ..."] + lines[-(limit_lines - 5):]
    return "\n".join(lines)


def fmt_ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def fmt_num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Fixed-width text table; columns in ``right`` are right-aligned."""
    right = right or set()
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def smollm2_case(layers, n_calib: int, n_eval: int, seq: int):
    """SmolLM2 (first ``layers`` or all), calibration windows from the start of the pydoc text,
    held-out evaluation windows, and a forward_loop feeding the calibration 4 windows a call."""
    from qpass import zoo

    with quiet():
        base, tok = zoo.load_smollm2(layers)
    split = zoo.text_split()
    calib = zoo.token_windows(tok, split.calib, n_calib, seq)
    evals = zoo.token_windows(tok, split.held_out, n_eval, seq)

    def loop(m):
        for i in range(0, len(calib), 4):
            m(input_ids=calib[i:i + 4], use_cache=False)

    return base, tok, calib, evals, loop


def smollm2_parser(doc: str):
    """An argument parser with the SmolLM2 case options :func:`smollm2_case` takes."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all 30)")
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--eval", type=int, default=16, help="held-out evaluation windows")
    p.add_argument("--seq", type=int, default=256, help="tokens per window")
    p.add_argument("--threads", type=int, default=2)
    return p
