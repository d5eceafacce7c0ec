"""The quantized model: the caller's object, whose forward runs traced graphs.

``quantize`` swaps the model's class for a subclass (``QuantizedModule`` first
in the MRO) so that the very object the caller holds becomes the quantized
model: ``model.config``, ``generate`` and every other method keep working,
quantizers are real submodules at ModelOpt's paths, and ``forward`` dispatches
to a graph captured lazily for each input structure.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from qpass.calib.pass_graph import calibration_graph
from qpass.errors import QpassError, TraceError
from qpass.graph import cuda_graphs, lazy_outputs
from qpass.graph.cuda_graphs import CudaGraphs
from qpass.graph.execution import execution_graph
from qpass.graph.graph_cache import cached_export
from qpass.graph.trace import GUARDS_FN, TracedGraph, guards_pass, matches_static_dims
from qpass.nn.tensor_quantizer import (
    ExpertQuantizers, SequentialQuantizer, TensorQuantizer, is_quantizer, is_quantizer_slot, iter_tensor_quantizers,
)
from qpass.passes.insert_quantizers import InsertQuantizers
from qpass.passes.rules import RuleSet
from qpass.passes.lora_branch import sync_graph
from qpass.passes.share_inputs import input_reader_edges, shared_input_groups

STATE_ATTR = "_qpass_state"

# Slots that are off unless a config rule names them (ModelOpt does the same).
_OFF_BY_DEFAULT = ("output_quantizer", "q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer",
                   "softmax_quantizer", "p_bmm_quantizer")


class QpassState:
    """Everything qpass keeps on a quantized model, outside its state_dict."""

    def __init__(self, original_cls: type, rule_set: RuleSet, rules: list, algorithm) -> None:
        self.original_cls = original_cls
        self.rule_set = rule_set
        self.rules = rules  # normalised config rules (qpass.config.Rule)
        self.algorithm = algorithm
        self.graphs: dict[Any, list[TracedGraph]] = {}
        self.created: list[tuple[str, str]] = []  # (owner path, slot) qpass registered
        self.hard_disabled: set[str] = set()
        self.edges: list[list[tuple[str, str]]] = []
        self.placed: set[str] = set()
        self.calls = 0
        self.calibrating = False
        self.calib_placed: set[str] = set()  # quantizers in graphs that ran during calibration
        self.layerwise = None  # qpass.calib.layerwise.LayerwiseOptions while calibrate() runs layer by layer
        self.recorder = None  # set while a layerwise pass records the forward_loop's inputs
        # the last calibration pass's forward device where it differs from the weights' (layerwise
        # calibration of an offloaded model): the algorithms' offline searches run there
        # (qpass.calib.compute_device)
        self.compute_device = None
        self.weight_cache = True  # eval forwards keep each fake-quant weight (qpass.set_weight_cache)
        # while a calibration pass runs (qpass.graph.lazy_outputs.deferred_outputs): the
        # forwards' outputs not computed yet
        self.deferred = None
        self.cuda_graphs = CudaGraphs(enabled=True)  # inference forwards on CUDA replay captured graphs
        self.calib_graphs = None  # a calibration pass's CUDA graphs (set while it runs)
        self.trace_s = 0.0  # seconds spent tracing (torch.export or the graph cache), for benchmarks
        self.capture = "auto"  # "export": a model torch.export cannot trace whole is an error, no fallback
        self.method = None  # the calibration algorithm running (or last run)
        # qpass.graph.compile_fallback.CompileFallback where an input structure needed it, and those structures
        self.fallback = None
        self.fallback_keys: set = set()

    @property
    def groups(self) -> list[list[str]]:
        return shared_input_groups(self.edges)


class QuantizedModule:
    """Mixin placed before the model's own class. Its forward runs the graph."""

    def forward(self, *args, **kwargs):
        if "use_cache" not in kwargs and _takes_use_cache(type(self)):
            # HF cache objects cannot leave an exported graph: run without a KV cache.
            kwargs["use_cache"] = False
        return run_graph(self, args, kwargs)


