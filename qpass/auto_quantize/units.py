"""What auto_quantize searches: a weight and its two quantizer slots.

A unit is a weighted layer (``path`` is the module: its ``weight``, ``input_quantizer`` and
``weight_quantizer``) or one fused mixture-of-experts parameter (``path`` is
``<experts module>.<parameter>``: the 3-D parameter, ``<param>_input_quantizer`` and its
per-expert ``<param>_weight_quantizers``, or GPT-OSS/Llama 4's one ``<param>_weight_quantizer``).
The search, the candidates' calibration and the installation of a choice go through these
accessors, so both kinds mix in one search; the experts module's parameters form one search group,
as in ModelOpt 0.47.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qpass.passes.rules import EXPERTS


@dataclass(frozen=True)
class Unit:
    path: str  # the searched name: a module path, or "<experts module path>.<parameter>"
    owner_path: str
    param: str  # "weight", or the expert parameter's name
    input_slot: str
    weight_slot: str
    transposed: bool = False  # [E, in, out] experts: the weight quantizer sees the parameter transposed

    @property
    def is_expert(self) -> bool:
        return self.param != "weight"

    def owner(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.owner_path)

    def weight(self, model: nn.Module) -> torch.Tensor:
        return getattr(self.owner(model), self.param)

    def quantized_weight(self, weight_quantizer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the graph's matmul gets it: fake-quantized in the parameter's own layout."""
        if self.transposed:
            return weight_quantizer(weight.mT).mT
        return weight_quantizer(weight)

    def weight_quantizer_name(self) -> str:
        """The name config rules resolve for this unit's weight quantizer (one expert's, for
        per-expert quantizers: ModelOpt's wildcards match it with the index dropped)."""
        name = f"{self.owner_path}.{self.weight_slot}" if self.owner_path else self.weight_slot
        return f"{name}.0" if self.weight_slot.endswith(EXPERTS.weight_suffix) else name

    @property
    def group_key(self) -> str | None:
        """Units with one key are searched as one group (an experts module's parameters)."""
        return self.owner_path if self.is_expert else None


def units_of(model: nn.Module) -> dict[str, Unit]:
    """Every unit of a qpass-quantized model, by path: modules with a weight quantizer, then fused
    expert parameters with theirs."""
    from qpass.calib.max_calibrate import expert_weight_quantizers

    out = {}
    for path, module in model.named_modules():
        if "weight_quantizer" in module._modules and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[path] = Unit(path, path, "weight", "input_quantizer", "weight_quantizer")
    for path, module, param, _ in expert_weight_quantizers(model):
        p = f"{path}.{param}" if path else param
        out[p] = Unit(p, path, param, param + EXPERTS.input_suffix, EXPERTS.weight_slot(module, param),
                      EXPERTS.transposed(module))
    return out
