"""Layer-by-layer calibration: a mode of the calibration pass driver.

``collect_activations`` runs ``forward_loop`` once; in layerwise mode that run only records
what the model was called with (the model's forward returns None), then the traced graph
runs segment by segment (:mod:`qpass.graph.segments`): the prefix over every recorded
batch, then block 0 over every batch, then block 1, ..., then the suffix. Between stages
only the values later segments read are kept (block k's outputs become block k+1's
inputs; block k-1's are freed). Every quantizer sees the same tensors, batch after batch,
as in a whole-model pass, so every statistic (max, histogram, the captures of SmoothQuant
and AWQ) is identical, and so is everything computed from them.

Where the weights live elsewhere than the inputs (the model on the CPU, forward_loop
feeding CUDA tensors), each segment's weights are copied to the inputs' device only while
that segment runs; the segment's quantizers move there and back, and their statistics are
stored next to the weights. The graph is traced on the weights' device and the device
constants it bakes in (``arange(device=...)``) are rewritten for the run. The smoothing
algorithms' offline searches then run on the blocks' device too, one unit at a time
(:mod:`qpass.calib.compute_device`), so they compute what a whole-model calibration there computes.

Options (ModelOpt 0.47's ``algorithm={"method": ..., "layerwise": {...}}`` spelling, or
``calibrate(..., layerwise=True)``): ``enable``; ``get_qdq_activations_from_prev_layer``
(only False: the next block sees the float activations, as in a whole-model pass);
``checkpoint_dir`` (not implemented: refused); ``save_every``; ``calib_mutates_weights``.
A model without repeated blocks (no ``nn.ModuleList`` of modules with parameters) is an
error naming it: one segment would save nothing, and silently calibrating the whole model
would hide that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from qpass.calib.histogram import HistogramCalibrator
from qpass.calib.max import MaxCalibrator
from qpass.calib.pass_graph import calibration_graph
from qpass.errors import CalibrationError, QuantConfigError
from qpass.graph.compile_fallback import whole_graph_needed
from qpass.graph.quantized_model import graph_for, state_of
from qpass.graph.segments import Partition, find_blocks, flat_inputs, partition, release, segment_module

_OPTION_TYPES = {
    "enable": bool, "get_qdq_activations_from_prev_layer": bool, "checkpoint_dir": (str, type(None)),
    "save_every": int, "calib_mutates_weights": bool,
}
#: Algorithms that change weights (ModelOpt refuses calib_mutates_weights=False for them).
_MUTATES_WEIGHTS = ("smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq", "svdquant")


@dataclass(frozen=True)
class LayerwiseOptions:
    enable: bool = False
    get_qdq_activations_from_prev_layer: bool = False
    checkpoint_dir: str | None = None
    save_every: int = 1
    calib_mutates_weights: bool = True
    mover: "DeviceMover | None" = field(default=None, compare=False)  # device placement; None: the inputs' device


def parse_options(value, method: str = "max") -> LayerwiseOptions | None:
    """The ``layerwise`` option (None, a bool, or ModelOpt's dict) checked; None when disabled."""
    where = f"algorithm {method!r}: layerwise"
    if value is None or value is False:
        return None
    if value is True:
        value = {"enable": True}
    if not isinstance(value, dict):
        raise QuantConfigError(f"{where} must be a bool or a dict such as {{'enable': True}}, got {value!r}")
    for key, v in value.items():
        if key not in _OPTION_TYPES:
            raise QuantConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(_OPTION_TYPES)}")
        if not isinstance(v, _OPTION_TYPES[key]) or (isinstance(v, bool) and _OPTION_TYPES[key] is int):
            raise QuantConfigError(f"{where}: {key} must be {_type_name(_OPTION_TYPES[key])}, got {v!r}")
    opts = LayerwiseOptions(**value)
    if opts.checkpoint_dir is not None and not opts.enable:
        raise QuantConfigError(f"{where}: checkpoint_dir requires enable=True")
    if opts.save_every < 1:
        raise QuantConfigError(f"{where}: save_every must be >= 1, got {opts.save_every}")
    if not opts.calib_mutates_weights and method in _MUTATES_WEIGHTS:
        raise QuantConfigError(
            f"{where}: calib_mutates_weights=False is only valid for algorithms that set amax alone "
            f"(max, mse); {method!r} changes weights"
        )
    if not opts.enable:
        return None
    if opts.checkpoint_dir is not None:
        raise QuantConfigError(
            f"{where}: checkpoint_dir (resumable per-layer checkpoints) is not implemented yet in qpass"
        )
    if opts.get_qdq_activations_from_prev_layer:
        raise QuantConfigError(
            f"{where}: get_qdq_activations_from_prev_layer=True is not implemented yet in qpass; "
            "with False each block sees the float activations, as in a whole-model pass"
        )
    return opts


def _type_name(t) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join("None" if x is type(None) else x.__name__ for x in types)


