"""Installing quantizers on an unquantized model, shared by qpass and ModelOpt checkpoint restore.

:func:`install` checks everything first (:func:`check_specs`, building every quantizer), then
wraps the model's class, attaches a ``QpassState`` and registers each quantizer on its owner
module at its slot, as ``make_quantizer`` does. On any failure the model is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qpass.checkpoint_format import class_path, unplain
from qpass.errors import QpassError
from qpass.graph.quantized_model import STATE_ATTR, QpassState, is_quantized, remove_created, wrapped_class
from qpass.nn.packed_weight import PACKED_KEYS, PackedWeightQuantizer, install_packed, release_weight
from qpass.nn.tensor_quantizer import ExpertQuantizers, SequentialQuantizer, TensorQuantizer, is_quantizer
from qpass.passes.lora_branch import set_lora


def _owner_weight_shape(owner: nn.Module):
    w = getattr(owner, "weight", None)
    return list(w.shape) if isinstance(w, torch.Tensor) else None


@dataclass
class QuantizerSpec:
    """One quantizer to install: where, what kind, its members' settings and tensors."""

    path: str
    sequential: bool
    members: list[dict]  # {"attributes": dict, "enabled": bool, "quant": bool, "calib": bool}
    tensors: list[dict] = field(default_factory=list)  # per member: {"_amax": tensor, ...}
    owner_class: str | None = None
    owner_weight_shape: list | None = None

    @property
    def owner_path(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def slot(self) -> str:
        return self.path.rpartition(".")[2]


def _find_owner(model: nn.Module, owner_path: str):
    try:
        return model.get_submodule(owner_path)
    except AttributeError:
        return None


def _expert_container(model: nn.Module, spec: QuantizerSpec):
    """(parent path, container slot, expert index, experts) when ``spec`` is one expert's weight
    quantizer of a fused MoE parameter (``<param>_weight_quantizers.{e}``), else None."""
    from qpass.passes.rules import EXPERTS, fused_expert_params

    parent_path, _, container = spec.owner_path.rpartition(".")
    if not container.endswith(EXPERTS.weight_suffix) or not spec.slot.isdigit():
        return None
    parent = _find_owner(model, parent_path)
    param = container[: -len(EXPERTS.weight_suffix)]
    if parent is None or param not in fused_expert_params(parent):
        return None
    return parent_path, container, int(spec.slot), getattr(parent, param).shape[0]


def check_specs(model: nn.Module, specs: list[QuantizerSpec]) -> list[str]:
    """Every reason ``specs`` cannot be installed on ``model`` (empty if they can)."""
    problems = []
    experts: dict[tuple, set] = {}
    for s in specs:
        where = _expert_container(model, s)
        if where is not None and not isinstance(_find_owner(model, s.owner_path), ExpertQuantizers):
            experts.setdefault(where[:2] + (where[3],), set()).add(where[2])
            continue
        owner = _find_owner(model, s.owner_path)
        if owner is None or is_quantizer(owner):
            problems.append(f"'{s.path}': owner module '{s.owner_path}' does not exist in this model")
            continue
        cls = class_path(type(owner))
        if s.owner_class is not None and cls != s.owner_class:
            problems.append(f"'{s.path}': owner is {cls}, the checkpoint's was {s.owner_class}")
        shape = _owner_weight_shape(owner)
        if s.owner_weight_shape is not None and shape != s.owner_weight_shape:
            problems.append(
                f"'{s.path}': owner weight has shape {tuple(shape) if shape else None}, "
                f"the checkpoint's had {tuple(s.owner_weight_shape)}"
            )
        if s.slot in owner._modules or s.slot in owner._parameters or s.slot in owner._buffers:
            problems.append(f"'{s.path}': '{s.owner_path}' already has a member named '{s.slot}'")
    for (parent_path, container, count), seen in experts.items():
        if seen != set(range(count)):
            problems.append(f"'{parent_path}.{container}': the checkpoint has weight quantizers for experts "
                            f"{sorted(seen)}, this model's parameter has {count} experts")
    return problems


def _build_quantizer(spec: QuantizerSpec) -> nn.Module:
    tqs = []
    for i, m in enumerate(spec.members):
        name = f"{spec.path}.{i}" if spec.sequential else spec.path
        try:
            tq = TensorQuantizer(unplain(m["attributes"]), name=name)
        except QpassError as e:
            raise QpassError(f"checkpoint quantizer '{name}': {e}") from None
        if m.get("enabled", True):
            tq.enable()
        else:
            tq.disable()
        tq._if_quant = bool(m.get("quant", True))
        tq._if_calib = bool(m.get("calib", False)) and tq.calibrator is not None
        tensors = spec.tensors[i] if i < len(spec.tensors) else {}
        if tensors.get("_amax") is not None:
            tq.amax = tensors["_amax"]
        if tensors.get("_pre_quant_scale") is not None:
            tq.pre_quant_scale = tensors["_pre_quant_scale"]
        if tensors.get("_bias_value") is not None:
            tq.bias_value = tensors["_bias_value"]
        if tensors.get("_global_amax") is not None:  # static NVFP4
            tq.global_amax = tensors["_global_amax"]
        if tensors.get("_svdquant_lora_a") is not None:  # SVDQuant (graphs add the branch when traced)
            set_lora(tq, (tensors["_svdquant_lora_a"], tensors["_svdquant_lora_b"]))
        if m.get("packed_weight"):  # real_quantize: the owner's weight is packed in this quantizer
            packed = {k: tensors[f"_{k}"] for k in PACKED_KEYS if tensors.get(f"_{k}") is not None}
            install_packed(tq, packed, m["packed_weight"]["shape"], getattr(torch, m["packed_weight"]["dtype"]))
        tqs.append(tq)
    return SequentialQuantizer(*tqs) if spec.sequential else tqs[0]


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return fallback


def install(model: nn.Module, rule_set, rules: list, algorithm, specs: list[QuantizerSpec],
            hard_disabled=()) -> nn.Module:
    """Make ``model`` a qpass-quantized model carrying exactly ``specs``. All or nothing."""
    if is_quantized(model):
        raise QpassError(
            f"{type(model).__name__} is already quantized by qpass; restore onto a fresh, unquantized model"
        )
    problems = check_specs(model, specs)
    if problems:
        raise QpassError(_listing("the checkpoint does not fit this model", problems))
    built = [_build_quantizer(s) for s in specs]  # may raise; the model is not touched yet
    root_device = _device_of(model, torch.device("cpu"))
    state = QpassState(type(model), rule_set, rules, algorithm)
    state.hard_disabled = set(hard_disabled)
    model.__dict__[STATE_ATTR] = state
    model.__class__ = wrapped_class(state.original_cls)
    try:
        containers: dict[tuple, list] = {}  # fused MoE parameters: members by expert index
        for spec, q in zip(specs, built):
            where = _expert_container(model, spec)
            if where is not None:
                containers.setdefault(where[:2] + (where[3],), [None] * where[3])[where[2]] = q
                continue
            owner = model.get_submodule(spec.owner_path)
            q.to(_device_of(owner, root_device))
            owner.add_module(spec.slot, q)
            state.created.append((spec.owner_path, spec.slot))
        for (parent_path, container, _), members in containers.items():
            parent = model.get_submodule(parent_path)
            parent.add_module(container, ExpertQuantizers(members).to(_device_of(parent, root_device)))
            state.created.append((parent_path, container))
    except BaseException:
        remove_created(model, state)
        model.__class__ = state.original_cls
        del model.__dict__[STATE_ATTR]
        raise
    released = set()
    for spec, q in zip(specs, built):
        if isinstance(q, PackedWeightQuantizer):  # the weight lives in the quantizer: drop the FP32 copy
            owner, name = _packed_weight_of(model, spec)
            if (id(owner), name) not in released:
                release_weight(owner, name)
                released.add((id(owner), name))
    return model


def _packed_weight_of(model: nn.Module, spec: QuantizerSpec) -> tuple[nn.Module, str]:
    """(module, tensor name) of the weight a packed quantizer holds: a layer's ``weight``, or a
    fused MoE parameter (per-expert members, or GPT-OSS/Llama 4's one quantizer per parameter)."""
    from qpass.passes.rules import EXPERTS

    where = _expert_container(model, spec)
    if where is not None:
        return model.get_submodule(where[0]), where[1][: -len(EXPERTS.weight_suffix)]
    if EXPERTS.is_weight_slot(spec.slot):
        return model.get_submodule(spec.owner_path), spec.slot[: -len(EXPERTS.whole_weight_suffix)]
    return model.get_submodule(spec.owner_path), "weight"


def _listing(title: str, problems: list[str], limit: int = 20) -> str:
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    return f"{title}:\n  " + "\n  ".join(shown)
