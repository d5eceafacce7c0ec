"""Readable and machine-readable summaries of a model's quantizers."""

from __future__ import annotations

from torch import nn

from qpass.graph.quantized_model import STATE_ATTR
from qpass.nn.tensor_quantizer import TensorQuantizer


def quantizer_rows(model: nn.Module) -> list[dict]:
    rows = []
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer):
            continue
        amax = q.amax
        row = {
            "name": name,
            "enabled": q.is_enabled,
            "format": q.describe() if q.is_enabled else "-",
            "amax": None,
            "pre_quant_scale": q.pre_quant_scale is not None,
            "bias": None,  # an affine quantizer's calibrated bias (ModelOpt's ``bias`` attribute)
        }
        bias = q.bias_value if q._attrs.get("bias") else None
        if bias is not None:
            row["bias"] = bias.item() if bias.numel() == 1 else [bias.min().item(), bias.max().item(), bias.numel()]
        if amax is not None:
            row["amax"] = amax.item() if amax.numel() == 1 else [amax.min().item(), amax.max().item(), amax.numel()]
        rows.append(row)
    return rows


def _amax_text(amax) -> str:
    if amax is None:
        return "-"
    if isinstance(amax, float):
        return f"{amax:.4g}"
    lo, hi, n = amax
    return f"[{lo:.4g}, {hi:.4g}] ({n})"


def format_summary(model: nn.Module) -> str:
    rows = quantizer_rows(model)
    if not rows:
        return "no quantizers (the model is not quantized)"
    width = max(len(r["name"]) for r in rows)
    fmt_width = max(len(r["format"]) for r in rows)
    lines = [f"{'quantizer':<{width}}  {'state':<8}  {'format':<{fmt_width}}  amax"]
    for r in rows:
        state = "on" if r["enabled"] else "off"
        extra = "  (pre_quant_scale)" if r["pre_quant_scale"] else ""
        if r["bias"] is not None:
            extra += f"  (bias {_amax_text(r['bias'])})"
        lines.append(f"{r['name']:<{width}}  {state:<8}  {r['format']:<{fmt_width}}  {_amax_text(r['amax'])}{extra}")
    enabled = sum(r["enabled"] for r in rows)
    calibrated = sum(r["amax"] is not None for r in rows if r["enabled"])
    lines.append(f"{len(rows)} quantizers: {enabled} enabled, {len(rows) - enabled} disabled, {calibrated} with amax")
    state = model.__dict__.get(STATE_ATTR)
    fallback = None if state is None else state.__dict__.get("fallback")
    if fallback is not None:
        lines.append(f"captured with torch.compile (torch.export could not trace it whole): {fallback.graphs} graph(s), "
                     f"{len(fallback.breaks)} graph-break reason(s); qpass.graph_breaks(model) lists them")
    return "\n".join(lines)


def summary_json(model: nn.Module) -> str:
    """The rows of :func:`quantizer_rows` and the totals as one JSON document."""
    import json

    rows = quantizer_rows(model)
    doc = {
        "quantizers": rows,
        "total": len(rows),
        "enabled": sum(r["enabled"] for r in rows),
        "with_amax": sum(r["amax"] is not None for r in rows if r["enabled"]),
    }
    return json.dumps(doc, indent=1, allow_nan=True)


def write_json(model: nn.Module, path) -> str:
    """Write :func:`summary_json` to ``path``; returns the path."""
    import os

    path = os.fspath(path)
    with open(path, "w") as f:
        f.write(summary_json(model) + "\n")
    return path


def print_quant_summary_json(model: nn.Module, file=None) -> None:
    """``print_quant_summary`` as JSON (the same rows)."""
    print(summary_json(model), file=file)