@contextlib.contextmanager
def layerwise_mode(model: nn.Module, options: LayerwiseOptions | None = LayerwiseOptions(enable=True),
                   mover: "DeviceMover | None" = None):
    """Calibration passes inside this block run layer by layer (``options=None``: whole model).

    For calibration entry points without an algorithm dict, e.g.
    ``with layerwise_mode(model): qpass.calib.histogram.calibrate_histogram(model, loop, "entropy")``.
    ``mover`` replaces the device placement (tests).
    """
    state = state_of(model)
    previous = state.layerwise
    state.layerwise = options if options is None or mover is None else replace(options, mover=mover)
    try:
        yield
    finally:
        state.layerwise = previous


def run_forward_loop(model: nn.Module, state, forward_loop: Callable) -> None:
    """What the pass driver calls: forward_loop on the whole model, or layer by layer."""
    state.compute_device = None
    if state.layerwise is None:
        forward_loop(model)
    else:
        calibrate_layer_by_layer(model, state, forward_loop, state.layerwise.mover)


# ---------------------------------------------------------------------- recording
@dataclass
class RecordedCall:
    partition_key: int  # id of the traced graph's GraphModule
    gm: fx.GraphModule
    inputs: list  # the graph's flat inputs, on the caller's device
    trace_device: torch.device | None  # the device the graph was traced on, if the inputs were moved for it


class Recorder:
    """Stands in for the graph during the recording run: keeps each call's inputs, returns None."""

    def __init__(self, home: torch.device | None) -> None:
        self.home = home
        self.calls: list[RecordedCall] = []
        self.failed = False

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict):
        try:
            tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            moved = self.home is not None and any(t.device != self.home for t in tensors)
            with whole_graph_needed("layer-by-layer calibration"):
                if moved:  # trace where the weights are; the run rewrites the graph's device constants
                    to_home = lambda v: v.to(self.home) if isinstance(v, torch.Tensor) else v  # noqa: E731
                    traced, _ = graph_for(model, *pytree.tree_map(to_home, (args, kwargs)))
                    flat = _flat_tensors(args, kwargs)
                else:
                    traced, flat = graph_for(model, args, kwargs)
            gm = calibration_graph(model, state_of(model), traced.gm)  # with MoE side passes, if asked
            inputs = flat_inputs(gm, [t.detach().clone() for t in flat])
        except BaseException:
            self.failed = True
            raise
        self.calls.append(RecordedCall(id(gm), gm, inputs, self.home if moved else None))
        return None


def _flat_tensors(args: tuple, kwargs: dict) -> list:
    return [x for x in pytree.tree_leaves((args, dict(sorted(kwargs.items())))) if isinstance(x, torch.Tensor)]


