"""Shared machinery of the smoothing algorithms (SmoothQuant, AWQ).

One calibration pass (:func:`capture_pass`) collects, at the same time, the max
statistics of every activation quantizer and the per-channel statistics and token
subsample of each smoothed module's input. A smoothing *unit* is a shared-input group
(q/k/v, gate/up) or a lone module: it gets one scale ``s`` over its input channels.
:func:`apply_scale` multiplies the unit's weights by ``s`` and folds ``1/s`` into the
producer (see :mod:`qpass.algorithms.fold`) or keeps it as every member's
``pre_quant_scale``. :func:`finish` sets the smoothed input quantizers' amax
(``max_c amax_c / s_c``, exact for a per-tensor max statistic; otherwise a second
pass), calibrates the weights and shares amax within groups.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from qpass.algorithms.fold import FoldSite, find_fold_site, is_shared_parameter, untie_weight
from qpass.calib.capture import ActivationCapture, InputStats
from qpass.calib.max import MaxCalibrator
from qpass.calib.pass_graph import statistics_kernels
from qpass.calib.max_calibrate import (
    calibrate_weights, collect_activations, global_amax_groups, load_activation_amax, named_tensor_quantizers,
    share_group_amax, weight_quantizer_owners,
)
from qpass.errors import CalibrationError, QuantConfigError
from qpass.formats.layout import abs_amax
from qpass.graph.quantized_model import QpassState, iter_tensor_quantizers
from qpass.nn.tensor_quantizer import TensorQuantizer
from qpass.passes.lora_branch import lora_of, set_lora, sync_lora_branches

#: Tokens kept per captured input for the per-layer searches (a seeded uniform subsample).
SEARCH_TOKENS = 4096
SEED = 0


def check_common_options(method: str, options: dict) -> None:
    """ModelOpt's options every algorithm takes; only their defaults are implemented."""
    for key, value in options.items():
        if key == "moe_calib_experts_ratio" and value is None:
            continue
        if key == "layerwise" and (not value or (isinstance(value, dict) and not value.get("enable", False))):
            continue
        raise QuantConfigError(f"{method}: option {key}={value!r} is not implemented yet in qpass")


def require_forward_loop(method: str, forward_loop) -> None:
    if forward_loop is None:
        raise CalibrationError(
            f"{method} needs calibration data: pass forward_loop=lambda m: [m(b) for b in data]"
        )


def validate_quantizers(model: nn.Module) -> None:
    for _, q in named_tensor_quantizers(model):
        if q.is_enabled:
            q.check_supported()
            q.spec  # noqa: B018 - validates the format before any work


def graphs_of(state: QpassState) -> list[fx.GraphModule]:
    return [t.gm for traced in state.graphs.values() for t in traced]


def smoothable_modules(model: nn.Module, need_input: bool) -> dict[str, nn.Linear]:
    """Linear modules with an enabled weight quantizer (and an enabled input quantizer if asked)."""
    out = {}
    for path, module, wq in weight_quantizer_owners(model):
        iq = module._modules.get("input_quantizer")
        if not isinstance(module, nn.Linear) or not wq.is_enabled or not isinstance(iq, TensorQuantizer):
            continue
        if need_input and not iq.is_enabled:
            continue
        if iq.is_enabled and iq._attrs.get("bias"):
            raise QuantConfigError(
                f"quantizer '{path}.input_quantizer' has an affine bias; smoothing scales for affine "
                "input quantizers are not implemented yet in qpass (disable its bias, or use algorithm 'max')")
        out[path] = module
    return out


def capture_pass(model, state, forward_loop, modules: dict, max_tokens: int, sums: bool = True,
                 grow_to: int = 0, second: bool = False) -> dict[str, InputStats]:
    """The one forward_loop pass: activation max statistics plus the modules' input captures
    (``sums``: with the per-channel mean |x| AWQ needs; ``grow_to``: a token sample that grows
    with the data; ``second``: each channel's second largest |x|; see :class:`ActivationCapture`).
    Its linears run through oneDNN on the CPU (:func:`qpass.calib.pass_graph.statistics_kernels`)."""
    with ActivationCapture(modules, max_tokens=max_tokens, seed=SEED, sums=sums, grow_to=grow_to,
                           second=second) as capture, statistics_kernels(model, state):
        collect_activations(model, state, forward_loop)
    load_activation_amax(model, state)
    return capture.stats


