"""A weight quantizer that holds its weight packed (``real_quantize``).

:func:`pack_weight` turns a module's enabled weight quantizer into a
:class:`PackedWeightQuantizer` (the same module object, so every traced graph keeps calling
it) holding the codes and scales from :mod:`qpass.formats.packed`, and replaces the module's
``weight`` by a placeholder of the same shape and dtype backed by one element: the FP32
storage is released. The graph still reads ``weight`` and hands it to the quantizer, which
ignores it and returns the dequantized weight, bit for bit what fake quantization of the
original weight gave. The placeholder is a non-persistent buffer: ``state_dict`` carries the
codes and scales (on the quantizer) instead of the weight. New input structures trace as before (the placeholder has the
weight's shape, dtype and device).
"""

from __future__ import annotations

import torch
from torch import nn

from qpass.errors import QpassError
from qpass.formats import packed as packing
from qpass.nn.tensor_quantizer import ExpertQuantizers, TensorQuantizer

PACKED_KEYS = ("codes", "scale", "block_scale", "global_scale")


def placeholder_like(w: torch.Tensor) -> torch.Tensor:
    """A tensor with ``w``'s shape, dtype and device whose storage is one zero element."""
    return torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


class PackedWeightQuantizer(TensorQuantizer):
    """Returns its packed weight, dequantized; its input (the placeholder weight) is ignored."""

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {k: self._buffers[f"_{k}"] for k in PACKED_KEYS if self._buffers.get(f"_{k}") is not None}

    @property
    def packed_bytes(self) -> int:
        """Codes, scales and amax: everything stored for the weight."""
        amax = self.amax
        return packing.packed_bytes(self.packed) + (0 if amax is None else amax.numel() * amax.element_size())

    @property
    def needs_calibration(self) -> bool:
        return False  # the scales are part of the packed weight

    def dequantized(self) -> torch.Tensor:
        return packing.unpack(self.spec, self.packed, self.amax, self._weight_shape, self._weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantized()

    def disable(self) -> None:
        raise QpassError(f"quantizer '{self._name}' holds its weight packed (real_quantize); the unquantized "
                         "weight no longer exists, so it cannot be disabled")

    def set_from_attribute_config(self, attributes) -> None:
        if "_weight_shape" in self.__dict__:
            raise QpassError(f"quantizer '{self._name}' holds its weight packed (real_quantize); its format "
                             "cannot change")
        super().set_from_attribute_config(attributes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for k in PACKED_KEYS:
            key = f"{prefix}_{k}"
            if key in state_dict and f"_{k}" not in self._buffers:
                self._buffers[f"_{k}"] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def install_packed(q: TensorQuantizer, packed: dict, shape, dtype) -> PackedWeightQuantizer:
    """Make ``q`` (in place) a :class:`PackedWeightQuantizer` holding ``packed``."""
    q.__class__ = PackedWeightQuantizer
    q._weight_shape = torch.Size(shape)
    q._weight_dtype = dtype
    for k, t in packed.items():
        q._buffers[f"_{k}"] = t
    q._bump()
    return q


def _pack_into(q: TensorQuantizer, w: torch.Tensor, name: str) -> int:
    """Make ``q`` hold ``w`` packed; returns the bytes it now stores."""
    if not isinstance(q, TensorQuantizer) or type(q) is not TensorQuantizer:
        raise QpassError(f"'{name}' is {type(q).__name__}; only a single TensorQuantizer packs")
    spec = q.spec
    amax = q.amax if spec.needs_amax and not q._attrs.get("type") == "dynamic" else None
    packed = packing.pack(spec, w, spec.with_global(amax, q.global_amax))
    install_packed(q, packed, w.shape, w.dtype)
    return q.packed_bytes


@torch.no_grad()
def pack_weight(module: nn.Module, path: str) -> tuple[int, int]:
    """Pack ``module.weight`` into its weight quantizer; returns (bytes before, bytes after)."""
    w = module.weight
    after = _pack_into(module.weight_quantizer, w, f"{path}.weight_quantizer")
    release_weight(module)
    return w.numel() * w.element_size(), after


def _expert_parts(q, view: torch.Tensor) -> tuple[list, list]:
    """(quantizers, the tensors they quantize): expert ``e``'s ``[out, in]`` matrix per member of an
    :class:`ExpertQuantizers`, else the whole ``[E, out, in]`` view for one quantizer."""
    if isinstance(q, ExpertQuantizers):
        return list(q), [view[e] for e in range(view.shape[0])]
    return [q], [view]


@torch.no_grad()
def pack_experts(module: nn.Module, param: str, q, transposed: bool, path: str) -> tuple[int, int]:
    """Pack a fused MoE parameter into its weight quantizer(s) (``transposed``: the parameter is
    ``[E, in, out]`` and its quantizer sees it as ``[E, out, in]``); the parameter becomes a
    placeholder. Returns (bytes before, bytes after)."""
    w = getattr(module, param)
    members, views = _expert_parts(q, w.mT if transposed else w)
    after = sum(_pack_into(m, v.contiguous(), f"{path}.{param} weight quantizer") for m, v in zip(members, views))
    release_weight(module, param)
    return w.numel() * w.element_size(), after


def release_weight(module: nn.Module, name: str = "weight") -> None:
    """Replace ``module.<name>`` by its placeholder, a non-persistent buffer: not a parameter any
    more, and not in the state_dict (the quantizer's codes and scales are)."""
    w = getattr(module, name)
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    module.register_buffer(name, placeholder_like(w), persistent=False)


def _unpacked(q: PackedWeightQuantizer) -> torch.Tensor:
    """``q``'s dequantized weight; ``q`` becomes a plain disabled quantizer (codes and scales dropped)."""
    folded = q.dequantized()
    for k in PACKED_KEYS:
        q._buffers.pop(f"_{k}", None)
    for k in ("_weight_shape", "_weight_dtype"):
        q.__dict__.pop(k, None)
    q.__class__ = TensorQuantizer
    q.disable()
    return folded


@torch.no_grad()
def unpack_weight(module: nn.Module) -> torch.Tensor:
    """Undo :func:`pack_weight` for ``fold_weight``: ``module.weight`` becomes a parameter holding
    the dequantized values again, and its quantizer a plain disabled one (codes and scales dropped)."""
    folded = _unpacked(module.weight_quantizer)
    module._buffers.pop("weight", None)
    module.weight = nn.Parameter(folded)
    return folded


@torch.no_grad()
def unpack_experts(module: nn.Module, param: str, q, transposed: bool) -> torch.Tensor:
    """Undo :func:`pack_experts`: the parameter holds the dequantized values again."""
    parts = [_unpacked(m) for m in (q if isinstance(q, ExpertQuantizers) else [q])]
    folded = torch.stack(parts) if isinstance(q, ExpertQuantizers) else parts[0]
    folded = (folded.mT if transposed else folded).contiguous()
    module._buffers.pop(param, None)
    setattr(module, param, nn.Parameter(folded))
    return folded
