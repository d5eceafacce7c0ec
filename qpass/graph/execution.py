"""The graph a quantized model's forward actually runs: the traced graph, trimmed for execution.

A traced graph keeps everything qpass's passes need: a call of every quantizer slot, enabled
or not (``enable_quantizer`` may switch it on later), export's runtime metadata asserts, and
full-range slices. Run node by node from Python, each of these costs a call, and on a GPU,
whose host launches kernels for the whole model, those calls set the pace (on a SmolLM2-shaped
model at 8x512 the traced graph ran 1.41x the eager model's time). :func:`execution_graph`
derives, per traced graph, a copy that

* leaves out disabled quantizers that hold no ``pre_quant_scale`` and no hooks (their forward
  is the identity), export's ``_assert_tensor_metadata`` checks and full-range slices (``x[:]``,
  an alias of ``x``);
* runs one quantizer where several quantize the same input alike (same attributes, equal amax
  values, no pre_quant_scale or hooks: q/k/v and gate/up input quantizers after their shared
  amax) and reuses its output for the others;
* reaches each parameter, buffer and quantizer through its parent container, bound to one
  attribute of the copy, instead of walking the dotted path on every call. The containers are
  the traced graph's own, so what qpass rebinds in them (folded or packed weights, a model moved
  to another device) is what the copy reads.

The copy is rebuilt when the traced graph is recompiled, or when a quantizer would now be
skipped or kept differently (checked whenever :func:`qpass.nn.tensor_quantizer.quantizer_epoch`
has moved: enable/disable, calibration switches, attributes, amax, pre_quant_scale, hooks, a
quantizer registered in a graph). Passes, exports, layerwise calibration and
``torch.compile`` keep working on the traced graph itself.
"""

from __future__ import annotations

import weakref

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from qpass.graph.trace import GUARDS_FN, graph_version, same_version
from qpass.nn.tensor_quantizer import TensorQuantizer, quantizer_epoch

__all__ = ["execution_graph"]

_INT64_MAX = 2**63 - 1
# traced GraphModule -> _Entry (its graph_version when built, quantizer epoch, execution copy); kept outside the
# GraphModule so that deep copies and pickles of a model do not carry it
_CACHE: "weakref.WeakKeyDictionary[fx.GraphModule, _Entry]" = weakref.WeakKeyDictionary()


class _Entry:
    __slots__ = ("version", "epoch", "exe", "decisions", "readers", "merges")

    def __init__(self, version, epoch, exe, decisions, readers) -> None:
        self.version, self.epoch, self.exe, self.decisions = version, epoch, exe, decisions
        self.readers = readers  # [(quantizers reading one input, in graph order), their partition]
        self.merges = _merge_states(readers)

    def still_valid(self) -> bool:
        """Every quantizer node would be skipped or kept as before, each skipped one still holds
        the same module (auto_quantize swaps candidate quantizers into the graphs), and the
        quantizers of each input would be merged as before."""
        for modules, leaf, module, skipped in self.decisions:
            current = modules.get(leaf)
            if _skippable(current) != skipped or (skipped and current is not module):
                return False
            if not skipped and self.readers and current is not module:
                return False
        if any(_partition(group) != part for group, part in self.readers):
            return False
        self.merges = _merge_states(self.readers)
        return True

    def amax_unchanged(self) -> bool:
        """The merged quantizers' amax tensors are the same objects, unchanged in place (the
        quantizer epoch does not see an in-place write; everything else about them it does)."""
        for q, state in self.merges:
            amax = q._buffers.get("_amax")
            if state is None or amax is not state[1] or amax._version != state[2]:
                return False
        return True


def _partition(group: list) -> list[int]:
    """For each quantizer of one input, the index of the first one that quantizes alike."""
    part = []
    for i, q in enumerate(group):
        part.append(next((j for j in range(i) if part[j] == j and _same_quantization(group[j], q)), i))
    return part


def _merge_states(readers: list) -> list:
    return [(q, _merge_state(q)) for group, part in readers if part != list(range(len(group)))
            for q, j in zip(group, part) if part.count(j) > 1]


