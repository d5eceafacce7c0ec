"""Input Hessians ``sum_t x_t x_t^T`` of weighted modules, accumulated during one forward_loop pass.

The capture machinery is :class:`qpass.calib.capture.ActivationCapture`'s (pre-hooks on the
input quantizers, shared inputs such as q/k/v accumulated once and shared as one object); only
the statistic differs. Memory is one ``[C, C]`` float32 matrix per distinct input, whatever the
number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpass.calib.capture import ActivationCapture


@dataclass(frozen=True)
class HessianStats:
    """``x^T x`` summed over every token a module's input saw (never mutated)."""

    xtx: torch.Tensor  # [C, C] float32
    tokens: int
    calls: int

    @property
    def channels(self) -> int:
        return self.xtx.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 X^T X / tokens``."""
        return self.xtx * (2.0 / max(self.tokens, 1))


class HessianCapture(ActivationCapture):
    """Context manager recording :class:`HessianStats` for the input quantizers of ``modules``."""

    def __init__(self, modules) -> None:
        super().__init__(modules, max_tokens=0)

    def reduce_heads(self, heads: list, paths: list[str], devices: list, comm) -> list:
        """The sums of ``x^T x`` and of the counts over the data-parallel ranks."""
        from qpass.calib.capture_reduce import reduce_sums

        return [None if xtx is None else HessianStats(xtx=xtx, tokens=t, calls=c)
                for xtx, t, c in reduce_sums(heads, paths, devices, comm)]

    @torch.no_grad()
    def _update(self, path, prev, quantizer, x):
        x = self._rows(path, prev, quantizer, x)
        xtx = x.t() @ x
        if prev is not None:
            xtx = prev.xtx + xtx.to(prev.xtx.device)
        return HessianStats(xtx=xtx, tokens=(prev.tokens if prev else 0) + x.shape[0],
                            calls=(prev.calls if prev else 0) + 1)
