"""Save a quantized model's quantization state and restore it onto a fresh model.

::

    qpass.save(model, "model.qpass.safetensors")           # after qpass.quantize(...)
    fresh = AutoModel.from_pretrained(...)                   # the unquantized model
    qpass.restore(fresh, "model.qpass.safetensors")          # quantized, no calibration data needed

The file stores only quantization state (config rules, every quantizer's attributes and
amax/pre_quant_scale tensors, a fingerprint of the model structure), not the model's weights:
restore it onto the same model, loaded the usual way. Format: :mod:`qpass.checkpoint_format`.
``restore_modelopt`` imports a checkpoint written by ModelOpt's ``mto.save``.
"""

from __future__ import annotations

import warnings

from torch import nn

from qpass import checkpoint_weights
from qpass.checkpoint_format import (
    FILTER_KEY, class_path, fingerprint, model_structure, plain, read_file, structure_diff, unplain, write_file,
)
from qpass.checkpoint_install import QuantizerSpec, _listing, _owner_weight_shape, check_specs, install
from qpass.errors import QpassError
from qpass.graph.quantized_model import is_quantized, iter_tensor_quantizers, state_of
from qpass.nn.hf_conv1d import conv1d_as_linear
from qpass.nn.packed_weight import PACKED_KEYS, PackedWeightQuantizer
from qpass.nn.tensor_quantizer import OPTIONAL_BUFFERS, SequentialQuantizer, TensorQuantizer, is_quantizer
from qpass.passes.rules import get_rule_set

__all__ = ["save", "restore", "restore_modelopt", "save_quantized", "restore_quantized"]

_TENSORS = OPTIONAL_BUFFERS + tuple(f"_{k}" for k in PACKED_KEYS)  # packed: real_quantize


