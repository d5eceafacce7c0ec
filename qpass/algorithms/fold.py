"""Where a per-channel smoothing scale can be folded, found from the captured graphs.

Smoothing (SmoothQuant, AWQ) multiplies a weighted module's input channels by ``1/s``
and its weight's input channels by ``s``. The ``1/s`` is free when the tensor is produced
by an op with a per-channel affine parameter that nothing else uses: a LayerNorm's weight
and bias, an RMSNorm's ``weight * x`` (any ``mul`` by a 1-D parameter), a ``+ bias``, or the
output channels (weight rows and bias) of a previous Linear, also through an elementwise
product (``act(gate) * up``: scaling ``up`` scales the product). Ops that keep every
channel where it is (casts, clones, slices and views that leave the last dim alone, a
disabled output quantizer) are walked through.

The fold is refused (and the caller keeps ``1/s`` explicit as the input quantizers'
``pre_quant_scale``) unless, in every captured graph, every node on the way and every use
of the folded parameters leads only to the input quantizers of the group being smoothed,
and no parameter is shared with another module (tied weights).
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass

import torch
from torch import fx, nn

from qpass.passes.insert_quantizers import QUANTIZER_META, SLOT_META, owner_path

aten = torch.ops.aten

_PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.type_as.default, aten.dropout.default,
    aten.detach.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.flatten.using_ints}
_HARMLESS = {aten._assert_tensor_metadata.default}


@dataclass(frozen=True)
class FoldSite:
    """Parameters that absorb ``1/s``: ``vectors`` are divided by s, ``rows`` row-wise."""

    vectors: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        return self.vectors + self.rows

    def describe(self) -> str:
        return ", ".join([f"{p} (channels)" for p in self.vectors] + [f"{p} (rows)" for p in self.rows])


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _last_dim(node) -> int | None:
    v = _val(node)
    if isinstance(v, torch.Tensor) and v.dim() > 0 and isinstance(v.shape[-1], int):
        return v.shape[-1]
    return None


class _Walk:
    """Walks from the tensor a group's input quantizers read back to a fold site in one graph."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, channels: int) -> None:
        self.model = model
        self.gm = gm
        self.channels = channels
        self.chain: list[fx.Node] = []  # nodes whose output is scaled by the fold
        self.param_nodes: dict[str, list[fx.Node]] = {}  # folded parameter -> get_attr nodes used
        self.extra_ok: set[fx.Node] = set()  # weight quantizer nodes between a param and its op

    def param_name(self, node) -> str | None:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        try:
            p = self.model.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target if isinstance(p, nn.Parameter) else None

    def _vector(self, node) -> str | None:
        name = self.param_name(node)
        if name is None:
            return None
        p = self.model.get_parameter(name)
        return name if p.dim() == 1 and p.numel() == self.channels else None

    def _use(self, name: str, node: fx.Node) -> None:
        self.param_nodes.setdefault(name, []).append(node)

    def site(self, node) -> FoldSite | None:
        if not isinstance(node, fx.Node) or _last_dim(node) != self.channels:
            return None
        self.chain.append(node)
        if node.op == "call_module" and node.meta.get(SLOT_META) == "output_quantizer":
            q = self.gm.get_submodule(node.target)
            if q.is_enabled:
                return None  # its range would change with the scale
            return self.site(node.args[0])
        if node.op != "call_function":
            return None
        t, args = node.target, node.args
        if t in _PASSTHROUGH:
            return self.site(args[0])
        if t in _RESHAPES:
            return self.site(args[0]) if _last_dim(args[0]) == self.channels else None
        if t is aten.slice.Tensor:
            ndim = _val(node).dim()
            dim = args[1] if len(args) > 1 else 0
            return None if dim % ndim == ndim - 1 else self.site(args[0])
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            w = args[2] if len(args) > 2 else None
            b = args[3] if len(args) > 3 and t is aten.layer_norm.default else None
            wn, bn = self._vector(w), self._vector(b) if b is not None else None
            if wn is None or (b is not None and bn is None):
                return None
            self._use(wn, w)
            if bn is not None:
                self._use(bn, b)
            return FoldSite(vectors=(wn,) + ((bn,) if bn else ()))
        if t is aten.mul.Tensor and len(args) == 2 and not node.kwargs:
            a, b = args
            if a is b:
                return None
            for p, other in ((a, b), (b, a)):
                name = self._vector(p)
                if name is not None and isinstance(other, fx.Node):
                    self._use(name, p)
                    return FoldSite(vectors=(name,))
            for x in (b, a):  # an elementwise product: fold into one factor (e.g. up of act(gate)*up)
                if isinstance(x, fx.Node) and _last_dim(x) == self.channels:
                    mark = len(self.chain)
                    found = self.site(x)
                    if found is not None:
                        return found
                    del self.chain[mark:]
            return None
        if t is aten.add.Tensor and len(args) == 2 and not node.kwargs:
            a, b = args
            for x, p in ((a, b), (b, a)):
                name = self._vector(p)
                if name is not None:
                    inner = self.site(x)
                    if inner is None:
                        return None
                    self._use(name, p)
                    return FoldSite(vectors=inner.vectors + (name,), rows=inner.rows)
            return None
        if t is aten.linear.default:
            w = args[1]
            if isinstance(w, fx.Node) and w.op == "call_module" and w.meta.get(SLOT_META) == "weight_quantizer":
                self.extra_ok.add(w)
                w = w.args[0]
            wn = self.param_name(w)
            if wn is None or self.model.get_parameter(wn).dim() != 2:
                return None
            self._use(wn, w)
            b = args[2] if len(args) > 2 else None
            if b is None:
                return FoldSite(rows=(wn,))
            bn = self.param_name(b)
            if bn is None:
                return None
            self._use(bn, b)
            return FoldSite(vectors=(bn,), rows=(wn,))
        return None


