"""CUDA-graph replay of a quantized model's inference forwards.

A fake-quantized forward on a GPU is bound by its host: at SmolLM2's size (8x512 tokens, 30
layers) the device works for about 10 ms of a 45-65 ms forward, and the rest is Python and
kernel launches - the model's own ops plus one or two fake-quant kernels per quantizer. A CUDA
graph records the kernels of one forward once and replays them with a single launch, so a
replayed forward costs about the device time.

Policy, per quantized model (:class:`CudaGraphs`, kept on its qpass state):

* Only inference forwards are eligible: CUDA inputs, ``model.eval()``, autograd off
  (``torch.no_grad()`` or ``torch.inference_mode()``), no layer-by-layer pass in progress, no
  autocast and no torch function or dispatch mode. Anything else runs the execution graph as
  before. A forward whose graph runs a quantizer with hooks (an algorithm's activation capture)
  stays eager while the hooks are there. Max-calibration forwards have graphs of their own,
  dropped when the pass ends.
* The first forward of an input signature (graph, shapes, strides, dtypes, devices) runs
  eagerly: it may trace, verify Triton kernels, fill the weight caches. The second is captured
  (after one warm-up run on a side stream) and replayed; later ones replay.
* A captured graph bakes in addresses and everything the host decided. Before each replay a
  fingerprint is compared: the quantizer epoch (enable/disable, attributes, amax, hooks, see
  :func:`qpass.nn.tensor_quantizer.quantizer_epoch`), the module-registration counter
  (parameters, buffers, submodules set anew on a module of a model that holds graphs; never
  counted under torch.compile, where it would make dynamo guard on it), and for every parameter
  and buffer of the model:
  that it is still the one registered, its storage address and its version counter (in-place
  writes). A mismatch drops the graph and runs eagerly; a signature invalidated
  ``MAX_RECAPTURES`` times, or whose capture fails (a host sync in the forward, say), is not
  captured again.
* Inputs are copied into the graph's static inputs; outputs are cloned out of its pool, so a
  result stays valid after the next call. At most ``MAX_GRAPHS`` graphs are kept per model (least
  recently used dropped; each holds one forward's activations). After ``MAX_EVICTIONS`` drops
  (inputs cycling through more signatures than that), new signatures are no longer captured.

Off: ``QPASS_CUDA_GRAPHS=0`` in the environment, or :func:`qpass.set_cuda_graphs(model, False)`.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.utils import _pytree as pytree

from qpass.nn.tensor_quantizer import TensorQuantizer, quantizer_epoch

log = logging.getLogger("qpass.cuda_graphs")

__all__ = ["CudaGraphs", "MAX_EVICTIONS", "MAX_GRAPHS", "MAX_RECAPTURES", "run"]

MAX_GRAPHS = 8
MAX_RECAPTURES = 3
#: graphs dropped to make room, after which no new signature is captured: inputs that cycle
#: through more shapes than MAX_GRAPHS would otherwise pay a capture again and again
MAX_EVICTIONS = 2 * MAX_GRAPHS
_MAX_SEEN = 256  # signatures counted but not (yet) captured


class _Registrations:
    value = 0  # registrations into watched modules
    any = 0  # every registration (eager): the cache of qpass.algorithms.fold._param_count
    installed = False
    #: the modules of models that hold captured graphs: only registrations into them count, so
    #: the forwards of other models (HF's Llama slices its ModuleList on every call, which
    #: registers each layer into a new list) invalidate nothing
    watched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _on_registration(module, *_args):
    # Not under torch.compile: dynamo would trace this and guard on the counter, and every
    # registration (the ModuleList slice above, in any compiled model) would recompile it.
    if not torch.compiler.is_compiling():
        _Registrations.any += 1
        if module in _Registrations.watched:
            _Registrations.value += 1
    # returns None: the registration itself is unchanged


def _install_hooks() -> None:
    if not _Registrations.installed:
        nn_module.register_module_parameter_registration_hook(_on_registration)
        nn_module.register_module_buffer_registration_hook(_on_registration)
        nn_module.register_module_module_registration_hook(_on_registration)
        _Registrations.installed = True


def env_enabled() -> bool:
    return os.environ.get("QPASS_CUDA_GRAPHS", "1") != "0"


class _Captured:
    __slots__ = ("graph", "exe", "inputs", "outputs", "out_spec", "tracked", "epoch", "registrations")

    def valid(self) -> bool:
        if self.epoch != quantizer_epoch() or self.registrations != _Registrations.value:
            return False
        for table, name, t, ptr, version in self.tracked:
            if table.get(name) is not t or t.data_ptr() != ptr or (version is not None and t._version != version):
                return False
        return True


class CudaGraphs:
    """The captured graphs of one quantized model (see the module docstring)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.graphs: collections.OrderedDict = collections.OrderedDict()  # signature -> _Captured
        self.seen: collections.OrderedDict = collections.OrderedDict()  # signature -> eager calls
        self.recaptures: dict = {}
        self.refused: dict = {}  # signature -> reason it is not captured
        self.replays = 0
        self.evictions = 0

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.recaptures.clear()
        self.refused.clear()
        self.evictions = 0

    # a copy or a pickle of the model starts with no graphs (they hold addresses of this one's tensors)
    def __deepcopy__(self, memo):
        return CudaGraphs(self.enabled)

    def __getstate__(self):
        return {"enabled": self.enabled}

    def __setstate__(self, d):
        self.__init__(d.get("enabled", True))