class _GraphGeneration:
    """For models with HF ``generate``."""

    def generate(self, *args, **kwargs):
        # torch.export cannot carry HF cache objects through a graph; generation
        # recomputes the prefix each step instead (same tokens, no KV cache).
        kwargs.setdefault("use_cache", False)
        return super().generate(*args, **kwargs)


_WRAPPED: dict[type, type] = {}
_USE_CACHE: dict[type, bool] = {}


def _takes_use_cache(cls: type) -> bool:
    """The model's forward accepts ``use_cache``: by name, or through ``**kwargs`` of an HF model
    (GraniteMoE's ``*ForCausalLM`` hands it on to its base model that way)."""
    if cls not in _USE_CACHE:
        original = cls.__bases__[-1]  # wrapped_class puts the model's own class last
        params = inspect.signature(original.forward).parameters
        hf = any(b.__name__ == "PreTrainedModel" and b.__module__.startswith("transformers") for b in original.__mro__)
        _USE_CACHE[cls] = "use_cache" in params or (
            hf and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))
    return _USE_CACHE[cls]


def wrapped_class(cls: type) -> type:
    if cls not in _WRAPPED:
        bases = (QuantizedModule, _GraphGeneration, cls) if hasattr(cls, "generate") else (QuantizedModule, cls)
        _WRAPPED[cls] = type(f"Quantized{cls.__name__}", bases, {"__module__": cls.__module__, "__doc__": cls.__doc__})
    return _WRAPPED[cls]


def state_of(model: nn.Module) -> QpassState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise QpassError(
            f"{type(model).__name__} is not quantized by qpass; call qpass.quantize(model, config, forward_loop) first"
        )
    return state


def is_quantized(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype, x.dim(), x.device.type)
    try:
        hash(x)
        return ("V", type(x).__name__, x)
    except TypeError:
        return ("O", type(x).__name__, repr(x))


def _structure(x):
    """The container structure of plain tuples, lists and dicts (anything else by its type name,
    counted as one leaf), and the number of leaves in it: what ``str(treespec)`` says for them,
    in plain Python dynamo can trace."""
    if type(x) in (tuple, list):
        parts = [_structure(v) for v in x]
        return (type(x).__name__, tuple([p[0] for p in parts])), sum([p[1] for p in parts])
    if type(x) is dict:
        parts = [_structure(x[k]) for k in x]
        return ("dict", tuple(x), tuple([p[0] for p in parts])), sum([p[1] for p in parts])
    return type(x).__name__, 1


def _input_key(training: bool, args, kwargs):
    # written for dynamo too (no sort over (key, value) pairs, no generator, no str(treespec) for
    # plain containers), so a compiled model's forward traces as one frame without graph breaks:
    # each break costs guards and a resumed frame on every call
    inputs = (args, {k: kwargs[k] for k in sorted(kwargs)})
    flat, spec = pytree.tree_flatten(inputs)
    structure, leaves = _structure(inputs)
    if leaves != len(flat):  # other pytree containers (namedtuples, registered classes) hold
        structure = str(spec)  # more or fewer leaves than the objects counted as one here
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    return (training, structure, tuple([_leaf_key(x) for x in flat])), tensors


#: ``gm.meta`` key: the names of a traced graph's flat tensor inputs (ONNX input names)
INPUT_NAMES_META = "qpass_input_names"


def input_names(args: tuple, kwargs: dict) -> list[str] | None:
    """Names of the flat tensor inputs, in :func:`_input_key`'s order: the keyword (``input_ids``,
    ``attention_mask``; ``past_0_1`` inside containers), positional ``input_N``; None if two
    would be the same."""
    leaves, _ = pytree.tree_flatten_with_path((args, {k: kwargs[k] for k in sorted(kwargs)}))
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))) for k in path[1:]]
        name = "_".join(parts) if path and getattr(path[0], "idx", None) == 1 else "input_" + "_".join(parts)
        names.append(name)
    return names if len(set(names)) == len(names) else None


