"""``qpass.export_onnx``: a quantized model as an ONNX graph with QuantizeLinear/DequantizeLinear.

Path: the traced graph of the model is lowered (:mod:`qpass.passes.lower`) to pure
``qpass::`` quantize/dequantize ops with folded low-precision weights, and that graph goes
through ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` with the
translations of :mod:`qpass.export.onnx_ops`. The exported ONNX IR is then finished here:

* a linear layer's ``DequantizeLinear(W) -> Transpose -> MatMul`` stores ``W.T`` instead
  (int8/FP8 weights, per channel on axis 1, as ONNX Runtime's quantize_static and TensorRT have
  it);
* packed 4-bit integer weights become INT4/UINT4 initializers (torch has no int4 dtype;
  the translations mark the DequantizeLinear nodes that read them);
* initializers nobody reads (the exact-arithmetic ``ref``/``amax`` inputs of the lowering
  ops that ONNX does not need) are dropped;
* the model is checked with ``onnx.checker.check_model(full_check=True)``, written to a
  temporary file in the target directory and renamed over ``path`` only when complete.

Formats and the opset they need (the exported opset is the largest needed, at least 20 -
torch's default, where GELU is one ``Gelu`` op that ONNX Runtime fuses with its bias and
TensorRT imports; at 18 it is an Erf decomposition ORT leaves unfused, about 10% slower):

* INT8 (per-tensor activations, per-channel or per-tensor weights): opset 13 Q/DQ;
* FP8 E4M3/E5M2: opset 19 Q/DQ with a float8 zero point, FP8 weight initializers;
* INT4 static blocks (weights): opset 21 DequantizeLinear with ``block_size``, INT4 initializers;
* NVFP4: opset 23, weights as FLOAT4E2M1 initializers behind two DequantizeLinear (FP8 block
  scales, then FP4 values), activations as a standard-op decomposition (see ``onnx_ops``).

``target="tensorrt"`` (default) keeps int8 activations with zero point 0, TensorRT's only
form; ``target="onnxruntime"`` writes int8 activations as uint8 with zero point 128 (the same
numbers) so ONNX Runtime's CPU uses its u8s8 kernels. Weights are int8 either way.

Numerics: ONNX's QuantizeLinear divides by the scale where ModelOpt (and the fake-quant
graph) multiplies by ``max_bound / amax``, so an element exactly on a rounding boundary can
land one code away (a few in millions; :func:`qpass.export.compare.compare_quantizers` counts
them per node). The float ops between quantizers (MatMul accumulation, softmax, erf,
LayerNorm) differ from PyTorch's by about 1e-7 relative; in a deep model with many activation
quantizers each such difference that straddles a rounding boundary flips a code, which
perturbs the next quantizer's input, so the final outputs can drift further than float
rounding (MiniLM INT8: cosine about 0.99) - as far as the fake-quant model drifts from itself
under the same size of perturbation. Weight-only formats agree to float rounding.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import torch
from torch.utils import _pytree as pytree

from qpass.errors import ExportError, QpassError
from qpass.graph.trace import fixed_dims

__all__ = ["export_onnx", "lowered_for_export"]

_TARGETS = ("tensorrt", "onnxruntime")


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise ExportError(
        f"example_inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs or "
        f"(args, kwargs); got {type(example_inputs).__name__}")


def select_graph(model, example_inputs=None):
    """(TracedGraph, flat example tensors, input names or None) of the graph to export."""
    from qpass.graph.quantized_model import (
        INPUT_NAMES_META, _input_key, _takes_use_cache, input_names, matches_static_dims, state_of,
    )

    try:
        state = state_of(model)
    except QpassError as e:
        raise ExportError(str(e)) from None
    if example_inputs is None:
        ordered = [(key, g) for key, gs in state.graphs.items() if not key[0] for g in gs]  # eval graphs first
        ordered += [(key, g) for key, gs in state.graphs.items() if key[0] for g in gs]
        for key, g in ordered:
            ex = g.gm.meta.get("qpass_example_inputs")
            if ex is None:
                ex = _inputs_from_meta(g.gm)
            if ex is not None:
                names = g.gm.meta.get(INPUT_NAMES_META)  # recorded when it was traced
                return g, list(ex), names if names is not None and len(names) == len(ex) else None
        if state.__dict__.get("fallback") is not None:
            raise ExportError(f"{type(model).__name__} runs through the torch.compile fallback (torch.export could "
                              "not trace it whole), and ONNX export needs one whole graph")
        raise ExportError(
            f"{type(model).__name__} has no traced graph yet (no forward pass since quantize or restore: "
            "a weight-only config, one that needs no calibration, or a restored checkpoint not run "
            "yet): pass example_inputs to export_onnx, or run the model once")
    args, kwargs = _split_inputs(example_inputs)
    names = input_names(args, kwargs)
    if "use_cache" not in kwargs and _takes_use_cache(type(model)):
        kwargs["use_cache"] = False  # as the quantized model's forward does
    key, tensors = _input_key(model.training, args, kwargs)
    for _ in range(2):
        for g in state.graphs.get(key, ()):
            if matches_static_dims(g, tensors):
                return g, tensors, names
        if key in state.__dict__.get("fallback_keys", ()):
            break
        with torch.no_grad():  # trace this input structure (the quantized model's own dispatch)
            model(*args, **kwargs)
    if key in state.__dict__.get("fallback_keys", ()):
        raise ExportError(
            f"{state.fallback.describe(shown=3)}; ONNX export needs one whole graph: make the forward traceable by "
            "torch.export (no data-dependent Python control flow)")
    raise ExportError("could not find or trace a graph for example_inputs")  # pragma: no cover


def _inputs_from_meta(gm):
    """Zero tensors shaped like the traced inputs (their traced sizes), or None if unknown.
    Values do not matter for re-tracing a graph that is already straight-line code."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        shape = []
        for d in val.shape:
            try:
                shape.append(int(d) if isinstance(d, int) else int(d.node.hint))
            except (AttributeError, TypeError):
                return None
        out.append(torch.zeros(shape, dtype=val.dtype))
    return out