def execution_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The trimmed copy of ``gm`` for the current quantizer states (cached)."""
    epoch = quantizer_epoch()
    entry = _CACHE.get(gm)
    version = graph_version(gm)
    if entry is not None and same_version(entry.version, version):
        if entry.epoch == epoch and (not entry.merges or entry.amax_unchanged()):
            return entry.exe
        if entry.still_valid():
            entry.epoch = epoch
            return entry.exe
    exe, decisions, readers = _build(gm)
    _CACHE[gm] = _Entry(version, epoch, exe, decisions, readers)
    return exe


def _skippable(q) -> bool:
    return (type(q) is TensorQuantizer and q._disabled and q._buffers.get("_pre_quant_scale") is None
            and not (q._forward_hooks or q._forward_pre_hooks or q._backward_hooks or q._backward_pre_hooks))


def _merge_state(q):
    """What decides that two quantizers of one input give the same output: None when ``q`` is
    not a candidate (calibrating, hooked, dynamic, a pre_quant_scale, an affine bias, no amax), else its
    attributes and its amax tensor, by identity (the state holds it) and version (an amax set anew
    or changed in place is a new state; values are compared once, when the graph is built)."""
    if (type(q) is not TensorQuantizer or q._disabled or q._if_calib or not q._if_quant
            or q._forward_hooks or q._forward_pre_hooks or q._buffers.get("_pre_quant_scale") is not None
            or q._attrs.get("bias")):
        return None
    amax = q._buffers.get("_amax")
    if amax is None or amax.is_inference() or q._attrs.get("type") == "dynamic":
        return None
    return repr(sorted(q._attrs.items())), amax, amax._version


def _same_quantization(a, b) -> bool:
    sa, sb = _merge_state(a), _merge_state(b)
    if sa is None or sb is None or sa[0] != sb[0]:
        return False
    x, y = a._buffers["_amax"], b._buffers["_amax"]
    return x.shape == y.shape and x.device == y.device and bool(torch.equal(x, y))


def _full_slice(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor or node.kwargs:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    _, _, start, end, step = args[:5]
    return start in (0, None) and end in (None, _INT64_MAX) and step in (None, 1)


def _build(gm: fx.GraphModule) -> tuple[fx.GraphModule, list, list]:
    graph = fx.Graph()
    decisions = []  # (parent's _modules, leaf, module, skipped) per quantizer node
    kept: dict[fx.Node, list] = {}  # input node -> [(quantizer, its output node in the copy, index it uses)]
    env: dict[fx.Node, fx.Node] = {}
    containers: dict[str, str] = {}  # parent path in gm -> attribute of the copy
    for node in gm.graph.nodes:
        quantizer = None  # a quantizer this node runs, kept in the copy
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            continue
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            parent_path, _, leaf = node.target.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            module = parent._modules.get(leaf)
            if isinstance(module, TensorQuantizer):
                skip = _skippable(module)
                decisions.append((parent._modules, leaf, module, skip))
                if skip:
                    env[node] = env[node.args[0]]
                    continue
                # q/k/v (gate/up) input quantizers share one amax after calibration: where two
                # quantize one input alike, the copy runs the first and reuses its output
                group = kept.setdefault(node.args[0], [])
                twin = next((j for j, (q, _, rep) in enumerate(group) if rep == j and _same_quantization(q, module)),
                            None)
                if twin is not None:
                    env[node] = group[twin][1]
                    group.append((module, None, twin))
                    continue
                quantizer = module
        if _full_slice(node):
            env[node] = env[node.args[0]]
            continue
        new = graph.node_copy(node, lambda a: env[a])
        if node.op in ("get_attr", "call_module"):
            parent, _, leaf = node.target.rpartition(".")
            if parent:
                key = containers.setdefault(parent, f"_qpass_c{len(containers)}")
                new.target = f"{key}.{leaf}"
        if quantizer is not None:
            group.append((quantizer, new, len(group)))
        env[node] = new
    graph._codegen = gm.graph._codegen  # the same pytree input/output handling

    live = {key: gm.get_submodule(parent) for parent, key in containers.items()}
    # top-level attributes (no parent container)
    names = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and "." not in n.target}
    if hasattr(gm, GUARDS_FN):
        names.add(GUARDS_FN)
    # lazy: its Python code is generated on the first call (a calibration pass runs the head of
    # qpass.graph.lazy_outputs instead, and never calls this one)
    exe = graph_module_over(graph, live, gm, sorted(names), "QpassExecutionGraph")
    exe.meta.update(gm.meta)
    readers = [([q for q, _, _ in group], [rep for _, _, rep in group]) for group in kept.values() if len(group) > 1]
    return exe, decisions, readers


def graph_module_over(graph: fx.Graph, containers: dict, source: nn.Module, names, class_name: str) -> fx.GraphModule:
    """A lazy GraphModule running ``graph`` that reaches parameters through the live modules in
    ``containers`` (attribute -> module) and takes the top-level attributes ``names`` from
    ``source``. Built empty, given them, then the graph: a GraphModule constructed over a root
    first copies every dotted target into containers of its own (one per parameter), only for
    them to be replaced by the live ones."""
    gm = _LazyGraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    share_containers(gm, containers)
    for name in names:
        copy_top_level(source, gm, name)
    gm.graph = graph
    return gm


def share_containers(gm: fx.GraphModule, containers: dict) -> None:
    """Point ``gm``'s container attributes at the live modules in ``containers`` (a GraphModule
    copies dotted targets into fresh containers), in its instance dict too, so that
    ``self._qpass_cN`` is a plain lookup."""
    for key, container in containers.items():
        gm._modules[key] = container
        object.__setattr__(gm, key, container)


def copy_top_level(gm: fx.GraphModule, root: nn.Module, name: str) -> None:
    value = getattr(gm, name)
    if isinstance(value, nn.Module):
        root._modules[name] = value
    elif isinstance(value, nn.Parameter):
        root._parameters[name] = value
    elif isinstance(value, torch.Tensor) and name in gm._buffers:
        root._buffers[name] = value
    else:
        root.__dict__[name] = value
