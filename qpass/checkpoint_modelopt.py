"""Import a ModelOpt checkpoint (what ``mto.save(model, path)`` writes) into qpass.

``mto.save`` writes a ``torch.save`` pickle ``{"modelopt_state": ..., "model_state_dict": ...}``.
``modelopt_state["modelopt_state_dict"]`` is a list of ``(mode, {"config", "metadata"})``; the
``quantize`` mode's config is the ``quant_cfg``/``algorithm`` and every mode's
``metadata["quantizer_state"]`` maps each quantizer's name to its properties (``_num_bits``,
``_axis``, ``_disabled``, ...; the last mode's is current). A ``SequentialQuantizer`` appears as
``{"is_sequential_quantizer": True, "num_quantizers": n}`` with its members at ``name.0``,
``name.1``, ... The ``_amax``/``_pre_quant_scale`` tensors are in ``model_state_dict``.

The file is read with ``torch.load(weights_only=True)`` unless the caller trusts it and passes
``weights_only=False`` (ModelOpt files are pickles; qpass's own format has none).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qpass.checkpoint_install import QuantizerSpec, _listing, check_specs, install
from qpass.errors import QpassError
from qpass.graph.quantized_model import is_quantized
from qpass.nn.hf_conv1d import conv1d_as_linear
from qpass.nn.tensor_quantizer import OPTIONAL_BUFFERS
from qpass.passes.rules import DEFAULT, get_rule_set

# ModelOpt TensorQuantizer property -> qpass attribute.
_ATTRS = {
    "_num_bits": "num_bits", "_axis": "axis", "_unsigned": "unsigned", "_narrow_range": "narrow_range",
    "_block_sizes": "block_sizes", "_fake_quant": "fake_quant", "_learn_amax": "learn_amax",
    "_trt_high_precision_dtype": "trt_high_precision_dtype", "_pass_through_bwd": "pass_through_bwd",
    "_bias": "bias", "_rotate": "rotate", "backend": "backend", "backend_extra_args": "backend_extra_args",
    "_use_constant_amax": "use_constant_amax", "_constant_amax": "constant_amax",
    "_effective_bits": "effective_bits",
}
# Properties whose truthy value means a numerics qpass does not implement for imports (ModelOpt's
# static-block quantizer class markers are not among them: its static INT blocks and static NVFP4
# are qpass's own formats; its learned-scale mode is refused).
_REFUSED = ("_dequantize", "_lsq")
_KNOWN_BUFFERS = OPTIONAL_BUFFERS  # the state buffers a qpass quantizer has too
_QUANTIZER_SLOTS = ("input_quantizer", "weight_quantizer", "output_quantizer")


def _load(f, weights_only: bool) -> dict:
    try:
        ckpt = torch.load(f, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        unpickling = "weights_only" in str(e).lower() or "Unpickl" in type(e).__name__
        hint = " If you trust this file, pass weights_only=False to unpickle it fully." if weights_only and unpickling else ""
        raise QpassError(f"cannot read ModelOpt checkpoint {f!r}: {type(e).__name__}: {str(e)[:400]}{hint}") from None
    if isinstance(ckpt, dict) and "modelopt_state" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and "modelopt_state_dict" in ckpt:  # a bare mto.modelopt_state() file
        return {"modelopt_state": ckpt, "model_state_dict": {}}
    raise QpassError(
        f"{f!r} is not a ModelOpt checkpoint: expected the dict mto.save writes, with keys "
        "'modelopt_state' and 'model_state_dict'"
    )


def _modes(ckpt: dict) -> list[tuple[str, dict]]:
    modes = ckpt["modelopt_state"].get("modelopt_state_dict")
    if not isinstance(modes, (list, tuple)):
        raise QpassError("ModelOpt checkpoint has no 'modelopt_state_dict' list of modes")
    out = []
    for entry in modes:
        name, st = entry
        if name != "quantize" and not name.endswith("calibrate"):
            raise QpassError(
                f"ModelOpt checkpoint uses mode {name!r}; qpass imports only 'quantize' and calibration modes"
            )
        out.append((name, st))
    if not any(name == "quantize" for name, _ in out):
        raise QpassError("ModelOpt checkpoint has no 'quantize' mode: the model was not quantized")
    return out


def _config(modes) -> tuple[list, object]:
    """qpass rules and algorithm from the ModelOpt modes' configs (best effort)."""
    from qpass.config import normalize_config

    cfg = dict(next(st for name, st in modes if name == "quantize").get("config") or {})
    calib = [st.get("config") or {} for name, st in modes if name != "quantize"]
    if calib and isinstance(calib[-1], dict) and calib[-1].get("method"):
        cfg["algorithm"] = calib[-1]["method"]
    cfg = {k: v for k, v in cfg.items() if k in ("quant_cfg", "algorithm", "effective_bits")}
    try:
        return normalize_config(cfg)
    except QpassError as e:
        warnings.warn(
            f"the ModelOpt checkpoint's quant_cfg does not load in qpass ({e}); quantizers are restored "
            "from their saved attributes, and quantizers created later get defaults", stacklevel=3)
        return [], cfg.get("algorithm")


