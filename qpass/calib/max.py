"""Max calibration: the running abs-max of what a quantizer has seen."""

from __future__ import annotations

import torch


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
