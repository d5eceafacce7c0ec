"""torch.compile capture for a model torch.export cannot trace whole.

When torch.export fails (data-dependent Python control flow, ``.item()`` loops, ...), qpass
captures the model with dynamo instead: ``torch.compile`` splits its forward into graphs at the
places it cannot trace (graph breaks) and runs the Python between them as it is. A backend
rewrites every Linear, Conv and ConvTranspose op of each captured graph into a call that passes
the op's input, weight and output through the owning module's ``input_quantizer``,
``weight_quantizer`` and ``output_quantizer`` (the very quantizers the module tree gave it at
quantize time), so calibration, enable/disable and the summary work as on a whole graph.

The owner is found at run time from the weight tensor the op reads: dynamo lifts parameters to
graph inputs, and one compiled graph may serve several modules (every decoder layer runs the
same code with its own weights). A weight that no Linear/Conv/ConvTranspose module owns (a
functional call on a computed tensor) runs unquantized, as the traced rules leave it.

What needs a whole graph is refused with a clear error: attention (bmm/softmax) quantizers,
quantizers on other modules (``rules="modelopt"``), algorithms other than max and mse, layerwise
calibration and auto_quantize (:func:`whole_graph_needed`), ONNX export and the ``"qpass"`` compile
backend. The break reasons are reported in
a warning and by :func:`graph_breaks`.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import fx, nn

from qpass.errors import QpassError, TraceError

#: calibration algorithms that need only the quantizers' own statistics, no graph of the model
ALGORITHMS = ("max", "mse")
_SLOTS = ("input_quantizer", "weight_quantizer", "output_quantizer")
_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_OWNERS = _LINEAR + _CONV + _CONV_T
# dynamo records the builtins (F.linear is torch._C._nn.linear, F.conv2d is torch.conv2d)
_OPS = {
    torch._C._nn.linear: _LINEAR,
    torch.conv1d: _CONV, torch.conv2d: _CONV, torch.conv3d: _CONV,
    torch.conv_transpose1d: _CONV_T, torch.conv_transpose2d: _CONV_T, torch.conv_transpose3d: _CONV_T,
}


class CompileFallback:
    """The model's forward under ``torch.compile`` with quantized weighted ops (see the module
    docstring). Holds no reference to the model: it is passed to each call, so a deep copy or a
    pickle of the model's state starts over with a fresh compile for the copy."""

    def __init__(self, cause: TraceError) -> None:
        self.cause = str(cause)
        self.breaks: list[str] = []  # the graph-break reasons dynamo gave, first line and place
        self.graphs = 0  # graphs dynamo handed to the backend
        self.warned = False
        self._fresh()

    def _fresh(self) -> None:
        self._fn = None
        self._owners: dict[int, tuple[str, nn.Module]] = {}
        # this forward's modules by the input tensor their ops read: id -> (weakref, module paths), and
        # the path lists of tensors whose id was taken by a later one
        self._readers: dict[int, tuple[weakref.ref, list[str]]] = {}
        self._read: list[list[str]] = []
        self._edges: set[tuple[str, str]] = set()
        self._state = None

    def __getstate__(self):
        return {"cause": self.cause, "breaks": list(self.breaks), "graphs": self.graphs, "warned": self.warned}

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._fresh()

    # ------------------------------------------------------------------ running
    def __call__(self, model: nn.Module, state, args: tuple, kwargs: dict):
        from torch._dynamo.utils import counters

        if self._fn is None:
            original = state.original_cls.forward

            def forward(m, *a, **kw):
                return original(m, *a, **kw)

            # shapes static first, dynamic where they change (dynamic=True made tiny Longformer's capture
            # 25 graphs in 12 s, against 4 in 2.7 s); a frame dynamo gives up on (its recompile limit)
            # runs eagerly, where the module hooks quantize it
            self._fn = torch.compile(forward, backend=self._backend)
        self._owners = _weight_owners(model)  # every call: a parameter may have been replaced since
        if state.calibrating:
            why = _pass_refusal(state)
            if why is not None:
                raise TraceError(f"{self.cause.rstrip('.')}. The torch.compile fallback cannot run this pass: {why}.")
        self._state = state
        before = dict(counters["graph_break"])
        try:
            _ACTIVE.append(self)
            out = self._fn(model, *args, **kwargs)
        except QpassError:
            raise
        except Exception as e:  # noqa: BLE001 - dynamo's own failures, named with the export's cause
            if type(e).__module__.startswith("torch._dynamo"):
                raise TraceError(
                    f"{self.cause.rstrip('.')}; the torch.compile fallback failed too: {type(e).__name__}: "
                    f"{_first_line(str(e))}"
                ) from e
            raise
        finally:
            if _ACTIVE and _ACTIVE[-1] is self:
                _ACTIVE.pop()
            self._state = None
            self._flush_edges(state)
        for reason, n in counters["graph_break"].items():
            if n > before.get(reason, 0):
                text = _reason(reason)
                if text not in self.breaks:
                    self.breaks.append(text)
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.describe()}. Its Linear/Conv/ConvTranspose ops are quantized; ONNX export, the 'qpass' "
                "compile backend and algorithms other than max/mse need a whole graph "
                "(qpass.graph_breaks(model) lists the reasons).",
                stacklevel=3,  # QuantizedModule.forward: a qpass module, so the CLI shows it
            )
        return out

    def describe(self, shown: int = 5) -> str:
        """torch.export's failure and what dynamo captured instead, in one sentence."""
        listed = "; ".join(self.breaks[:shown]) + (" ..." if len(self.breaks) > shown else "")
        return (f"{self.cause.split(' The model was left unchanged')[0]} qpass captured the model with torch.compile "
                f"instead: {self.graphs} graph(s), {len(self.breaks)} graph-break reason(s){': ' + listed if listed else ''}")

    def _backend(self, gm: fx.GraphModule, example_inputs):
        self.graphs += 1
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _QUANTIZED:
                node.target = _QUANTIZED[node.target]
                changed = True
        if changed:
            gm.recompile()
        return gm.forward

    def _reached(self, path: str, x, quantizers) -> None:
        state = self._state
        if state is None:
            return
        names = [f"{path}.{s}" for s, q in zip(_SLOTS, quantizers) if q is not None]
        state.placed.update(names)
        if state.calibrating:
            state.calib_placed.update(names)
        # modules whose input quantizers read one tensor share an input amax (q/k/v, gate/up)
        hit = self._readers.get(id(x))
        if hit is None or hit[0]() is not x:  # a new tensor (maybe at a freed one's address)
            if hit is not None:
                self._read.append(hit[1])
            self._readers[id(x)] = (weakref.ref(x), [path])
        elif path not in hit[1]:
            hit[1].append(path)

    def _flush_edges(self, state) -> None:
        edges = []
        for owners in self._read + [owners for _, owners in self._readers.values()]:
            owners = sorted(owners)
            pairs = [(owners[0], o) for o in owners[1:]] if len(owners) > 1 else [(owners[0], owners[0])]
            edges.extend(p for p in pairs if p not in self._edges)
        self._readers.clear()
        self._read.clear()
        if edges:
            self._edges.update(edges)
            state.edges.append(edges)