def eligible(model: nn.Module, state, tensors: list) -> bool:
    if not tensors or torch.is_grad_enabled() or model.training:
        return False
    if state.recorder is not None or not env_enabled():
        return False
    if not all(t.is_cuda for t in tensors) or torch.cuda.is_current_stream_capturing():
        return False
    if torch.is_autocast_enabled("cuda") or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    return True


def _signature(key, tensors: list) -> tuple:
    return (key,) + tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def run(model: nn.Module, graphs: CudaGraphs, key, exe, tensors: list, calibration: bool = False):
    """``exe(*tensors)`` from a CUDA graph where one is captured and still valid. ``key``: what
    ``exe`` is (e.g. the id of the traced graph it comes from, and which derived graph);
    ``calibration``: a calibration pass's forward (captured once every quantizer it collects for
    holds a running statistic, so that replays only update statistics in place)."""
    sig = _signature(key, tensors)
    cap = graphs.graphs.get(sig)
    if cap is not None:
        if cap.exe is exe and cap.valid():
            graphs.graphs.move_to_end(sig)
            return _replay(graphs, cap, tensors)
        del graphs.graphs[sig]  # stale: run eagerly now, capture again on the next call
        graphs.recaptures[sig] = graphs.recaptures.get(sig, 0) + 1
        if graphs.recaptures[sig] >= MAX_RECAPTURES:
            graphs.refused[sig] = "invalidated too often (weights or quantizers change between calls)"
        graphs.seen[sig] = 1
        return exe(*tensors)
    if sig in graphs.refused:
        return exe(*tensors)
    if graphs.evictions >= MAX_EVICTIONS:  # inputs cycle through more signatures than it keeps
        return exe(*tensors)
    calls = graphs.seen.pop(sig, 0)
    if calls == 0:  # first call of this signature: eager (traces, verifies kernels, fills caches)
        graphs.seen[sig] = 1
        while len(graphs.seen) > _MAX_SEEN:
            graphs.seen.popitem(last=False)
        return exe(*tensors)
    if _hooked_quantizer(exe) is not None:  # hooks come and go (an algorithm's capture pass): try later
        graphs.seen[sig] = 1
        return exe(*tensors)
    if calibration:
        reason = _calibration_blocker(exe)
        if reason == "no statistic yet":  # a quantizer this input has not reached so far: later
            graphs.seen[sig] = 1
            return exe(*tensors)
        if reason is not None:
            graphs.refused[sig] = reason
            return exe(*tensors)
    try:
        cap = _capture(model, exe, tensors)
        _Registrations.watched.update(model.modules())
        _Registrations.watched.update(exe.modules())
    except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eagerly
        graphs.refused[sig] = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log.info("qpass: no CUDA graph for %s: %s", type(model).__name__, graphs.refused[sig])
        return exe(*tensors)
    graphs.graphs[sig] = cap
    while len(graphs.graphs) > MAX_GRAPHS:
        graphs.graphs.popitem(last=False)
        graphs.evictions += 1
    return _replay(graphs, cap, tensors)


def _hooked_quantizer(exe) -> str | None:
    for m in exe.modules():
        if isinstance(m, TensorQuantizer) and (m._forward_hooks or m._forward_pre_hooks):
            return f"quantizer '{m._name}' has hooks (a graph replay would not call them)"
    return None


def _calibration_blocker(exe) -> str | None:
    """Why a calibration forward cannot be captured: a collecting quantizer whose statistic is
    not a max (histograms collect on the host), or has no running tensor yet (the capture would
    allocate it in the graph's pool)."""
    from qpass.calib.max import MaxCalibrator

    for m in exe.modules():
        if not isinstance(m, TensorQuantizer) or m._disabled or not m._if_calib or m.is_dynamic:
            continue
        cal = m._calibrator
        if type(cal) is not MaxCalibrator:
            return f"quantizer '{m._name}' collects with {type(cal).__name__} (host-side statistics)"
        if cal._amax is None:
            return "no statistic yet"
    return None


def _tracked(model: nn.Module, exe) -> list:
    out, seen = [], set()
    for root in (model, exe):
        for m in root.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is None or (id(table), name) in seen:
                        continue
                    seen.add((id(table), name))
                    out.append((table, name, t, t.data_ptr(), None if t.is_inference() else t._version))
    return out


def _capture(model: nn.Module, exe, tensors: list) -> _Captured:
    static = [t.clone() for t in tensors]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        exe(*static)  # warm-up on a side stream (lazy library and allocator initialisation)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = exe(*static)
    cap = _Captured()
    cap.graph, cap.exe, cap.inputs = graph, exe, static
    flat, cap.out_spec = pytree.tree_flatten(out)
    cap.outputs = flat
    cap.epoch, cap.registrations = quantizer_epoch(), _Registrations.value
    cap.tracked = _tracked(model, exe)  # after the runs: weight caches and constants exist by now
    return cap


def _replay(graphs: CudaGraphs, cap: _Captured, tensors: list):
    for s, t in zip(cap.inputs, tensors):
        if s.data_ptr() != t.data_ptr():
            s.copy_(t)
    cap.graph.replay()
    graphs.replays += 1
    flat = [x.clone() if isinstance(x, torch.Tensor) else x for x in cap.outputs]
    return pytree.tree_unflatten(flat, cap.out_spec)


def set_enabled(graphs: CudaGraphs, enabled: bool) -> None:
    graphs.enabled = bool(enabled)
    if not enabled:
        graphs.clear()


_install_hooks()
