"""Export a model with repeated blocks by tracing one block of each kind and stamping copies.

torch.export's cost grows with the number of ops it traces, and a transformer is mostly
the same block N times with different weights (6 BERT layers in MiniLM, 30 decoder
layers in SmolLM2). :func:`export_with_blocks`:

1. finds repeated blocks: children of an ``nn.ModuleList`` with one structure (module
   types, parameter shapes, scalar attributes other than a layer index);
2. runs the model eagerly on the example inputs until each kind's first block returns:
   the kind's output structure (which input each output takes its shape from);
3. exports the model with every repeated block swapped for a stand-in that calls the
   opaque op ``qpass::block_call``; its fake kernel gives the block's output shapes, and
   the stand-in records how each block was called (input structure, constants);
4. runs that graph on the example inputs, the op running the real blocks eagerly, until
   the first block of each kind has been called: its inputs are exactly what the graph
   passes (under tracing, HF builds masks it skips eagerly);
5. exports the first block of each kind alone from those inputs (every dim dynamic);
6. replaces each opaque call with a copy of its kind's block graph, re-targeted to that
   block's parameters and module path (``nn_module_stack``), so the stitched graph is
   what a whole-model export gives;
7. runs the stitched graph and the eager model on the example inputs cut to a few
   rows and tokens along their dynamic dims, and checks that the outputs agree.

Blocks of one kind differ only in their weights and in a layer index (``layer_idx``),
which HF blocks use for KV-cache bookkeeping only; a block whose numerics depend on it
fails step 7. Wherever a step does not apply (no repeated blocks, a block that reads
state outside itself or mutates it, blocks called with other constants, a mismatch in
step 7) this returns None and the caller exports the whole model.
``QPASS_BLOCK_EXPORT=0`` turns it off.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import re
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from qpass.graph.trace import (
    GUARDS_FN, GUARDS_META, TracedGraph, TracedGraphModule, muted_meta_errors, _static_dims, export_graph, fetch_attr,
    original_class,
)
from qpass.passes.causal_mask import SYMBOLS_META, recover_causal_masks

log = logging.getLogger(__name__)

#: Scalar attributes that number a block (left out when grouping blocks into kinds).
INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})
_ROOT_KEY = "L__self__"
VERIFY_SIZE = 8  # dynamic dims of the example inputs are cut to this for the check of step 7 ...
VERIFY_BATCH = 2  # ... and a dynamic dim 0 (the batch) to this: on SmolLM2 the check (eager and graph)
                  # took 0.43 s on 4x8 tokens, 0.34 s on 2x8 (1 thread)
_GUARDS = GUARDS_FN  # the whole-model graph checks its own inputs
_SIZE = r"L\['tensors'\]\[\d+\]\.size\(\)\[\d+\]"
_SAME_SIZE = re.compile(f"{_SIZE} == {_SIZE}")  # a block guard that two of its inputs share a size


def enabled() -> bool:
    return os.environ.get("QPASS_BLOCK_EXPORT", "1") != "0"


class Unsupported(Exception):
    """This model or input is exported whole instead (the message says why)."""


class _Captured(Exception):
    """Stops the graph run of step 4 once every kind's first block has been called."""


@dataclass
class _Kind:
    """Blocks with one structure; the graph traced from the first of them."""

    list_path: str
    members: list  # [(child name, path, module)]
    out_spec: object = None  # the block's output structure (eager)
    out_consts: list | None = None  # flat outputs: _TENSOR for a tensor, else the constant
    out_shape_from: list | None = None  # per tensor output: key path of the input it takes its shape from
    out_dtypes: list | None = None
    first_inputs: list | None = None  # real tensors passed to the first member's block_call
    gm: fx.GraphModule | None = None


@dataclass
class _Call:
    """How one block was called during the model's export (step 3)."""

    kind: _Kind
    path: str
    block: nn.Module
    in_spec: object = None
    in_consts: list | None = None  # flat (args, kwargs): _TENSOR for a tensor, else the constant


_TENSOR = object()  # marks a tensor's place among a call's flat inputs/outputs (None is a leaf too)
_CALLS: dict[int, _Call] = {}
_COUNTER = itertools.count()
_WANTED: set[int] = set()  # kinds (by id) whose first inputs step 4 still waits for