# The fallback whose forward is running. The quantized ops and the hooks find the model's
# quantizers through it, not through the fallback that compiled them: dynamo keeps compiled code
# per code object, so a graph captured while one model ran may run again for another instance
# of the same class (and a deep copy of a model shares the hooks harmlessly).
_ACTIVE: list = []


def _owner(w, owner_types: tuple):
    """(fallback, path, module) of the running model's module whose weight ``w`` is, or None."""
    if not _ACTIVE or not isinstance(w, torch.Tensor):
        return None
    fallback = _ACTIVE[-1]
    hit = fallback._owners.get(id(w))
    if hit is None or hit[1]._parameters.get("weight") is not w or not isinstance(hit[1], owner_types):
        return None
    return fallback, hit[0], hit[1]


def _reach(hit, x) -> tuple:
    """The module's (input, weight, output) quantizers (None where absent), after recording that the
    running pass reached them with input ``x``."""
    fallback, path, module = hit
    quantizers = tuple(module._modules.get(s) for s in _SLOTS)
    fallback._reached(path, x, quantizers)
    return quantizers


def _quantized(op, owner_types: tuple):
    """``op`` (linear, convN, conv_transposeN) through its owning module's quantizers."""

    def qpass_quantized_op(*args, **kwargs):
        args = list(args)
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        hit = _owner(w, owner_types)
        if hit is None:
            return op(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        iq, wq, oq = _reach(hit, x)
        if iq is not None:
            x = iq(x)
        if wq is not None:
            w = wq(w)
        if args:
            args[0] = x
        else:
            kwargs["input"] = x
        if len(args) > 1:
            args[1] = w
        else:
            kwargs["weight"] = w
        y = op(*args, **kwargs)
        return oq(y) if oq is not None else y

    qpass_quantized_op.__name__ = qpass_quantized_op.__qualname__ = f"qpass_quantized_{op.__name__}"
    return qpass_quantized_op


_QUANTIZED = {op: _quantized(op, types) for op, types in _OPS.items()}


def _eager_pre(module, args):
    """Forward pre-hook of a weighted module: where dynamo runs a weighted module's call eagerly (a frame it
    skipped: a graph break inside a loop runs that whole frame in Python; a frame past its
    recompile limit), quantize it here, since the module's own forward runs no captured graph.
    While dynamo traces, and outside a fallback's forward, it does nothing."""
    if torch.compiler.is_compiling() or not _ACTIVE or not args:
        return None
    hit = _owner(module._parameters.get("weight"), _OWNERS)
    if hit is None or hit[2] is not module:
        return None
    iq, wq, oq = _reach(hit, args[0])
    module.__dict__[_EAGER] = oq  # read (and dropped) by _eager_post
    if wq is not None:
        module.__dict__["weight"] = wq(module._parameters["weight"])  # shadows the parameter for this call
    return ((iq(args[0]) if iq is not None else args[0]),) + tuple(args[1:])


_EAGER = "_qpass_eager_output_quantizer"


def _eager_post(module, args, out):
    """Forward hook (always called, also on an exception): drop the pre-hook's quantized
    weight and quantize the output."""
    if torch.compiler.is_compiling() or _EAGER not in module.__dict__:
        return None
    oq = module.__dict__.pop(_EAGER)
    module.__dict__.pop("weight", None)
    return oq(out) if oq is not None and out is not None else None


def _never_compiled(*fns) -> list:
    """Dynamo must not compile these hooks as frames of their own (their callers run eagerly):
    traced, ``is_compiling()`` would make them no-ops. Inlined into a traced module call they still
    are (the graph op is quantized instead). Nested calls (the quantizers) run eagerly too."""
    try:
        from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # pragma: no cover - a torch without it: disabled hooks (a graph break per call)
        return [torch._dynamo.disable(fn) for fn in fns]
    for fn in fns:
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    return list(fns)


_PRE, _POST = _never_compiled(_eager_pre, _eager_post)


def remove_eager_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`_weight_owners` added (a failed quantize leaves the model as it was)."""
    for _, module in model.named_modules():
        for hooks, fn in ((module._forward_pre_hooks, _PRE), (module._forward_hooks, _POST)):
            for key in [k for k, v in hooks.items() if v is fn]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)


def _weight_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """The weighted modules by the id of their weight; each with quantizers also gets the two eager
    hooks, once (per module: dynamo breaks its graphs at every module call while global module hooks
    exist; plain functions, so a deep copy shares them harmlessly)."""
    owners = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, _OWNERS):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and id(w) not in owners:
            owners[id(w)] = (path, module)
        if any(module._modules.get(s) is not None for s in _SLOTS) and _PRE not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_PRE)
            module.register_forward_hook(_POST, always_call=True)
    return owners


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _reason(reason: str) -> str:
    """A graph-break reason as one line: its title and the user code it points at."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown"
    where = next((ln for ln in lines if ln.startswith("# File ") or ln.startswith("File ")), None)
    return lines[0] + (f" ({where.lstrip('# ')})" if where else "")


def _pass_refusal(state) -> str | None:
    """Why the running calibration pass cannot go through the fallback, or None (layerwise
    calibration traces through its recorder: :func:`whole_graph_needed`)."""
    method = state.method
    if state.calibrating and method not in ALGORITHMS:
        return f"algorithm {method!r} needs a whole graph (the fallback calibrates with {' or '.join(ALGORITHMS)})"
    return None


def refusal(model: nn.Module, state) -> str | None:
    """Why this model's quantization cannot go through the fallback, or None."""
    from qpass.calib.max_calibrate import _may_enable_traced_slots
    from qpass.nn.tensor_quantizer import iter_tensor_quantizers

    if state.capture == "export":
        return "capture='export' was asked for"
    why = _pass_refusal(state)
    if why is not None:
        return why
    if _may_enable_traced_slots(state):
        return "the config enables attention (bmm/softmax) quantizers, which need a whole graph"
    for path, owner in model.named_modules():
        if isinstance(owner, _OWNERS):
            continue
        for name, child in owner._modules.items():
            if name.endswith("quantizer") or name.endswith("quantizers"):
                if any(q.is_enabled for q in iter_tensor_quantizers(child)):
                    where = f"{path}.{name}" if path else name
                    return f"quantizer '{where}' is not on a Linear/Conv/ConvTranspose module"
    return None


def start(model: nn.Module, state, cause: TraceError) -> CompileFallback:
    """The model's fallback capture after ``cause``; raises ``cause`` (extended) where it cannot be."""
    why = refusal(model, state)
    if why is not None:
        if why.startswith("capture="):
            raise cause
        raise TraceError(f"{str(cause).rstrip('.')}. The torch.compile fallback was not used: {why}.") from cause
    fallback = CompileFallback(cause)
    state.fallback = fallback
    return fallback


@contextlib.contextmanager
def whole_graph_needed(who: str):
    """A TraceError inside says that ``who`` needs the model traced whole (no fallback for it)."""
    try:
        yield
    except TraceError as e:
        raise TraceError(f"{str(e).rstrip('.')}. {who} needs the model traced whole by torch.export (the "
                         "torch.compile fallback of quantize cannot serve it)") from e


def graph_breaks(model: nn.Module) -> list[str] | None:
    """The graph-break reasons of a model quantized through the torch.compile fallback (one line
    each), or None where every input structure was traced whole by torch.export."""
    from qpass.graph.quantized_model import state_of

    fallback = state_of(model).__dict__.get("fallback")
    return None if fallback is None else list(fallback.breaks)