def _weights_device(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return next(iter(devices)) if len(devices) == 1 else None


def offline_device(model: nn.Module, device: torch.device) -> torch.device | None:
    """Where the algorithms' offline searches run after a layerwise pass whose blocks ran on
    ``device``: there, when the weights live elsewhere (None: where the statistics are)."""
    return None if _weights_device(model) == device else device


def record_calls(model: nn.Module, state, forward_loop: Callable) -> list[RecordedCall]:
    recorder = Recorder(_weights_device(model))
    state.recorder = recorder
    try:
        forward_loop(model)
    except Exception as e:
        if recorder.calls and not recorder.failed:
            raise CalibrationError(
                f"layerwise calibration: forward_loop raised {type(e).__name__}: {e}. In layerwise mode the "
                "model's forward only records its inputs and returns None (the blocks run afterwards, one "
                "at a time), so forward_loop must not use the model's outputs: call model(batch) for each "
                "batch and discard the result, or calibrate without layerwise"
            ) from e
        raise
    finally:
        state.recorder = None
    return recorder.calls


# ---------------------------------------------------------------------- device placement
class DeviceMover:
    """Puts a segment's weights and quantizers on the execution device while it runs.

    Weights are copied (the model keeps its own on their home device; the copies die with
    the segment's module); quantizer buffers move there and back; calibration statistics
    are stored on the quantizer's home device after each stage.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def needs_move(self, t: torch.Tensor) -> bool:
        return t.device != self.device

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def attr(self, target: str, value):
        if not isinstance(value, torch.Tensor) or not self.needs_move(value):
            return value
        moved = self.copy(value.detach())
        return nn.Parameter(moved, requires_grad=False) if isinstance(value, nn.Parameter) else moved

    @contextlib.contextmanager
    def quantizers(self, quantizers: list[tuple[nn.Module, torch.device]]):
        """Quantizer buffers on the device for the stage; statistics home afterwards."""
        saved = []
        for q, _ in quantizers:
            for m in q.modules():
                for name, buf in m._buffers.items():
                    if buf is not None and self.needs_move(buf):
                        saved.append((m, name, buf.device))
                        m._buffers[name] = self.copy(buf)
        try:
            yield
        finally:
            for m, name, device in saved:
                if m._buffers.get(name) is not None:
                    m._buffers[name] = m._buffers[name].to(device)
            for q, home in quantizers:
                for m in q.modules():
                    _calibrator_to(getattr(m, "calibrator", None), home)


def _calibrator_to(cal, device: torch.device) -> None:
    if isinstance(cal, MaxCalibrator) and cal._amax is not None and cal._amax.device != device:
        cal._amax = cal._amax.to(device)
    elif isinstance(cal, HistogramCalibrator) and cal._hist is not None and cal._hist.device != device:
        cal._to(device)


# ---------------------------------------------------------------------- the schedule
def _observes(module: nn.Module) -> bool:
    """A module whose call matters during calibration: it collects statistics or is hooked."""
    return any(
        (getattr(m, "_if_calib", False) and getattr(m, "is_enabled", True)) or m._forward_pre_hooks or m._forward_hooks
        for m in module.modules()
    )


def _sinks(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and _observes(gm.get_submodule(n.target))]


def _stage_order(parts: list[Partition]) -> list[tuple]:
    """Segment keys in run order: prefix, block 0, glue after it, block 1, ..., suffix."""
    blocks: list[str] = []
    for part in parts:
        for seg in part.segments:
            if seg.block is not None and seg.block not in blocks:
                blocks.append(seg.block)
    rank = {("glue", None): 0}
    for i, b in enumerate(blocks):
        rank[("block", b)] = 2 * i + 1
        rank[("glue", b)] = 2 * i + 2
    for part in parts:
        ranks = [rank[s.key] for s in part.segments]
        if ranks != sorted(ranks):
            order = " -> ".join(s.name for s in part.segments)
            raise CalibrationError(
                f"layerwise calibration: the traced graphs run the blocks in different orders ({order}); "
                "calibrate this model without layerwise"
            )
    return sorted({s.key for p in parts for s in p.segments}, key=rank.__getitem__)


def _owner_device(model: nn.Module, quantizer_path: str, fallback: torch.device) -> torch.device:
    owner = model.get_submodule(quantizer_path.rpartition(".")[0])
    for t in owner.parameters(recurse=False):
        return t.device
    home = _weights_device(model)
    return home if home is not None else fallback


def _execution_device(calls: list[RecordedCall]) -> torch.device:
    devices = {t.device for c in calls for t in c.inputs if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise CalibrationError(
            f"layerwise calibration: forward_loop fed inputs on several devices ({', '.join(map(str, devices))}); "
            "feed every batch on the device the blocks should run on"
        )
    return devices.pop() if devices else torch.device("cpu")


@torch.no_grad()
def calibrate_layer_by_layer(model: nn.Module, state, forward_loop: Callable, mover: DeviceMover | None = None) -> None:
    blocks = find_blocks(model)
    if not blocks:
        raise CalibrationError(
            f"layerwise calibration needs repeated blocks, but {type(model).__name__} has no nn.ModuleList "
            "of modules with parameters (such as model.layers or encoder.layer); calibrate it without layerwise"
        )
    calls = record_calls(model, state, forward_loop)
    if not calls:
        return  # the driver reports a forward_loop that never called the model
    device = _execution_device(calls)
    mover = mover or DeviceMover(device)
    state.compute_device = offline_device(model, device)
    parts: dict[int, Partition] = {}
    for c in calls:
        if c.partition_key not in parts:
            parts[c.partition_key] = partition(c.gm, blocks, sinks=_sinks(c.gm))
    if not any(s.block is not None for p in parts.values() for s in p.segments):
        raise CalibrationError(
            f"layerwise calibration: none of {type(model).__name__}'s blocks ({blocks[0]}, ...) feeds a "
            "quantizer that is calibrated; calibrate it without layerwise"
        )
    envs = []
    for c in calls:
        envs.append(dict(zip(parts[c.partition_key].placeholders, c.inputs)))
        c.inputs = None  # the environments own them now; freed after their last reader
    for key in _stage_order(list(parts.values())):
        _run_stage(model, key, calls, parts, envs, mover, device)


def _run_stage(model, key, calls, parts, envs, mover: DeviceMover, device) -> None:
    modules, quantizers = {}, {}
    for pk, part in parts.items():
        for i, seg in enumerate(part.segments):
            if seg.key != key:
                continue
            trace_device = next((c.trace_device for c in calls if c.partition_key == pk), None)
            devices = (trace_device, device) if trace_device is not None else None
            modules[pk] = (i, seg, segment_module(part, seg, attr=mover.attr, devices=devices))
            for node in seg.nodes:
                if node.op == "call_module" and node.target not in quantizers:
                    quantizers[node.target] = (part.gm.get_submodule(node.target),
                                               _owner_device(model, node.target, device))
    try:
        with mover.quantizers(list(quantizers.values())):
            for call, env in zip(calls, envs):
                entry = modules.get(call.partition_key)
                if entry is None:
                    continue
                i, seg, module = entry
                outs = module(*[env[n] for n in seg.inputs])
                env.update(zip(seg.outputs, outs))
                del outs
                last_use = parts[call.partition_key].last_use
                for n in seg.inputs:
                    if last_use.get(n, -1) <= i:
                        env.pop(n, None)  # block k-1's outputs once block k has read them
    finally:
        for _, seg, module in modules.values():
            release(module, seg)
