"""``{"method": "real_quantize", "additional_algorithm": ...}``: calibrate, then store weights packed.

The additional algorithm (``max`` when absent; any qpass algorithm, e.g. ``awq_lite`` or
``gptq``) calibrates first. Then every Linear/Conv whose weight quantizer is enabled keeps
its weight as codes and scales (:mod:`qpass.nn.packed_weight`): INT8 codes, INT4/FP4 two per
byte, FP8 codes, NVFP4/MX block scales; so does every fused MoE expert parameter, one set of
codes and scales per expert. The FP32 weight is released; the forward dequantizes on the fly
and gives the fake-quantized model's outputs bit for bit.

A weight shared with another module (tied embeddings) is left as it is, fake-quantized
(packing it would take it from the other user), with a warning. ModelOpt 0.47 spells this
step ``mtq.compress(model)``; earlier ModelOpt releases took this algorithm form.
"""

from __future__ import annotations

import warnings

from torch import nn

from qpass.algorithms import get_algorithm, register_algorithm
from qpass.algorithms.fold import is_shared_parameter
from qpass.algorithms.smoothing import graphs_of
from qpass.calib.max_calibrate import expert_weight_quantizers, weight_quantizer_owners
from qpass.calib.moe_ratio import OPTION, experts_ratio
from qpass.errors import QuantConfigError
from qpass.nn.packed_weight import PackedWeightQuantizer, pack_experts, pack_weight
from qpass.nn.tensor_quantizer import ExpertQuantizers, SequentialQuantizer, TensorQuantizer, iter_tensor_quantizers
from qpass.passes.rules import EXPERTS

_PACKABLE = (nn.Linear, nn.modules.conv._ConvNd)


def packable_modules(model: nn.Module) -> tuple[dict, list[str]]:
    """(path -> module to pack, paths left fake-quantized because their weight is shared)."""
    out, shared = {}, []
    for path, module, q in weight_quantizer_owners(model):
        if isinstance(q, PackedWeightQuantizer) or not q.is_enabled:
            continue
        if not isinstance(module, _PACKABLE):
            continue
        if isinstance(q, SequentialQuantizer):
            raise QuantConfigError(
                f"real_quantize: '{path}.weight_quantizer' is a sequence ({q.describe()}); packing a "
                "sequence of formats is not implemented yet in qpass"
            )
        if is_shared_parameter(model, module.weight):
            shared.append(path)
            continue
        out[path] = module
    return out, shared


def packable_experts(model: nn.Module) -> tuple[list, list[str]]:
    """Fused MoE parameters to pack, as (path, module, parameter, quantizer), and those left
    fake-quantized: some expert's quantizer disabled, or a sequence of formats."""
    out, left = [], []
    for path, module, param, q in expert_weight_quantizers(model):
        members = iter_tensor_quantizers(q)
        if all(isinstance(m, PackedWeightQuantizer) for m in members) or not q.is_enabled:
            continue
        plain = list(q) if isinstance(q, ExpertQuantizers) else [q]
        if all(type(m) is TensorQuantizer and m.is_enabled for m in plain):
            out.append((path, module, param, q))
        else:
            left.append(f"{path}.{param}")
    return out, left


def _rebind_graphs(state, targets: dict) -> None:
    """Point every graph's ``get_attr`` of a packed weight (``targets``: get_attr target -> its
    placeholder) at the placeholder, dropping the FP32 weight."""
    for gm in graphs_of(state):
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in targets:
                parent_path, _, leaf = node.target.rpartition(".")
                parent = gm.get_submodule(parent_path) if parent_path else gm
                parent._parameters.pop(leaf, None)
                parent._buffers.pop(leaf, None)
                setattr(parent, leaf, targets[node.target])


@register_algorithm("real_quantize")
def real_quantize(model, state, forward_loop, additional_algorithm="max"):
    from qpass.config.algorithms import normalize_algorithm

    inner = normalize_algorithm(additional_algorithm, "real_quantize: additional_algorithm")
    packable_modules(model)  # format problems before any work
    if inner is not None:
        options = {k: v for k, v in inner.items() if k != "method"}
        with experts_ratio(model, state, options.pop(OPTION, None)):  # checked by normalize_algorithm
            get_algorithm(inner["method"])(model, state, forward_loop, **options)
    modules, shared = packable_modules(model)
    if shared:
        warnings.warn(f"real_quantize: the weights of {', '.join(shared)} are shared with another module; "
                      "they stay unpacked (fake-quantized)", stacklevel=3)
    experts, unpacked = packable_experts(model)
    if unpacked:
        warnings.warn(f"real_quantize: fused MoE expert weights ({', '.join(unpacked[:4])}"
                      f"{', ...' if len(unpacked) > 4 else ''}) have disabled or sequential expert quantizers; "
                      "they stay unpacked (fake-quantized)", stacklevel=3)
    before = after = 0
    for path, module in modules.items():
        b, a = pack_weight(module, path)
        before, after = before + b, after + a
    targets = {f"{path}.weight": module.weight for path, module in modules.items()}
    for path, module, param, q in experts:
        b, a = pack_experts(module, param, q, EXPERTS.transposed(module), path)
        before, after = before + b, after + a
        targets[f"{path}.{param}"] = getattr(module, param)
    _rebind_graphs(state, targets)
    state.packed_bytes = (before, after)
