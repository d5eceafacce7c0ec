"""TensorQuantizer: the one module that fake-quantizes a tensor in the graph.

It holds ModelOpt's quantizer attributes (num_bits, axis, block_sizes, ...),
the calibrated ``_amax`` buffer and an optional ``_pre_quant_scale``. All
numerics are delegated to :mod:`qpass.formats`; this module only keeps state.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from qpass.calib.histogram import HistogramCalibrator, histogram_calibrator_for
from qpass.calib.max import MaxCalibrator
from qpass.errors import CalibrationError, QuantConfigError

# Attributes this version implements numerically. Others are accepted by the
# config (so every preset loads) and refused when the quantizer is first used.
_UNSUPPORTED_WHEN_SET = {
    "rotate": (False, None, {}),
    "bias": (None, {}),
    "backend": (None,),
    "learn_amax": (False,),
}


class TensorQuantizer(nn.Module):
    """Fake-quantizes its input with the configured format.

    States (ModelOpt's names): ``enable``/``disable`` switch the quantizer off
    entirely; ``enable_calib``/``disable_calib`` collect statistics;
    ``enable_quant``/``disable_quant`` apply quantization.
    """

    def __init__(self, attributes: Any = None, name: str = "") -> None:
        super().__init__()
        self._name = name
        self._disabled = False
        self._if_quant = True
        self._if_calib = False
        self._state_version = 0
        self._weight_cache: tuple | None = None
        self._attrs: dict = {}
        self._spec = None
        self._calibrator = MaxCalibrator()
        self.set_from_attribute_config(attributes or {})

    # ------------------------------------------------------------------ attributes
    def set_from_attribute_config(self, attributes: Any) -> None:
        """Set attributes from a dict or ``qpass.config.QuantizerAttributes``."""
        from qpass.config import QuantizerAttributes

        if isinstance(attributes, dict):
            attributes = QuantizerAttributes.from_dict(attributes, key=self._name or "<quantizer>")
        attrs = attributes.to_dict()
        self._attrs = attrs
        self._disabled = not attrs.get("enable", True)
        self._spec = None
        if attrs.get("calibrator", "max") in ("max", None):
            self._calibrator = MaxCalibrator()
        else:  # "histogram" (or ModelOpt's HistogramCalibrator class); others: set by an algorithm
            self._calibrator = histogram_calibrator_for(attrs, self._name or "<quantizer>")
        self._bump()

    def _bump(self) -> None:
        self._state_version += 1
        self._weight_cache = None

    def __getattr__(self, name: str):
        attrs = self.__dict__.get("_attrs")
        if attrs is not None and name in attrs:
            return attrs[name]
        return super().__getattr__(name)

    @property
    def spec(self):
        if self._spec is None:
            from qpass.formats import QuantSpec

            a = self._attrs
            try:
                self._spec = QuantSpec.from_attributes(
                    a.get("num_bits", 8),
                    axis=a.get("axis"),
                    block_sizes=a.get("block_sizes"),
                    unsigned=a.get("unsigned", False),
                    narrow_range=a.get("narrow_range", False),
                )
            except QuantConfigError as e:
                raise QuantConfigError(f"quantizer '{self._name}': {e}") from None
        return self._spec

    @property
    def is_dynamic(self) -> bool:
        """Ranges computed from each input at run time (``type: "dynamic"``, or MX-style blocks)."""
        return self._attrs.get("type") == "dynamic" or not self.spec.needs_amax

    @property
    def needs_calibration(self) -> bool:
        return self.is_enabled and not self.is_dynamic

    def check_supported(self) -> None:
        for key, defaults in _UNSUPPORTED_WHEN_SET.items():
            value = self._attrs.get(key)
            if value not in defaults:
                raise QuantConfigError(
                    f"quantizer '{self._name}': attribute {key}={value!r} is not implemented yet in qpass"
                )

    # ------------------------------------------------------------------ state switches
    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    def enable(self) -> None:
        self._disabled = False
        self._attrs["enable"] = True
        self._bump()

    def disable(self) -> None:
        self._disabled = True
        self._attrs["enable"] = False
        self._bump()

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise CalibrationError(
                f"quantizer '{self._name}': calibrator {self._attrs.get('calibrator')!r} "
                "needs a calibration algorithm that supports it"
            )
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    # ------------------------------------------------------------------ amax
    @property
    def amax(self) -> torch.Tensor | None:
        return self._buffers.get("_amax")

    @amax.setter
    def amax(self, value) -> None:
        if value is None:
            self._buffers.pop("_amax", None)
        else:
            value = torch.as_tensor(value, dtype=torch.float32).detach()
            old = self._buffers.get("_amax")
            if old is not None:
                value = value.to(old.device)
            self._buffers["_amax"] = value.clone()
        self._bump()

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        return self._buffers.get("_pre_quant_scale")

    @pre_quant_scale.setter
    def pre_quant_scale(self, value) -> None:
        if value is None:
            self._buffers.pop("_pre_quant_scale", None)
        else:
            self._buffers["_pre_quant_scale"] = torch.as_tensor(value).detach().clone()
        self._bump()

    def reset_amax(self) -> None:
        self.amax = None
        if self._calibrator is not None:
            self._calibrator.reset()

    @property
    def calibrator(self):
        return self._calibrator

    def collect(self, x: torch.Tensor) -> None:
        """Feed one batch to the calibrator; NaN/Inf is an error naming this quantizer."""
        spec = self.spec
        if self.is_dynamic or x.numel() == 0:  # x.numel() == 0: e.g. an MoE expert that got no tokens
            return
        histogram = isinstance(self._calibrator, HistogramCalibrator)
        stat = x.detach().abs().amax().float() if histogram else spec.amax_of(x)
        if not bool(torch.isfinite(stat).all()):
            raise CalibrationError(
                f"quantizer '{self._name}' saw NaN or Inf in its input during calibration "
                f"(input shape {tuple(x.shape)}, dtype {x.dtype}); check the calibration data "
                "and the layers before it"
            )
        if histogram:
            self._calibrator.collect(x, stat)  # the raw input: the histogram is of |x|
        else:
            self._calibrator.collect_amax(stat)

    def load_calib_amax(self, *args, **kwargs) -> bool:
        """Move the calibrator's result into ``_amax``. Returns False if it saw no data.

        Arguments go to the calibrator's ``compute_amax``, as in ModelOpt: a histogram
        calibrator takes ``(method, percentile=..., stride=..., start_bin=...)``.
        """
        if self._calibrator is None or self.is_dynamic:
            return True
        try:
            amax = self._calibrator.compute_amax(*args, **kwargs)
        except (CalibrationError, QuantConfigError) as e:
            raise type(e)(f"quantizer '{self._name}': {e}") from None
        if amax is None:
            return False
        self.amax = amax
        return True

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The smoothing scale applies even when quantization is off: AWQ/SmoothQuant already
        # multiplied the weights by its inverse (weight-only AWQ has a disabled input quantizer).
        pqs = self._buffers.get("_pre_quant_scale")
        if pqs is not None:
            x = x * pqs.to(x.dtype)
        if self._disabled:
            return x
        if self._if_calib:
            self.collect(x)
        if not self._if_quant:
            return x
        return self._fake_quant_cached(x) if isinstance(x, nn.Parameter) else self._fake_quant(x)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        amax = None if self._attrs.get("type") == "dynamic" else self._buffers.get("_amax")
        if amax is None and spec.needs_amax:
            # Uncalibrated: quantize with the input's own range, as ModelOpt does.
            amax = spec.amax_of(x)
        elif amax is not None and amax.device != x.device:
            amax = amax.to(x.device)
        if not self._attrs.get("fake_quant", True):
            # Real quantization: packed codes plus scales, dequantized on the fly
            # (bit-identical to fake quant by construction of qpass.formats).
            codes, scale = spec.quantize(x, amax)
            return spec.dequantize(codes, scale, dtype=x.dtype, shape=x.shape)
        return spec.fake_quant(x, amax)

    def _fake_quant_cached(self, w: nn.Parameter) -> torch.Tensor:
        # Weights do not change between eval forwards: quantize once, reuse until the
        # weight or this quantizer changes. Never cache when autograd needs the graph.
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            # Under dynamo the version check would be data-dependent: compile the quantizer itself.
            return self._fake_quant(w)
        amax = self._buffers.get("_amax")
        key = (w._version, self._state_version, None if amax is None else amax._version)
        cache = self._weight_cache
        if cache is not None and cache[0]() is w and cache[1] == key:
            return cache[2]
        out = self._fake_quant(w)
        self._weight_cache = (weakref.ref(w), key, out)
        return out

    # ------------------------------------------------------------------ display
    def describe(self) -> str:
        if self._disabled:
            return "disabled"
        try:
            fmt = self.spec.describe()
        except QuantConfigError as e:
            fmt = f"<invalid: {e}>"
        return fmt

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        parts = [self.describe()]
        amax = self.amax
        if amax is not None:
            if amax.numel() == 1:
                parts.append(f"amax={amax.item():.4g}")
            else:
                parts.append(f"amax=[{amax.min().item():.4g}, {amax.max().item():.4g}]({amax.numel()})")
        if self.pre_quant_scale is not None:
            parts.append("pre_quant_scale")
        if self._if_calib:
            parts.append("calib")
        if self._if_quant:
            parts.append("quant")
        return " ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # _amax/_pre_quant_scale exist only once set: create them when a checkpoint has them.
        for key in ("_amax", "_pre_quant_scale"):
            if prefix + key in state_dict and key not in self._buffers:
                self._buffers[key] = torch.empty_like(state_dict[prefix + key], dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._bump()


class SequentialQuantizer(nn.Sequential):
    """Several quantizers applied in turn (e.g. W4A8: int4 blocks, then fp8)."""

    def __init__(self, *quantizers: TensorQuantizer) -> None:
        super().__init__(*quantizers)

    @property
    def is_enabled(self) -> bool:
        return any(q.is_enabled for q in self)

    def set_from_attribute_config(self, attributes) -> None:
        attributes = list(attributes)
        if len(attributes) != len(self):
            raise QuantConfigError(
                f"quantizer sequence has {len(self)} members but the config gives {len(attributes)}"
            )
        for q, a in zip(self, attributes):
            q.set_from_attribute_config(a)

    def enable(self) -> None:
        for q in self:
            q.enable()

    def disable(self) -> None:
        for q in self:
            q.disable()

    def describe(self) -> str:
        return " -> ".join(q.describe() for q in self)


def is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, (TensorQuantizer, SequentialQuantizer))