def shared_input_units(state: QpassState, modules: dict) -> list[list[str]]:
    """Shared-input groups restricted to ``modules``, then the remaining modules alone."""
    units, seen = [], set()
    for group in state.groups:
        members = [p for p in group if p in modules]
        if members:
            units.append(members)
            seen.update(members)
    units.extend([p] for p in modules if p not in seen)
    return units


def smoothing_units(state: QpassState, modules: dict, stats: dict) -> list[list[str]]:
    """:func:`shared_input_units`; modules the pass never reached are left out with a
    warning (nothing to smooth with)."""
    units = shared_input_units(state, modules)
    kept, missed = [], []
    for unit in units:
        (kept if all(p in stats for p in unit) else missed).append(unit)
    if missed:
        names = ", ".join(p for u in missed for p in u)
        warnings.warn(f"no calibration data reached {names}; left unsmoothed", stacklevel=3)
    for unit in kept:
        ref = stats[unit[0]]
        if any(stats[p] is not ref and stats[p].channels != ref.channels for p in unit):
            raise CalibrationError(f"modules {unit} share an input but saw different channel counts")
    return kept


def group_weight(model: nn.Module, unit: list[str]) -> torch.Tensor:
    """The members' weights stacked along output rows, float32."""
    return torch.cat([model.get_submodule(p).weight.detach().float() for p in unit])


#: Elements per row chunk in :func:`scaled_weight_rows`: a few MB of float32 temporaries, under
#: glibc's mmap threshold (32 MB), so the allocator reuses them instead of faulting fresh pages
#: for every elementwise step (that cost ~5x the arithmetic on a 49152x576 lm_head).
ROW_CHUNK_ELEMENTS = 1 << 20


