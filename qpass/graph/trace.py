"""Capture a module as an FX graph with torch.export (non-strict, dynamic batch/sequence).

The captured GraphModule shares every parameter and buffer object with the
original model, keeps the caller's calling convention (args, kwargs, outputs
such as HF ``ModelOutput``) and records each op's owning module path in
``node.meta["nn_module_stack"]``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from qpass.errors import TraceError
from qpass.passes.causal_mask import recover_causal_masks

# How many leading dims of each input tensor are traced as dynamic (batch, sequence).
DYNAMIC_DIMS = 2


def _dim_spec(x: torch.Tensor, dynamic_dims=DYNAMIC_DIMS):
    """Dims traced as dynamic: the first ``dynamic_dims`` (an int), or the listed ones (a collection)."""
    dims = range(min(x.dim(), dynamic_dims)) if isinstance(dynamic_dims, int) else dynamic_dims
    return {d: torch.export.Dim.AUTO for d in dims} or None


class _FlatCall(nn.Module):
    """Calls the model's own forward from a flat list of input tensors.

    torch.export sees only tensors (one positional argument each, with dynamic
    batch/sequence dims); every other leaf of the caller's (args, kwargs) is a
    constant of this graph. The module shares the model's parameter, buffer
    and submodule dicts, so every FQN in the graph is the model's own.
    """

    def __init__(self, model: nn.Module, original_cls: type, spec, leaves: list) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        object.__setattr__(self, "_qpass_call", (model, original_cls, spec, leaves))

    def forward(self, *tensors):
        model, original_cls, spec, leaves = self._qpass_call
        it = iter(tensors)
        filled = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return original_cls.forward(model, *args, **kwargs)


class _ModuleStack:
    """Tracks which module is executing, so a failed trace can name it."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []

    def pre(self, module, args):
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)

    def post(self, module, args, out):
        if self.names.get(id(module)) is not None and self.stack:
            self.stack.pop()

    @contextlib.contextmanager
    def watching(self):
        h1 = nn.modules.module.register_module_forward_pre_hook(self.pre)
        h2 = nn.modules.module.register_module_forward_hook(self.post)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()

    def failing_module(self) -> str:
        # The stack at the moment of failure: its top is the module whose code raised.
        # Empty: the root's own code (or its outputs) failed.
        return (self.stack[-1] if self.stack else "") or "<root>"


class TracedGraphModule(_LazyGraphModule):
    """A traced graph's module: Python code generated on first use, a version every recompile bumps.

    qpass's passes edit the traced graph and recompile it (quantizer insertion, folding), but a
    forward never runs it: it runs the execution copy (:mod:`qpass.graph.execution`), which checks
    :func:`graph_version` to know when to rebuild. Generating the code of a 30-layer graph on
    every edit cost about 0.1 s a time.
    """

    _qpass_version = 0

    @classmethod
    def recompile(cls) -> None:  # each instance has a class of its own (GraphModule.__new__)
        cls._qpass_version += 1
        super().recompile()


def graph_version(gm: fx.GraphModule):
    """Changes whenever ``gm`` is recompiled: its version, or for a plain GraphModule its code
    string (compared by identity)."""
    version = getattr(type(gm), "_qpass_version", None)
    return version if version is not None else gm.code


def same_version(a, b) -> bool:
    """Two :func:`graph_version` values name the same code (ints by value, code strings by identity)."""
    return a == b if isinstance(b, int) else a is b


@dataclass
class TracedGraph:
    """One captured graph plus the facts needed to dispatch inputs to it."""

    gm: fx.GraphModule
    # per flat input leaf: None (not a tensor) or {dim: size} of its specialised dims, where a dim
    # the graph only takes within a range maps to (lowest, highest or None) instead (_static_dims)
    static_dims: list
    placed: frozenset = frozenset()  # names of the quantizers placed in this graph


