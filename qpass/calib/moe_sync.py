"""One input amax for all local experts of a sequential MoE block, as ModelOpt 0.47's max calibration.

A sequential MoE block keeps one module per expert (``experts`` is an ``nn.ModuleList``) and a
router (``gate``) with ``top_k`` and ``num_experts`` (or ``n_routed_experts``), or those on the
block itself: transformers 4's Mixtral/Qwen-MoE, DBRX, remote-code models. ModelOpt 0.47 detects
such blocks by that structure and, after max calibration, gives every expert's input quantizers
the element-wise max over the experts (per quantizer name within an expert: ``fc1.input_quantizer``
of expert 0 with that of expert 1, ...), so an expert the router sent few or no calibration tokens
shares its siblings' range; with ``sync_expert_weight_amax=True`` the weight quantizers too. It
skips this when ``moe_calib_experts_ratio`` is set (every expert then sees tokens of its own).
qpass does the same. transformers 5's fused experts hold one input quantizer per parameter
already.
"""

from __future__ import annotations

import torch
from torch import nn

from qpass.nn.tensor_quantizer import TensorQuantizer


def _has_router(module: nn.Module) -> bool:
    return hasattr(module, "top_k") and (hasattr(module, "num_experts") or hasattr(module, "n_routed_experts"))


def sequential_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of every sparse MoE block whose experts are separate modules."""
    out = []
    for path, module in model.named_modules():
        experts = module._modules.get("experts")
        if experts is None or not hasattr(experts, "__iter__"):
            continue
        gate = module._modules.get("gate")
        if (gate is not None and _has_router(gate)) or _has_router(module):
            out.append((path, module))
    return out


def sync_local_experts(model: nn.Module, sync_weight_amax: bool = False) -> set[str]:
    """Share input (and with ``sync_weight_amax``, weight) amax across each block's experts; returns
    the names of the quantizers that had no amax of their own and got one."""
    filled = set()
    for path, block in sequential_moe_blocks(model):
        per_name: dict[str, list[tuple[str, TensorQuantizer]]] = {}
        for i, expert in enumerate(block.experts):
            for name, q in expert.named_modules():
                if type(q) is not TensorQuantizer or not q.is_enabled:
                    continue
                if "input_quantizer" in name or (sync_weight_amax and "weight_quantizer" in name):
                    full = ".".join(p for p in (path, "experts", str(i), name) if p)
                    per_name.setdefault(name, []).append((full, q))
        for members in per_name.values():
            known = [q.amax for _, q in members if q.amax is not None]
            if not known or len({tuple(a.shape) for a in known}) != 1:
                continue
            shared = known[0].detach().clone()
            for a in known[1:]:
                shared = torch.maximum(shared, a.to(shared.device))
            for full, q in members:
                if q.amax is None:
                    filled.add(full)
                q.amax = shared.clone()
    return filled
