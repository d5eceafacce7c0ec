"""Kernel rewrites of the lowered graph for the "qpass" torch.compile backend.

Inputs are graphs made by :func:`qpass.passes.lower.lower_graph`: ``qpass::`` quantize /
dequantize ops whose scales and folded weight codes are ``get_attr`` constants. The rewrites
read those constants (never recompute them from amax):

* :func:`rewrite_cpu_int8` - int8 ops become the PT2E ``quantized_decomposed`` Q/DQ pattern
  that inductor's x86 freezing passes fuse into oneDNN int8 linear/conv (compiled under
  :func:`no_inplace_qlinear_sum`, which keeps inductor from summing into a graph input);
* :func:`rewrite_cuda` - FP8 and INT8 linear layers become calls of :func:`fp8_linear`
  (``torch._scaled_mm``) and :func:`int8_linear` (``torch._int_mm``), which inductor traces
  into; int4 block weights are unpacked and dequantized in the graph (inductor fuses it with
  the matmul).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import fx

import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops

from qpass.calib.bias import shifted_zero_point
from qpass.export.compile_fuse import replace_with_slices
from qpass.passes.lower import OPS, _fetch, _install

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

_INT8 = ("int8", "int8n")
_LINEAR = (aten.linear.default, torch.nn.functional.linear)


def _const(gm: fx.GraphModule, node) -> torch.Tensor:
    assert isinstance(node, fx.Node) and node.op == "get_attr", node
    return _fetch(gm, node.target)


def _new_const(gm: fx.GraphModule, base: str, value: torch.Tensor) -> fx.Node:
    target, n = base, 1
    while _has(gm, target):
        n += 1
        target = f"{base}{n}"
    _install(gm, target, value)
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first) if first.op != "placeholder" else gm.graph.inserting_after(
            [p for p in gm.graph.nodes if p.op == "placeholder"][-1]):
        node = gm.graph.get_attr(target)
    node.meta["val"] = value
    return node


def _has(gm, target: str) -> bool:
    try:
        _fetch(gm, target)
        return True
    except AttributeError:
        return False


def _qmin(fmt: str) -> int:
    return -127 if fmt.endswith("n") else -128


# ---------------------------------------------------------------------------------------------
# CPU: quantized_decomposed Q/DQ for inductor's oneDNN int8 passes
# ---------------------------------------------------------------------------------------------
def rewrite_cpu_int8(gm: fx.GraphModule) -> int:
    """Rewrite int8 ``qpass::`` ops in place; returns how many ops were rewritten.

    Activations: int8 codes with zero point 0 are written as uint8 with zero point 128 (the
    same numbers, X86InductorQuantizer's encoding); narrow range clamps at code 1 (= -127).
    """
    g = gm.graph
    count = 0
    zero_points = _fold_affine_biases(gm)  # quantize node -> uint8 zero point of its affine bias
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is OPS["quantize_per_tensor"] and node.args[3] in _INT8:
            x, scale_n, _amax, fmt = node.args
            s = float(_const(gm, scale_n))
            with g.inserting_before(node):
                new = g.call_function(qd.quantize_per_tensor.default,
                                      (x, s, zero_points.get(node, 128), _qmin(fmt) + 128, 255, torch.uint8))
            if node in zero_points:
                zero_points[new] = zero_points.pop(node)
            _replace(node, new, torch.uint8)
            count += 1
        elif node.target is OPS["dequantize_per_tensor"] and node.args[3] in _INT8:
            codes, scale_n, _ref, fmt, dtype = node.args
            s = float(_const(gm, scale_n))
            with g.inserting_before(node):
                if codes.op == "get_attr":  # a per-tensor weight: int8 codes, zero point 0
                    new = g.call_function(qd.dequantize_per_tensor.default, (codes, s, 0, _qmin(fmt), 127, torch.int8))
                else:
                    new = g.call_function(qd.dequantize_per_tensor.default,
                                          (codes, s, zero_points.get(codes, 128), _qmin(fmt) + 128, 255, torch.uint8))
                if dtype != torch.float32:
                    new = g.call_function(aten._to_copy.default, (new,), {"dtype": dtype})
            _replace(node, new, dtype)
            count += 1
        elif node.target is OPS["dequantize_per_channel"] and node.args[3] in _INT8:
            codes, scale_n, _ref, fmt, axis, dtype = node.args
            scales = _const(gm, scale_n).float().reshape(-1)
            zps = _new_const(gm, f"{scale_n.target.rsplit('.', 1)[0]}.zero_point", torch.zeros(scales.numel(), dtype=torch.int64))
            with g.inserting_before(node):
                new = g.call_function(qd.dequantize_per_channel.default,
                                      (codes, scale_n, zps, axis, _qmin(fmt), 127, torch.int8))
                if dtype != torch.float32:
                    new = g.call_function(aten._to_copy.default, (new,), {"dtype": dtype})
            _fix_scale_dtype(gm, scale_n)
            _replace(node, new, dtype)
            count += 1
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return count


def _fold_affine_biases(gm: fx.GraphModule) -> dict:
    """``sub(x, b) -> quantize -> dequantize -> add(., b)`` (an affine int8 activation,
    :func:`qpass.passes.lower._lower_affine`) with ``b`` a whole number ``k`` of steps becomes
    ``quantize(x) -> dequantize`` with uint8 zero point ``128 - k`` (PT2E's asymmetric uint8
    activation, which oneDNN's int8 kernels take). Returns {quantize node: zero point}."""
    g = gm.graph
    out = {}
    for q in list(g.nodes):
        if q.op != "call_function" or q.target is not OPS["quantize_per_tensor"] or q.args[3] not in _INT8:
            continue
        sub = q.args[0]
        if (not isinstance(sub, fx.Node) or sub.target is not aten.sub.Tensor or len(sub.users) != 1
                or not isinstance(sub.args[1], fx.Node) or sub.args[1].op != "get_attr"):
            continue
        bias_n = sub.args[1]
        bias = _const(gm, bias_n)
        dqs = list(q.users)
        if bias.numel() != 1 or len(dqs) != 1 or dqs[0].target is not OPS["dequantize_per_tensor"]:
            continue
        adds = list(dqs[0].users)
        if not adds or any(a.target is not aten.add.Tensor or a.args[1] is not bias_n or a.args[0] is not dqs[0]
                           for a in adds):
            continue
        zero_point = shifted_zero_point(float(bias), float(_const(gm, q.args[1])), 128, 0, 255)
        if zero_point is None:
            continue
        q.replace_input_with(sub, sub.args[0])
        for a in adds:
            a.replace_all_uses_with(dqs[0])
            g.erase_node(a)
        g.erase_node(sub)
        out[q] = zero_point
    return out


def _fix_scale_dtype(gm, scale_n: fx.Node) -> None:
    t = _const(gm, scale_n)
    if t.dtype != torch.float32 or t.dim() != 1:
        *path, leaf = scale_n.target.split(".")
        mod = gm.get_submodule(".".join(path)) if path else gm
        mod._buffers[leaf] = t.float().reshape(-1)


def _replace(old: fx.Node, new: fx.Node, dtype) -> None:
    val = old.meta.get("val")
    if isinstance(val, torch.Tensor):
        new.meta["val"] = val.new_empty(val.shape, dtype=dtype) if val.dtype != dtype else val
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


@contextlib.contextmanager
def no_inplace_qlinear_sum():
    """Inductor (2.13) fuses ``x + qlinear(...)`` into a oneDNN "sum" post-op that writes into
    x's buffer, even when x is a graph input (the caller's tensor) or a view of one; we saw it
    overwrite the model input of a residual block. While compiling, such an x is reported as not
    in-place-able, so inductor uses the out-of-place "add" post-op (still fused into the qlinear);
    any other x keeps inductor's own decision (a residual stream computed inside the graph is
    summed in place, as in PT2E's graphs)."""
    try:
        from torch._inductor import ir
        from torch._inductor.fx_passes import mkldnn_fusion
        from torch._inductor.virtualized import V
    except ImportError:  # pragma: no cover
        yield
        return
    if not hasattr(mkldnn_fusion, "_qlinear_binary_can_be_inplace"):
        yield
        return
    old = mkldnn_fusion._qlinear_binary_can_be_inplace

    def can_be_inplace(other):
        data = other.data
        if isinstance(data, ir.BaseView):
            data = data.unwrap_view()
        if isinstance(data, ir.StorageBox):
            data = data.data
        name = data.get_name() if hasattr(data, "get_name") else None
        if isinstance(data, (ir.InputBuffer, ir.ConstantBuffer)) or name in V.graph.graph_inputs:
            return False
        return old(other)

    mkldnn_fusion._qlinear_binary_can_be_inplace = can_be_inplace
    try:
        yield
    finally:
        mkldnn_fusion._qlinear_binary_can_be_inplace = old


# ---------------------------------------------------------------------------------------------
# CUDA: _scaled_mm (FP8), _int_mm (INT8), fused int4 dequantize
# ---------------------------------------------------------------------------------------------
# Plain functions, not custom ops: inductor traces through them, so the activation's quantization
# fuses with the op that produces it and the GEMM is inductor's own ``_scaled_mm``/``_int_mm``
# lowering. (As opaque custom ops they ran their Python bodies op by op on every call: on a
# SmolLM2-shaped model at 8x512 on an H200 that was 41.7 ms against 13.6 ms for bf16 compiled.)
def fp8_linear(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = False,
               ones_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (w * w_scale).T + bias`` with x quantized to E4M3 per tensor (``x_scale``: the
    dequantization step) on ``torch._scaled_mm``. ``w``: E4M3 weight [N, K] row-major, so
    ``w.t()`` is the column-major [K, N] operand _scaled_mm wants; ``w_scale``: 0-dim
    (tensor-wise) or [1, N] (row-wise). ``fast_accum``: _scaled_mm's ``use_fast_accum`` (Hopper
    tensor cores accumulate without the periodic promotion to float32). ``ones_rows``: row-wise
    only, a constant [M, 1] of ones to pass as ``scale_a`` when ``w_scale`` already holds
    ``x_scale`` (no [M, 1] tensor is then made on every call)."""
    w_t = w.t()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq = (x2.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    m = x2.shape[0]
    if w_scale.numel() == 1:
        out = torch._scaled_mm(xq, w_t, scale_a=x_scale.reshape(()).float(), scale_b=w_scale.reshape(()).float(),
                               bias=None, out_dtype=out_dtype, use_fast_accum=fast_accum)
    else:  # row-wise: scale_a [M, 1] (ones where w_scale holds x_scale already), scale_b [1, N]
        if ones_rows is None:
            sa = x_scale.float().reshape(1, 1).expand(m, 1).contiguous()
        elif ones_rows.shape[0] == m:
            sa = ones_rows
        else:
            sa = torch.ones(m, 1, dtype=torch.float32, device=xq.device)
        out = torch._scaled_mm(xq, w_t, scale_a=sa, scale_b=w_scale.float().reshape(1, -1), bias=None,
                               out_dtype=out_dtype, use_fast_accum=fast_accum)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*shape[:-1], w_t.shape[1])


def int8_linear(x: torch.Tensor, x_scale: float, qmin: int, w_t: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 on ``torch._int_mm`` (int32 accumulation); ``w_t``: int8 [K, N]; ``w_scale``: [N] or
    0-dim. _int_mm needs M > 16 and K, N multiples of 8: other shapes dequantize instead."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq = torch.clamp(torch.round(x2.float() * (1.0 / x_scale)), qmin, 127).to(torch.int8)
    m, k = x2.shape
    n = w_t.shape[1]
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        acc = torch._int_mm(xq, w_t)
        out = acc.float() * (x_scale * w_scale.float().reshape(1, -1) if w_scale.numel() > 1 else x_scale * w_scale.float())
    else:
        out = (xq.float() @ w_t.float()) * x_scale * w_scale.float().reshape(1, -1)
    out = out.to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*shape[:-1], n)


def _linear_args(node: fx.Node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def rewrite_cuda(gm: fx.GraphModule, fp8_fast_accum: bool = False, fuse: bool = True) -> dict[str, int]:
    """Replace ``linear(dq(q(x)), dq(w))`` with FP8/INT8 kernel ops; unpack int4 blocks in the
    graph. ``fp8_fast_accum``: FP8 GEMMs with fast accumulation; ``fuse``: one GEMM per
    shared-input group. Returns counts per kernel."""
    from qpass.passes.lower import spec_of_token

    g = gm.graph
    counts = {"fp8_linear": 0, "int8_linear": 0, "int4_dequant": 0, "fused_groups": 0}
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _LINEAR:
            continue
        x, w, b = _linear_args(node)
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node)):
            continue
        if x.target is not OPS["dequantize_per_tensor"] or w.target not in (OPS["dequantize_per_tensor"],
                                                                           OPS["dequantize_per_channel"]):
            continue
        q = x.args[0]
        if not isinstance(q, fx.Node) or q.target is not OPS["quantize_per_tensor"]:
            continue
        fmt_a, fmt_w = q.args[3], w.args[3]
        src = q.args[0]
        x_scale = float(_const(gm, q.args[1]))
        codes = _const(gm, w.args[0])
        w_scale = _const(gm, w.args[1]).float()
        out_dtype = node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else torch.float32
        base = w.args[0].target.rsplit(".", 1)[0]
        if fmt_a == "e4m3" and fmt_w == "e4m3":
            wt = w.args[0]  # the folded [N, K] E4M3 codes
            ws = _new_const(gm, f"{base}.scale_row", w_scale.reshape(1, -1) if w_scale.numel() > 1 else w_scale.reshape(()))
            xs = _new_const(gm, f"{base}.x_scale", torch.tensor(x_scale, dtype=torch.float32, device=codes.device))
            with g.inserting_before(node):
                new = g.call_function(fp8_linear, (src, xs, wt, ws, b, out_dtype), {"fast_accum": bool(fp8_fast_accum)})
            counts["fp8_linear"] += 1
        elif fmt_a in _INT8 and fmt_w in _INT8:
            wt = _new_const(gm, f"{base}.codes_t", codes.t().contiguous())
            ws = _new_const(gm, f"{base}.scale_n", w_scale.reshape(-1))
            with g.inserting_before(node):
                new = g.call_function(int8_linear,
                                      (src, x_scale, _qmin(fmt_a), wt, ws, b, out_dtype))
            counts["int8_linear"] += 1
        else:
            continue
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        g.erase_node(node)
    counts["fused_groups"] = _fuse_shared_input(gm) if fuse else 0
    # int4 block weights: unpack + dequantize as plain aten ops inductor can fuse
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is OPS["dequantize_blockwise"] and node.args[3] in ("int4", "int4n", "uint4"):
            codes_n, scale_n, _ref, fmt, axis, block, shape, dtype = node.args
            if axis != len(shape) - 1 or shape[-1] % block or shape[-1] % 2:
                continue
            with g.inserting_before(node):
                new = g.call_function(_int4_block_dequant, (codes_n, scale_n, fmt, block, list(shape), dtype))
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
            g.erase_node(node)
            counts["int4_dequant"] += 1
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return counts


def _fuse_shared_input(gm: fx.GraphModule) -> int:
    """One kernel call for the FP8/INT8 linears that read the same activation with the same scale
    (q/k/v, gate/up: their shared-input group has one input amax): their weights are concatenated
    along N, each member's weight scale is spread over its output channels (row-wise scaling), and
    the output is sliced back. One activation quantization and one wider GEMM instead of three or
    two narrow ones, as the CPU backend does for oneDNN (:mod:`qpass.export.compile_fuse`). FP8
    groups are fused for bfloat16 outputs only (what row-wise ``_scaled_mm`` writes on CUDA). Every
    output column is computed from the same codes and scales as before; ``_scaled_mm`` then
    applies the scales row-wise instead of tensor-wise. Returns the number of groups fused."""
    g = gm.graph
    groups: dict[tuple, list[fx.Node]] = {}
    for node in g.nodes:
        if node.op != "call_function" or node.target not in (fp8_linear, int8_linear):
            continue
        if node.target is fp8_linear:
            src, xs, w, _ws, _b, out_dtype = node.args
            if out_dtype != torch.bfloat16:  # CUDA's row-wise _scaled_mm writes bfloat16 only
                continue
            key = (fp8_linear, src, float(_const(gm, xs)), out_dtype, _const(gm, w).shape[1])
        else:
            src, x_scale, qmin, w_t, _ws, _b, out_dtype = node.args
            key = (int8_linear, src, x_scale, qmin, out_dtype, _const(gm, w_t).shape[0])
        groups.setdefault(key, []).append(node)
    fused = 0
    for key, members in groups.items():
        if len(members) < 2:
            continue
        fp8 = key[0] is fp8_linear
        first = members[0]
        codes, scales, biases, sizes = [], [], [], []
        for m in members:
            if fp8:
                w, ws = _const(gm, m.args[2]), _const(gm, m.args[3]).float()
                n = w.shape[0]
                codes.append(w.view(torch.uint8))  # concatenated as bytes: float8 cat is not everywhere
            else:
                w, ws = _const(gm, m.args[3]), _const(gm, m.args[4]).float()
                n = w.shape[1]
                codes.append(w)
            scales.append(ws.reshape(-1).expand(n) if ws.numel() == 1 else ws.reshape(-1))
            biases.append(m.args[4] if fp8 else m.args[5])
            sizes.append(n)
        if any(b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr") for b in biases):
            continue
        base = f"_qpass_fused.{first.name}"
        scale = torch.cat(scales)
        bias_n = None
        if any(b is not None for b in biases):
            dtype = next(_const(gm, b).dtype for b in biases if b is not None)
            parts = [_const(gm, b).to(dtype) if b is not None else torch.zeros(n, dtype=dtype, device=scale.device)
                     for b, n in zip(biases, sizes)]
            bias_n = _new_const(gm, f"{base}_bias", torch.cat(parts))
        kwargs = dict(first.kwargs)
        if fp8:
            w_n = _new_const(gm, f"{base}_codes", torch.cat(codes).view(torch.float8_e4m3fn))
            rows = _static_rows(first)
            if rows is not None:  # scale_a: one shared constant of ones, the activation scale in scale_b
                s_n = _new_const(gm, f"{base}_scale_row", (scale * key[2]).reshape(1, -1))
                kwargs["ones_rows"] = _ones_rows(gm, rows, scale.device)
            else:
                s_n = _new_const(gm, f"{base}_scale_row", scale.reshape(1, -1))
            args = (first.args[0], first.args[1], w_n, s_n, bias_n, first.args[5])
        else:
            w_n = _new_const(gm, f"{base}_codes_t", torch.cat(codes, dim=1))
            s_n = _new_const(gm, f"{base}_scale_n", scale)
            args = (first.args[0], first.args[1], first.args[2], w_n, s_n, bias_n, first.args[6])
        with g.inserting_before(first):
            out = g.call_function(first.target, args, kwargs)
            val = first.meta.get("val")
            if isinstance(val, torch.Tensor):
                out.meta["val"] = val.new_empty((*val.shape[:-1], sum(sizes)))
            replace_with_slices(g, out, members, sizes)
        for m in members:
            g.erase_node(m)
        fused += 1
    return fused


def _static_rows(node: fx.Node) -> int | None:
    """The row count M of a linear's flattened input, when the traced shape fixes it."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape[:-1]):
        return None
    return math.prod(val.shape[:-1])


def _ones_rows(gm: fx.GraphModule, rows: int, device) -> fx.Node:
    """A get_attr node for a [rows, 1] float32 constant of ones, one per graph and row count."""
    target = f"_qpass_ones_rows_{rows}"
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            return n
    return _new_const(gm, target, torch.ones(rows, 1, dtype=torch.float32, device=device))


def _int4_block_dequant(packed: torch.Tensor, scale: torch.Tensor, fmt: str, block: int, shape: list, dtype):
    """Unpack two 4-bit codes per byte (low nibble first) and multiply by per-block scales.
    Matches qpass.formats' packing (see formats/packing.py)."""
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    if fmt != "uint4":
        lo = torch.where(lo > 7, lo - 16, lo)
        hi = torch.where(hi > 7, hi - 16, hi)
    codes = torch.stack((lo, hi), dim=-1).reshape(*shape[:-1], -1)[..., : shape[-1]]
    vals = codes.reshape(*shape[:-1], shape[-1] // block, block).float() * scale.float().unsqueeze(-1)
    return vals.reshape(shape).to(dtype)
