"""Diagnostics: where does quantization error come from?

``compare(model_fp, model_q, forward_loop)`` runs the same batches through the FP model and the
quantized one and reports, for every enabled quantizer:

* ``sqnr_db``: the signal-to-quantization-noise ratio of the quantizer itself,
  ``10 log10(sum x^2 / sum (q(x) - x)^2)`` over all batches (its input against its output);
* ``layer_error``: the relative L2 error ``||y_q - y_fp|| / ||y_fp||`` of the output of the op
  the quantizer feeds (its own output for output quantizers), quantized model against FP model,
  which includes the error carried in from earlier layers; ``layer_sqnr_db`` is the same in dB.

The quantized model runs traced graphs, where module hooks never fire: its graphs are run
through a :class:`torch.fx.Interpreter` that records the quantizer nodes and the op nodes they
feed (``node.meta["qpass_reads"]``). The FP values come from forward hooks on the FP model's
module that owns the quantizer when that module is a leaf whose output is the op's output
(Linear, Conv, LayerNorm, ...); for ops inside a larger module (attention matmuls) they come
from the same graph run with every quantizer passed through (pre_quant_scale still applied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from qpass.errors import QpassError
from qpass.nn.tensor_quantizer import SequentialQuantizer, TensorQuantizer, is_quantizer
from qpass.passes.insert_quantizers import QUANTIZER_META, READS_META, SLOT_META

__all__ = ["compare", "QuantizerError", "format_compare", "plot_compare"]


@dataclass
class QuantizerError:
    name: str
    slot: str
    format: str
    sqnr_db: float
    layer_error: float
    layer_sqnr_db: float
    reference: str  # "fp_model" (hook on the FP module) or "graph" (quantizers passed through)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0
    ref: float = 0.0
    diff: float = 0.0
    source: set = field(default_factory=set)


def _sq(t: torch.Tensor) -> float:
    t = t.detach().reshape(-1)
    t = t if t.dtype == torch.float32 else t.float()
    return float(torch.dot(t, t))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _GraphRecorder(fx.Interpreter):
    """Runs a qpass graph, recording quantizer inputs/outputs and the values of watched nodes.

    ``passthrough=True`` runs every quantizer as identity (pre_quant_scale still applied).
    """

    def __init__(self, gm: fx.GraphModule, passthrough: bool = False) -> None:
        super().__init__(gm)
        self.passthrough = passthrough
        self.quantizers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # node name -> (in, out)
        self.values: dict[str, torch.Tensor] = {}  # node name -> value, for watched nodes
        self.watch: set[str] = set()
        for n in gm.graph.nodes:
            if QUANTIZER_META in n.meta:
                self.watch.add(_layer_node(n).name)

    def call_module(self, target, args, kwargs):
        if self.passthrough:
            module = self.fetch_attr(target)
            if is_quantizer(module):
                x = args[0]
                first = module[0] if isinstance(module, SequentialQuantizer) else module
                pqs = getattr(first, "pre_quant_scale", None)
                return x * pqs.to(x.dtype) if pqs is not None and first.is_enabled else x
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if not self.passthrough and QUANTIZER_META in n.meta and isinstance(out, torch.Tensor):
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            if isinstance(x, torch.Tensor):
                self.quantizers[n.name] = (x.detach(), out.detach())
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _layer_node(qnode: fx.Node) -> fx.Node:
    """The node whose output is 'the layer output' of a quantizer node."""
    if qnode.meta.get(SLOT_META) == "output_quantizer":
        return qnode
    return qnode.meta[READS_META]


def _record_batches(model_fp: nn.Module, forward_loop: Callable) -> list[tuple[tuple, dict]]:
    batches: list[tuple[tuple, dict]] = []

    def pre(module, args, kwargs):
        batches.append((tuple(args), dict(kwargs)))

    h = model_fp.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(model_fp)
    finally:
        h.remove()
    if not batches:
        raise QpassError("compare: forward_loop never called the model")
    return batches


def _fp_leaf_hooks(model_fp: nn.Module, owners: set[str], store: dict):
    handles = []
    for path in owners:
        try:
            module = model_fp.get_submodule(path)
        except AttributeError:
            continue
        if any(not is_quantizer(c) for c in module.children()):
            continue  # the op is not the module's whole forward

        def hook(mod, args, out, path=path):
            if isinstance(out, torch.Tensor):
                store.setdefault(path, []).append(out.detach())

        handles.append(module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def compare(model_fp: nn.Module, model_q: nn.Module, forward_loop: Callable, png: str | None = None,
            top: int = 40) -> list[QuantizerError]:
    """Per-quantizer SQNR and layer-output error of ``model_q`` against ``model_fp``, worst first.

    ``forward_loop(model)`` feeds the batches: it runs once on ``model_fp`` (its calls are
    recorded) and the recorded batches are replayed through ``model_q``'s graphs. Worst first
    means lowest quantizer SQNR first. ``png``: also draw the ``top`` worst as a bar chart.
    """
    from qpass.export.onnx import select_graph
    from qpass.graph.quantized_model import is_quantized

    if not is_quantized(model_q):
        raise QpassError("compare: model_q is not quantized by qpass (pass the quantized model second)")
    if is_quantized(model_fp):
        raise QpassError("compare: model_fp is quantized; pass the unquantized FP model first")
    quantizers = {n: m for n, m in model_q.named_modules() if is_quantizer(m)}
    batches = _record_batches(model_fp, forward_loop)
    acc: dict[str, _Acc] = {}
    for args, kwargs in batches:
        try:
            traced, tensors, _ = select_graph(model_q, (args, kwargs))
        except QpassError as e:
            raise QpassError(f"compare: cannot run the quantized model on a recorded batch: {e}") from None
        gm = traced.gm
        qnodes = [n for n in gm.graph.nodes if QUANTIZER_META in n.meta]
        live = [n for n in qnodes if _enabled(quantizers.get(n.meta[QUANTIZER_META]))]
        if not live:
            continue
        owners = {n.meta[QUANTIZER_META].rpartition(".")[0] for n in live}
        fp_out: dict[str, list] = {}
        handles = _fp_leaf_hooks(model_fp, owners, fp_out)
        try:
            model_fp(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        rec = _GraphRecorder(gm)
        rec.run(*tensors)
        ref_graph = None
        for n in live:
            name = n.meta[QUANTIZER_META]
            a = acc.setdefault(name, _Acc())
            x, y = rec.quantizers.get(n.name, (None, None))
            if x is not None:
                a.signal += _sq(x.float())
                a.noise += _sq(y.float() - x.float())
            layer = _layer_node(n)
            got = rec.values.get(layer.name)
            if got is None:
                continue
            owner = name.rpartition(".")[0]
            calls = fp_out.get(owner, [])
            ref = calls[0] if len(calls) == 1 else None  # a module called twice: use the graph
            if ref is not None and ref.shape == got.shape:
                a.source.add("fp_model")
            else:
                if ref_graph is None:
                    ref_graph = _GraphRecorder(gm, passthrough=True)
                    ref_graph.run(*tensors)
                ref = ref_graph.values.get(layer.name)
                if ref is None or ref.shape != got.shape:
                    continue
                a.source.add("graph")
            a.ref += _sq(ref.float())
            a.diff += _sq(got.float() - ref.float())
    results = []
    for name, a in acc.items():
        q = quantizers[name]
        rel = math.sqrt(a.diff / a.ref) if a.ref > 0 else (0.0 if a.diff == 0 else math.inf)
        results.append(QuantizerError(
            name=name, slot=name.rpartition(".")[2], format=q.describe(), sqnr_db=_db(a.signal, a.noise),
            layer_error=rel, layer_sqnr_db=_db(a.ref, a.diff), reference="+".join(sorted(a.source)) or "-",
        ))
    results.sort(key=lambda r: (r.sqnr_db, -r.layer_error))
    if png is not None:
        plot_compare(results, png, top=top)
    return results


def _enabled(q) -> bool:
    if q is None:
        return False
    if isinstance(q, SequentialQuantizer):
        return any(m.is_enabled for m in q)
    return isinstance(q, TensorQuantizer) and q.is_enabled


def format_compare(results: list[QuantizerError], limit: int | None = 20) -> str:
    shown = results if limit is None else results[:limit]
    if not shown:
        return "no enabled quantizer saw data"
    w = max(len(r.name) for r in shown)
    lines = [f"{'quantizer':<{w}}  {'SQNR dB':>8}  {'layer err':>9}  {'layer dB':>8}  format"]
    for r in shown:
        lines.append(f"{r.name:<{w}}  {r.sqnr_db:>8.2f}  {r.layer_error:>9.4f}  {r.layer_sqnr_db:>8.2f}  {r.format}")
    if limit is not None and len(results) > limit:
        lines.append(f"... {len(results) - limit} more (best last)")
    return "\n".join(lines)


def plot_compare(results: list[QuantizerError], path: str, top: int = 40) -> str | None:
    """A horizontal bar chart of the ``top`` worst quantizers' SQNR and layer SQNR; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("qpass.debug: matplotlib is not installed; skipping the PNG chart (pip install matplotlib)")
        return None
    shown = results[:top]
    cap = lambda v: 100.0 if math.isinf(v) and v > 0 else (-20.0 if math.isinf(v) else v)  # noqa: E731
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(shown) + 1.5))
    ys = range(len(shown))
    ax.barh([y - 0.2 for y in ys], [cap(r.sqnr_db) for r in shown], height=0.4, label="quantizer SQNR (dB)")
    ax.barh([y + 0.2 for y in ys], [cap(r.layer_sqnr_db) for r in shown], height=0.4, label="layer output SQNR (dB)")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r.name for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("dB (higher is better)")
    ax.set_title(f"qpass.debug.compare: {len(shown)} worst of {len(results)} quantizers")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
