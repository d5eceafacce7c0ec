"""The user API, compatible with ModelOpt's ``modelopt.torch.quantization`` (model_quant)."""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import warnings
from typing import Any, Callable

import torch
from torch import nn

from qpass.algorithms import get_algorithm
from qpass.calib.max_calibrate import (
    expert_weight_quantizers, named_tensor_quantizers, restore_amax, snapshot_amax, weight_quantizer_owners,
)
from qpass.errors import QpassError, QuantConfigError
from qpass.graph.quantized_model import (
    STATE_ATTR, QpassState, is_quantized, make_quantizer, realize_code, remove_created, state_of, wrapped_class,
)
from qpass.nn.hf_conv1d import conv1d_as_linear
from qpass.nn.tensor_quantizer import is_quantizer, iter_tensor_quantizers
from qpass.passes.insert_quantizers import SLOT_META, quantizer_nodes
from qpass.config.rules import pattern_matches
from qpass.passes.rules import EXPERTS, fused_expert_params, get_rule_set

__all__ = [
    "quantize", "calibrate", "disable_quantizer", "enable_quantizer", "print_quant_summary",
    "fold_weight", "postprocess_amax", "shared_input_groups", "set_cuda_graphs",
]


def _register_module_quantizers(model: nn.Module, state: QpassState) -> None:
    for path, module in list(model.named_modules()):
        if is_quantizer(module):
            continue
        for rule in state.rule_set.module_rules:
            if rule.matches(module):
                for slot in rule.slots:
                    if slot in rule.hard_disabled:
                        state.hard_disabled.add(f"{path}.{slot}" if path else slot)
                    make_quantizer(model, state, path, module, slot)
        experts = state.rule_set.expert_rule
        if experts is not None:
            for param in fused_expert_params(module):
                make_quantizer(model, state, path, module, param + experts.input_suffix)
                make_quantizer(model, state, path, module, experts.weight_slot(module, param))


_GC_FROZEN = [0]


@contextlib.contextmanager
def frozen_gc():
    """Objects alive on entry move to the collector's permanent generation until exit.

    quantize and calibrate allocate many small objects (quantizers, graph nodes) next to a
    large live heap (the model, its traced graphs); each full collection then walked the whole
    heap, about 0.3 s per collection on a 30-layer model. New garbage is still collected."""
    _GC_FROZEN[0] += 1
    if _GC_FROZEN[0] == 1:
        gc.freeze()
    try:
        yield
    finally:
        _GC_FROZEN[0] -= 1
        if _GC_FROZEN[0] == 0:
            gc.unfreeze()


