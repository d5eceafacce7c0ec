"""HF's ``Conv1D`` (GPT-2 and its kin) made a Linear, as ModelOpt makes it.

``transformers.pytorch_utils.Conv1D`` is a linear layer in all but name: its weight is stored
``[in, out]`` and its forward is ``addmm(bias, x, weight)``. ModelOpt quantizes it as a Linear
after transposing the weight to ``[out, in]`` in place, so its quantizers, their amax
(per output channel: ``[out, 1]``) and its checkpoints' weights all take the Linear layout.
qpass does the same before it registers quantizers (:func:`conv1d_as_linear`): each Conv1D's
class becomes a subclass of ``nn.Linear`` and of its own class (``isinstance`` checks on either
still hold), whose forward is ``nn.Linear.forward``, and its weight a new ``[out, in]``
parameter. The product is the same. On failure (a quantize or restore that raises) every
module gets its class and its original weight parameter back.

Nothing is imported from transformers: a model holding an HF Conv1D has loaded it already.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

_LINEAR_CLASSES: dict[type, type] = {}


def hf_conv1d_class() -> type | None:
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _linear_class(cls: type) -> type:
    if cls not in _LINEAR_CLASSES:
        _LINEAR_CLASSES[cls] = type(f"{cls.__name__}AsLinear", (nn.Linear, cls), {
            "forward": nn.Linear.forward, "extra_repr": nn.Linear.extra_repr, "__module__": __name__,
            "__doc__": f"{cls.__qualname__} run as an nn.Linear: weight [out, in] (qpass.nn.hf_conv1d)",
        })
    return _LINEAR_CLASSES[cls]


def _convertible(module: nn.Module, conv1d: type) -> bool:
    """An HF Conv1D whose forward is Conv1D's own (a subclass with its own forward is left alone)."""
    w = module._parameters.get("weight")
    return (isinstance(module, conv1d) and type(module).forward is conv1d.forward
            and isinstance(w, torch.Tensor) and w.dim() == 2)


def as_linear(model: nn.Module) -> list[tuple[nn.Module, type, nn.Parameter]]:
    """Convert every HF Conv1D in ``model``; returns what :func:`undo` needs."""
    conv1d = hf_conv1d_class()
    if conv1d is None:
        return []
    done = []
    for module in model.modules():
        if not _convertible(module, conv1d):
            continue
        weight = module._parameters["weight"]
        done.append((module, type(module), weight))
        module.__class__ = _linear_class(type(module))
        module._parameters["weight"] = nn.Parameter(weight.detach().t().contiguous(),
                                                    requires_grad=weight.requires_grad)
        module.in_features, module.out_features = weight.shape
    return done


def undo(done: list) -> None:
    for module, cls, weight in reversed(done):
        module.__class__ = cls
        module._parameters["weight"] = weight
        module.__dict__.pop("in_features", None)
        module.__dict__.pop("out_features", None)


@contextlib.contextmanager
def conv1d_as_linear(model: nn.Module):
    """HF Conv1D modules are Linears inside the block, and stay so unless the block raises."""
    done = as_linear(model)
    try:
        yield done
    except BaseException:
        undo(done)
        raise
