"""Max calibration over the captured graph.

Weight quantizers are calibrated straight from the module tree (no data
needed). Activation quantizers collect statistics while ``forward_loop`` runs
the model, whose forward is the traced graph. :func:`collect_activations` is the
pass driver every algorithm calibrates through; in layerwise mode (set by
``qpass.calibrate``) it runs the graph block by block (:mod:`qpass.calib.layerwise`).
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

import torch
from torch import nn

from qpass.calib.distributed import reduce_statistics
from qpass.calib.layerwise import run_forward_loop
from qpass.errors import CalibrationError
from qpass.graph.cuda_graphs import CudaGraphs
from qpass.graph.lazy_outputs import deferred_outputs
from qpass.graph.quantized_model import QpassState, iter_tensor_quantizers
from qpass.nn.tensor_quantizer import ExpertQuantizers, TensorQuantizer, is_quantizer, is_quantizer_slot
from qpass.passes.rules import EXPERTS, fused_expert_params


def named_tensor_quantizers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def weight_quantizer_owners(model: nn.Module):
    """(owner path, owner, quantizer) for every module with a weight quantizer."""
    out = []
    for path, module in model.named_modules():
        q = module._modules.get("weight_quantizer")
        if q is not None and is_quantizer(q) and isinstance(getattr(module, "weight", None), torch.Tensor):
            out.append((path, module, q))
    return out


def expert_weight_quantizers(model: nn.Module):
    """(owner path, owner, parameter name, quantizer) for every fused MoE parameter with a weight
    quantizer: an :class:`ExpertQuantizers` (one per expert), or one TensorQuantizer on the whole
    parameter (GPT-OSS's transposed layout)."""
    out = []
    for path, module in model.named_modules():
        for param in fused_expert_params(module):
            q = module._modules.get(EXPERTS.weight_slot(module, param))
            if q is not None and is_quantizer_slot(q):
                out.append((path, module, param, q))
    return out


def is_weight_quantizer(name: str) -> bool:
    """``a.weight_quantizer``, a sequence member ``a.weight_quantizer.1``, or a fused MoE
    parameter's per-expert ``a.gate_up_proj_weight_quantizers[.3[.1]]``."""
    parts = name.split(".")
    if parts[-1].endswith("weight_quantizer") or (len(parts) > 1 and parts[-2].endswith("weight_quantizer")):
        return True
    return any(p.endswith("_weight_quantizers") for p in parts[-3:])


def calibrate_weights(model: nn.Module, groups=()) -> None:
    """Every weight quantizer's amax from its weight (static NVFP4: also the global amax, one per
    shared-input group in ``groups``)."""
    from qpass.calib.nvfp4_static import set_global_amax

    with torch.no_grad():
        for _, module, q in weight_quantizer_owners(model):
            for tq in iter_tensor_quantizers(q):
                if not tq.needs_calibration:
                    continue
                tq.reset_amax()
                tq.collect(module.weight)
                tq.load_calib_amax()
        for _, module, param, q in expert_weight_quantizers(model):
            weight = EXPERTS.quantized_view(module, getattr(module, param))
            parts = enumerate(q) if isinstance(q, ExpertQuantizers) else [(None, q)]
            for e, member in parts:
                for tq in iter_tensor_quantizers(member):
                    if not tq.needs_calibration:
                        continue
                    tq.reset_amax()
                    tq.collect(weight if e is None else weight[e])
                    tq.load_calib_amax()
    set_global_amax(model, groups)


def activation_quantizers(model: nn.Module):
    return [
        (n, q) for n, q in named_tensor_quantizers(model)
        if q.needs_calibration and not is_weight_quantizer(n)
    ]


def snapshot_amax(model: nn.Module) -> dict:
    return {n: (None if q.amax is None else q.amax.clone()) for n, q in named_tensor_quantizers(model)}


def restore_amax(model: nn.Module, snap: dict) -> None:
    for n, q in named_tensor_quantizers(model):
        if n in snap:
            q.amax = snap[n]


def collect_activations(model: nn.Module, state: QpassState, forward_loop: Callable, reduce: bool = True) -> None:
    """Run forward_loop with every enabled activation quantizer collecting statistics
    (layer by layer when ``state.layerwise`` is set); ``reduce``: then across data-parallel ranks."""
    quantizers = named_tensor_quantizers(model)
    for name, q in quantizers:
        if q.calibrator is not None:
            q.calibrator.reset()
        q.disable_quant()
        if q.is_enabled and not is_weight_quantizer(name):
            q.enable_calib()
    state.calibrating = True
    state.calib_placed = set()
    calls_before = state.calls
    # CUDA-graph replay of the pass's forwards (qpass.graph.cuda_graphs), for this pass only: its
    # graphs update this pass's running statistics in place
    inference_graphs = state.__dict__.get("cuda_graphs")
    state.calib_graphs = CudaGraphs(enabled=inference_graphs is None or inference_graphs.enabled)
    try:
        with torch.no_grad(), deferred_outputs(state):
            run_forward_loop(model, state, forward_loop)
    finally:
        state.calibrating = False
        state.calib_graphs = None
        for _, q in named_tensor_quantizers(model):  # includes quantizers created while tracing
            q.disable_calib()
            q.enable_quant()
    if state.calls == calls_before:
        raise CalibrationError(
            "forward_loop never called the model: it must run model(batch) for the calibration data"
        )
    if reduce:
        reduce_statistics(model)


def load_activation_amax(model: nn.Module, state: QpassState, fill: Callable[[], set] | None = None) -> None:
    """Each activation quantizer's amax from its calibrator; ``fill``: then sets amax from elsewhere
    and returns the names of quantizers it gave one (they saw no data, and that is fine)."""
    missing, outside = [], []
    for n, q in activation_quantizers(model):
        if not q.load_calib_amax():
            (missing if _owner_slot(n) in state.calib_placed else outside).append(n)
    if fill is not None:
        done = fill()
        missing, outside = [n for n in missing if n not in done], [n for n in outside if n not in done]
    if outside:
        warnings.warn(
            f"{len(outside)} enabled quantizer(s) belong to modules the traced forward does not use "
            f"({', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}); they stay uncalibrated "
            "and quantize with each input's own range if a later input structure reaches them",
            stacklevel=4,
        )
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CalibrationError(
            f"{len(missing)} enabled quantizer(s) saw no calibration data: {shown}. forward_loop never "
            "reached them; feed inputs that do, or disable them with "
            "qpass.disable_quantizer(model, '<pattern>') before calibrating"
        )


def _owner_slot(name: str) -> str:
    """'a.weight_quantizer.1' -> 'a.weight_quantizer' (the name placed in the graph)."""
    head, _, last = name.rpartition(".")
    return head if last.isdigit() else name


def share_group_amax(model: nn.Module, groups: list[list[str]]) -> None:
    """One input amax per shared-input group (max over members), so TensorRT can fuse them."""
    for group in groups:
        members = []
        for path in group:
            q = model.get_submodule(path)._modules.get("input_quantizer")
            if isinstance(q, TensorQuantizer) and q.is_enabled and q.amax is not None:
                members.append(q)
        if len(members) < 2:
            continue
        if len({(q.describe(), tuple(q.amax.shape)) for q in members}) != 1:
            continue  # different formats: nothing to share
        shared = members[0].amax.clone()
        for q in members[1:]:
            shared = torch.maximum(shared, q.amax)
        for q in members:
            q.amax = shared


def _may_enable_traced_slots(state: QpassState) -> bool:
    """Could a config rule enable a quantizer that only tracing creates (attention slots)?"""
    slots = state.rule_set.attention_slots
    for rule in state.rules:
        if rule.cfg is None and not rule.enable:
            continue
        if callable(rule.pattern):
            return True
        tail = rule.pattern.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(slot, rule.pattern) or fnmatch.fnmatch(slot, tail) for slot in slots):
            if rule.enable is not False:
                return True
    return False


