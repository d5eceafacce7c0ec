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


#: interleaved token groups of :func:`channel_abs_top2` (token i falls in group i % TOP2_GROUPS)
TOP2_GROUPS = 16


def channel_abs_top2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (last dim), max |x| and a lower bound on the second largest |x|, float32 [C] each.

    The tokens (every dim but the last) are split into ``TOP2_GROUPS`` interleaved groups; the bound
    is the second largest of the groups' maxima, so it is exact unless a channel's two largest
    values lie in one group (tokens a multiple of 16 apart). One pass over ``x``, about 1.4x the
    cost of :func:`channel_abs_max`, whose memo it fills with the (exact) max."""
    d = x.detach().reshape(-1, x.shape[-1])
    n, c = d.shape
    m = n - n % TOP2_GROUPS
    parts = []
    if m:
        v = d[:m].view(m // TOP2_GROUPS, TOP2_GROUPS, c)
        parts.append(torch.maximum(v.amax(0), v.amin(0).neg_()))
    if m < n:
        parts.append(d[m:].abs())
    g = (torch.cat(parts) if len(parts) > 1 else parts[0]).float()
    if g.shape[0] < 2:
        g = torch.cat([g, g.new_zeros(2 - g.shape[0], c)])
    top = g.topk(2, dim=0).values
    amax, second = top[0], top[1]
    e = _entry(x, create=True)
    if e is not None and e[3] is None:
        e[3] = amax
    return amax, second


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
