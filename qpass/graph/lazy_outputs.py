"""Calibration forwards compute what calibration reads now, and the model's outputs on demand.

A calibration pass runs the caller's forward_loop, and most forward_loops discard what the
model returns. Everything a graph computes after its last statistic-collecting node feeds
nothing the pass reads: an LLM's final norm and vocabulary GEMM (SmolLM2's lm_head is about
16% of its forward), a classifier head, a loss. ModelOpt's eager forward runs it anyway.

Inside a pass over the caller's forward_loop (:func:`deferred_outputs`: max calibration's
statistics pass, the algorithms' capture passes, GPTQ's and local_hessian's later passes), a
forward without autograd is cut in two (:func:`split_for`):

* the *head*: the nodes that every pinned node depends on. Pinned are the quantizer nodes
  that are not the identity at this moment (collecting statistics, quantizing, a
  pre_quant_scale, hooks such as the activation captures), any other module call, and any
  op with side effects;
* the *tail*: the rest, which is pure. Quantizer nodes in it are the identity now, and the
  tail is built without them, so it computes what the whole graph would have returned at
  the time of the call.

The head runs at once. Each output that depends on the tail comes back as a
:class:`LazyOutput`, a tensor with the output's shape, dtype and device whose values are
computed the first time anything reads them (any torch op, ``.numpy()``, ``print``,
pickling). One run of the tail computes every lazy output of that call, from the boundary
values the head kept. Outputs that are still referenced when the pass ends are computed
then, before any algorithm changes a weight, so an output read after ``quantize`` returns
holds the values of the call. Outputs that were dropped are never computed.

Where a split does not pay (the tail has no GEMM or convolution) or an output's shape cannot
be stated from the input shapes, the graph runs whole.
"""

from __future__ import annotations

import contextlib
import weakref

import sympy
import torch
from torch import fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from qpass.graph.execution import graph_module_over
from qpass.nn.tensor_quantizer import is_quantizer, iter_tensor_quantizers, quantizer_epoch

__all__ = ["LazyOutput", "call", "deferred_outputs", "split_for"]

# ops whose presence makes a tail worth deferring (by overload packet name)
_HEAVY = frozenset({
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "convolution", "conv1d", "conv2d",
    "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
})

# exe GraphModule -> (quantizer epoch, identity signature, _Split or None)
_CACHE: "weakref.WeakKeyDictionary[fx.GraphModule, tuple]" = weakref.WeakKeyDictionary()


def op_name(target) -> str:
    """An op's name without overload (``linear`` for ``aten.linear.default``); a Python function
    standing in for an op names it in ``qpass_op`` (:func:`qpass.calib.pass_graph.cpu_linear`)."""
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else getattr(target, "qpass_op", "")


def _identity(module) -> bool:
    """The quantizer's forward returns its input unchanged, and observes nothing."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    for tq in iter_tensor_quantizers(module):
        if tq._forward_hooks or tq._forward_pre_hooks or tq._buffers.get("_pre_quant_scale") is not None:
            return False
        if not tq._disabled and (tq._if_quant or tq._if_calib):
            return False
    return True


def _signature(exe: fx.GraphModule) -> tuple:
    """Per call_module node: whether it is an identity quantizer now."""
    out = []
    for node in exe.graph.nodes:
        if node.op == "call_module":
            module = exe.get_submodule(node.target)
            out.append(is_quantizer(module) and _identity(module))
    return tuple(out)


class _Split:
    __slots__ = ("head", "tail", "leaves", "out_spec", "inputs")

    def __init__(self, head, tail, leaves, out_spec, inputs) -> None:
        self.head = head  # GraphModule: the graph's inputs -> tuple of boundary values
        self.tail = tail  # GraphModule: boundary values -> tuple of the tail's outputs
        self.leaves = leaves  # per flat output: ("head", i) | ("tail", i, fake value) | ("const", v)
        self.out_spec = out_spec  # how the flat outputs unflatten (None: as the list)
        self.inputs = inputs  # the placeholders' fake values (for the symbolic shapes)


def split_for(exe: fx.GraphModule) -> _Split | None:
    """The head/tail split of ``exe`` for its quantizers' current states (cached), or None."""
    epoch = quantizer_epoch()
    cached = _CACHE.get(exe)
    if cached is not None and cached[0] == epoch:
        return cached[2]
    sig = _signature(exe)
    if cached is not None and cached[1] == sig:
        _CACHE[exe] = (epoch, sig, cached[2])
        return cached[2]
    split = _build(exe, sig)
    _CACHE[exe] = (epoch, sig, split)
    return split


