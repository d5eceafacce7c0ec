"""Model weights in a qpass checkpoint: value digests always, the values themselves when needed.

A checkpoint normally holds no weights: it is restored onto the same model loaded the usual way.
Calibration that changes weights (SmoothQuant/AWQ fold scales into norms and Linears, and untie
shared weights; ``fold_weight``) makes that model different from the saved one, so:

* every parameter and buffer's sha256 is recorded; restore refuses a model whose values differ
  (outputs could not match), naming the tensors;
* ``save(..., weights=True)`` (automatic after SmoothQuant/AWQ) also stores every tensor, once
  per shared storage, with the groups of names that share one; restore loads them, untying
  tensors the saved model had untied.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from qpass.checkpoint_format import model_modules
from qpass.nn.packed_weight import is_placeholder

PREFIX = "weights/"  # safetensors key prefix of stored model tensors
WEIGHT_CHANGING_METHODS = ("smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq")


def model_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, str, torch.Tensor]]:
    """name -> (owner module, '_parameters'/'_buffers', local name, tensor), quantizers excluded."""
    out = {}
    for name, module in model_modules(model):
        for kind in ("_parameters", "_buffers"):
            for local, t in getattr(module, kind).items():
                if t is not None:
                    out[f"{name}.{local}" if name else local] = (module, kind, local, t)
    return out


def digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def shared_groups(tensors: dict) -> list[list[str]]:
    """Names that share one tensor object, for each tensor with more than one name."""
    by_id: dict[int, list[str]] = {}
    for name, (_, _, _, t) in tensors.items():
        by_id.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in by_id.values() if len(g) > 1)


def changes_weights(state) -> bool:
    """Whether calibration changed the model's weights (as far as the state tells)."""
    algos = state.algorithm if isinstance(state.algorithm, list) else [state.algorithm]
    algos = algos + [a["additional_algorithm"] for a in algos if isinstance(a, dict) and a.get("additional_algorithm")]
    methods = {a.get("method") if isinstance(a, dict) else a for a in algos}
    return bool(getattr(state, "smoothing", None)) or any(m in WEIGHT_CHANGING_METHODS for m in methods)


def record(model: nn.Module, include: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The body entries and (if ``include``) safetensors entries for the model's own tensors.

    Placeholders of packed weights (real_quantize) are left out: their values are in the
    quantizers' tensors, and a fresh model has its real weights there."""
    tensors = {n: v for n, v in model_tensors(model).items() if not is_placeholder(v[3])}
    body = {"weights_sha256": {n: digest(v[3]) for n, v in tensors.items()},
            "weights_stored": include, "weights_shared": shared_groups(tensors)}
    stored = {}
    if include:
        seen = set()
        for name, (_, _, _, t) in tensors.items():
            if id(t) not in seen:  # one copy per storage (safetensors refuses shared tensors)
                seen.add(id(t))
                stored[PREFIX + name] = t
    return body, stored


def check(model: nn.Module, body: dict, file_tensors: dict) -> list[str]:
    """Problems restoring ``body``'s weights onto ``model`` (empty if none)."""
    tensors = model_tensors(model)
    if body.get("weights_stored"):
        problems = []
        for key, t in file_tensors.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            if name not in tensors:
                problems.append(f"stored weight '{name}' does not exist in this model")
            elif tensors[name][3].shape != t.shape:
                problems.append(f"stored weight '{name}': shape {tuple(t.shape)}, this model's "
                                f"{tuple(tensors[name][3].shape)}")
        return problems
    saved = body.get("weights_sha256") or {}
    differ = [n for n, h in saved.items() if n in tensors and digest(tensors[n][3]) != h]
    if not differ:
        return []
    shown = ", ".join(f"'{n}'" for n in differ[:8]) + (" ..." if len(differ) > 8 else "")
    return [f"{len(differ)} weight(s) differ from the saved model's, so outputs could not match: {shown}. "
            "The checkpoint's amax values belong to other weights: restore onto the model the "
            "checkpoint was made from, or save with weights=True if calibration changed weights"]


def load(model: nn.Module, body: dict, file_tensors: dict) -> None:
    """Untie what the saved model had untied, then copy the stored values in. Checked beforehand."""
    if not body.get("weights_stored"):
        return
    tensors = model_tensors(model)
    groups = {n: tuple(g) for g in body.get("weights_shared", []) for n in g}
    fresh_groups = {n: tuple(g) for g in shared_groups(tensors) for n in g}
    done = set()
    for name in tensors:
        if name in done or fresh_groups.get(name, (name,)) == groups.get(name, (name,)):
            continue
        # Shared here but not (or differently) in the saved model: give the saved group its own tensor.
        group = groups.get(name, (name,))
        _, _, _, old = tensors[name]
        new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad) if isinstance(
            old, nn.Parameter) else old.detach().clone()
        for n in group:
            module, kind, local, _ = tensors[n]
            getattr(module, kind)[local] = new
            done.add(n)
    tensors = model_tensors(model)
    with torch.no_grad():
        for key, t in file_tensors.items():
            if key.startswith(PREFIX):
                name = key[len(PREFIX):]
                target = tensors[name][3]
                target.copy_(t.to(target.device))
                for n in groups.get(name, ()):
                    if tensors[n][3] is not target:
                        tensors[n][3].copy_(t.to(tensors[n][3].device))