# ---------------------------------------------------------------------- save
def _quantizer_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level quantizers (a SequentialQuantizer, not its members) in module order."""
    out = []
    for name, module in model.named_modules():  # pre-order: a sequence's members follow it
        if is_quantizer(module) and not (out and name.startswith(out[-1][0] + ".")):
            out.append((name, module))
    return out


def _storable_attributes(attrs: dict) -> dict:
    attrs = dict(attrs)
    c = attrs.get("calibrator")
    if c is not None and not isinstance(c, str):
        # ModelOpt's constructor forms (a class, or (class, args, kwargs)): keep the kind only.
        cls = c[0] if isinstance(c, (tuple, list)) and c else c
        attrs["calibrator"] = "histogram" if getattr(cls, "__name__", "") == "HistogramCalibrator" else "max"
    return attrs


def _member_record(tq: TensorQuantizer, where: str) -> dict:
    record = {
        "attributes": plain(_storable_attributes(tq._attrs), f"quantizer '{where}'"),
        "enabled": tq.is_enabled,
        "quant": bool(tq._if_quant),
        "calib": bool(tq._if_calib),
    }
    if isinstance(tq, PackedWeightQuantizer):  # its owner's weight lives in the quantizer's tensors
        record["packed_weight"] = {"shape": list(tq._weight_shape), "dtype": str(tq._weight_dtype).removeprefix("torch.")}
    return record


def _rule_record(rule, quantizer_names: list[str]) -> dict:
    pattern = rule.pattern
    if not isinstance(pattern, str):
        # A filter function cannot be stored: keep the names it selected in this model.
        pattern = {
            FILTER_KEY: getattr(pattern, "__qualname__", getattr(pattern, "__name__", repr(pattern))),
            "matched": sorted(n for n in quantizer_names if pattern(n)),
        }
    parent = rule.parent_class
    if isinstance(parent, type):
        parent = class_path(parent)
    entry = {"quantizer_name": pattern, "parent_class": parent, "enable": rule.enable is not False}
    if rule.cfg is not None:
        cfg = [_storable_attributes(c) for c in rule.cfg] if isinstance(rule.cfg, list) else _storable_attributes(rule.cfg)
        entry["cfg"] = plain(cfg, f"config rule {pattern!r}")
    return entry


def _algorithm_record(algorithm):
    try:
        return plain(algorithm, "algorithm")
    except QpassError:
        return {"__unserialisable__": repr(algorithm)}


def save(model: nn.Module, f, *, weights: bool | None = None) -> None:
    """Write ``model``'s quantization state to ``f`` (a path or a binary file object).

    Deterministic: the same model state always gives the same bytes. The model's own weights
    are stored only with ``weights=True``; ``None`` stores them when calibration changed them
    (SmoothQuant, AWQ). A sha256 of every weight is always stored, so restoring onto a model
    with other weights is refused rather than silently giving other outputs.
    """
    import qpass

    state = state_of(model)
    include = checkpoint_weights.changes_weights(state) if weights is None else bool(weights)
    quantizers = _quantizer_paths(model)
    all_names = [n for n, m in model.named_modules() if is_quantizer(m)]
    records, tensors = [], {}
    for path, q in quantizers:
        owner_path, _, slot = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        members = iter_tensor_quantizers(q)
        prefixes = [f"{path}.{i}" for i in range(len(members))] if isinstance(q, SequentialQuantizer) else [path]
        for prefix, tq in zip(prefixes, members):
            for key in _TENSORS:
                t = tq._buffers.get(key)
                if t is not None:
                    tensors[f"{prefix}.{key}"] = t
        records.append({
            "path": path,
            "owner": owner_path,
            "slot": slot,
            "owner_class": class_path(state.original_cls if owner is model else type(owner)),
            "owner_weight_shape": _owner_weight_shape(owner),
            "class": "TensorQuantizer" if isinstance(q, PackedWeightQuantizer) else type(q).__name__,
            "members": [_member_record(tq, p) for p, tq in zip(prefixes, members)],
        })
    structure = model_structure(model, state.original_cls)
    body = {
        "qpass_version": qpass.__version__,
        "rule_set": state.rule_set.name,
        "rules": [_rule_record(r, all_names) for r in state.rules],
        "algorithm": _algorithm_record(state.algorithm),
        "hard_disabled": sorted(state.hard_disabled),
        "model_class": class_path(state.original_cls),
        "structure": structure,
        "fingerprint": fingerprint(structure),
        "quantizers": records,
    }
    weight_body, stored = checkpoint_weights.record(model, include)
    body.update(weight_body)
    tensors.update(stored)
    write_file(f, body, tensors)


# ---------------------------------------------------------------------- restore
class _SavedFilter:
    """Stands in for a filter-function rule: selects the quantizer names it selected when saved."""

    def __init__(self, qualname: str, matched) -> None:
        self.__name__ = self.__qualname__ = qualname
        self.matched = frozenset(matched)

    def __call__(self, name: str) -> bool:
        return name in self.matched

    def __repr__(self) -> str:
        return f"<saved filter {self.__name__}: {len(self.matched)} quantizers>"


def _rules_from_record(entries: list) -> list:
    from qpass.config import normalize_quant_cfg

    out = []
    for e in entries:
        e = dict(e)
        p = e["quantizer_name"]
        if isinstance(p, dict) and FILTER_KEY in p:
            e["quantizer_name"] = _SavedFilter(p[FILTER_KEY], p.get("matched", ()))
        if e.get("parent_class") is None:
            e.pop("parent_class", None)
        if "cfg" in e:
            e["cfg"] = unplain(e["cfg"])
        out.append(e)
    try:
        return normalize_quant_cfg(out, "checkpoint rules")
    except QpassError as e:
        raise QpassError(f"the checkpoint's config rules do not load in this qpass version: {e}") from None


def _specs_from_record(body: dict, tensors: dict) -> list[QuantizerSpec]:
    specs = []
    for r in body["quantizers"]:
        seq = r["class"] == "SequentialQuantizer"
        if r["class"] not in ("TensorQuantizer", "SequentialQuantizer"):
            raise QpassError(f"checkpoint quantizer '{r['path']}' has unknown class {r['class']!r}")
        prefixes = [f"{r['path']}.{i}" for i in range(len(r["members"]))] if seq else [r["path"]]
        specs.append(QuantizerSpec(
            path=r["path"], sequential=seq, members=r["members"],
            tensors=[{k: tensors[f"{p}.{k}"] for k in _TENSORS if f"{p}.{k}" in tensors} for p in prefixes],
            owner_class=r.get("owner_class"), owner_weight_shape=r.get("owner_weight_shape"),
        ))
    return specs


def restore(model: nn.Module, f, *, strict: bool = True) -> nn.Module:
    """Quantize the unquantized ``model`` in place from a :func:`save` checkpoint; returns it.

    No calibration data is needed and outputs equal the saved model's bit for bit. A checkpoint
    that does not fit (missing modules, other shapes) or a damaged file raises QpassError and
    leaves the model untouched. ``strict=False`` accepts a model whose structure fingerprint
    differs as long as every quantizer's owner matches, and (with a warning) one whose weights
    differ from the saved model's. Weights stored in the checkpoint are loaded.
    """
    body, tensors = read_file(f)
    if is_quantized(model):
        raise QpassError(
            f"{type(model).__name__} is already quantized by qpass; restore onto a fresh, unquantized model"
        )
    with conv1d_as_linear(model):  # as quantize() saw it: GPT-2's Conv1D layers are Linears
        return _restore(model, body, tensors, strict)


def _restore(model: nn.Module, body: dict, tensors: dict, strict: bool) -> nn.Module:
    specs = _specs_from_record(body, tensors)
    problems = check_specs(model, specs)
    current = model_structure(model)
    if body.get("fingerprint") != fingerprint(current) and (strict or problems):
        diff = structure_diff(body.get("structure", {}), current) or ["(structure record missing)"]
        problems.append(
            f"model structure fingerprint differs: checkpoint {str(body.get('fingerprint'))[:12]}, "
            f"this model {fingerprint(current)[:12]}"
        )
        problems.extend("  " + d for d in diff)
    if problems:
        raise QpassError(_listing(
            f"checkpoint was saved from a different model ({body.get('model_class')}) than this "
            f"{class_path(type(model))}; the model is unchanged", problems, limit=40))
    weight_problems = checkpoint_weights.check(model, body, tensors)
    if weight_problems and (strict or body.get("weights_stored")):
        raise QpassError(_listing("the checkpoint's weights do not fit this model; the model is unchanged",
                                  weight_problems))
    for p in weight_problems:
        warnings.warn(p, stacklevel=2)
    rules = _rules_from_record(body.get("rules", []))
    rule_set = get_rule_set(body.get("rule_set", "default"))
    install(model, rule_set, rules, body.get("algorithm"), specs, body.get("hard_disabled", ()))
    checkpoint_weights.load(model, body, tensors)
    return model


def restore_modelopt(model: nn.Module, f, **kwargs) -> nn.Module:
    """Import a checkpoint written by ModelOpt's ``mto.save``; see :mod:`qpass.checkpoint_modelopt`."""
    from qpass.checkpoint_modelopt import restore_modelopt as _impl

    return _impl(model, f, **kwargs)


save_quantized = save
restore_quantized = restore