def lowered_for_export(model, example_inputs=None):
    """(lowered GraphModule, flat example tensors, traced graph, input names)."""
    from qpass.passes.lower import lower_graph

    traced, tensors, names = select_graph(model, example_inputs)
    return lower_graph(traced.gm).eval(), tensors, traced, names


def _check_lowered(lowered, target: str) -> int:
    """Refuse what has no ONNX form (naming node and format); return the opset needed."""
    from qpass.export.onnx_ops import MIN_OPSET
    from qpass.passes.lower import LOWERED_META, OPS

    opset = 20
    for node in lowered.graph.nodes:
        meta = node.meta.get(LOWERED_META)
        if meta is None:
            continue
        where = f"node '{meta['node']}' (quantizer '{meta['quantizer']}', format {meta['format']})"
        if node.target is OPS["fake_quant"]:
            a = json.loads(node.args[2])
            bs = a.get("block_sizes") or {}
            nvfp4 = a.get("num_bits") == [2, 1] and bs.get("type") == "dynamic" and bs.get("scale_bits") == [4, 3]
            if not nvfp4 or not node.args[3]:
                raise ExportError(
                    f"{where} has no ONNX form in qpass: ONNX export supports per-tensor int8/fp8 "
                    "activations, per-tensor/per-channel int8/fp8 weights, int4 block weights and NVFP4")
            val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            size = int(next(v for k, v in bs.items() if k not in ("type", "scale_bits")))
            last = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None
            try:
                last = int(last)  # a SymInt: its traced size (the reshape needs whole blocks)
            except (TypeError, ValueError, RuntimeError):
                last = None
            if last is None or last % size:
                raise ExportError(f"{where}: dynamic NVFP4 export needs a static last axis that is a "
                                  f"multiple of {size}, got {last}")
            opset = max(opset, 23)
        elif node.target is OPS["dequantize_nvfp4"]:
            shape = node.args[4]
            if shape[-1] % 2:
                raise ExportError(f"{where}: FP4 weights need an even last axis, got shape {shape}")
            opset = max(opset, 23)
        elif node.target in (OPS["quantize_per_tensor"], OPS["dequantize_per_tensor"],
                             OPS["dequantize_per_channel"], OPS["dequantize_blockwise"]):
            fmt = node.args[3]
            need = MIN_OPSET[fmt]
            if node.target is OPS["dequantize_blockwise"]:
                need = max(need, 21)
            if fmt.endswith("n") and node.target is OPS["quantize_per_tensor"]:
                raise ExportError(f"{where}: narrow-range activations have no ONNX QuantizeLinear form "
                                  "(it saturates to the full range)")
            opset = max(opset, need)
    return opset