def _unquantize(model: nn.Module) -> None:
    """Undo quantize(): remove every quantizer qpass added and restore the class."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return
    remove_created(model, state)
    if state.__dict__.get("fallback") is not None:
        from qpass.graph.compile_fallback import remove_eager_hooks

        remove_eager_hooks(model)
    model.__class__ = state.original_cls
    del model.__dict__[STATE_ATTR]


def _warn_unmatched(model: nn.Module, rules: list) -> None:
    names = [n for n, m in model.named_modules() if is_quantizer(m)]
    for rule in rules:
        if not isinstance(rule.pattern, str) or (rule.cfg is None and not rule.enable):
            continue  # a rule that only disables nothing is harmless
        if not any(pattern_matches(rule.pattern, n) for n in names):
            warnings.warn(f"quant_cfg pattern {rule.pattern!r} matched no quantizer in the model", stacklevel=3)


def _check_formats(model: nn.Module) -> None:
    """Build every enabled quantizer's format now: a bad attribute (num_bits=9) fails quantize
    and leaves the model untouched, instead of failing the first forward after it."""
    for _, q in named_tensor_quantizers(model):
        if q.is_enabled and q._attrs.get("backend") is None:
            q.spec


def _split_example_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def quantize(
    model: nn.Module,
    config: dict | str,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    *,
    rules: str = "default",
    example_inputs: Any = None,
    capture: str = "auto",
) -> nn.Module:
    """Quantize and calibrate ``model`` in place; returns the same object.

    ``config`` is a ModelOpt config dict (list or dict ``quant_cfg`` form) or a
    preset name. ``forward_loop(model)`` feeds calibration data; the model is
    traced lazily from its first call. ``rules="modelopt"`` adds ModelOpt's
    input-only quantizers (LayerNorm, pooling, ...) for exact name parity.
    ``example_inputs`` (a tensor, tuple of args, or dict of kwargs) traces eagerly.
    ``capture="auto"``: where torch.export cannot trace the model whole, capture it with
    torch.compile (graph breaks) instead, quantizing its Linear/Conv/ConvTranspose ops, and warn
    with the break reasons (:mod:`qpass.graph.compile_fallback`); ``capture="export"``: that is an
    error (:class:`qpass.errors.TraceError`) naming the failing module.
    On any error the model is left exactly as it was.
    """
    from qpass.config import normalize_config

    config_rules, algorithm = normalize_config(config)
    rule_set = get_rule_set(rules)
    if capture not in ("auto", "export"):
        raise QuantConfigError(f"quantize: capture must be 'auto' or 'export', got {capture!r}")
    if is_quantized(model):
        raise QpassError(
            f"{type(model).__name__} is already quantized by qpass; quantize a fresh copy of the "
            "original model, or change formats with enable_quantizer/disable_quantizer and re-run calibrate"
        )
    state = QpassState(type(model), rule_set, config_rules, algorithm)
    state.capture = capture
    model.__dict__[STATE_ATTR] = state
    model.__class__ = wrapped_class(state.original_cls)
    try:
        with frozen_gc(), conv1d_as_linear(model):  # GPT-2's Conv1D layers: Linears, as in ModelOpt
            _register_module_quantizers(model, state)
            if example_inputs is not None:
                args, kwargs = _split_example_inputs(example_inputs)
                with torch.no_grad():
                    model(*args, **kwargs)
            calibrate(model, algorithm, forward_loop)
            _check_formats(model)
            _warn_unmatched(model, config_rules)
    except BaseException:
        _unquantize(model)
        raise
    return model


def calibrate(model: nn.Module, algorithm: Any = "max", forward_loop: Callable | None = None, *,
              layerwise: bool | dict | None = None) -> nn.Module:
    """(Re)calibrate a quantized model. On failure the previous amax values stay.

    ``layerwise=True`` (or the algorithm dict's ``"layerwise": {"enable": True}``, ModelOpt's
    spelling) calibrates block by block: ``forward_loop`` runs once, only recording the
    model's inputs (the model returns None meanwhile), then each block runs over all batches
    in turn, holding one block's activations (and, for a CPU-resident model fed CUDA
    batches, one block's weights) on the device. Same result as a whole-model pass.
    """
    from qpass.calib.layerwise import layerwise_mode, parse_options
    from qpass.calib.moe_ratio import OPTION, experts_ratio
    from qpass.config import normalize_config

    state = state_of(model)
    _, algo = normalize_config({"quant_cfg": [], "algorithm": algorithm})
    if algo is None:
        return model
    options = {k: v for k, v in algo.items() if k != "method"}
    in_config = options.pop("layerwise", None)
    ratio = options.pop(OPTION, None)  # checked by normalize_config
    lw = parse_options(in_config, algo["method"])
    if layerwise is not None:
        from_kwarg = parse_options(layerwise, algo["method"])
        if in_config is not None and from_kwarg != lw:
            raise QuantConfigError(
                f"calibrate: layerwise={layerwise!r} contradicts the algorithm's 'layerwise': {in_config!r}; give one"
            )
        lw = from_kwarg
    run = get_algorithm(algo["method"])
    state.method = algo["method"]
    snap = snapshot_amax(model)
    try:
        # Neither the kwarg nor the config says: keep the mode the caller set (layerwise_mode).
        unset = layerwise is None and in_config is None
        with frozen_gc(), contextlib.nullcontext() if unset else layerwise_mode(model, lw):
            with experts_ratio(model, state, ratio):
                run(model, state, forward_loop, **options)
    except BaseException:
        restore_amax(model, snap)
        raise
    realize_code(model)
    return model


def _select(model: nn.Module, wildcard_or_filter_func: str | Callable):
    if isinstance(wildcard_or_filter_func, str):
        # as a quant_cfg pattern: a fused-MoE expert's quantizer also by its name without the index
        match = lambda name: pattern_matches(wildcard_or_filter_func, name)  # noqa: E731
    elif callable(wildcard_or_filter_func):
        match = wildcard_or_filter_func
    else:
        raise QuantConfigError(
            f"expected a wildcard string or a filter function, got {type(wildcard_or_filter_func).__name__}"
        )
    return [m for n, m in model.named_modules() if is_quantizer(m) and match(n)]


def disable_quantizer(model: nn.Module, wildcard_or_filter_func: str | Callable) -> None:
    """Disable every quantizer whose name matches the wildcard or filter function."""
    for q in _select(model, wildcard_or_filter_func):
        q.disable()


def enable_quantizer(model: nn.Module, wildcard_or_filter_func: str | Callable) -> None:
    """Enable every quantizer whose name matches the wildcard or filter function."""
    for q in _select(model, wildcard_or_filter_func):
        q.enable()


def postprocess_amax(model: nn.Module, key: str, post_process_fn: Callable) -> nn.Module:
    """Apply ``post_process_fn`` to the amax of every quantizer matching ``key``."""
    for name, q in named_tensor_quantizers(model):
        if fnmatch.fnmatch(name, key) and q.amax is not None:
            q.amax = post_process_fn(q.amax)
    return model


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Groups of module names whose weighted ops read the same tensor (q/k/v, gate/up)."""
    return state_of(model).groups