#: the submodule ``ep.module()`` checks its inputs with, first thing in the graph
GUARDS_FN = "_guards_fn"
#: gm.meta key: the input checks torch.export could not state as ranges (``"(L['x'].size()[1] % 8) == 0"``)
GUARDS_META = "qpass_guards"


def guards_pass(guards, tensors) -> bool:
    """True if the exported graph's input check (its ``_guards_fn`` module, None: none) accepts
    ``tensors``: it raises before any work, and a graph whose check fails is traced anew."""
    if guards is None:
        return True
    try:
        guards(*tensors)
    except AssertionError:
        return False
    return True


def _size_range(size: torch.SymInt) -> tuple[int | None, int | None]:
    """(lowest, highest) a traced size may take (None: unbounded), from its shape environment."""
    try:
        r = size.node.shape_env.bound_sympy(size.node.expr)
        lo, hi = r.lower, r.upper
        return (int(lo) if lo.is_finite else None), (int(hi) if hi.is_finite else None)
    except Exception:  # noqa: BLE001 - no shape environment: no known bound
        return None, None


def _dim_constraint(size):
    """What an input dim of the graph requires: its size (a specialised dim, also one traced as
    dynamic that the code pinned: Funnel and Mamba fix the sequence at the traced length), a
    range (BigBird's sequence is at least 16 long), or None. torch.export's usual lower bound of
    2 is not a requirement: the graphs run on size 1 too (one token of generation)."""
    if isinstance(size, int):
        return size
    lo, hi = _size_range(size)
    if lo is not None and lo == hi:
        return lo
    lo = lo if lo is not None and lo > 2 else 0
    return (lo, hi) if lo or hi is not None else None


def _static_dims(gm: fx.GraphModule) -> list:
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = {i: _dim_constraint(s) for i, s in enumerate(val.shape)}
            out.append({i: c for i, c in dims.items() if c is not None})
        else:
            out.append(None)
    return out


def fixed_dims(dims: dict | None) -> set[int]:
    """The dims of one :attr:`TracedGraph.static_dims` entry that have a single size."""
    return {d for d, c in (dims or {}).items() if isinstance(c, int)}


def export_graph(model: nn.Module, original_cls: type, args: tuple, kwargs: dict,
                 dynamic_dims: int | list = DYNAMIC_DIMS) -> TracedGraph:
    """Export the model's own forward (its class before qpass wrapped it) for these inputs.

    The graph takes the input tensors flat, in ``pytree.tree_flatten((args, kwargs))`` order
    (kwargs sorted by name), and returns the caller's output structure. ``dynamic_dims``:
    how many leading dims of each input are traced as dynamic, or per input tensor, which dims.
    """
    leaves, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
    tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    watcher = _ModuleStack(model)
    printed = io.StringIO()
    try:
        with original_class(model, original_cls), watcher.watching(), _lean_tracing(), muted_meta_errors(), \
                contextlib.redirect_stderr(printed):
            ep = torch.export.export(
                _FlatCall(model, original_cls, spec, leaves), tensors,
                dynamic_shapes=(tuple(_dim_spec(t, dynamic_dims if isinstance(dynamic_dims, int) else dynamic_dims[i])
                                   for i, t in enumerate(tensors)),), strict=False,
            )
        sys.stderr.write(printed.getvalue())
    except Exception as e:  # noqa: BLE001 - every export failure becomes one clear error
        # torch.export prints the partial graph of a data-dependent failure; the error says it in a line
        partial = getattr(e, "partial_fx_graph", None)
        sys.stderr.write(printed.getvalue().replace(f"{partial}\n", "") if partial is not None else printed.getvalue())
        where = watcher.failing_module()
        text = str(e).strip()
        cause = text.splitlines()[0] if text else type(e).__name__
        raise TraceError(
            f"torch.export could not trace the model: module '{where}' "
            f"({_type_of(model, where)}) failed with {type(e).__name__}: {cause}. "
            "The model was left unchanged. Make its forward traceable (no data-dependent "
            f"Python control flow), or pass inputs that avoid the failing branch.{_hint(model, where)}"
        ) from e
    exported = ep.module()
    exported.meta[GUARDS_META] = list(getattr(ep, "_guards_code", None) or ())
    recover_causal_masks(exported.graph)
    exported.graph.eliminate_dead_code()
    gm = TracedGraphModule(exported, exported.graph)
    gm.meta.update(exported.meta)
    gm.meta["qpass_example_inputs"] = tuple(t.detach() for t in tensors)  # what export_onnx re-traces with
    return TracedGraph(gm=gm, static_dims=_static_dims(gm))


