"""Containers of quantizers: a sequence applied in turn (W4A8: int4 blocks, then fp8) and the
per-expert weight quantizers of a fused mixture-of-experts parameter; the helpers that tell
quantizer slots apart and walk their TensorQuantizers."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from qpass.errors import QuantConfigError


class _Members:
    """Enabled when any member is; enable/disable switch every member."""

    @property
    def is_enabled(self) -> bool:
        return any(q.is_enabled for q in self)

    def enable(self) -> None:
        for q in self:
            q.enable()

    def disable(self) -> None:
        for q in self:
            q.disable()


class SequentialQuantizer(_Members, nn.Sequential):
    """Several quantizers applied in turn (e.g. W4A8: int4 blocks, then fp8)."""

    def __init__(self, *quantizers: TensorQuantizer) -> None:
        super().__init__(*quantizers)

    def set_from_attribute_config(self, attributes) -> None:
        attributes = list(attributes)
        if len(attributes) != len(self):
            raise QuantConfigError(
                f"quantizer sequence has {len(self)} members but the config gives {len(attributes)}"
            )
        for q, a in zip(self, attributes):
            q.set_from_attribute_config(a)

    def describe(self) -> str:
        return " -> ".join(q.describe() for q in self)


class ExpertQuantizers(_Members, nn.ModuleList):
    """The per-expert weight quantizers of one fused mixture-of-experts parameter.

    transformers 5 keeps all experts of an MoE layer in one 3-D parameter (``experts.gate_up_proj``
    ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) and runs them through a grouped matmul.
    Member ``e`` (a :class:`TensorQuantizer`, or a :class:`SequentialQuantizer` for W4A8-style
    configs) quantizes expert ``e``'s ``[out, in]`` matrix with its own amax, as ModelOpt 0.47's
    ``gate_up_proj_weight_quantizers.{e}``. The graph calls the container once, on the whole
    parameter; the fake-quant result is kept until the weight or a member changes.

    The container itself is not a quantizer slot of its own (:func:`is_quantizer` is False): its
    members are, under the names ``<param>_weight_quantizers.{e}``, which ModelOpt's wildcards also
    match with the index dropped (``*weight_quantizer`` selects them)."""

    def __init__(self, quantizers) -> None:
        super().__init__(quantizers)
        self.__dict__["_cache"] = None

    def describe(self) -> str:
        return f"{len(self)} experts: " + self[0].describe() if len(self) else "no experts"

    def _key(self, w: torch.Tensor) -> tuple:
        parts = [w._version]
        for tq in iter_tensor_quantizers(self):
            amax = tq._buffers.get("_amax")
            parts.append((tq._state_version, None if amax is None else (id(amax), amax._version)))
        return tuple(parts)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() < 1 or w.shape[0] != len(self):
            raise QuantConfigError(f"{len(self)} expert weight quantizers got a tensor of shape {tuple(w.shape)}")
        members = iter_tensor_quantizers(self)
        if all(tq._disabled or not (tq._if_quant or tq._if_calib) for tq in members):
            return w
        cacheable = (isinstance(w, nn.Parameter) and all(tq._cache_weights and not tq._if_calib for tq in members)
                     and not torch.compiler.is_compiling() and not (w.requires_grad and torch.is_grad_enabled()))
        if cacheable:
            cache, key = self.__dict__["_cache"], self._key(w)
            if cache is not None and cache[0]() is w and cache[1] == key:
                return cache[2]
        out = torch.stack([m(w[e]) for e, m in enumerate(self)])
        if cacheable:
            self.__dict__["_cache"] = (weakref.ref(w), key, out)
        return out


def is_quantizer(module: nn.Module) -> bool:
    from qpass.nn.tensor_quantizer import TensorQuantizer

    return isinstance(module, (TensorQuantizer, SequentialQuantizer))


def is_quantizer_slot(module: nn.Module) -> bool:
    """A quantizer, or a container of per-expert quantizers: what qpass adds to a model, which model
    structure (graph cache keys, checkpoint fingerprints) leaves out."""
    return is_quantizer(module) or isinstance(module, ExpertQuantizers)


def iter_tensor_quantizers(q: nn.Module) -> list:
    """The TensorQuantizers of a quantizer slot (a SequentialQuantizer's members, the members of
    each expert of an :class:`ExpertQuantizers`, else itself)."""
    if isinstance(q, ExpertQuantizers):
        return [tq for m in q for tq in iter_tensor_quantizers(m)]
    return list(q) if isinstance(q, SequentialQuantizer) else [q]