def _attributes(path: str, props: dict, rules, owner) -> tuple[dict, list[str]]:
    from qpass.config import resolve_attributes

    refused = [k for k in _REFUSED if props.get(k)]
    attrs = {q: props[m] for m, q in _ATTRS.items() if m in props}
    if attrs.get("backend_extra_args") == {}:
        attrs["backend_extra_args"] = None
    if props.get("_is_static_block_scale_quantizer") or props.get("_is_nvfp4_static_quantizer"):
        attrs["axis"] = None  # ModelOpt's static-block class keeps its per-block amax axis internally
    attrs["type"] = "dynamic" if props.get("_dynamic") else "static"
    attrs["enable"] = not props.get("_disabled", False)
    resolved = resolve_attributes(rules, path, owner) if rules else None
    calibrator = getattr(resolved, "calibrator", "max")  # not in ModelOpt's quantizer state
    attrs["calibrator"] = calibrator if isinstance(calibrator, str) else "max"
    buffers = (props.get("_pytorch_state_metadata") or {}).get("buffers", {})
    refused += [f"buffer {b}" for b in buffers if b not in _KNOWN_BUFFERS]
    return attrs, refused


def _member(path: str, props: dict, rules, owner, state_dict) -> tuple[dict, dict, list[str]]:
    attrs, refused = _attributes(path, props, rules, owner)
    member = {"attributes": attrs, "enabled": attrs["enable"],
              "quant": bool(props.get("_if_quant", True)), "calib": False}
    tensors = {}
    for key in _KNOWN_BUFFERS:
        t = state_dict.get(f"{path}.{key}")
        if t is not None and not (key == "_pre_quant_scale" and props.get("_enable_pre_quant_scale") is False):
            tensors[key] = t
    return member, tensors, [f"'{path}': {r}" for r in refused]


def _owner(model, path):
    try:
        return model.get_submodule(path.rpartition(".")[0])
    except AttributeError:
        return None


def _auto_rule_set(model: nn.Module, specs) -> str:
    """'modelopt' when the checkpoint has quantizers only ModelOpt's rule set places (LayerNorm, ...)."""
    default_types = tuple(t for r in DEFAULT.module_rules for t in r.module_types)
    for s in specs:
        if s.slot == "p_bmm_quantizer":
            return "modelopt"
        owner = _owner(model, s.path)
        if s.slot in _QUANTIZER_SLOTS and owner is not None and not isinstance(owner, default_types):
            return "modelopt"
    return "default"


def _hard_disabled(model: nn.Module, rule_set, specs) -> set[str]:
    """The rule set's never-used slots among the checkpoint's quantizers (Embedding inputs)."""
    out = set()
    for s in specs:
        owner = _owner(model, s.path)
        for rule in rule_set.module_rules:
            if s.slot in rule.hard_disabled and rule.matches(owner):
                out.add(s.path)
    return out


def _unplaced(model: nn.Module, rule_set, specs) -> list[str]:
    """Enabled quantizers that no rule of ``rule_set`` places in the graph (they would do nothing)."""
    out = []
    for s in specs:
        if not any(m.get("enabled", True) for m in s.members):
            continue
        owner = _owner(model, s.path)
        placed = any(s.slot in r.slots and r.matches(owner) for r in rule_set.module_rules) or any(
            s.slot in [slot.name for slot in r.slots] and r.matches(owner)
            for r in rule_set.op_rules)
        if not placed:
            out.append(s.path)
    return out