def graph_for(model: nn.Module, args: tuple, kwargs: dict) -> tuple[TracedGraph, list]:
    """The graph for this input structure (traced now if new) and its flat input tensors."""
    state = state_of(model)
    key, tensors = _input_key(model.training, args, kwargs)
    for traced in state.graphs.get(key, ()):
        if matches_static_dims(traced, tensors) and guards_pass(traced.gm._modules.get(GUARDS_FN), tensors):
            break
    else:
        traced = capture(model, args, kwargs, key)
        state.graphs.setdefault(key, []).append(traced)
    if state.calibrating:
        state.calib_placed.update(traced.placed)
    return traced, tensors


def realize_code(model: nn.Module) -> None:
    """Generate the Python code of every traced graph that a pass edited since (their code is
    generated lazily, see :class:`qpass.graph.trace.TracedGraphModule`): ``torch.compile`` inlines
    a traced graph's forward, and must find code there, not the generator. The public entry points
    that edit graphs (calibrate, fold_weight, auto_quantize, a new input structure outside
    calibration) end with it."""
    for traced_list in state_of(model).graphs.values():
        for traced in traced_list:
            _LazyGraphModule.force_recompile(traced.gm)


def run_graph(model: nn.Module, args: tuple, kwargs: dict):
    state = state_of(model)
    if not torch.compiler.is_compiling():
        state.calls += 1  # only calibration reads it; under dynamo it would force recompiles
    if state.recorder is not None:  # layerwise calibration records the inputs; it returns None
        return state.recorder(model, args, kwargs)
    fallback = state.__dict__.get("fallback")
    if fallback is not None and _input_key(model.training, args, kwargs)[0] in state.fallback_keys:
        if torch.compiler.is_compiling():
            raise QpassError("this model was quantized through the torch.compile fallback (torch.export could not "
                             "trace it whole), so the 'qpass' compile backend has no graph to lower; run it eagerly")
        return fallback(model, state, args, kwargs)
    try:
        traced, tensors = graph_for(model, args, kwargs)
    except TraceError as e:
        if torch.compiler.is_compiling():
            raise
        from qpass.graph import compile_fallback

        fallback = fallback or compile_fallback.start(model, state, e)
        state.fallback_keys.add(_input_key(model.training, args, kwargs)[0])
        return fallback(model, state, args, kwargs)
    if torch.compiler.is_compiling():
        return traced.gm(*tensors)  # the compile backend lowers the traced graph's quantizer nodes
    gm = calibration_graph(model, state, traced.gm)  # traced.gm, or its copy with MoE side passes
    exe = execution_graph(gm)
    pending = state.__dict__.get("deferred")
    if pending is not None and not torch.is_grad_enabled():  # a pass: outputs computed when read
        out = lazy_outputs.call(exe, tensors, lambda head: _run(model, state, (id(gm), "head"), head, tensors),
                                pending)
        if out is not None:
            return out
    return _run(model, state, (id(gm), "exe"), exe, tensors)


def _run(model: nn.Module, state: QpassState, key, fn, tensors: list):
    """``fn(*tensors)``, replayed from a CUDA graph where :mod:`qpass.graph.cuda_graphs` allows:
    inference forwards use the model's graphs, calibration forwards the calibration pass's own
    (dropped when the pass ends)."""
    # states pickled before CUDA graphs have no "cuda_graphs"
    graphs = state.__dict__.get("calib_graphs" if state.calibrating else "cuda_graphs")
    if graphs is not None and graphs.enabled and cuda_graphs.eligible(model, state, tensors):
        return cuda_graphs.run(model, graphs, key, fn, tensors, calibration=state.calibrating)
    return fn(*tensors)


