"""The qpass checkpoint file: one safetensors file, no pickle.

Layout: the quantizer tensors (``_amax``, ``_pre_quant_scale``) are the safetensors tensors,
named by their ``state_dict`` keys; everything else is one JSON document stored under the
single metadata key ``"qpass"`` (one key, so the header bytes do not depend on hash order)::

    {"format": "qpass.checkpoint", "format_version": 1, "sha256": "...", "body": {...}}

``sha256`` covers the canonical JSON of ``body`` and every tensor's name, dtype, shape and
bytes, so a truncated or corrupted file is detected. ``body`` holds the qpass version, the
rule set name, the normalised config rules and algorithm, the model structure and its
fingerprint, and one record per quantizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch
from torch import nn

from qpass.errors import QpassError
from qpass.nn.tensor_quantizer import is_quantizer_slot

FORMAT = "qpass.checkpoint"
FORMAT_VERSION = 1
META_KEY = "qpass"
FILTER_KEY = "__filter_function__"  # marker of a rule whose pattern was a callable


# ---------------------------------------------------------------------- JSON values
def plain(value: Any, where: str = "value") -> Any:
    """``value`` as JSON data: tuples become lists, dict keys strings; anything else is an error."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v, where) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    raise QpassError(f"{where}: {type(value).__name__} value {value!r} cannot be stored in a qpass checkpoint")


def unplain(value: Any) -> Any:
    """Undo the special float encoding of :func:`plain` (lists stay lists: validation re-tuples)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unplain(v) for v in value]
    return value


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------- model structure
def model_modules(model: nn.Module):
    """(name, module) of every module that is not a quantizer or inside one."""
    skip = None  # named_modules is pre-order: a quantizer's members follow it directly
    for name, module in model.named_modules(remove_duplicate=False):
        if skip is not None and name.startswith(skip):
            continue
        if is_quantizer_slot(module):
            skip = name + "."
            continue
        yield name, module


def model_structure(model: nn.Module, root_cls: type | None = None) -> dict:
    """Modules (name -> class) and tensors (name -> [shape, dtype]) of the model, quantizers excluded."""
    modules: dict[str, str] = {}
    tensors: dict[str, list] = {}
    for name, module in model_modules(model):
        cls = root_cls if (name == "" and root_cls is not None) else type(module)
        modules[name] = class_path(cls)
        for kind in ("_parameters", "_buffers"):
            for tname, t in getattr(module, kind).items():
                if t is None:
                    continue
                full = f"{name}.{tname}" if name else tname
                tensors[full] = [list(t.shape), str(t.dtype).removeprefix("torch.")]
    return {"modules": modules, "tensors": tensors}


def fingerprint(structure: dict) -> str:
    return hashlib.sha256(canonical(structure)).hexdigest()


def structure_diff(saved: dict, current: dict, limit: int = 8) -> list[str]:
    """Human-readable differences between two :func:`model_structure` results."""
    lines: list[str] = []
    for kind, label in (("modules", "module"), ("tensors", "tensor")):
        a, b = saved.get(kind, {}), current.get(kind, {})
        missing = [k for k in a if k not in b]
        extra = [k for k in b if k not in a]
        changed = [k for k in a if k in b and a[k] != b[k]]
        for names, what in ((missing, "missing in this model"), (extra, "not in the checkpoint")):
            if names:
                shown = ", ".join(f"'{n or '<root>'}'" for n in names[:limit])
                lines.append(f"{len(names)} {label}(s) {what}: {shown}{' ...' if len(names) > limit else ''}")
        for n in changed[:limit]:
            lines.append(f"{label} '{n or '<root>'}': checkpoint has {_fmt(a[n])}, this model has {_fmt(b[n])}")
        if len(changed) > limit:
            lines.append(f"... and {len(changed) - limit} more changed {label}s")
    return lines


def _fmt(entry) -> str:
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list):
        return f"shape {tuple(entry[0])} {entry[1]}"
    return str(entry)


# ---------------------------------------------------------------------- checksum
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def checksum(body: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(canonical(body))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(canonical([name, str(t.dtype), list(t.shape)]))
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# ---------------------------------------------------------------------- file I/O
def write_file(f, body: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": checksum(body, tensors), "body": body}
    data = st_save(tensors, metadata={META_KEY: canonical(doc).decode()})
    if hasattr(f, "write"):
        f.write(data)
        return
    path = os.fspath(f)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # never leave a half-written checkpoint at ``path``
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_file(f) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(body, tensors)`` of a qpass checkpoint; QpassError if it is not one or is damaged."""
    from safetensors.torch import load as st_load

    name = getattr(f, "name", None) if hasattr(f, "read") else os.fspath(f)
    try:
        if hasattr(f, "read"):
            data = f.read()
        else:
            with open(f, "rb") as fh:
                data = fh.read()
    except OSError as e:
        raise QpassError(f"cannot read qpass checkpoint {name!r}: {e}") from None

    def bad(why: str) -> QpassError:
        return QpassError(f"{name!r} is not a valid qpass checkpoint (truncated or corrupted?): {why}")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise bad(f"header says {n} bytes but the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8 : 8 + n])
        doc = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"no readable qpass header ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("the header is not a qpass checkpoint header")
    if doc.get("format_version") != FORMAT_VERSION:
        raise QpassError(
            f"{name!r} has qpass checkpoint format version {doc.get('format_version')!r}; this qpass "
            f"reads version {FORMAT_VERSION} (written by qpass {doc.get('body', {}).get('qpass_version')})"
        )
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise bad(f"{type(e).__name__}: {e}") from None
    body = doc.get("body")
    if not isinstance(body, dict) or checksum(body, tensors) != doc.get("sha256"):
        raise bad("checksum mismatch")
    return body, tensors