def _pinned(node: fx.Node, identity: dict) -> bool:
    if node.op == "call_module":
        return not identity[node]
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return True
    return node.is_impure() and "assert" not in str(node.target)


def _build(exe: fx.GraphModule, sig: tuple) -> _Split | None:
    nodes = list(exe.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module"]
    identity = dict(zip(calls, sig))
    need: set[fx.Node] = set()
    stack = [n for n in nodes if n.op == "placeholder" or _pinned(n, identity)]
    while stack:  # the pinned nodes and everything they read
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    output = nodes[-1]
    tail_nodes = [n for n in nodes[:-1] if n not in need]
    if not any(n.op == "call_function" and op_name(n.target) in _HEAVY for n in tail_nodes):
        return None
    tail_set = set(tail_nodes)
    flat_out, out_tree = pytree.tree_flatten(output.args[0])
    boundary = [n for n in nodes[:-1] if n in need and n.op != "get_attr"
                and (any(u in tail_set for u in n.users) or n in flat_out)]

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:-1]:
        if n in need:
            env[n] = head.node_copy(n, lambda a: env[a])
    head.output(tuple(env[n] for n in boundary))
    codegen = exe.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:  # the same input handling, the boundary values returned as they are
        if type(codegen) is not _PyTreeCodeGen:
            return None
        head._codegen = _PyTreeCodeGen(info._replace(out_spec=None))

    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {n: tail.placeholder(f"b{i}") for i, n in enumerate(boundary)}
    for n in nodes:  # parameters the tail reads (also those the head reads: a tied weight)
        if n.op == "get_attr" and any(u in tail_set for u in n.users):
            tenv[n] = tail.node_copy(n)
    for n in tail_nodes:
        if n.op == "get_attr":
            continue
        elif n.op == "call_module":  # an identity quantizer (anything else is pinned)
            tenv[n] = tenv[n.args[0]]
        else:
            tenv[n] = tail.node_copy(n, lambda a: tenv[a])
    index = {n: i for i, n in enumerate(boundary)}
    tail_out, leaves = [], []
    for leaf in flat_out:
        if not isinstance(leaf, fx.Node):
            leaves.append(("const", leaf))
        elif leaf in index:
            leaves.append(("head", index[leaf]))
        else:
            val = leaf.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None
            leaves.append(("tail", len(tail_out), val))
            tail_out.append(tenv[leaf])
    tail.output(tuple(tail_out))
    inputs = [n.meta.get("val") for n in nodes if n.op == "placeholder"]
    spec = info.out_spec if info is not None else None
    # the tail's code is generated when a call first reads a deferred output: most forward_loops
    # read none, and then it never is
    return _Split(_graph_module(exe, head), _graph_module(exe, tail, lazy=True), (leaves, out_tree), spec, inputs)