def _dynamic_shapes(traced, tensors, dynamic: bool):
    if not dynamic:
        return None
    specs = []
    it = iter(traced.static_dims)
    for t in tensors:
        static = fixed_dims(next(it, None))
        dims = {d: torch.export.Dim.AUTO for d in range(t.dim()) if d not in static}
        specs.append(dims or None)
    return tuple(specs)


def export_onnx(model, path, example_inputs=None, dynamic: bool = True, target: str = "tensorrt") -> str:
    """Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear; returns ``path``.

    ``example_inputs``: a tensor, a tuple of positional inputs, a dict of keyword inputs or
    ``(args, kwargs)``; by default the inputs the model was first traced with (in eval mode).
    ``dynamic``: keep the traced graph's dynamic (batch, sequence) dims dynamic.
    ``target``: ``"tensorrt"`` or ``"onnxruntime"`` (uint8 activations with zero point 128).
    Raises :class:`~qpass.errors.ExportError` naming the node and the format that has no ONNX
    form; never leaves a partial file at ``path``.
    """
    if target not in _TARGETS:
        raise ExportError(f"target must be one of {_TARGETS}, got {target!r}")
    path = os.fspath(path)
    lowered, tensors, traced, names = lowered_for_export(model, example_inputs)
    opset = _check_lowered(lowered, target)
    proto = _to_onnx(lowered, tensors, traced, names, opset, target, dynamic)
    _write_atomically(proto, path)
    return path


def _to_onnx(lowered, tensors, traced, names, opset: int, target: str, dynamic: bool):
    import onnx_ir as ir

    from qpass.export.onnx_ops import make_table
    from qpass.passes.onnx_legalize import legalize_for_onnx

    table = make_table(opset, target)
    kwargs: dict[str, Any] = dict(dynamo=True, custom_translation_table=table, opset_version=opset,
                                  dynamic_shapes=_dynamic_shapes(traced, tensors, dynamic), optimize=True,
                                  verbose=False, report=False)
    if names:
        kwargs["input_names"] = names
    out_names = _output_names(lowered)
    if out_names:
        kwargs["output_names"] = out_names
    legalize_for_onnx(lowered)
    try:
        program = _torch_onnx_export(lowered, tuple(tensors), table, kwargs)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.onnx failures become one clear error
        raise ExportError(_export_failure(lowered, e)) from e
    model = program.model
    _fold_weight_transposes(model)
    if target == "onnxruntime":
        _fold_affine_zero_points(model)
    _finish_int4(model)
    _drop_unused_initializers(model)
    _strip_nondeterminism(model)
    return ir.serde.serialize_model(model)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_failure(lowered, error: BaseException) -> str:
    """One line for a torch.onnx failure: its innermost cause (torch's own message is generic),
    the node it names with the module that node belongs to, and the model's source line."""
    from qpass.passes.insert_quantizers import owner_path

    inner, seen = error, 0
    while seen < 10 and (inner.__cause__ or inner.__context__) is not None:
        inner, seen = inner.__cause__ or inner.__context__, seen + 1
    text = _ANSI.sub("", str(inner)).strip()
    first = text.splitlines()[0] if text else ""
    where = ""
    found = re.search(r"While executing %(\w+)[^\n]*?target=([\w.]+)\]\(args = \(%?(\w*)", text)
    if found:
        # torch.onnx re-exports the lowered graph; its node names mostly survive, so a node of this
        # name, op and first input in the lowered graph is that node, and its module is known
        name, target, arg = found.group(1), found.group(2).removeprefix("torch.ops."), found.group(3)
        node = next((n for n in lowered.graph.nodes if n.name == name and str(n.target) == target
                     and (not arg or (n.args and getattr(n.args[0], "name", None) == arg))), None)
        where = f" at node '{name}' ({target}" + (f", in module '{owner_path(node) or '<root>'}')" if node is not None
                                                 else ", in torch.onnx's decomposition of the graph)")
    source = _innermost_frame(text)
    return (f"torch.onnx.export failed on the lowered graph{where}: {type(inner).__name__}: {first}"
            f"{f' (source: {source})' if source else ''}; no file was written")