def fake_quant_weight(q: nn.Module, w: torch.Tensor, first_amax: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` fake-quantized as the (possibly sequential) weight quantizer would after max calibration
    (the first enabled quantizer with ``first_amax`` instead, when given: a clipped amax)."""
    out = w
    first = True
    for tq in iter_tensor_quantizers(q):
        if not tq.is_enabled:
            continue
        spec = tq.spec
        amax = spec.amax_of(w) if spec.needs_amax else None
        if first and first_amax is not None:
            amax = first_amax
        first = False
        out = spec.fake_quant(out, amax)
    return out


_GLOBAL, _LOCAL, _NONE = "global", "local", "none"


@functools.lru_cache(maxsize=256)
def _amax_counts(spec, channels: int) -> tuple[int, int]:
    """How many amax values ``spec`` keeps for a weight of one row and of two rows."""
    return tuple(spec.amax_of(torch.ones(n, channels)).numel() for n in (1, 2))


def _stage_kinds(q: nn.Module, w: torch.Tensor, s: torch.Tensor, col_amax: torch.Tensor | None = None):
    """Per enabled stage of ``q``: (spec, kind, amax) for quantizing ``w * s`` in row chunks, or None
    when some stage's statistic spans rows in a way chunks cannot reproduce.

    ``local``: the amax is per row or per block of a row (computed from each chunk); ``global``:
    one per-tensor amax, ``max_c(max_r |w_rc| * s_c)``, which equals ``max |w * s|`` exactly
    (scaling by a positive ``s_c`` is monotone under rounding); ``none``: no amax (MX)."""
    plan = []
    if not bool((s > 0).all()):
        return None
    for tq in iter_tensor_quantizers(q):
        if not tq.is_enabled:
            continue
        spec = tq.spec
        if not spec.needs_amax:
            plan.append((spec, _NONE, None))
            continue
        one, two = _amax_counts(spec, w.shape[1])
        if one == 1 and two == 1:
            cols = abs_amax(w.detach().float(), (0,))[0] if col_amax is None else col_amax
            amax = (cols * s.float()).amax()
            plan.append((spec, _GLOBAL, amax.reshape(spec.amax_of(w[:1].float()).shape)))
        elif two == 2 * one:
            plan.append((spec, _LOCAL, None))
        else:
            return None
    return plan


def scaled_weight_rows(q: nn.Module, w: torch.Tensor, s: torch.Tensor, col_amax: torch.Tensor | None = None):
    """Yield ``(rows, w[rows].float(), Q(w[rows] * s))`` over row chunks of a 2-D weight: the same
    values as ``fake_quant_weight(q, w * s)[rows]`` (each stage's amax from ``w * s``), with small
    temporaries. Falls back to one whole-tensor chunk when the stages do not split by rows.
    ``col_amax``: ``|w|.amax(0)`` when the caller has it (a search over many ``s``)."""
    w = w.detach()
    s = s.to(w.device, torch.float32)
    plan = _stage_kinds(q, w, s, col_amax) if w.dim() == 2 else None
    if plan is None:
        wf = w.float()
        yield slice(0, w.shape[0]), wf, fake_quant_weight(q, wf * s)
        return
    step = max(1, ROW_CHUNK_ELEMENTS // max(w.shape[1], 1))
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, min(r0 + step, w.shape[0]))
        wc = w[rows].float()
        ws = wc * s
        out = ws
        for spec, kind, amax in plan:
            a = amax if kind == _GLOBAL else (spec.amax_of(ws) if kind == _LOCAL else None)
            out = spec.fake_quant(out, a)
        yield rows, wc, out


def quantized_output(model: nn.Module, unit: list[str], x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(x / s) @ Q(W * s)^T`` over the unit's members, stacked along output features (no bias)."""
    outs = []
    xs = x / s
    for p in unit:
        m = model.get_submodule(p)
        w = m.weight.detach().float() * s
        outs.append(xs @ fake_quant_weight(m.weight_quantizer, w).float().t())
    return torch.cat(outs, dim=-1)


def alpha_grid(step: float) -> list[float]:
    """0, step, 2*step, ... up to 1 (ModelOpt's search grid, without overshooting 1)."""
    return [round(i * step, 10) for i in range(int(1.0 / step + 1e-9) + 1)]


# ---------------------------------------------------------------------- applying a scale
class Changes:
    """Values a smoothing algorithm overwrote, so a failure, or the next calibration, can put them back.

    After a successful run :meth:`seal` records each tensor's in-place version counter;
    :func:`start_smoothing` uses it to tell whether anything modified the smoothed values since.
    The saved values are kept in host memory: on a GPU, keeping them beside the weights would
    double the smoothed weights' device memory for as long as the model lives.
    """

    def __init__(self) -> None:
        self._tensors: list[tuple[torch.Tensor, torch.Tensor, str]] = []
        self._scales: list[tuple[TensorQuantizer, torch.Tensor | None]] = []
        self._loras: list[tuple[TensorQuantizer, tuple | None]] = []  # SVDQuant factors (None: none)
        self._versions: list[int] | None = None

    def tensor(self, t: torch.Tensor, name: str = "") -> torch.Tensor:
        if not any(t is seen for seen, _, _ in self._tensors):
            self._tensors.append((t, t.detach().to("cpu", copy=True), name))
        return t

    def pre_quant_scale(self, q: TensorQuantizer) -> TensorQuantizer:
        if not any(q is seen for seen, _ in self._scales):
            old = q.pre_quant_scale
            self._scales.append((q, None if old is None else old.clone()))
        return q

    def lora(self, q: TensorQuantizer) -> TensorQuantizer:
        if not any(q is seen for seen, _ in self._loras):
            self._loras.append((q, lora_of(q)))
        return q

    @property
    def has_lora(self) -> bool:
        return bool(self._loras)

    def snapshot(self) -> "Changes":
        """The current values of everything recorded here."""
        now = Changes()
        for t, _, name in self._tensors:
            now.tensor(t, name)
        for q, _ in self._scales:
            now.pre_quant_scale(q)
        for q, _ in self._loras:
            now.lora(q)
        return now

    def seal(self) -> None:
        self._versions = [t._version for t, _, _ in self._tensors]

    def modified_since_seal(self) -> list[str]:
        if self._versions is None:
            return []
        return [name or "<tensor>" for (t, _, name), v in zip(self._tensors, self._versions) if t._version != v]

    @torch.no_grad()
    def restore(self) -> None:
        for t, value, _ in self._tensors:
            t.copy_(value)
        for q, value in self._scales:
            q.pre_quant_scale = value
        for q, factors in self._loras:
            set_lora(q, factors)


def start_smoothing(state: QpassState) -> tuple[Changes, Changes | None]:
    """Undo the previous smoothing calibration, if any, so a re-calibration starts from the
    unsmoothed weights. Returns the new run's :class:`Changes` and, to put the previous
    smoothing back if the new run fails, a snapshot of it (None if there was none)."""
    prev = getattr(state, "unsmoothed", None)
    if prev is None:
        return Changes(), None
    changed = prev.modified_since_seal()
    if changed:
        raise CalibrationError(
            f"cannot re-run smoothing: {', '.join(changed[:4])} changed since the last smoothing calibration "
            "(e.g. fold_weight); re-quantize the original model instead"
        )
    redo = prev.snapshot()
    prev.restore()
    if prev.has_lora:
        sync_lora_branches(state)
    return Changes(), redo


def end_smoothing(state: QpassState, changes: Changes, applied: list) -> None:
    changes.seal()
    state.unsmoothed = changes
    state.smoothing = applied


def abort_smoothing(state: QpassState, changes: Changes, redo: Changes | None) -> None:
    """Put back what the failed run found: the previous smoothing, still undoable."""
    changes.restore()
    if redo is not None:
        redo.restore()
        state.unsmoothed.seal()
    if changes.has_lora or (redo is not None and redo.has_lora):
        sync_lora_branches(state)


@dataclass
class Applied:
    """What happened to one unit, for reports and tests."""

    unit: list[str]
    scale: torch.Tensor
    site: FoldSite | None
    untied: list[str] = field(default_factory=list)
    alpha: float | None = None
    clip: float = 1.0  # the smoothed input's static amax is clip * its max


@torch.no_grad()
def apply_scale(model: nn.Module, state: QpassState, unit: list[str], s: torch.Tensor,
                changes: Changes | None = None) -> Applied:
    """Weights x s on input channels; 1/s folded into the producer, else kept as pre_quant_scale."""
    changes = changes or Changes()
    graphs = graphs_of(state)
    untied = []
    for p in unit:
        m = model.get_submodule(p)
        if is_shared_parameter(model, m.weight):
            untie_weight(model, graphs, p)
            untied.append(p)
    graphs = graphs_of(state)
    site = find_fold_site(model, graphs, unit, s.numel())
    for p in unit:
        w = changes.tensor(model.get_submodule(p).weight, f"{p}.weight")
        w.mul_(s.to(w.device, w.dtype))
    if site is not None:
        for name in site.vectors:
            v = changes.tensor(model.get_parameter(name), name)
            v.div_(s.to(v.device, v.dtype))
        for name in site.rows:
            w = changes.tensor(model.get_parameter(name), name)
            w.div_(s.to(w.device, w.dtype)[:, None])
    else:
        for p in unit:
            q = changes.pre_quant_scale(model.get_submodule(p).input_quantizer)
            old = q.pre_quant_scale
            inv = 1.0 / s
            q.pre_quant_scale = inv if old is None else old.float() * inv
    return Applied(unit=unit, scale=s, site=site, untied=untied)


def _scalar_max_statistic(q: TensorQuantizer, channels: int) -> bool:
    """True if the quantizer's calibrated amax is the global abs-max of its input."""
    if type(q.calibrator) is not MaxCalibrator:
        return False
    probe = torch.ones(2, channels)
    return q.spec.amax_of(probe).numel() == 1


def _is_dynamic(q: TensorQuantizer) -> bool:
    return q._attrs.get("type") == "dynamic" or not q.spec.needs_amax


@torch.no_grad()
def finish(model: nn.Module, state: QpassState, forward_loop: Callable, applied: list[Applied],
           stats: dict[str, InputStats], keep_weight_amax: dict | None = None) -> None:
    """Input amax of the smoothed activations, weight amax, group sharing."""
    second_pass = False
    for a in applied:
        for p in a.unit:
            q = model.get_submodule(p).input_quantizer
            if not q.is_enabled or _is_dynamic(q):
                continue
            if _scalar_max_statistic(q, a.scale.numel()):
                amax = (stats[p].amax / a.scale).max() * a.clip
                old = q.amax
                q.amax = amax.reshape(old.shape) if old is not None and old.numel() == 1 else amax
            else:
                second_pass = True
    if second_pass:
        collect_activations(model, state, forward_loop)
        load_activation_amax(model, state)
    calibrate_weights(model, global_amax_groups(model, state))
    for q, amax in (keep_weight_amax or {}).items():
        q.amax = amax
    share_group_amax(model, state.groups)
