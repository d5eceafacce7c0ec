"""Max calibration: the running abs-max of what a quantizer has seen, and the abs-max
reductions themselves, computed once per activation tensor.

In a calibration pass several observers read one tensor: the input quantizers of q/k/v (or
gate/up), which share their input, and an algorithm's activation capture
(:mod:`qpass.calib.capture`), whose per-channel abs-max also gives the per-tensor one (the
max of the channel maxima, exactly). :func:`abs_max` and :func:`channel_abs_max` remember
their last results by tensor object and version, so each activation is reduced once: on
SmolLM2's SmoothQuant pass, 480 full reductions instead of 1320.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

_MEMO_SIZE = 8
# id(x) -> [weakref(x), version, per-tensor abs-max or None, per-channel abs-max or None]
_MEMO: "OrderedDict[int, list]" = OrderedDict()


def _entry(x: torch.Tensor, create: bool):
    try:
        version = x._version
    except RuntimeError:  # inference-mode tensors keep no version: not remembered
        return None
    e = _MEMO.get(id(x))
    if e is not None and e[0]() is x and e[1] == version:
        return e
    if not create:
        return None
    e = _MEMO[id(x)] = [weakref.ref(x), version, None, None]
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return e


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim tensor (exact; x's dtype, or float32 when taken from the channel
    maxima); NaN and Inf carry through. One reduction pass: on CUDA the inf-norm (one kernel);
    on the CPU ``aminmax`` (there the inf-norm is about 13x slower than ``abs().amax()``, and
    ``aminmax`` about 1.4x faster)."""
    e = _entry(x, create=False)
    if e is not None and e[2] is None and e[3] is not None:
        e[2] = e[3].max()
    if e is not None and e[2] is not None:
        return e[2]
    d = x.detach()
    if d.is_cuda:
        out = torch.linalg.vector_norm(d, float("inf"))
    else:
        lo, hi = torch.aminmax(d)
        out = torch.maximum(lo.neg(), hi)
    e = _entry(x, create=True)
    if e is not None:
        e[2] = out
    return out


def channel_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over every dim but the last, float32 [channels]; NaN and Inf carry through."""
    e = _entry(x, create=True)
    if e is not None and e[3] is not None:
        return e[3]
    d = x.detach().reshape(-1, x.shape[-1])
    # amax and amin: on the CPU ``aminmax`` along a dim is 8-10x slower than the two of them
    out = torch.maximum(d.amax(0), d.amin(0).neg_()).float()
    if e is not None:
        e[3] = out
    return out


class MaxCalibrator:
    """Keeps the element-wise running maximum of per-batch amax statistics.

    The statistic itself (per-tensor, per-channel, per-block) comes from the
    quantizer's format spec, so its shape is the quantizer's amax shape.
    """

    name = "max"

    def __init__(self) -> None:
        self._amax: torch.Tensor | None = None
        self.num_batches = 0

    def reset(self) -> None:
        self._amax = None
        self.num_batches = 0

    def collect_amax(self, amax: torch.Tensor) -> None:
        amax = amax.detach()
        if self._amax is None or self._amax.shape != amax.shape:
            if self._amax is not None:
                raise RuntimeError(
                    f"calibration statistic changed shape from {tuple(self._amax.shape)} "
                    f"to {tuple(amax.shape)} between batches"
                )
            self._amax = amax.to(torch.float32, copy=True)  # the statistic may come in x's dtype
        else:
            torch.maximum(self._amax, amax, out=self._amax)  # computed in float32, exact
        self.num_batches += 1

    @property
    def has_data(self) -> bool:
        return self._amax is not None

    def compute_amax(self) -> torch.Tensor | None:
        return None if self._amax is None else self._amax.clone()

    def state(self) -> dict:
        """What a distributed reduction needs: the running max (reduced with MAX)."""
        return {"amax": self._amax}
