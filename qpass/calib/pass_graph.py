"""The graph a calibration pass runs: the traced graph, or a pass-only copy of it.

Two options make a calibration pass run a copy of each traced graph instead of the graph
itself. Both copies exist only while the pass runs; the model's own graphs, and every forward
outside the pass, are untouched.

* ``moe_calib_experts_ratio`` (:mod:`qpass.calib.moe_ratio`): MoE blocks also see their input
  routed to more experts, for statistics only.
* **Statistics kernels** (:func:`statistics_kernels`): the search algorithms' capture passes
  (SmoothQuant, AWQ) run their linear layers through oneDNN on the CPU, where it is available
  (:func:`cpu_linear`). A capture pass reads the unquantized float32 model's activations, and
  on a CPU that pass is almost all GEMM time (84% on SmolLM2 at 4x256 tokens): oneDNN's
  ``linear`` ran it 6-7% faster than the MKL GEMM behind ``aten.linear`` (eager SmolLM2 body,
  4 batches of 4x256 tokens, one thread: 10.0 s against 10.7 s). The two differ in the order of
  their float32 sums only (max abs difference 1.5e-5 on SmolLM2's activations of magnitude
  ~10). The searches pick scales from these statistics, and no criterion asks them to equal
  ModelOpt's to the bit.

  Max calibration keeps ``aten.linear``: its amax must equal ModelOpt's exactly, and on a
  model as sensitive as INT8 MiniLM an amax off in the 7th digit moves enough codes to change
  the quantized outputs visibly. Layer-by-layer calibration records the same copy, so its
  statistics still equal the whole-model pass's bit for bit. ``QPASS_FAST_LINEAR=0`` turns the
  kernels off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule

__all__ = ["calibration_graph", "cpu_linear", "drop_variants", "statistics_kernels"]

_LINEAR = torch.ops.aten.linear.default


@dataclass
class _Variant:
    version: object  # graph_version of the graph it copies
    key: tuple  # (moe ratio, statistics kernels)
    model: weakref.ref
    gm: fx.GraphModule
    tokens: list = field(default_factory=list)  # the MoE side passes' keys (qpass.calib.moe_ratio)


_VARIANTS: "weakref.WeakKeyDictionary[fx.GraphModule, _Variant]" = weakref.WeakKeyDictionary()


def calibration_graph(model: nn.Module, state, gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or the copy of it that the running calibration pass runs (see the module doc)."""
    from qpass.graph.trace import graph_version, same_version

    if not state.calibrating:
        return gm
    ratio = state.__dict__.get("moe_ratio")
    fast = bool(state.__dict__.get("statistics_kernels"))
    if ratio is None and not fast:
        return gm
    key = (ratio, fast)
    version = graph_version(gm)
    entry = _VARIANTS.get(gm)
    if entry is not None and entry.key == key and same_version(entry.version, version):
        return entry.gm
    entry = _Variant(version, key, weakref.ref(model), gm)
    if ratio is not None:
        from qpass.calib.moe_ratio import moe_blocks, with_side_passes

        entry.gm = with_side_passes(model, state, gm, moe_blocks(model, ratio), entry.tokens)
    if fast:
        entry.gm = with_cpu_linears(entry.gm)
    _VARIANTS[gm] = entry
    return entry.gm


def drop_variants(model: nn.Module) -> None:
    """Forget the pass copies of ``model``'s graphs (when the pass that asked for them ends)."""
    for gm in list(_VARIANTS):
        entry = _VARIANTS.get(gm)
        if entry is not None and entry.model() is model:
            del _VARIANTS[gm]
            if entry.tokens:
                from qpass.calib.moe_ratio import release_side_passes

                release_side_passes(entry.tokens)


# ---------------------------------------------------------------------- statistics kernels
@functools.lru_cache(maxsize=None)
def _onednn_linear():
    """oneDNN's linear op, if this build has it and it runs; else None."""
    if os.environ.get("QPASS_FAST_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default", None)
    if op is None:
        return None
    try:
        x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
        if not torch.allclose(op(x, w, b, "none", [], ""), _LINEAR(x, w, b), atol=1e-5):
            return None
    except Exception:  # noqa: BLE001 - a build without the kernel: aten.linear it is
        return None
    return op


def available() -> bool:
    return _onednn_linear() is not None


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``aten.linear``, through oneDNN for plain float32 CPU tensors outside autograd."""
    op = _onednn_linear()
    if (op is not None and type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))):
        return op(x, weight, bias, "none", [], "")
    return _LINEAR(x, weight, bias)


cpu_linear.qpass_op = "linear"  # what qpass.graph.lazy_outputs counts as a GEMM


def with_cpu_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose ``aten.linear`` calls run :func:`cpu_linear` (``gm`` itself if it has none)."""
    if not any(n.op == "call_function" and n.target is _LINEAR for n in gm.graph.nodes):
        return gm
    graph = copied_graph(gm)
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _LINEAR:
            n.target = cpu_linear
    return variant_over(gm, graph)


def copied_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph, with its input/output handling, for a pass copy to edit."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    return graph


def variant_over(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running the edited copy ``graph`` over ``gm``'s modules and parameters; its code
    is generated only if something calls it directly (a pass runs its execution graph)."""
    variant = _LazyGraphModule(gm, graph)
    variant.meta.update(gm.meta)
    return variant


@contextlib.contextmanager
def statistics_kernels(model: nn.Module, state):
    """While a capture pass runs: its linears run through :func:`cpu_linear` (where available, and
    for a model whose weights are on the CPU: a GPU model would only pay for the graph copies)."""
    weight = next(model.parameters(), None)
    on_cpu = weight is not None and weight.device.type == "cpu"
    if not on_cpu or not available() or state.__dict__.get("statistics_kernels"):
        yield
        return
    state.statistics_kernels = True
    try:
        yield
    finally:
        state.statistics_kernels = False
        drop_variants(model)