def global_amax_groups(model: nn.Module, state: QpassState,
                       chosen: list[list[str]] | None = None) -> list[list[str]]:
    """The modules whose static NVFP4 weights share one global amax: ``chosen`` (``shared_states``
    patterns), else the graph's shared-input groups, else, before any graph is traced (a
    weight-only config runs no forward), ModelOpt's default name groups
    (:func:`qpass.calib.nvfp4_static.name_groups`)."""
    from qpass.calib.nvfp4_static import name_groups

    if chosen is not None:
        return chosen
    return state.groups if state.graphs or state.__dict__.get("fallback") else name_groups(model)


def max_calibrate(model: nn.Module, state: QpassState, forward_loop: Callable | None,
                  sync_expert_weight_amax: bool = False, distributed_sync: bool = True,
                  global_groups: list[list[str]] | None = None) -> None:
    """Max calibration. As ModelOpt 0.47's: a sequential MoE block's experts then share their input
    amax (and with ``sync_expert_weight_amax``, their weight amax) unless ``moe_calib_experts_ratio``
    is set (:mod:`qpass.calib.moe_sync`); ``distributed_sync=False`` keeps each data-parallel rank's
    own statistics; ``global_groups``: the modules whose static NVFP4 weights share one global amax
    (None: :func:`global_amax_groups`)."""
    from qpass.calib.moe_sync import sync_local_experts
    from qpass.calib.nvfp4_static import set_global_amax

    for _, q in named_tensor_quantizers(model):
        if q.is_enabled:
            q.check_supported()
            q.spec  # noqa: B018 - validates the format before any work
    calibrate_weights(model, global_amax_groups(model, state, global_groups))
    sync_experts = state.__dict__.get("moe_ratio") is None
    sync = (lambda: sync_local_experts(model, sync_expert_weight_amax)) if sync_experts else None  # noqa: E731
    needs_data = activation_quantizers(model)
    if not needs_data and not _may_enable_traced_slots(state):
        if sync is not None:
            sync()
        return  # nothing needs data; the graph is traced on the model's first call
    if forward_loop is None:
        if needs_data:
            shown = ", ".join(f"'{n}'" for n, _ in needs_data[:3])
            raise CalibrationError(
                f"the config enables {len(needs_data)} activation quantizer(s) ({shown}, ...) that need "
                "calibration data, but no forward_loop was given; pass forward_loop=lambda m: [m(b) for b in data] "
                "or use a weight-only config"
            )
        if sync is not None:
            sync()
        return
    collect_activations(model, state, forward_loop, reduce=distributed_sync)
    load_activation_amax(model, state, fill=sync)
    share_group_amax(model, state.groups)
    set_global_amax(model, global_amax_groups(model, state, global_groups))  # the forward may have traced the graph
