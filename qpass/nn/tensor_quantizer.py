"""TensorQuantizer: the one module that fake-quantizes a tensor in the graph.

It holds ModelOpt's quantizer attributes (num_bits, axis, block_sizes, ...),
the calibrated ``_amax`` buffer, an optional ``_pre_quant_scale`` and, for affine
quantization (the ``bias`` attribute, :mod:`qpass.calib.bias`), the calibrated ``_bias_value``.
All numerics are delegated to :mod:`qpass.formats`; this module only keeps state.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from qpass.calib.bias import BiasCalibrator, bias_of
from qpass.calib.histogram import HistogramCalibrator, histogram_calibrator_for
from qpass.calib.max import MaxCalibrator, abs_max
from qpass.errors import CalibrationError, QuantConfigError
from qpass.formats import triton_kernels
from qpass.nn.compiled_fake_quant import compiled_int_fake_quant, int_compile_plan

# Attributes not implemented numerically: the config accepts them (every preset loads), first use refuses them.
_UNSUPPORTED_WHEN_SET = {
    "rotate": (False, None, {}),
    "backend": (None,),
    "learn_amax": (False,),
}
OPTIONAL_BUFFERS = ("_amax", "_pre_quant_scale", "_bias_value", "_global_amax", "_svdquant_lora_a", "_svdquant_lora_b")  # once set


class _Epoch:
    """Counts changes to any quantizer's state that decide how a graph runs it: enabled or not,
    quantizing or calibrating, a pre_quant_scale, hooks, the attributes, the amax. Cached
    execution graphs (:mod:`qpass.graph.execution`) are rebuilt when it moves."""

    value = 0


def quantizer_epoch() -> int:
    return _Epoch.value


def bump_quantizer_epoch() -> None:
    _Epoch.value += 1


class TensorQuantizer(nn.Module):
    """Fake-quantizes its input with the configured format.

    States (ModelOpt's names): ``enable``/``disable`` switch the quantizer off
    entirely; ``enable_calib``/``disable_calib`` collect statistics;
    ``enable_quant``/``disable_quant`` apply quantization.
    """

    _cache_weights = True  # eval forwards keep the fake-quant weight (qpass.set_weight_cache)

    def __init__(self, attributes: Any = None, name: str = "") -> None:
        super().__init__()
        # plain attributes straight into __dict__ (nn.Module.__setattr__ checks each one for
        # parameters, buffers and modules: a model's quantizers are created by the hundred)
        self.__dict__.update(_name=name, _disabled=False, _if_quant=True, _if_calib=False, _state_version=0,
                             _weight_cache=None, _fast=None, _attrs={}, _spec=None, _calibrator=MaxCalibrator(),
                             _bias_calibrator=None)
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
        bias = attrs.get("bias")
        if bias and bias.get("method") == "histogram" and not self._zero_point_format():
            raise QuantConfigError(
                f"quantizer '{self._name or '<quantizer>'}': bias method 'histogram' searches one range for "
                "a static per-tensor integer quantizer (integer num_bits, axis None, no block_sizes)"
            )
        self._bias_calibrator = BiasCalibrator(bias) if bias and bias.get("type", "static") == "static" else None
        if self._bias_calibrator is None:
            self._buffers.pop("_bias_value", None)
        self.__dict__["_compile_plan"] = int_compile_plan(self)
        self._bump()

    def _bump(self) -> None:
        self._state_version += 1
        self._weight_cache = None
        self._fast = None
        _Epoch.value += 1

    def register_forward_pre_hook(self, *args, **kwargs):
        _Epoch.value += 1  # an execution graph that skips this quantizer must call it again
        return super().register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        _Epoch.value += 1
        return super().register_forward_hook(*args, **kwargs)

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
        if self._attrs.get("bias") and not self._attrs.get("fake_quant", True):
            raise QuantConfigError(
                f"quantizer '{self._name}': bias (affine quantization) with fake_quant=False is not "
                "implemented yet in qpass")

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
        _Epoch.value += 1

    def disable_quant(self) -> None:
        self._if_quant = False
        _Epoch.value += 1

    def enable_calib(self) -> None:
        if self._calibrator is None:
            raise CalibrationError(
                f"quantizer '{self._name}': calibrator {self._attrs.get('calibrator')!r} "
                "needs a calibration algorithm that supports it"
            )
        self._if_calib = True
        _Epoch.value += 1

    def disable_calib(self) -> None:
        self._if_calib = False
        _Epoch.value += 1

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
        self._set_state_buffer("_pre_quant_scale", value)

    def _set_state_buffer(self, name: str, value, dtype=None) -> None:
        """Set (a copy of ``value``) or drop (None) one of the optional state buffers."""
        if value is None:
            self._buffers.pop(name, None)
        else:
            self._buffers[name] = torch.as_tensor(value, dtype=dtype).detach().clone()
        self._bump()

    @property
    def global_amax(self) -> torch.Tensor | None:
        """Static NVFP4: the per-tensor amax that fixes the E4M3 block-scale grid (ModelOpt's name)."""
        return self._buffers.get("_global_amax")

    @global_amax.setter
    def global_amax(self, value) -> None:
        self._set_state_buffer("_global_amax", value, torch.float32)

    def reset_amax(self) -> None:
        self.amax = None
        self._buffers.pop("_global_amax", None)
        if self._calibrator is not None:
            self._calibrator.reset()
        if self._bias_calibrator is not None:
            self._bias_calibrator.reset()

    # ------------------------------------------------------------------ affine bias
    @property
    def bias_value(self) -> torch.Tensor | None:
        """The calibrated static bias (ModelOpt's ``_bias_value``), None before calibration."""
        return self._buffers.get("_bias_value")

    @bias_value.setter
    def bias_value(self, value) -> None:
        self._set_state_buffer("_bias_value", value, torch.float32)

    def _zero_point_format(self) -> bool:
        """A ``zero_point`` bias on a static per-tensor integer format."""
        from qpass.formats.integer import IntFormat

        bias = self._attrs.get("bias")
        spec = self.spec
        return bool(bias and bias.get("zero_point") and isinstance(spec.fmt, IntFormat) and not spec.is_dynamic
                    and not spec.block_sizes and spec.axis is None)

    def zero_point_step(self, amax: torch.Tensor | None) -> torch.Tensor | None:
        """The quantization step a ``zero_point`` bias is rounded to (an integer format under one
        per-tensor amax), else None: the bias is used as calibrated."""
        if amax is None or amax.numel() != 1 or not self._zero_point_format():
            return None
        a = amax.detach().float().reshape(1)
        return self.spec.quantize(a.new_zeros(1), a)[1].reshape(())

    def effective_bias(self, x: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor | None:
        """The bias subtracted before quantizing ``x`` (float32), or None without affine
        quantization: the calibrated one (rounded to whole steps with ``zero_point``), one computed
        from ``x`` when uncalibrated or dynamic."""
        bias = self._attrs.get("bias")
        if not bias:
            return None
        b = self._buffers.get("_bias_value") if bias.get("type", "static") == "static" else None
        if b is None:
            return bias_of(x, bias)
        b = b.to(x.device)
        step = self.zero_point_step(amax)
        if step is not None:
            step = step.to(x.device)
            b = torch.round(b / step) * step
        return b

    @property
    def calibrator(self):
        return self._calibrator

    def collect(self, x: torch.Tensor) -> None:
        """Feed one batch to the calibrator; NaN/Inf is an error naming this quantizer.

        Per-tensor statistics (and, on a GPU, per-channel and block ones) are checked once, on
        the collected amax (NaN and Inf carry through the running max), in
        :meth:`load_calib_amax`: a check per batch would stop a GPU's host until the device caught
        up, once per quantizer and batch. Histogram statistics, and per-channel or block ones on
        the CPU, are checked per batch."""
        spec = self.spec
        if self.is_dynamic or x.numel() == 0:  # x.numel() == 0: e.g. an MoE expert that got no tokens
            return
        histogram = isinstance(self._calibrator, HistogramCalibrator)
        self.__dict__["_calib_input"] = (tuple(x.shape), x.dtype)
        if self._bias_calibrator is not None:  # the amax of x minus the running bias, as ModelOpt
            try:
                self._bias_calibrator.collect(x)
            except CalibrationError as e:
                raise CalibrationError(f"quantizer '{self._name}': {e}") from None
            x = x.detach().float() - self._bias_calibrator.compute_bias()
        if not histogram and spec.axis is None and not spec.block_sizes:
            # per tensor: max |x| in one reduction, exact in x's own dtype (no float32 copy of x);
            # NaN and Inf carry through it
            self._calibrator.collect_amax(abs_max(x))
            return
        stat = x.detach().abs().amax().float() if histogram else spec.amax_of(x)
        if (histogram or x.device.type == "cpu") and not bool(torch.isfinite(stat).all()):
            self._raise_not_finite()
        if histogram:
            self._calibrator.collect(x, stat)  # the raw input: the histogram is of |x|
        else:
            self._calibrator.collect_amax(stat)

    def _raise_not_finite(self):
        shape, dtype = self.__dict__.get("_calib_input", ("?", "?"))
        raise CalibrationError(
            f"quantizer '{self._name}' saw NaN or Inf in its input during calibration "
            f"(input shape {shape}, dtype {dtype}); check the calibration data "
            "and the layers before it"
        )

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
        if isinstance(self._calibrator, MaxCalibrator) and not bool(torch.isfinite(amax).all()):
            self._raise_not_finite()  # a batch held NaN or Inf (the checks deferred in collect)
        if self._bias_calibrator is not None and self._bias_calibrator.compute_bias() is not None:
            bias = self._bias_calibrator.compute_bias()
            if self._zero_point_format() and amax.numel() == 1 and bias.numel() == 1:
                bias, amax = self._bias_calibrator.zero_point_range(amax, 2 ** self.spec.fmt.num_bits)
            self.bias_value = bias.to(amax.device)  # beside the amax (layerwise: the weights' home)
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
        if isinstance(x, nn.Parameter):
            return self._fake_quant_cached(x)
        if torch.compiler.is_compiling():
            out = compiled_int_fake_quant(self, x)
            if out is not None:
                return out
        out = self._fake_quant_per_tensor(x)
        return self._fake_quant(x) if out is None else out

    # Activations with one calibrated amax (the INT8/FP8/NVFP4 input quantizers) are quantized by a
    # short fixed sequence of kernels, with the scales computed once per amax: on a GPU the
    # host issues every kernel of every quantizer, and the general path (layouts, 0-dim scale
    # arithmetic, a float32 copy of the input, a final cast) issued three to four times as many.
    # The values are those of the general path (tested: to the bit for the float formats; an
    # integer zero may keep the sign of x, which the general path normalises to +0.0).
    _FAST_DTYPES = (torch.float32, torch.bfloat16)

    def _fake_quant_per_tensor(self, x: torch.Tensor):
        """Fake quantization of ``x`` with a per-tensor static INT/FP8 format or NVFP4-style
        blocks under a calibrated global amax, or None where the general path applies (other
        formats, autograd, torch.compile, float16, a 0-dim x)."""
        amax = self._buffers.get("_amax")
        if (amax is None or x.dtype not in self._FAST_DTYPES or x.dim() == 0 or amax.numel() != 1
                or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling()):
            return None
        fast = self._fast
        if fast is None or fast[0] is not amax or fast[1] != amax._version or fast[2] != x.device:
            fast = self._fast = (amax, amax._version, x.device, self._fast_constants(amax, x.device))
        consts = fast[3]
        if consts is None:
            return None
        if consts[0] == "blocks":
            return self._fake_quant_float_blocks(x, *consts[1:])
        _, fmt, mult, div, integer_format = consts

        def torch_path():
            y = torch.mul(x, mult)  # float32: ``mult`` has one dimension, so it takes part in promotion
            if integer_format:
                y.round_().clamp_(fmt.min_bound, fmt.max_bound)
                return torch.div(y, div, out=torch.empty_like(x))  # in float32, stored in x's dtype
            return torch.mul(fmt.round_(y), div, out=torch.empty_like(x))  # FP8: ``div`` is 1 / scale

        if triton_kernels.usable(x) and (integer_format or fmt.bits == (4, 3)):
            lo, hi = (fmt.min_bound, fmt.max_bound) if integer_format else (-fmt.max, fmt.max)
            out = triton_kernels.fake_quant_per_tensor(x, mult, div, lo, hi, not integer_format, torch_path)
            if out is not None:
                return out
        return torch_path()

    @staticmethod
    def _fake_quant_float_blocks(x, elem, scale_fmt, block, g, denom):
        """NVFP4-style dynamic blocks (float block scales under a calibrated global amax), the
        arithmetic of :func:`qpass.formats.dynamic.fake_quant` on x's own blocks."""
        if x.shape[-1] % block:
            return None

        def torch_path():
            xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
            s = torch.div(xb.abs().amax(dim=-1, keepdim=True), denom).clamp_(max=scale_fmt.max)  # float32
            d = scale_fmt.round_(s).mul_(g)
            zero = d == 0
            y = torch.div(xb, torch.where(zero, 1.0, d)).masked_fill_(zero, 0.0)
            out = torch.empty(xb.shape, dtype=x.dtype, device=x.device)
            return torch.mul(elem.round_(y), d, out=out).view(x.shape)

        if (triton_kernels.usable(x) and scale_fmt.bits == (4, 3) and elem.rounds_by_quantum
                and block & (block - 1) == 0):
            out = triton_kernels.fake_quant_blocks(x, elem, scale_fmt, block, g, denom, torch_path)
            if out is not None:
                return out
        return torch_path()

    def _fast_constants(self, amax: torch.Tensor, device):
        from qpass.formats import dynamic, floating, integer, scaled

        spec = self.spec
        if self._attrs.get("type") == "dynamic" or not self._attrs.get("fake_quant", True) or self._attrs.get("bias"):
            return None  # an affine bias: the general path (_fake_quant) subtracts it
        a = amax.detach().to(device=device, dtype=torch.float32).reshape(1)
        elem = spec.fmt
        if spec.is_dynamic:
            key, block = spec.dynamic_block
            scale_fmt = spec.scale_format
            if (spec.is_mx or key != -1 or scale_fmt.torch_dtype is None
                    or not isinstance(elem, floating.FloatFormat) or elem.torch_dtype is not None):
                return None
            g = dynamic._global_scale(elem, scale_fmt, a)
            if not bool(g > 0) or not bool(torch.isfinite(g)):  # zero or NaN global scale: general path
                return None
            return "blocks", elem, scale_fmt, block, g.reshape(1), (elem.max * g).reshape(1)
        if spec.block_sizes or not isinstance(elem, (integer.IntFormat, floating.FloatFormat)):
            return None
        if isinstance(elem, integer.IntFormat):
            mult, div = scaled._int_divisor(elem, a)
            return "tensor", elem, mult, div, True
        if elem.torch_dtype is None:  # FP8 only (FP4/FP6 per tensor take the general path)
            return None
        scale, scale_inv = scaled._float_scale(elem, a)
        return "tensor", elem, scale, scale_inv, False

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        amax = None if self._attrs.get("type") == "dynamic" else self._buffers.get("_amax")
        bias = self.effective_bias(x, amax)
        if bias is not None:  # affine: quantize x - b, add b back (in x's dtype)
            b = bias.to(x.dtype)
            xb = x - b
            if amax is None and spec.needs_amax:
                amax = spec.amax_of(xb)
            elif amax is not None and amax.device != x.device:
                amax = amax.to(x.device)
            return spec.fake_quant(xb, amax) + b
        if amax is None and spec.needs_amax:
            # Uncalibrated: quantize with the input's own range, as ModelOpt does.
            amax = spec.amax_of(x)
        elif amax is not None and amax.device != x.device:
            amax = amax.to(x.device)
        amax = spec.with_global(amax, self._buffers.get("_global_amax"))
        if not self._attrs.get("fake_quant", True):
            # Real quantization: packed codes plus scales, dequantized on the fly
            # (bit-identical to fake quant by construction of qpass.formats).
            codes, scale = spec.quantize(x, amax)
            return spec.dequantize(codes, scale, dtype=x.dtype, shape=x.shape)
        return spec.fake_quant(x, amax)

    def _fake_quant_cached(self, w: nn.Parameter) -> torch.Tensor:
        # Weights do not change between eval forwards: quantize once, reuse until the
        # weight or this quantizer changes. Never cache when autograd needs the graph.
        if torch.is_grad_enabled() and w.requires_grad:
            return self._fake_quant(w)
        if torch.compiler.is_compiling():
            # Dynamo cannot check w._version (data-dependent: a graph break per weight). With a
            # cache from an eager forward (every quantizer change drops it, see _bump, and dynamo
            # guards on its presence), the compiled code reads the cached fake-quant weight as an
            # input instead of re-quantizing every weight on every call; weights changed in place
            # after compiling need torch._dynamo.reset(), as amax changes already do. Without a
            # cache, the quantizer's arithmetic is compiled.
            cache = self._weight_cache
            if cache is not None:
                return cache[2]
            out = compiled_int_fake_quant(self, w)
            return self._fake_quant(w) if out is None else out
        if not self._cache_weights:
            return self._fake_quant(w)
        amax = self._buffers.get("_amax")
        key = (w._version, self._state_version, None if amax is None else amax._version)
        cache = self._weight_cache
        if cache is not None and cache[0]() is w and cache[1] == key:
            return cache[2]
        # contiguous: a padded block layout (576 columns in blocks of 128) comes back as a strided
        # view, which every GEMM reading the cached weight would otherwise step through
        out = self._fake_quant(w).contiguous()
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
        if self._attrs.get("bias"):
            b = self.bias_value
            parts.append("bias" if b is None or b.numel() != 1 else f"bias={b.item():.4g}")
        if self._if_calib:
            parts.append("calib")
        if self._if_quant:
            parts.append("quant")
        return " ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key in OPTIONAL_BUFFERS:  # created once a checkpoint has them
            saved = state_dict.get(prefix + key)
            # a bias keeps the calibration input's rank ([1, 1, 1] per tensor for 3-D inputs)
            if saved is not None and (key not in self._buffers or (key == "_bias_value"
                                                                   and self._buffers[key].shape != saved.shape)):
                self._buffers[key] = torch.empty_like(saved, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._bump()


# Containers of quantizers (a sequence for W4A8, one per expert of a fused MoE parameter) and the
# helpers that walk them live in qpass.nn.containers; imported here, where callers find them.
from qpass.nn.containers import (  # noqa: E402 - below TensorQuantizer, which the containers use
    ExpertQuantizers, SequentialQuantizer, is_quantizer, is_quantizer_slot, iter_tensor_quantizers,
)
