"""Reuse a traced graph for another model of the same architecture.

torch.export dominates the cost of quantizing a small model: several seconds
for SmolLM2. The graph it produces depends only on the model's structure (module
types, parameter shapes and dtypes, scalar attributes, HF config) and the input
structure, not on weight values. Quantizing the same architecture again in one
process (another config, auto_quantize candidates, a fresh copy) rebinds the
cached graph to the new model's parameters instead of exporting again.

The cache holds graphs only, never parameters; it keeps the last few entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from qpass.graph.block_export import export_with_blocks
from qpass.graph.trace import (
    GUARDS_FN, TracedGraph, TracedGraphModule, export_graph, fetch_attr, guards_pass, matches_static_dims,
)
from qpass.nn.tensor_quantizer import is_quantizer_slot
from qpass.passes.normalize_linear import linear_from_matmul

MAX_ENTRIES = 8
_SCALARS = (bool, int, float, str, type(None))


@dataclass
class _Entry:
    graph: fx.Graph  # before quantizer insertion; owns no module
    constants: dict  # get_attr values that are not the model's (lifted constants, subgraphs)
    static_dims: list


_CACHE: "OrderedDict[tuple, list[_Entry]]" = OrderedDict()


def _describe(value) -> str:
    if isinstance(value, _SCALARS):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return repr(tuple(value))
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{value.dtype}"
    return type(value).__qualname__


def structure_fingerprint(model: nn.Module, original_cls: type, ignore: frozenset = frozenset()) -> str:
    """What the exported graph can depend on, apart from weight values.

    ``ignore``: attribute names left out (a block's ``layer_idx``, when the caller
    checks by other means that the graph does not depend on it).
    """
    h = hashlib.sha256(f"{original_cls.__module__}.{original_cls.__qualname__}".encode())
    first_name: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        # Tied tensors change the graph (torch.export names a shared parameter once).
        owner = first_name.setdefault(id(t), name)
        if owner != name:
            h.update(f"|tie:{name}={owner}".encode())
    for name, module in model.named_modules(remove_duplicate=False):
        if is_quantizer_slot(module):
            continue
        h.update(f"|{name}:{type(module).__qualname__}".encode())
        for key, value in sorted(module.__dict__.items()):
            if key in ignore:
                continue
            if key in ("_parameters", "_buffers", "_modules", "_qpass_state") or key.startswith("_forward") \
                    or key.startswith("_backward") or key.startswith("_state_dict") or key.startswith("_load"):
                if key.endswith("hooks") and value:
                    h.update(f";{key}={len(value)}".encode())
                continue
            h.update(f";{key}={_describe(value)}".encode())
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                h.update(f";{key}:{tuple(t.shape)}:{t.dtype}:{t.device.type}".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
        h.update(repr(_implementations(config)).encode())
    return h.hexdigest()


def _implementations(config, depth: int = 0) -> list:
    """The kernels an HF config selects (``_attn_implementation``: sdpa or eager attention,
    ``_experts_implementation``: grouped_mm, batched_mm or eager experts), its sub-configs' too:
    private attributes its JSON leaves out, which change the traced graph."""
    out = []
    for key, value in sorted(vars(config).items()):
        name = key.removesuffix("_internal")  # transformers 5 keeps them behind properties
        if name.endswith("_implementation"):
            chosen = getattr(config, name, value)
            out.append((name, chosen if isinstance(chosen, (str, type(None))) else repr(chosen)))
        elif hasattr(value, "to_json_string") and depth < 3:
            out.append((key, _implementations(value, depth + 1)))
    return out


def _copy_graph(source: fx.Graph) -> fx.Graph:
    graph = fx.Graph()
    value, old_output = graph.graph_copy(source, {}, return_output_node=True)
    graph.output(value, type_expr=old_output.type).meta.update(old_output.meta)
    graph._codegen = source._codegen
    return graph


def _entry_from(gm: fx.GraphModule, model: nn.Module, static_dims: list) -> _Entry:
    graph = _copy_graph(gm.graph)
    constants = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                fetch_attr(model, node.target)
            except AttributeError:
                constants[node.target] = fetch_attr(gm, node.target)
    return _Entry(graph=graph, constants=constants, static_dims=static_dims)


def _rebind(entry: _Entry, model: nn.Module, tensors) -> TracedGraph:
    graph = _copy_graph(entry.graph)
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            root[node.target] = entry.constants[node.target] if node.target in entry.constants \
                else fetch_attr(model, node.target)
    gm = TracedGraphModule(root, graph)
    gm.meta["qpass_example_inputs"] = tuple(t.detach() for t in tensors)
    return TracedGraph(gm=gm, static_dims=list(entry.static_dims))


def cached_export(model: nn.Module, original_cls: type, args: tuple, kwargs: dict, input_key) -> TracedGraph:
    """export_graph, reusing the graph of an identical architecture and input structure."""
    leaves = pytree.tree_leaves((args, dict(sorted(kwargs.items()))))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    key = (structure_fingerprint(model, original_cls), input_key)
    for entry in _CACHE.get(key, ()):
        if matches_static_dims(entry, tensors) and guards_pass(entry.constants.get(GUARDS_FN), tensors):
            _CACHE.move_to_end(key)
            return _rebind(entry, model, tensors)
    traced = export_with_blocks(model, original_cls, args, kwargs) or export_graph(model, original_cls, args, kwargs)
    if linear_from_matmul(traced.gm, model):  # FalconLinear-style layers become aten.linear
        traced.gm.recompile()
    _CACHE.setdefault(key, []).append(_entry_from(traced.gm, model, traced.static_dims))
    _CACHE.move_to_end(key)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return traced  # bound to this model's own parameters and buffers already


def clear() -> None:
    _CACHE.clear()