def _users_ok(node: fx.Node, allowed: set) -> bool:
    return all(u in allowed or (u.target in _HARMLESS and not u.users) for u in node.users)


_COUNTS: dict = {}  # id(model) -> (registration counter, weakref to the model, its counts): the last model only


def _param_count(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many (module, name) slots hold it, as
    ``named_parameters(remove_duplicate=False)`` counts them (an explicit stack instead of
    nested generators: called once or twice per smoothed unit, on models with hundreds of
    modules). Cached until a parameter or module is registered anywhere (the global registration
    counter of :mod:`qpass.graph.cuda_graphs`): untying a weight registers a new parameter."""
    from qpass.graph.cuda_graphs import _Registrations

    hit = _COUNTS.get(id(model))
    if hit is not None and hit[0] == _Registrations.any and hit[1]() is model:
        return hit[2]
    counts: dict[int, int] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
        stack.extend(c for c in m._modules.values() if c is not None)
    _COUNTS.clear()
    _COUNTS[id(model)] = (_Registrations.any, weakref.ref(model), counts)
    return counts


def input_quantizer_nodes(gm: fx.GraphModule, paths) -> list[fx.Node]:
    names = {f"{p}.input_quantizer" for p in paths}
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get(QUANTIZER_META) in names]


def find_fold_site(model: nn.Module, graphs, paths: list[str], channels: int) -> FoldSite | None:
    """The fold site shared by the modules ``paths`` (one shared-input group) in every graph, or None."""
    counts = _param_count(model)
    site = None
    used_params: set[str] = set()
    for gm in graphs:
        qnodes = input_quantizer_nodes(gm, paths)
        if not qnodes:
            continue
        sources = {q.args[0] for q in qnodes}
        if len(sources) != 1:
            return None  # a module called on different tensors in one graph
        walk = _Walk(model, gm, channels)
        found = walk.site(next(iter(sources)))
        if found is None or (site is not None and found != site):
            return None
        site = found
        used_params.update(found.params)
        # Every node whose value the fold scales may feed only the chain or the group.
        allowed = set(walk.chain) | set(qnodes)
        # chain[i] is consumed by chain[i-1]; chain[0] by the group's quantizers.
        for i, node in enumerate(walk.chain):
            consumers = set(qnodes) if i == 0 else {walk.chain[i - 1]}
            if not _users_ok(node, consumers):
                return None
        for name, nodes in walk.param_nodes.items():
            for pn in nodes:
                if not _users_ok(pn, allowed | walk.extra_ok):
                    return None
        for wq in walk.extra_ok:
            if not _users_ok(wq, allowed):
                return None
    if site is None:
        return None
    # Parameters must be used only there: not tied, and not read elsewhere in any graph.
    site_ids = {id(model.get_parameter(name)) for name in site.params}
    if any(counts.get(i, 0) != 1 for i in site_ids):
        return None
    for gm in graphs:
        if input_quantizer_nodes(gm, paths):
            continue
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            try:
                p = model.get_parameter(node.target)
            except AttributeError:
                continue
            if id(p) in site_ids:
                return None  # a graph that reads the parameter without the group
    return site


def owner_of(name: str) -> str:
    return name.rpartition(".")[0]


def is_shared_parameter(model: nn.Module, param: torch.Tensor) -> bool:
    return _param_count(model).get(id(param), 0) > 1


def untie_weight(model: nn.Module, graphs, path: str) -> bool:
    """Give module ``path`` its own copy of a shared ``weight``; the graphs follow. True if untied.

    torch.export names a tied parameter once (``lm_head.weight`` for the embedding too), so
    each graph's ``get_attr`` of it is split: the module's own uses read ``{path}.weight``,
    every other use an alias that stays with the other owners.
    """
    from qpass.model_quant import sync_graph_attributes

    module = model.get_submodule(path)
    old = module.weight
    if not is_shared_parameter(model, old):
        return False
    own = f"{path}.weight"
    aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is old and n != own]
    module.weight = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    other = aliases[0]
    for gm in graphs:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" or (node.target != own and node.target not in aliases):
                continue
            mine = [u for u in node.users if _belongs_to(u, path)]
            theirs = [u for u in node.users if not _belongs_to(u, path)]
            if node.target == own and theirs:
                _redirect(gm, node, other, old, theirs)
                changed = True
            elif node.target != own and mine:
                _redirect(gm, node, own, module.weight, mine)
                changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
    sync_graph_attributes(model)
    return True


def _belongs_to(node: fx.Node, path: str) -> bool:
    q = node.meta.get(QUANTIZER_META)
    if q is not None:
        return q.rpartition(".")[0] == path
    return owner_path(node) == path


def _redirect(gm: fx.GraphModule, node: fx.Node, target: str, value, users) -> None:
    """Point ``users`` of get_attr ``node`` at a new get_attr of ``target``, set to ``value``."""
    _set_attr(gm, target, value)
    with gm.graph.inserting_after(node):
        new = gm.graph.get_attr(target)
    new.meta.update(node.meta)
    for u in users:
        u.replace_input_with(node, new)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    parent = gm
    *parts, leaf = target.split(".")
    for part in parts:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    setattr(parent, leaf, value)