def set_cuda_graphs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn CUDA-graph replay of the model's inference forwards on (the default) or off.

    On, a forward on CUDA inputs in eval mode with autograd off is captured into a CUDA graph on
    the second call of an input signature and replayed afterwards (see
    :mod:`qpass.graph.cuda_graphs`); results are the eager ones. ``QPASS_CUDA_GRAPHS=0`` turns
    it off for every model. Off also frees the captured graphs. Returns the model.
    """
    from qpass.graph import cuda_graphs

    state = state_of(model)
    if state.__dict__.get("cuda_graphs") is None:
        state.cuda_graphs = cuda_graphs.CudaGraphs()
    cuda_graphs.set_enabled(state.cuda_graphs, enabled)
    return model


def set_weight_cache(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Keep each fake-quantized weight between eval forwards (the default) or not.

    On, an eval forward without autograd quantizes each weight once and reuses the result until
    the weight or its quantizer changes: forwards run at about the unquantized model's speed,
    for one more copy of every quantized weight in memory (in the weight's dtype, on its
    device). Off, every forward quantizes the weights again, as ModelOpt does, and no copy is
    kept; the existing copies are dropped. Outputs are the same either way. Returns the model.
    """
    if not isinstance(enabled, bool):
        raise QuantConfigError(f"set_weight_cache: enabled must be True or False, got {enabled!r}")
    state = state_of(model)
    state.weight_cache = enabled
    for _, q in named_tensor_quantizers(model):
        if q._cache_weights != enabled:
            q._cache_weights = enabled
            q._bump()  # drops the copy; compiled code guards on it
    return model


def sync_graph_attributes(model: nn.Module) -> None:
    """Point every captured graph at the model's current parameters and buffers."""
    state = state_of(model)
    for traced_list in state.graphs.values():
        for traced in traced_list:
            gm = traced.gm
            for node in gm.graph.nodes:
                if node.op == "get_attr":
                    try:
                        value = model.get_parameter(node.target)
                    except AttributeError:
                        try:
                            value = model.get_buffer(node.target)
                        except AttributeError:
                            continue
                    parent_path, _, leaf = node.target.rpartition(".")
                    parent = gm.get_submodule(parent_path) if parent_path else gm
                    setattr(parent, leaf, value)


def fold_weight(model: nn.Module) -> None:
    """Replace weights by their fake-quantized values and drop weight quantizers from the graph.

    A weight shared with another module (tied embeddings) is untied first, so
    the other user keeps its original values. A packed (real_quantize) weight becomes a
    parameter holding its dequantized values again.
    """
    from qpass.algorithms.fold import untie_weight
    from qpass.nn.packed_weight import PackedWeightQuantizer, unpack_experts, unpack_weight

    state = state_of(model)
    graphs = [t.gm for ts in state.graphs.values() for t in ts]
    with torch.no_grad():
        for path, module, q in weight_quantizer_owners(model):
            if isinstance(q, PackedWeightQuantizer):  # real_quantize: the packed values become the weight
                unpack_weight(module)
                continue
            if not q.is_enabled:
                continue
            folded = q(module.weight)
            untie_weight(model, graphs, path)  # a tied weight's other users keep their values
            module.weight.copy_(folded)
            q.disable()
        for _, module, param, experts in expert_weight_quantizers(model):  # fused MoE parameters
            if isinstance(iter_tensor_quantizers(experts)[0], PackedWeightQuantizer):
                unpack_experts(module, param, experts, EXPERTS.transposed(module))
            elif experts.is_enabled:
                weight = getattr(module, param)
                EXPERTS.quantized_view(module, weight).copy_(experts(EXPERTS.quantized_view(module, weight)))
                experts.disable()
    for traced_list in state.graphs.values():
        for traced in traced_list:
            for node in quantizer_nodes(traced.gm):
                if node.meta[SLOT_META] == "weight_quantizer" or EXPERTS.is_weight_slot(node.meta[SLOT_META]):
                    node.replace_all_uses_with(node.args[0])
                    traced.gm.graph.erase_node(node)
            traced.gm.recompile()
    sync_graph_attributes(model)
    realize_code(model)


def print_quant_summary(model: nn.Module, file=None) -> None:
    """One line per quantizer (name, state, format, amax) and a totals line."""
    from qpass.summary import format_summary

    print(format_summary(model), file=file)
