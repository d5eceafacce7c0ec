"""Where an algorithm's offline work runs: on the device the calibration forwards ran on.

After their capture pass, SmoothQuant and AWQ search each unit's scale (and clip, and GPTQ-round
its weights) from the captured statistics, offline. Whole-model calibration keeps statistics next
to the weights, where the forwards ran, so the searches run there. Layerwise calibration of a
model kept on the CPU runs each block on the GPU but stores the statistics next to the weights, on
the CPU. Floating-point results depend on the device (``pow``, reduction and matmul orders, the
Cholesky factorization), so a search on the CPU would not give exactly what a whole-model
calibration on the GPU gives.

:func:`on_compute_device` brings one unit (its modules' parameters and buffers, quantizers
included) to the calibration device for the duration of its search, and gives the statistics a
copy there. Only one unit is on the device at a time, so the peak stays one unit's weights. The
parameters keep their identity: each one's data is swapped for the device copy, then swapped back.
Changes made on the device are copied home only when the caller says it writes (GPTQ rounding).

Layerwise calibration sets the device (:attr:`QpassState.compute_device`) when the forwards ran
elsewhere than the weights; otherwise it is None and this module does nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qpass.nn.tensor_quantizer import TensorQuantizer

__all__ = ["on_compute_device", "to_compute_device"]


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (a separate function so the tests can stand a copy in for a device)."""
    return t.to(device)


class Placement:
    """Moves tensors between the unit's home and the compute device (both None: nothing moves)."""

    def __init__(self, device: torch.device | None, home: torch.device | None) -> None:
        self.device, self.home_device = device, home

    def to(self, t):
        """``t`` on the compute device."""
        if self.device is None or t is None:
            return t
        return _copy(t, self.device)

    def home(self, t):
        """``t`` back on the unit's home device (results that outlive the search)."""
        if self.device is None or t is None or self.home_device is None:
            return t
        return t.to(self.home_device)

    def stats(self, st):
        """Input statistics (:class:`qpass.calib.capture.InputStats`) on the compute device."""
        return st if self.device is None else st.moved(self.to)


_NOWHERE = Placement(None, None)


@contextlib.contextmanager
def on_compute_device(model: nn.Module, state, paths: list[str], writes: bool = False):
    """The modules at ``paths`` on the calibration device within the block (see the module doc).
    Yields a :class:`Placement`. ``writes``: in-place changes made to their parameters within are
    copied home; otherwise the block must not change them."""
    device = state.compute_device
    if device is None:
        yield _NOWHERE
        return
    params: list[tuple[nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    modules: list[nn.Module] = []
    seen: set[int] = set()
    home = None
    for path in paths:
        for module in model.get_submodule(path).modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            modules.append(module)
            for t in module._parameters.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    home = home or t.device
                    params.append((t, t.data))
                    t.data = _copy(t.data, device)
            for name, b in module._buffers.items():
                if b is not None:
                    buffers.append((module, name, b))
                    module._buffers[name] = _copy(b, device)
    try:
        yield Placement(device, home)
    finally:
        for t, data in params:
            if writes:
                data.copy_(t.data)
            t.data = data
        for module, name, b in buffers:
            module._buffers[name] = b
        for module in modules:  # what a quantizer derived from the device copies is dropped
            if isinstance(module, TensorQuantizer):
                module._bump()


def to_compute_device(state, t: torch.Tensor) -> torch.Tensor:
    """``t`` on the calibration device (``t`` itself where there is none, or no state)."""
    device = None if state is None else state.compute_device
    return t if device is None else _copy(t, device)