def fetch_attr(root, target: str):
    """The attribute at a dotted get_attr target ("encoder.layer.0.dense.weight")."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def muted_meta_errors():
    """Silence fake tensors' ERROR log of an op whose meta function raised, for one export.

    The exception itself still propagates: the model's code may catch it (transformers probes
    ``torch._grouped_mm`` on float32 MoE experts and falls back to its own op, which left a
    traceback in the log of every quantize of such a model), and otherwise it ends the export with
    a :class:`TraceError` that names the module and the cause. Also silenced: the symbolic-shapes
    warning of a data-dependent guard ("Unable to find user code corresponding to {u0}"), which the
    TraceError (and the torch.compile fallback's warning) reports with the module. (The partial graph
    torch.export prints on such a failure goes to stderr directly; :func:`export_graph` drops it.)"""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _lean_tracing():
    """Switch off two tracing costs qpass never uses, for one export.

    - The fake-tensor dispatch cache: one export of a block almost never repeats an op with
      the same symbolic shapes, so building cache entries costs more than it saves.
    - Per-node Python stack traces: qpass names quantizers from ``nn_module_stack``.

    Together they cut the export of one BERT layer with dynamic batch/sequence from about
    0.25 to 0.16 s. Both are restored on exit, for the caller's own exports and compiles.
    """
    import torch._dynamo.config as dynamo_config
    import torch.fx.config as fx_config

    lean = [(dynamo_config, "fake_tensor_cache_enabled", False), (fx_config, "do_not_emit_stack_traces", True)]
    saved = [(cfg, name, getattr(cfg, name)) for cfg, name, _ in lean if hasattr(cfg, name)]
    for cfg, name, value in lean:
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    try:
        yield
    finally:
        for cfg, name, value in saved:
            setattr(cfg, name, value)


@contextlib.contextmanager
def original_class(model: nn.Module, original_cls: type):
    """The model runs as its own class (before qpass wrapped it) inside this block."""
    wrapped = model.__class__
    model.__class__ = original_cls
    try:
        yield model
    finally:
        model.__class__ = wrapped


def _hint(model: nn.Module, path: str) -> str:
    """What to change for a module known to be untraceable as configured."""
    from qpass.passes.rules import fused_expert_params

    try:
        module = model.get_submodule("" if path == "<root>" else path)
    except AttributeError:
        return ""
    config = getattr(model, "config", None)
    if fused_expert_params(module) and getattr(config, "_experts_implementation", None) == "eager":
        return (" Its fused experts run the 'eager' implementation, a Python loop over the experts each "
                "batch routes to; load the model with experts_implementation='grouped_mm' (transformers' "
                "default) or 'batched_mm' to quantize it.")
    return ""


def _type_of(model: nn.Module, path: str) -> str:
    try:
        return type(model.get_submodule("" if path == "<root>" else path)).__name__
    except AttributeError:
        return "?"


def matches_static_dims(traced: TracedGraph, tensors: list) -> bool:
    if len(tensors) != len(traced.static_dims):
        return False
    for x, dims in zip(tensors, traced.static_dims):
        if dims is None:
            continue
        for d, size in dims.items():
            if d >= x.dim():
                return False
            if isinstance(size, tuple):
                lo, hi = size
                if x.shape[d] < lo or (hi is not None and x.shape[d] > hi):
                    return False
            elif x.shape[d] != size:
                return False
    return True