@torch.library.custom_op("qpass::block_call", mutates_args=())
def block_call(tensors: list[torch.Tensor], token: int, shape_from: list[int]) -> list[torch.Tensor]:
    call = _CALLS.get(token)
    if call is None:
        raise RuntimeError("qpass::block_call exists only while qpass traces a model")
    kind = call.kind
    if kind.first_inputs is None and call.block is kind.members[0][2]:
        kind.first_inputs = [t.detach() for t in tensors]
        _WANTED.discard(id(kind))
        if not _WANTED:
            raise _Captured()
    args, kwargs = _unflatten_inputs(call, tensors)
    out = call.block(*args, **kwargs)
    return [t.clone() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@block_call.register_fake
def _block_call_fake(tensors, token, shape_from):
    kind = _CALLS[token].kind
    return [tensors[i].new_empty(tensors[i].shape, dtype=dt) for i, dt in zip(shape_from, kind.out_dtypes)]


def _unflatten_inputs(call: _Call, tensors):
    it = iter(tensors)
    leaves = [next(it) if c is _TENSOR else c for c in call.in_consts]
    return pytree.tree_unflatten(leaves, call.in_spec)


class _BlockStub(nn.Module):
    """Stands in for one block during the model's export: records the call, emits block_call."""

    def __init__(self, block: nn.Module, kind: _Kind, path: str) -> None:
        super().__init__()
        self.training = block.training
        token = next(_COUNTER)
        _CALLS[token] = _Call(kind=kind, path=path, block=block)
        object.__setattr__(self, "_qpass_block", block)
        object.__setattr__(self, "_qpass_token", token)

    def __getattr__(self, name):  # the caller may read attributes off a block (HF: attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_qpass_block"), name)

    def forward(self, *args, **kwargs):
        call = _CALLS[self._qpass_token]
        if call.in_spec is not None:
            raise Unsupported(f"block {call.path} is called twice in one forward")
        with_paths, call.in_spec = pytree.tree_flatten_with_path((args, dict(sorted(kwargs.items()))))
        call.in_consts = [_TENSOR if isinstance(x, torch.Tensor) else x for _, x in with_paths]
        tensor_index = {pytree.keystr(p): i for i, (p, _) in enumerate(
            (p, x) for p, x in with_paths if isinstance(x, torch.Tensor))}
        try:
            shape_from = [tensor_index[k] for k in call.kind.out_shape_from]
        except KeyError as e:
            raise Unsupported(f"block {call.path}: no tensor input {e} to take an output shape from") from None
        tensors = [x for _, x in with_paths if isinstance(x, torch.Tensor)]
        outs = iter(torch.ops.qpass.block_call(tensors, self._qpass_token, shape_from))
        flat = [next(outs) if c is _TENSOR else c for c in call.kind.out_consts]
        return pytree.tree_unflatten(flat, call.kind.out_spec)


def block_kinds(model: nn.Module) -> list[_Kind]:
    """Groups of at least two same-structure children of each outermost ModuleList."""
    from qpass.graph.graph_cache import structure_fingerprint

    kinds: list[_Kind] = []
    taken: list[str] = []
    for list_path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if any(list_path.startswith(t + ".") for t in taken):
            continue
        children = [(n, c) for n, c in mod._modules.items() if c is not None]
        if len({id(c) for _, c in children}) != len(children):
            continue
        groups: dict[str, list] = {}
        for name, child in children:
            key = structure_fingerprint(child, type(child), INDEX_ATTRS)
            path = f"{list_path}.{name}" if list_path else name
            groups.setdefault(key, []).append((name, path, child))
        for members in groups.values():
            if len(members) >= 2:
                kinds.append(_Kind(list_path=list_path, members=members))
                taken.extend(p for _, p, _ in members)
    return kinds


#: leaves of a block's inputs that a run on fake tensors cannot change (anything else, a KV
#: cache for one, may be updated in place by the block, so that block runs for real)
_IMMUTABLE = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def _fake_outputs(block: nn.Module, args: tuple, kwargs: dict):
    """The block's outputs computed on fake tensors (shapes and dtypes, no arithmetic), or None
    where that fails: data-dependent code, inputs the block may mutate."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not all(isinstance(x, _IMMUTABLE) for x in pytree.tree_leaves((args, kwargs))):
        return None
    try:
        with muted_meta_errors(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            a, kw = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (tuple(args), dict(kwargs)))
            return block(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the block then runs for real
        log.debug("qpass: block outputs not found on fake tensors (%s: %s)", type(e).__name__, e)
        return None


def _record(model, original_cls, args, kwargs, kinds: list[_Kind]):
    """Step 2: each kind's output structure, from an eager forward stopped at the blocks.

    Only the structure is needed, so each kind's first block runs on fake tensors where it can
    (on MiniLM the eager BERT layer took 0.07 s of a 0.5 s export, on SmolLM2 0.09 s); the last
    one to run stops the forward, and any other still runs for real, for the blocks after it."""
    seen: dict[int, tuple] = {}
    firsts = {id(k.members[0][2]): k for k in kinds}

    running = []  # the block's own call inside _fake_outputs passes these hooks by

    def pre(module, a, kw):
        if running:
            return
        running.append(module)
        try:
            out = _fake_outputs(module, a, kw)
        finally:
            running.pop()
        if out is not None:
            seen.setdefault(id(module), (a, kw, out))
            if len(seen) == len(firsts):
                raise _Captured()  # the rest of the forward is not needed

    def post(module, a, kw, out):
        if running:
            return
        seen.setdefault(id(module), (a, kw, out))
        if len(seen) == len(firsts):
            raise _Captured()

    hooks = [k.members[0][2].register_forward_pre_hook(pre, with_kwargs=True) for k in kinds]
    hooks += [k.members[0][2].register_forward_hook(post, with_kwargs=True) for k in kinds]
    try:
        with torch.no_grad(), original_class(model, original_cls):
            original_cls.forward(model, *args, **kwargs)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    for block_id, kind in firsts.items():
        if block_id not in seen:
            raise Unsupported(f"block {kind.members[0][1]} is not called by the model's forward")
        a, kw, out = seen[block_id]
        inputs = {pytree.keystr(p): x for p, x in pytree.tree_flatten_with_path((tuple(a), dict(sorted(kw.items()))))[0]
                  if isinstance(x, torch.Tensor)}
        leaves, kind.out_spec = pytree.tree_flatten(out)
        kind.out_consts = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        kind.out_shape_from, kind.out_dtypes = [], []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                src = next((k for k, t in inputs.items() if t.shape == x.shape), None)
                if src is None:
                    raise Unsupported(f"block {kind.members[0][1]}: output of shape {tuple(x.shape)} is no input's shape")
                kind.out_shape_from.append(src)
                kind.out_dtypes.append(x.dtype)


def _owned_state(block: nn.Module) -> set[str]:
    names = {n for n, _ in block.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in block.named_buffers(remove_duplicate=False)}


def _trace_kind(kind: _Kind, first_call: _Call, call_node: fx.Node) -> None:
    """Step 5: the first block's graph, from the inputs the model's graph gives it, dynamic
    in the dims that are dynamic there."""
    _, path, block = kind.members[0]
    args, kwargs = _unflatten_inputs(first_call, kind.first_inputs)
    dynamic = [[d for d, s in enumerate(x.meta["val"].shape) if not isinstance(s, int)] for x in call_node.args[0]]
    gm = export_graph(block, type(block), tuple(args), dict(kwargs), dynamic_dims=dynamic).gm
    # the block's code may pin, bound or otherwise constrain a size (BigBird: sequence >= 16, Mamba2:
    # a multiple of 8) that the model's graph, traced with the block opaque, does not check; the
    # whole model's export checks it at the graph's entry. Equal sizes among the block's inputs
    # are no constraint: the model's graph passes them so.
    for i, dims in enumerate(_static_dims(gm)):
        pinned = sorted(set(dims or {}) & set(dynamic[i] if i < len(dynamic) else ()))
        if pinned:
            raise Unsupported(f"block {path}'s graph constrains its input {i} in dims {pinned}")
    other = [g for g in gm.meta.get(GUARDS_META, ()) if not _SAME_SIZE.fullmatch(g)]
    if other:
        raise Unsupported(f"block {path}'s graph checks its inputs: {other[0]}")
    owned = _owned_state(block)
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target != _GUARDS:
            raise Unsupported(f"block {path}'s graph calls submodule {n.target}")
        if n.op == "get_attr" and n.target not in owned:
            raise Unsupported(f"block {path}'s graph reads {n.target}, which the block does not own")
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            raise Unsupported(f"block {path}'s graph mutates state ({n.target})")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(kind.first_inputs):
        raise Unsupported(f"block {path}'s graph takes {len(placeholders)} inputs, the model passes {len(kind.first_inputs)}")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if gm.graph._codegen.pytree_info.out_spec != kind.out_spec:
        raise Unsupported(f"block {path} returns another structure when traced")
    outs = [o for o in out_node.args[0] if isinstance(o, fx.Node)]
    if len(outs) != len(kind.out_dtypes):
        raise Unsupported(f"block {path} returns {len(outs)} tensors when traced, {len(kind.out_dtypes)} eagerly")
    kind.gm = gm


def _same_dims(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != b.dim():
        return False
    return all(type(x) is type(y) and (isinstance(x, int) and x == y or not isinstance(x, int))
               for x, y in zip(a.shape, b.shape))


def _check_call(node: fx.Node, call: _Call, first: _Call) -> None:
    """A block call matches its kind's template: same constants, dynamic where the template is."""
    if call.in_spec != first.in_spec or any(
        (c is _TENSOR) != (f is _TENSOR) or (c is not _TENSOR and not _same_constant(c, f))
        for c, f in zip(call.in_consts, first.in_consts)
    ):
        raise Unsupported(f"block {call.path} is called with other inputs than {first.path}")
    template_inputs = [n for n in call.kind.gm.graph.nodes if n.op == "placeholder"]
    for x, p in zip(node.args[0], template_inputs):
        val, tval = x.meta.get("val"), p.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != tval.dim():
            raise Unsupported(f"block {call.path}: input {x.name} does not match its template")
        for d, s in enumerate(tval.shape):
            if isinstance(s, int) and not (isinstance(val.shape[d], int) and val.shape[d] == s):
                raise Unsupported(f"block {call.path}: input {x.name} dim {d} is dynamic, its template traced it as {s}")


def _same_constant(a, b) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are not the same constant
        return a is b


def _stack_for(copy_of: fx.Node, call: fx.Node, path: str, block: nn.Module) -> dict:
    stack = {}
    for key, (p, cls) in call.meta.get("nn_module_stack", {}).items():
        stack[key] = (p, f"{type(block).__module__}.{type(block).__qualname__}") if p == path else (p, cls)
    for key, (p, cls) in copy_of.meta.get("nn_module_stack", {}).items():
        if p and not p.startswith("_empty_nn_module_stack"):
            stack[f"{_ROOT_KEY}{path}.{p}"] = (f"{path}.{p}", cls)
    return stack


def _symbol_map(env: dict) -> dict:
    """Each size symbol of the block's own trace -> the size it has in the model's graph, from the
    block's inputs (the copied nodes keep the block trace's shapes, in its symbols)."""
    symbols = {}
    for p, x in env.items():
        pv, xv = p.meta.get("val"), x.meta.get("val")
        if isinstance(pv, torch.Tensor) and isinstance(xv, torch.Tensor) and pv.dim() == xv.dim():
            outer = x.meta.get(SYMBOLS_META)  # x is itself a copied node (an earlier block's output)
            for s, t in zip(pv.shape, xv.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    size = t.node.expr if isinstance(t, torch.SymInt) else int(t)
                    symbols.setdefault(s.node.expr, size.xreplace(outer) if outer and not isinstance(size, int) else size)
    return symbols


def _inline(graph: fx.Graph, call_node: fx.Node, call: _Call) -> None:
    """Step 6: the kind's block graph in place of one block_call, on this block's weights."""
    template = call.kind.gm.graph
    env = dict(zip((n for n in template.nodes if n.op == "placeholder"), call_node.args[0]))
    symbols = _symbol_map(env)
    outs = None
    with graph.inserting_before(call_node):
        for n in template.nodes:
            if n.op == "placeholder" or (n.op == "call_module" and n.target == _GUARDS):
                continue
            if n.op == "output":
                outs = [env[o] for o in n.args[0] if isinstance(o, fx.Node)]
                continue
            if n.op == "get_attr":
                new = graph.create_node("get_attr", f"{call.path}.{n.target}")
                new.meta.update(n.meta)
            else:
                new = graph.node_copy(n, lambda a: env[a])
            new.meta["nn_module_stack"] = _stack_for(n, call_node, call.path, call.block)
            new.meta[SYMBOLS_META] = symbols
            env[n] = new
    for user in list(call_node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise Unsupported(f"block {call.path}'s outputs are used as a list")
        user.replace_all_uses_with(outs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(call_node)


def _close(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (
            x.shape != y.shape or x.dtype != y.dtype or not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)
        ):
            return False
    return True


def export_with_blocks(model: nn.Module, original_cls: type, args: tuple, kwargs: dict) -> TracedGraph | None:
    """The whole-model graph built from one traced block per kind; None where that does not apply."""
    if not enabled() or model.training:
        return None
    kinds = block_kinds(model)
    if not kinds:
        return None
    tokens: list[int] = []
    try:
        return _export(model, original_cls, args, kwargs, kinds, tokens)
    except Exception as e:  # noqa: BLE001 - any failure means: export the whole model instead
        log.debug("qpass: block-wise export not used (%s: %s); exporting the whole model", type(e).__name__, e, exc_info=True)
        return None
    finally:
        for t in tokens:
            _CALLS.pop(t, None)
        _WANTED.clear()


def _export(model, original_cls, args, kwargs, kinds: list[_Kind], tokens: list[int]) -> TracedGraph:
    _record(model, original_cls, args, kwargs, kinds)
    swapped = []
    try:
        for kind in kinds:
            parent = model.get_submodule(kind.list_path)
            for name, path, block in kind.members:
                stub = _BlockStub(block, kind, path)
                tokens.append(stub._qpass_token)
                parent._modules[name] = stub
                swapped.append((parent, name, block))
        top = export_graph(model, original_cls, args, kwargs).gm
    finally:
        for parent, name, block in swapped:
            parent._modules[name] = block
    tensors = [x for x in pytree.tree_leaves((args, dict(sorted(kwargs.items())))) if isinstance(x, torch.Tensor)]
    _WANTED.update(id(k) for k in kinds)
    try:
        with torch.no_grad():
            top(*tensors)
    except _Captured:
        pass
    calls = [n for n in top.graph.nodes if n.op == "call_function" and n.target is torch.ops.qpass.block_call.default]
    firsts = {}
    for node in calls:
        call = _CALLS[node.args[1]]
        if call.block is call.kind.members[0][2]:
            firsts[id(call.kind)] = (call, node)
    for kind in kinds:
        if kind.first_inputs is None or id(kind) not in firsts:
            raise Unsupported(f"the model's graph never calls block {kind.members[0][1]}")
        _trace_kind(kind, *firsts[id(kind)])
    for node in calls:
        call = _CALLS[node.args[1]]
        _check_call(node, call, firsts[id(call.kind)][0])
        _inline(top.graph, node, call)
    root = {}
    for node in top.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                root[node.target] = fetch_attr(model, node.target)
            except AttributeError:
                root[node.target] = fetch_attr(top, node.target)
    lazy = _LazyGraphModule(root, top.graph)  # no code generated until the clean-up is done
    recover_causal_masks(lazy.graph)  # before step 7, which then checks it too
    lazy.graph.eliminate_dead_code()
    gm = TracedGraphModule(lazy, lazy.graph)
    gm.meta.update(top.meta)
    _verify(model, original_cls, gm, args, kwargs)
    return TracedGraph(gm=gm, static_dims=_static_dims(gm))


def _shrunk(gm: fx.GraphModule, args, kwargs, cap: int = VERIFY_SIZE, batch: int = VERIFY_BATCH):
    """The example inputs cut to at most ``cap`` along each dynamic dim, ``batch`` along a dynamic
    dim 0 (one cut per symbol, the first place it appears deciding)."""
    sizes: dict = {}
    cuts = []
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        val = p.meta.get("val")
        cut = {}
        for d, s in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(s, torch.SymInt):
                hint = int(s.node.hint)
                size = max(batch if d == 0 else cap, 2)
                cut[d] = sizes.setdefault(s.node.expr, min(hint, size) if hint >= 2 else hint)
        cuts.append(cut)
    leaves, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
    it = iter(cuts)
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            for d, n in next(it).items():
                x = x.narrow(d, 0, n)
        out.append(x)
    a, kw = pytree.tree_unflatten(out, spec)
    return a, kw, [x for x in out if isinstance(x, torch.Tensor)]


def _verify(model, original_cls, gm: fx.GraphModule, args, kwargs) -> None:
    """Step 7, on inputs cut short along their dynamic dims (the check is about code, not size)."""
    a, kw, tensors = _shrunk(gm, args, kwargs)
    with torch.no_grad():
        with original_class(model, original_cls):
            reference = original_cls.forward(model, *a, **kw)
        got = gm(*tensors)
    if not _close(got, reference):
        raise Unsupported("the stitched graph's outputs differ from the eager model's")