# ---------------------------------------------------------------------- quantizers
def make_quantizer(model: nn.Module, state: QpassState, owner_path: str, owner: nn.Module, slot: str):
    """Return the (owner, slot) quantizer, creating and configuring it if new."""
    existing = owner._modules.get(slot)
    if existing is not None and is_quantizer_slot(existing):
        return existing
    name = f"{owner_path}.{slot}" if owner_path else slot
    rule = state.rule_set.expert_rule
    if rule is not None and slot.endswith(rule.weight_suffix):
        # one weight quantizer per expert of a fused MoE parameter, each configured by its own name
        experts = getattr(owner, slot[: -len(rule.weight_suffix)]).shape[0]
        q = ExpertQuantizers(_new_quantizer(state, f"{name}.{e}", slot, owner) for e in range(experts))
    else:
        q = _new_quantizer(state, name, slot, owner)
    for tq in iter_tensor_quantizers(q):
        if not state.weight_cache:
            tq._cache_weights = False
        if state.calibrating:
            tq.enable_calib()
            tq.disable_quant()
    owner.add_module(slot, q)
    state.created.append((owner_path, slot))
    return q


def _new_quantizer(state: QpassState, name: str, slot: str, owner: nn.Module):
    from qpass.config import default_attributes

    attrs = _resolved_attributes(state, name, slot, owner)
    if isinstance(attrs, list):
        q = SequentialQuantizer(*(TensorQuantizer(a, name=f"{name}.{i}") for i, a in enumerate(attrs)))
    elif attrs is None:  # no rule names it: ModelOpt's per-slot default state
        q = TensorQuantizer(default_attributes(name, owner), name=name)
        if slot in _OFF_BY_DEFAULT:
            q.disable()
    else:
        q = TensorQuantizer(attrs, name=name)
    if name in state.hard_disabled:
        q.disable()
    return q


def _resolved_attributes(state: QpassState, name: str, slot: str, owner: nn.Module):
    """``resolve_attributes(state.rules, name, owner)``, memoised per (rules that match, slot,
    owner class): the result depends on nothing else, and a model's quantizers fall into a
    handful of such keys. Resolving (rule application, validation, copies) once per quantizer
    was most of quantize's set-up time on a 30-layer model. The attributes are shared
    read-only: a TensorQuantizer keeps its own dict of them."""
    from qpass.config import resolve_attributes
    from qpass.config.rules import rule_matches

    cache = state.__dict__.setdefault("attr_cache", {})
    rules = state.rules
    key = (id(rules), tuple(i for i, r in enumerate(rules) if rule_matches(r, name, owner)), slot, type(owner))
    if key not in cache:
        cache[key] = resolve_attributes(rules, name, owner)
    return cache[key]


def remove_created(model: nn.Module, state: QpassState, since: int = 0) -> None:
    for owner_path, slot in reversed(state.created[since:]):
        owner = model.get_submodule(owner_path)
        owner._modules.pop(slot, None)
    del state.created[since:]


def capture(model: nn.Module, args: tuple, kwargs: dict, input_key=None) -> TracedGraph:
    """Trace one input structure, place quantizers and record shared-input edges.

    Transactional: if anything fails, quantizers created for this trace are removed.
    """
    state = state_of(model)
    since = len(state.created)
    try:
        if input_key is None:
            input_key = _input_key(model.training, args, kwargs)[0]
        t0 = time.perf_counter()
        traced = cached_export(model, state.original_cls, args, kwargs, input_key)
        state.trace_s = state.__dict__.get("trace_s", 0.0) + time.perf_counter() - t0  # older pickles lack it
        insert = InsertQuantizers(
            model, state.rule_set, lambda path, owner, slot: make_quantizer(model, state, path, owner, slot)
        )
        insert.call(traced.gm)
        sync_graph(traced.gm)  # SVDQuant's low-rank branches, where quantizers hold factors
    except BaseException:
        remove_created(model, state, since)
        raise
    traced.placed = frozenset(insert.placed)
    traced.gm.meta.setdefault(INPUT_NAMES_META, input_names(args, kwargs))
    state.placed.update(insert.placed)
    state.edges.append(input_reader_edges(traced.gm))
    if not state.calibrating:
        _LazyGraphModule.force_recompile(traced.gm)  # see realize_code
    return traced