def restore_modelopt(model: nn.Module, f, *, rules: str | None = None, load_weights: bool = True,
                     weights_only: bool = True) -> nn.Module:
    """Quantize the unquantized ``model`` in place from a ModelOpt ``mto.save`` checkpoint.

    Each ModelOpt quantizer becomes a qpass quantizer at the same path with the same attributes,
    enabled flag, ``_amax`` and ``_pre_quant_scale``. ``rules`` picks the qpass rule set that
    places them in the graph; ``None`` chooses ``"modelopt"`` when the checkpoint has quantizers
    on LayerNorm/pooling/embedding modules, else ``"default"``. ``load_weights`` also copies the
    checkpoint's model weights (ModelOpt stores them). Any mismatch raises QpassError and leaves
    the model untouched.
    """
    if is_quantized(model):
        raise QpassError(
            f"{type(model).__name__} is already quantized by qpass; restore onto a fresh, unquantized model"
        )
    ckpt = _load(f, weights_only)
    with conv1d_as_linear(model):  # ModelOpt's GPT-2 Conv1D layers are Linears with [out, in] weights
        return _restore(model, ckpt, rules, load_weights)


def _restore(model: nn.Module, ckpt: dict, rules: str | None, load_weights: bool) -> nn.Module:
    modes = _modes(ckpt)
    state_dict = ckpt.get("model_state_dict") or {}
    qstate = None
    for _, st in modes:
        qstate = (st.get("metadata") or {}).get("quantizer_state", qstate)
    if not isinstance(qstate, dict) or not qstate:
        raise QpassError("ModelOpt checkpoint has no quantizer_state (sharded checkpoints are not supported)")
    config_rules, algorithm = _config(modes)

    specs, problems = [], []
    for path, props in qstate.items():
        if any(path.startswith(s.path + ".") for s in specs if s.sequential):
            continue  # a member of a sequence, handled with it
        owner = _owner(model, path)
        if props.get("is_sequential_quantizer"):
            n = int(props.get("num_quantizers", 0))
            parts = [_member(f"{path}.{i}", qstate.get(f"{path}.{i}", {}), config_rules, owner, state_dict)
                     for i in range(n)]
            specs.append(QuantizerSpec(path, True, [p[0] for p in parts], [p[1] for p in parts]))
            problems += [msg for p in parts for msg in p[2]]
        else:
            m, t, refused = _member(path, props, config_rules, owner, state_dict)
            specs.append(QuantizerSpec(path, False, [m], [t]))
            problems += refused
    if problems:
        raise QpassError(_listing("the ModelOpt checkpoint uses features qpass cannot import", problems))
    problems = check_specs(model, specs)

    weights = {}
    if load_weights:
        qpaths = {s.path for s in specs}
        own = model.state_dict()
        for key, t in state_dict.items():
            head = key.rpartition(".")[0]
            if head in qpaths or head.rpartition(".")[0] in qpaths or not isinstance(t, torch.Tensor):
                continue
            if key not in own:
                problems.append(f"weight '{key}' does not exist in this model")
            elif own[key].shape != t.shape:
                problems.append(f"weight '{key}': this model has shape {tuple(own[key].shape)}, "
                                f"the checkpoint {tuple(t.shape)}")
            else:
                weights[key] = t
    if problems:
        raise QpassError(_listing("the ModelOpt checkpoint does not fit this model; the model is unchanged",
                                  problems, limit=40))
    rule_set = get_rule_set(rules if rules is not None else _auto_rule_set(model, specs))
    unplaced = _unplaced(model, rule_set, specs)
    if unplaced:
        shown = ", ".join(f"'{p}'" for p in unplaced[:6]) + (" ..." if len(unplaced) > 6 else "")
        warnings.warn(
            f"{len(unplaced)} enabled ModelOpt quantizer(s) sit on modules qpass's {rule_set.name!r} rule set "
            f"does not quantize, so they will not act: {shown}", stacklevel=2)
    install(model, rule_set, config_rules, algorithm, specs, _hard_disabled(model, rule_set, specs))
    if weights:
        with torch.no_grad():
            own = model.state_dict(keep_vars=True)
            for key, t in weights.items():
                own[key].copy_(t)
    return model
