"""Candidate formats: per-layer rules, their own calibration, and the per-module quantizer slots.

Each candidate is calibrated on a deep copy of the unquantized model with the public
``qpass.quantize`` (its own algorithm: AWQ smooths and folds weights, max only sets amax).
Calibrating on a copy keeps the caller's weights untouched (tied embeddings stay bit-identical)
and lets every algorithm run unchanged; what the search needs from the copy is extracted per
weighted module as a :class:`Slot`: standalone input/weight quantizers (attributes, amax,
pre_quant_scale) and, when the algorithm scaled the weight, the scaled weight. A fold of
``1/s`` into a producer (norm or Linear) is turned into the module's own ``pre_quant_scale``,
so each slot is self-contained and slots of different formats can be mixed freely.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qpass.auto_quantize.units import Unit
from qpass.config import QPASS_OPTIONS, Rule, normalize_config, resolve_attributes
from qpass.graph.quantized_model import iter_tensor_quantizers, state_of
from qpass.nn.tensor_quantizer import ExpertQuantizers

NONE_NAME = "None"


@dataclass
class Candidate:
    name: str
    rules: list | None  # per-layer rules; None = unquantized
    algorithm: object = None


@dataclass
class Slot:
    """One module's quantizers (and scaled weight, if any) under one candidate format."""

    input_quantizer: nn.Module | None
    weight_quantizer: nn.Module
    weight: torch.Tensor | None = None  # None: the module's original weight
    qweight: torch.Tensor | None = None  # fake-quantized weight, cached while scoring
    qweight_low: torch.Tensor | None = None  # its bfloat16 copy, for low-precision scoring

    @property
    def effective_bits(self) -> float:
        on = [q for q in iter_tensor_quantizers(self.weight_quantizer) if q.is_enabled]
        return float(on[0].spec.effective_bits) if on else 16.0


def is_per_layer(rule: Rule) -> bool:
    """A rule that selects quantizers by their own slot name (or a parent class), not by model path."""
    if rule.parent_class is not None or callable(rule.pattern):
        return True
    rest = rule.pattern[1:] if rule.pattern.startswith("*") else rule.pattern
    return "*" not in rest and "." not in rest


def make_candidates(formats) -> list[Candidate]:
    from qpass.errors import QuantConfigError

    if not isinstance(formats, (list, tuple)) or not formats:
        raise QuantConfigError(f"quantization_formats must be a non-empty list, got {formats!r}")
    out, names = [], set()
    for i, fmt in enumerate(formats):
        if fmt is None:
            cand = Candidate(NONE_NAME, None)
        else:
            rules, algorithm = normalize_config(fmt)
            name = fmt if isinstance(fmt, str) else f"format_{i}"
            cand = Candidate(name, [r for r in rules if is_per_layer(r)], algorithm)
        if cand.name in names:
            raise QuantConfigError(f"quantization_formats lists {cand.name!r} twice")
        names.add(cand.name)
        out.append(cand)
    return out


def quantizes(cand: Candidate, unit: Unit, owner: nn.Module) -> bool:
    """Whether ``cand`` quantizes ``unit``'s weight (``owner``: the unit's module in the original model)."""
    if cand.rules is None:
        return False
    attrs = resolve_attributes(cand.rules, unit.weight_quantizer_name(), owner)
    return attrs is not None and any(a.enable for a in (attrs if isinstance(attrs, list) else [attrs]))


def planned_bits(cand: Candidate, unit: Unit, owner: nn.Module) -> float:
    """Effective bits of ``unit``'s weight under ``cand``, known before any calibration (16: unquantized)."""
    from qpass.nn.tensor_quantizer import TensorQuantizer

    if cand.rules is None:
        return 16.0
    name = unit.weight_quantizer_name()
    attrs = resolve_attributes(cand.rules, name, owner)
    on = [a for a in (attrs if isinstance(attrs, list) else [attrs]) if a is not None and a.enable]
    return float(TensorQuantizer(on[0], name).spec.effective_bits) if on else 16.0


