"""``qpass summary <saved>``: the quantizers of a saved file, read from its JSON header (no model needed)."""

from __future__ import annotations

import json

def _describe_member(member: dict) -> str:
    from qpass.nn.tensor_quantizer import TensorQuantizer

    if not member.get("enabled", True):
        return "-"
    try:
        return TensorQuantizer(member.get("attributes") or {}).describe()
    except Exception as e:  # noqa: BLE001 - a summary should never fail on one odd record
        return f"<{type(e).__name__}: {e}>"


def _amax_value(t):
    if t is None:
        return None
    t = t.float()
    return t.item() if t.numel() == 1 else [t.min().item(), t.max().item(), t.numel()]


def saved_rows(path: str) -> tuple[dict, list[dict]]:
    """(header, one row per quantizer) read straight from a saved file's JSON header."""
    from qpass.checkpoint_format import read_file

    body, tensors = read_file(path)
    rows = []
    for r in body.get("quantizers", []):
        members = r.get("members", [])
        seq = r.get("class") == "SequentialQuantizer"
        prefixes = [f"{r['path']}.{i}" for i in range(len(members))] if seq else [r["path"]]
        enabled = any(m.get("enabled", True) for m in members)
        amaxes = [_amax_value(tensors.get(f"{p}._amax")) for p in prefixes]
        rows.append({
            "name": r["path"],
            "enabled": enabled,
            "format": " -> ".join(_describe_member(m) for m in members) if enabled else "-",
            "amax": amaxes if seq else amaxes[0],  # a SequentialQuantizer: one per member
            "sequential": seq,
            "pre_quant_scale": any(f"{p}._pre_quant_scale" in tensors for p in prefixes),
        })
    header = {k: body.get(k) for k in ("qpass_version", "model_class", "rule_set", "algorithm", "fingerprint")}
    header["weights_stored"] = bool(body.get("weights_stored"))
    return header, rows


def _amax_text(row: dict) -> str:
    from qpass.summary import _amax_text as one

    if row["sequential"]:
        return " -> ".join(one(a) for a in row["amax"])
    return one(row["amax"])


def cmd_summary(args) -> int:
    header, rows = saved_rows(args.saved)
    if args.json:
        print(json.dumps({"file": args.saved, **header, "quantizers": rows}, indent=1))
        return 0
    print(f"{args.saved}: {header['model_class']}  rules={header['rule_set']}  algorithm={header['algorithm']}  "
          f"qpass {header['qpass_version']}")
    if not rows:
        print("no quantizers")
        return 0
    width = max(len(r["name"]) for r in rows)
    fw = max(len(r["format"]) for r in rows)
    for r in rows:
        extra = "  (pre_quant_scale)" if r["pre_quant_scale"] else ""
        print(f"{r['name']:<{width}}  {'on' if r['enabled'] else 'off':<3}  {r['format']:<{fw}}  "
              f"{_amax_text(r)}{extra}")
    on = sum(r["enabled"] for r in rows)
    print(f"{len(rows)} quantizers: {on} enabled, {len(rows) - on} disabled")
    return 0