def _innermost_frame(text: str) -> str:
    """``file, line N: code`` of the last frame of the "Original traceback" torch.onnx quotes."""
    if "Original traceback:" not in text:
        return ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text.split("Original traceback:", 1)[1])
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f"{os.path.basename(path)}, line {line}: {code.strip()}"


def _output_names(lowered) -> list[str] | None:
    """Output names from the model's output structure (``last_hidden_state``, ``logits``, ...)."""
    try:
        spec = lowered.graph._codegen.pytree_info.out_spec
        dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        leaves, _ = pytree.tree_flatten_with_path(dummy)
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None
    names = []
    for path, _ in leaves:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", "")))) for k in path]
        names.append("_".join(parts) or "output")
    if len(set(names)) != len(names):
        return None
    return [n if not n[0].isdigit() else f"output_{n}" for n in names]


_BASE_REGISTRIES: dict[int, Any] = {}


def _torch_onnx_export(lowered, args: tuple, table: dict, kwargs: dict):
    """``torch.onnx.export(dynamo=True)``, reusing torch's ONNX op registry across calls.

    Building the registry from torchlib costs seconds per export; when torch's exporter
    internals are where this version of torch has them, a cached copy per opset is used
    (with the same custom translations registered on top), else the public call.
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:  # pragma: no cover - other torch layouts
        return torch.onnx.export(lowered, args, **kwargs)
    opset = kwargs["opset_version"]
    base = _BASE_REGISTRIES.get(opset)
    if base is None:
        base = _BASE_REGISTRIES[opset] = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    registry = _registration.ONNXRegistry()
    registry._opset_version = base._opset_version
    registry.functions = {k: list(v) for k, v in base.functions.items()}
    for torch_op, onnx_op in table.items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    _check_custom_ops(lowered, registry)
    return _core.export(lowered, args, None, registry=registry, dynamic_shapes=kwargs["dynamic_shapes"],
                        input_names=kwargs.get("input_names"), output_names=kwargs.get("output_names"), report=False, verify=False,
                        verbose=False, optimize=kwargs["optimize"], opset_version=opset)


def _check_custom_ops(lowered, registry) -> None:
    """Name the node, op and module of a custom op (another library's ``torch.library`` op, e.g.
    ``transformers::grouped_mm_fallback`` of fused MoE experts) that no ONNX translation covers:
    torch.onnx would fail on it at its last step with no pointer to the model."""
    for node in lowered.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        if op.namespace in ("aten", "prims", "qpass") or registry.is_registered(op):
            continue
        if op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            continue  # torch.onnx decomposes it into ops it knows
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        owner = f"module '{owner}'" if owner else "the model's own forward"
        hint = (" (the grouped matmul of fused mixture-of-experts layers; load the model with "
                "experts_implementation='batched_mm', whose per-token gather and bmm export)"
                if "grouped_mm" in op._opname
                else "; register one with torch.onnx, or keep that module out of the exported model")
        raise ExportError(f"node '{node.name}' in {owner} calls {op.namespace}::{op._opname}, which has no "
                          f"ONNX translation{hint}")


def _fold_weight_transposes(model) -> None:
    """``DequantizeLinear(W [N, K], axis 0) -> Transpose -> MatMul`` (a linear layer as torch.onnx
    writes it) becomes ``DequantizeLinear(W.T [K, N], axis 1) -> MatMul``: the weight stored as
    the MatMul reads it, per output channel on axis 1, which is the form ONNX Runtime's
    quantize_static writes and the one TensorRT wants, with no Transpose left to run or to fold.

    Only 2-D int8/FP8 weights with a per-tensor or per-channel scale whose initializer, dequantized
    value and Transpose have no other reader; block-scaled weights (INT4, NVFP4) keep their form.
    """
    import numpy as np
    import onnx_ir as ir

    from qpass.export.onnx_ops import INT4_META

    graph = model.graph
    for tr in list(graph):
        if tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
            continue
        perm = tr.attributes.get("perm")
        dq = tr.inputs[0].producer() if tr.inputs[0] is not None else None
        if perm is None or list(perm.value) != [1, 0] or dq is None or dq.op_type != "DequantizeLinear":
            continue
        codes, scale = dq.inputs[0], dq.inputs[1]
        if (codes is None or codes.const_value is None or len(codes.uses()) != 1 or len(dq.outputs[0].uses()) != 1
                or INT4_META in dq.metadata_props or "block_size" in dq.attributes
                or scale is None or scale.const_value is None or len(codes.const_value.shape) != 2):
            continue
        per_channel = len(scale.const_value.shape) == 1 and scale.const_value.shape[0] > 1
        axis = dq.attributes.get("axis")  # absent means 1 (ONNX's default): not the output channels
        if per_channel and (axis is None or axis.value not in (0, -2)):
            continue
        arr = np.ascontiguousarray(np.asarray(codes.const_value.numpy()).T)
        codes.const_value = ir.Tensor(arr, name=codes.name)
        codes.shape = ir.Shape(arr.shape)
        if per_channel:
            dq.attributes["axis"] = ir.AttrInt64("axis", 1)
        out = dq.outputs[0]
        out.shape = tr.outputs[0].shape
        ir.convenience.replace_all_uses_with(tr.outputs[0], out)
        for i, o in enumerate(graph.outputs):
            if o is tr.outputs[0]:
                graph.outputs[i] = out
        graph.remove(tr, safe=True)


def _fold_affine_zero_points(model) -> None:
    """``Sub(x, b) -> QuantizeLinear(s, zp) -> DequantizeLinear(s, zp) -> Add(., b)`` (an affine
    quantizer, :func:`qpass.passes.lower._lower_affine`) becomes ``QuantizeLinear(x, s, zp - k) ->
    DequantizeLinear(s, zp - k)`` where the scalar bias ``b`` is a whole number ``k`` of steps
    (a ``zero_point`` bias) and ``zp - k`` fits the code type: ONNX Runtime's asymmetric uint8
    activations, the form ``quantize_static`` writes, which its QDQ fusions take into the integer
    kernels. The codes are the same (up to rounding ties: ``round(x/s) - k`` against
    ``round((x - b)/s)``). Other affine quantizers keep their Sub and Add (``target="tensorrt"``
    keeps them all: TensorRT takes zero point 0 only)."""
    import numpy as np
    import onnx_ir as ir

    from qpass.calib.bias import shifted_zero_point

    graph = model.graph
    for sub in list(graph):
        if sub.op_type != "Sub" or sub.domain not in ("", "ai.onnx") or sub.inputs[1] is None:
            continue
        bias = sub.inputs[1].const_value
        uses = list(sub.outputs[0].uses())
        if bias is None or bias.size != 1 or len(uses) != 1 or uses[0][0].op_type != "QuantizeLinear":
            continue
        q = uses[0][0]
        dqs = [u for u, _ in q.outputs[0].uses()]
        if len(q.inputs) < 3 or q.inputs[1].const_value is None or q.inputs[2] is None or q.inputs[2].const_value is None:
            continue
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or dqs[0].inputs[1] is not q.inputs[1]:
            continue
        dq = dqs[0]
        adds = [u for u, _ in dq.outputs[0].uses()]
        if not adds or any(a.op_type != "Add" or a.inputs[1] is not sub.inputs[1] for a in adds):
            continue
        b = float(np.asarray(bias.numpy()).reshape(-1)[0])
        step = float(np.asarray(q.inputs[1].const_value.numpy()).reshape(-1)[0])
        zp = np.asarray(q.inputs[2].const_value.numpy())
        if zp.size != 1 or zp.dtype.kind not in "iu":
            continue
        info = np.iinfo(zp.dtype)
        new = shifted_zero_point(b, step, int(zp.reshape(-1)[0]), int(info.min), int(info.max))
        if new is None:
            continue
        zp_value = ir.Value(name=f"{q.name}_zero_point", shape=ir.Shape(list(zp.shape)),
                            type=ir.TensorType(q.inputs[2].dtype),
                            const_value=ir.Tensor(np.full(zp.shape, new, dtype=zp.dtype), name=f"{q.name}_zero_point"))
        graph.register_initializer(zp_value)
        q.replace_input_with(0, sub.inputs[0])
        q.replace_input_with(2, zp_value)
        dq.replace_input_with(2, zp_value)
        for add in adds:
            ir.convenience.replace_all_uses_with(add.outputs[0], dq.outputs[0])
            for i, o in enumerate(graph.outputs):
                if o is add.outputs[0]:
                    graph.outputs[i] = dq.outputs[0]
            graph.remove(add, safe=True)
        graph.remove(sub, safe=True)


def _finish_int4(model) -> None:
    """Retype the packed uint8 4-bit codes read by marked DequantizeLinear nodes as INT4/UINT4."""
    import numpy as np
    import onnx_ir as ir

    from qpass.export.onnx_ops import INT4_META
    from qpass.formats import pack_nibbles, unpack_nibbles

    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        info = node.metadata_props.pop(INT4_META, None)
        if info is None:
            continue
        info = json.loads(info)
        value = node.inputs[0]
        if value is None or value.const_value is None:
            raise ExportError(f"ONNX node '{node.name}': int4 codes are not an initializer")
        shape = info["shape"]
        signed = info["fmt"] != "uint4"
        packed = torch.from_numpy(np.asarray(value.const_value.numpy()).copy())
        codes = unpack_nibbles(packed, shape[-1], signed).reshape(shape)
        flat = pack_nibbles(codes.reshape(-1)).numpy()  # ONNX packs the flattened tensor
        dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
        value.const_value = ir.PackedTensor(flat, dtype, shape=ir.Shape(shape), name=value.name)
        value.dtype = dtype
        value.shape = ir.Shape(shape)


def _drop_unused_initializers(model) -> None:
    graph = model.graph
    for name in list(graph.initializers):
        v = graph.initializers[name]
        if not v.uses() and v not in graph.outputs:
            del graph.initializers[name]


def _strip_nondeterminism(model) -> None:
    """Metadata with stack traces and object addresses would make the bytes differ run to run."""
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch.onnx.")]:
            if key in ("pkg.torch.onnx.stack_trace",):
                del node.metadata_props[key]


def _write_atomically(proto, path: str) -> None:
    import onnx

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qpass-", suffix=".onnx.tmp", dir=directory)
    os.close(fd)
    try:
        large = proto.ByteSize() > 1_900_000_000 if hasattr(proto, "ByteSize") else False
        if large:
            raise ExportError("models above 2 GB (external data) are not supported by qpass.export_onnx yet")
        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported model fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