def _graph_module(exe: fx.GraphModule, graph: fx.Graph, lazy: bool = False) -> fx.GraphModule:
    """A GraphModule over ``graph`` that reaches parameters through ``exe``'s live containers
    (what qpass rebinds in them later is what it reads); ``lazy``: its code is generated on its
    first call."""
    used = {n.target.split(".", 1)[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
    live = {key: m for key, m in exe._modules.items() if key in used}
    gm = graph_module_over(graph, live, exe, sorted(used - set(live)), "QpassCalibrationPart")
    if not lazy:
        gm.real_recompile()
    return gm


def _shape(val: torch.Tensor, bindings: dict) -> list[int] | None:
    out = []
    for s in val.shape:
        if isinstance(s, int):
            out.append(s)
            continue
        v = s.node.expr.xreplace(bindings)
        if not getattr(v, "is_Integer", False):
            return None
        out.append(int(v))
    return out


def call(exe: fx.GraphModule, tensors: list, run_head, pending: "weakref.WeakSet"):
    """``exe(*tensors)`` with the tail deferred: ``run_head(head)`` runs the head now, and the
    outputs that depend on the tail come back as :class:`LazyOutput`. None (nothing run) where
    ``exe`` has no split or an output's shape cannot be resolved from the inputs' shapes."""
    split = split_for(exe)
    if split is None or len(split.inputs) != len(tensors):
        return None
    bindings = {}
    for val, t in zip(split.inputs, tensors):
        if isinstance(val, torch.Tensor):
            for s, size in zip(val.shape, t.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    bindings[s.node.expr] = sympy.Integer(size)
    leaves, out_tree = split.leaves
    shapes = {}
    for leaf in leaves:
        if leaf[0] == "tail":
            shapes[leaf[1]] = _shape(leaf[2], bindings)
            if shapes[leaf[1]] is None:
                return None
    values = run_head(split.head)
    job = _Pending(split.tail, values)
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    flat = []
    for leaf in leaves:
        if leaf[0] == "const":
            flat.append(leaf[1])
        elif leaf[0] == "head":
            flat.append(values[leaf[1]])
        elif device is None:  # a tail that reads no boundary tensor: run it now
            flat.append(job.result()[leaf[1]])
        else:
            flat.append(LazyOutput(job, leaf[1], shapes[leaf[1]], leaf[2].dtype, device))
    if job.values is None:
        pending.add(job)
    out = pytree.tree_unflatten(flat, out_tree)
    return out if split.out_spec is None else pytree.tree_unflatten(out, split.out_spec)


@contextlib.contextmanager
def deferred_outputs(state):
    """A calibration pass over the caller's forward_loop: inside, a forward (without autograd)
    defers its outputs' tail; at the end, the tails of outputs still referenced are computed."""
    if state.__dict__.get("deferred") is not None:  # nested: the outer pass owns them
        yield
        return
    state.deferred = pending = weakref.WeakSet()
    try:
        yield
        for job in list(pending):
            job.result()
    finally:
        state.deferred = None


class _Pending:
    """One call's tail: run once, when the first of its outputs is read."""

    __slots__ = ("tail", "inputs", "values", "__weakref__")

    def __init__(self, tail: fx.GraphModule, inputs: tuple) -> None:
        self.tail, self.inputs, self.values = tail, inputs, None

    def result(self) -> tuple:
        if self.values is None:
            with torch.no_grad():  # calibration forwards run without autograd
                self.values = tuple(self.tail(*self.inputs))
            self.inputs = None
        return self.values


def _value(t: "LazyOutput") -> torch.Tensor:
    return t._qpass_job.result()[t._qpass_index]


class LazyOutput(torch.Tensor):
    """An output of a calibration forward, computed when first read (see the module doc)."""

    @staticmethod
    def __new__(cls, job: _Pending, index: int, shape, dtype, device):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        t._qpass_job, t._qpass_index = job, index
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(LazyOutput, _value, (args, kwargs or {}))
        return func(*args, **kwargs)

    def materialize(self) -> torch.Tensor:
        """The plain tensor."""
        return _value(self)

    # data access that does not go through torch's dispatcher
    def numpy(self, *args, **kwargs):
        return _value(self).numpy(*args, **kwargs)

    def tolist(self):
        return _value(self).tolist()

    def __array__(self, *args, **kwargs):
        return _value(self).__array__(*args, **kwargs)

    def __repr__(self, *args, **kwargs):
        return repr(_value(self))

    def __reduce_ex__(self, protocol):
        return _value(self).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return _value(self).clone()
