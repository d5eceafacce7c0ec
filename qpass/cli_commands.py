"""The ``qpass`` subcommands (parsing lives in :mod:`qpass.cli`)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import warnings

import torch

from qpass.cli_models import CliError, Metric, call, example_inputs, load_job


def run(args) -> int:
    from qpass.cli_summary import cmd_summary

    return {
        "quantize": cmd_quantize, "summary": cmd_summary, "export": cmd_export,
        "bench": cmd_bench, "auto-quantize": cmd_auto_quantize,
    }[args.func](args)


# ---------------------------------------------------------------------- helpers
def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    # disable=None: bars on a terminal only, so logs and pipes stay clean
    return tqdm(iterable, desc=desc, total=total, unit="batch", file=sys.stderr, disable=None, leave=False)


@contextlib.contextmanager
def _stage(desc: str):
    """A one-step progress bar around a stage that has no batches (ONNX export)."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, file=sys.stderr, disable=None, leave=False, bar_format="{desc}: {elapsed}")
    try:
        yield
        bar.update(1)
    finally:
        bar.close()


@contextlib.contextmanager
def _warnings_as_lines(debug: bool):
    """qpass's own warnings as ``qpass: warning: ...`` lines; other libraries' hidden unless --debug."""
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
            warnings.filterwarnings("always", module=r"qpass\.")

            def show(message, category, filename, lineno, file=None, line=None):
                print(f"qpass: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
        yield


def load_config(text: str, algorithm: str | None):
    """A preset name (validated by qpass.quantize) or a JSON file; ``algorithm`` overrides."""
    import qpass.config as qc

    if os.path.isfile(text) or text.endswith(".json"):
        try:
            with open(text) as f:
                config = json.load(f)
        except OSError as e:
            raise CliError(f"cannot read --config {text!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CliError(f"--config {text!r} is not valid JSON: {e}") from None
    elif algorithm is not None and text in qc.choices:
        config = copy.deepcopy(getattr(qc, text))
    else:
        config = text
    if algorithm is None:
        return config
    if not isinstance(config, dict):
        if isinstance(config, list):
            config = {"quant_cfg": config}
        else:  # an unknown preset: let qpass.quantize name the choices
            return config
    algo = algorithm
    if algorithm.lstrip().startswith(("{", "[", '"')) or algorithm == "null":
        try:
            algo = json.loads(algorithm)
        except json.JSONDecodeError as e:
            raise CliError(f"--algorithm {algorithm!r} is not valid JSON: {e}") from None
    return dict(config, algorithm=algo)


def _forward_loop(job, desc="calibrate"):
    def loop(model):
        with torch.no_grad():
            for batch in _progress(job.calib, desc, total=len(job.calib)):
                call(model, batch)

    return loop


def _default_path(explicit: str | None, disabled: bool, name: str, ext: str) -> tuple[str | None, bool]:
    """(path or None, whether the user asked for it explicitly)."""
    if disabled:
        return None, False
    if explicit is not None:
        return explicit, True
    return os.path.join("out", f"{name}{ext}"), False


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


# ---------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    import qpass

    from qpass.config import normalize_config

    t_start = time.perf_counter()
    config = load_config(args.config, args.algorithm)
    normalize_config(config)  # a bad config fails here, before the model loads
    torch.manual_seed(0)
    times = {}
    t = time.perf_counter()
    job = load_job(args)
    if not job.calib:
        print("qpass: note: no calibration batches; only data-free (weight-only) configs will work", file=sys.stderr)
    save_path, save_explicit = _default_path(args.save, args.no_save, job.name, ".qpass")
    onnx_path, onnx_explicit = _default_path(args.export, args.no_export, job.name, ".onnx")
    for p in (save_path, onnx_path):
        if p is not None:
            _ensure_dir(p)
    metric = Metric(job)
    metric.record_fp32()
    times["load + FP32 eval"] = time.perf_counter() - t

    t = time.perf_counter()
    with _warnings_as_lines(args.debug):
        qpass.quantize(job.model, config, _forward_loop(job) if job.calib else None, rules=args.rules,
                       capture=args.capture)
    times["quantize + calibrate"] = time.perf_counter() - t
    if not args.no_summary:
        qpass.print_quant_summary(job.model)

    t = time.perf_counter()
    value = metric.measure(job.model)
    times["evaluate"] = time.perf_counter() - t

    outputs = []
    if save_path is not None:
        t = time.perf_counter()
        qpass.save(job.model, save_path)
        times["save"] = time.perf_counter() - t
        outputs.append(("saved", save_path))
    if onnx_path is not None:
        t = time.perf_counter()
        try:
            with _stage("export ONNX"), _warnings_as_lines(args.debug):
                ex = example_inputs(job.calib[0]) if job.calib else None
                qpass.export_onnx(job.model, onnx_path, ex, target=args.target)
            outputs.append(("onnx", onnx_path))
        except qpass.QpassError as e:
            if onnx_explicit:
                raise
            outputs.append(("onnx", f"not exported ({' '.join(str(e).split())[:300]})"))
        times["export"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    _report(args, job, metric, value, times, outputs)
    return 0


def _report(args, job, metric, value, times, outputs) -> None:
    cfg = args.config + (f" algorithm={args.algorithm}" if args.algorithm else "")
    print(f"\n{job.label}  config={cfg}  rules={args.rules}  calibration: {job.info['calib']}")
    print(f"  accuracy: {metric.describe(value)}")
    print("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    for what, path in outputs:
        print(f"  {what}: {path}")


# ---------------------------------------------------------------------- export
def cmd_export(args) -> int:
    import qpass

    t = time.perf_counter()
    args.calib_samples = min(args.calib_samples, 4)
    job = load_job(args)
    if not job.calib:
        raise CliError(f"--model {args.model!r} gives no example inputs to trace the export with")
    qpass.restore(job.model, args.saved)
    _ensure_dir(args.output)
    with _stage("export ONNX"), _warnings_as_lines(args.debug):
        qpass.export_onnx(job.model, args.output, example_inputs(job.calib[0]), target=args.target)
    print(f"onnx: {args.output}  ({time.perf_counter() - t:.1f} s)")
    return 0


# ---------------------------------------------------------------------- bench
def _tools_dir() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(here, "tools")
    return d if os.path.isfile(os.path.join(d, "bench.py")) else None


def cmd_bench(args) -> int:
    d = _tools_dir()
    if d is None:
        raise CliError("qpass bench runs tools/bench.py, which ships with a source checkout of qpass, not "
                       "with an installed package; clone the repository and run it there")
    if d not in sys.path:
        sys.path.insert(0, d)
    import bench

    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if "--full" in rest:
        rest.remove("--full")
    elif "--quick" not in rest and "--gpu" not in rest and "-h" not in rest and "--help" not in rest:
        rest.insert(0, "--quick")
    return int(bench.main(rest) or 0)


# ---------------------------------------------------------------------- auto-quantize
def cmd_auto_quantize(args) -> int:
    import qpass

    auto = getattr(qpass, "auto_quantize", None)
    if auto is None or not callable(auto):
        raise CliError("auto-quantize is not available in this version of qpass (qpass.auto_quantize is missing)")
    job = load_job(args)
    metric = Metric(job)
    metric.record_fp32()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    t = time.perf_counter()

    if job.kind == "causal":  # next-token loss: the gradient sensitivity score
        data = [dict(b, labels=b["input_ids"]) for b in job.calib]
        kwargs = dict(data_loader=data, forward_step=call, loss_func=lambda out, batch: out.loss)
    else:  # no labels: the label-free KL-divergence score
        from qpass.cli_models import _first_tensor

        kwargs = dict(data_loader=job.calib, forward_step=lambda m, b: _first_tensor(call(m, b)), method="kl_div")
    with _warnings_as_lines(args.debug):
        result = auto(job.model, constraints={"effective_bits": args.effective_bits},
                      quantization_formats=formats, **kwargs)
    model, search_state = result if isinstance(result, tuple) else (result, None)
    elapsed = time.perf_counter() - t
    qpass.print_quant_summary(model)
    if search_state is not None:
        from qpass.auto_quantize import auto_quantize_report, format_table

        print(format_table(search_state))
        if args.report:
            _ensure_dir(args.report)
            print(f"  sensitivity report: {auto_quantize_report(search_state, args.report)}")
    value = metric.measure(model)
    save_path, _ = _default_path(args.save, args.no_save, job.name + "-auto", ".qpass")
    print(f"\n{job.label}  auto-quantize effective_bits={args.effective_bits} formats={','.join(formats)}")
    print(f"  accuracy: {metric.describe(value)}")
    print(f"  time: search + calibrate {elapsed:.1f} s")
    if save_path is not None:
        _ensure_dir(save_path)
        qpass.save(model, save_path)
        print(f"  saved: {save_path}")
    return 0