def usable_algorithm(cand: Candidate):
    """The candidate's algorithm, or max (with a warning naming the format) if qpass lacks it."""
    from qpass.algorithms import ALGORITHMS, _load_builtin

    _load_builtin()
    algos = cand.algorithm if isinstance(cand.algorithm, list) else [cand.algorithm]
    missing = [a["method"] for a in algos if a is not None and a["method"] not in ALGORITHMS]
    if not missing:
        # A slot keeps the unrounded weight times the smoothing scale (a fold into a previous Linear
        # becomes a pre_quant_scale, so formats can mix), so AWQ's GPTQ rounding, which rounds the
        # folded rows, cannot be carried over: candidates run ModelOpt's AWQ/SmoothQuant.
        out = [{**a, "gptq": a.get("gptq", False)}
               if a is not None and "gptq" in QPASS_OPTIONS.get(a["method"], ()) else a for a in algos]
        return out if isinstance(cand.algorithm, list) else out[0]
    warnings.warn(
        f"auto_quantize: format {cand.name!r} asks for calibration algorithm {missing[0]!r}, which qpass "
        "does not implement; it is calibrated with 'max' instead", stacklevel=4)
    return "max"


def calib_steps(cand: Candidate, num_calib_steps: int) -> int:
    """Batches ``cand`` calibrates on: a quarter for AWQ methods, as ModelOpt's auto_quantize does.

    AWQ's scale search runs every captured token through each Linear once per alpha (11 times at
    the default step), so it dominates the search's cost; its statistics need fewer batches.
    """
    algos = cand.algorithm if isinstance(cand.algorithm, list) else [cand.algorithm]
    awq = any(a is not None and str(a["method"]).startswith("awq") for a in algos)
    return max(1, num_calib_steps // 4) if awq else num_calib_steps


def _standalone(q: nn.Module | None) -> nn.Module | None:
    """The quantizer itself, taken over from the candidate's copy of the model (which is
    discarded right after, so nothing else holds or changes it); its weight cache is dropped
    (it refers to the copy's weight, and holds a weakref, which later deep copies cannot copy)."""
    if q is None:
        return None
    for tq in iter_tensor_quantizers(q):
        tq._weight_cache = None
    if isinstance(q, ExpertQuantizers):
        q.__dict__["_cache"] = None
    return q


def _methods(cand: Candidate) -> list:
    algos = cand.algorithm if isinstance(cand.algorithm, list) else [cand.algorithm]
    return [None if a is None else (a["method"] if len(a) == 1 or a["method"] != "max" else "max+")
            for a in algos]


def is_max_only(cand: Candidate) -> bool:
    return all(m == "max" for m in _methods(cand))


#: algorithms whose first forward_loop pass runs the float model (quantization off)
FLOAT_FIRST_PASS = {"max", "awq_lite", "awq_clip", "awq_full", "smoothquant"}


def records_float_inputs(cand: Candidate) -> bool:
    return all(m in FLOAT_FIRST_PASS for m in _methods(cand))


class SeenInputs:
    """Per searched module, the per-channel abs-max of its (raw) input over the first ``batches``
    calibration batches, recorded while another candidate calibrated on them. A max-calibrated
    candidate then runs only the batches after those: its per-tensor input amax is the max of
    both (the float model computes the same activations in every copy)."""

    def __init__(self) -> None:
        self.batches = 0
        self.amax: dict[str, torch.Tensor] = {}

    def covers(self, quantizers) -> bool:
        """True if every (name, quantizer) is a static per-tensor max-calibrated input quantizer,
        without pre_quant_scale, of a module seen here."""
        from qpass.calib.max import MaxCalibrator
        from qpass.nn.tensor_quantizer import TensorQuantizer

        for name, q in quantizers:
            path, _, slot = name.rpartition(".")
            if (slot != "input_quantizer" or path not in self.amax or type(q) is not TensorQuantizer
                    or q.pre_quant_scale is not None or q.is_dynamic or not isinstance(q.calibrator, MaxCalibrator)
                    or q.amax is None or q.amax.numel() != 1):
                return False
        return True


def _capture_seen(units: dict, forward_loop, seen: SeenInputs, batches: int):
    """``forward_loop`` that also records the searched layers' input channel maxima into ``seen``
    (fused expert parameters are left out: their candidates calibrate on every batch)."""
    from qpass.calib.capture import ActivationCapture

    def loop(m):
        if seen.batches:  # a later pass (e.g. after smoothing) is not the float model's
            return forward_loop(m)
        modules = {p: m.get_submodule(p) for p, u in units.items() if not u.is_expert}
        with ActivationCapture(modules, max_tokens=0, sums=False) as cap:
            out = forward_loop(m)
        seen.amax = {p: st.amax.detach().clone() for p, st in cap.stats.items()}
        seen.batches = batches
        return out

    return loop


@torch.no_grad()
def calibrate_candidate(original: nn.Module, cand: Candidate, units: dict, forward_loop,
                        seen: SeenInputs | None = None, record: int = 0, rest_loop=None) -> dict[str, Slot]:
    """Calibrate ``cand`` on a copy of ``original``; one Slot per unit (path -> :class:`Unit`) it quantizes.

    ``record`` > 0: also record the searched modules' input maxima over the ``record`` batches
    ``forward_loop`` feeds into ``seen``. ``rest_loop``: for a max-calibrated candidate whose
    first ``seen.batches`` batches ``seen`` holds, a loop over the remaining batches only; it is
    used when ``seen`` covers every activation quantizer of the candidate (else the full loop)."""
    from qpass.calib.max_calibrate import activation_quantizers, share_group_amax
    from qpass.model_quant import quantize

    work = copy.deepcopy(original)
    cfg = {"quant_cfg": list(cand.rules), "algorithm": usable_algorithm(cand)}
    if record and seen is not None:
        forward_loop = _capture_seen(units, forward_loop, seen, record)
    if rest_loop is not None and seen is not None and seen.batches and is_max_only(cand):
        quantize(work, cfg, rest_loop)
        acts = activation_quantizers(work)
        if seen.covers(acts):
            for name, q in acts:
                q.amax = torch.maximum(q.amax, seen.amax[name.rpartition(".")[0]].max().reshape(q.amax.shape))
            share_group_amax(work, state_of(work).groups)
        else:  # something the record did not see: calibrate on every batch after all
            work = copy.deepcopy(original)
            quantize(work, cfg, forward_loop)
    else:
        quantize(work, cfg, forward_loop)
    scaled: dict[str, torch.Tensor] = {}
    folded: dict[str, torch.Tensor] = {}
    for applied in getattr(state_of(work), "smoothing", None) or []:
        for p in applied.unit:
            w = original.get_submodule(p).weight.detach()
            scaled[p] = w * applied.scale.to(w.device, w.dtype)
            if applied.site is not None:
                folded[p] = applied.scale
    slots = {}
    for p, unit in units.items():
        owner = unit.owner(work)
        if not quantizes(cand, unit, owner):
            continue
        in_q = _standalone(owner._modules.get(unit.input_slot))
        w_q = _standalone(owner._modules[unit.weight_slot])
        if p in folded and in_q is not None:
            old = in_q.pre_quant_scale
            inv = 1.0 / folded[p].float()
            in_q.pre_quant_scale = inv if old is None else old.float() * inv
        expected = scaled.get(p, unit.weight(original).detach())
        if not unit.is_expert and not torch.equal(unit.weight(work).detach(), expected):
            # rows changed by a fold into this Linear
            for tq in iter_tensor_quantizers(w_q):
                if tq.needs_calibration:
                    tq.reset_amax()
                    tq.collect(expected)
                    tq.load_calib_amax()
        slots[p] = Slot(in_q, w_q, scaled[p].clone() if p in scaled else None)
    del work
    return slots
