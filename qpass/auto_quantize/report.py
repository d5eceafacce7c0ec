"""Re-solving from saved scores, the result table, the sensitivity heat map and the bits sweep."""

from __future__ import annotations

import numpy as np
from torch import nn

from qpass.auto_quantize.solver import AutoQuantizeError, budget_bits, solve


def _matrices(state_dict: dict):
    stats = state_dict["candidate_stats"]
    names = list(stats)
    scores = np.array([stats[n]["scores"] for n in names], dtype=np.float64)
    costs = np.array([stats[n]["costs"] for n in names], dtype=np.float64)
    return names, scores, costs


def auto_quantize_resolve(model: nn.Module, state_dict: dict, constraints: dict):
    """Choose formats again for new ``constraints`` from the saved scores (no scoring) and apply them.

    ``model`` must be the model :func:`qpass.auto_quantize` returned (it keeps the calibrated
    candidates). Updates and returns ``(model, state_dict)``.
    """
    from qpass.auto_quantize.search import apply_choice

    names, scores, costs = _matrices(state_dict)
    total = state_dict["total_weights"]
    budget = budget_bits(constraints, total)
    choice = solve(scores, costs, budget, constraints, total)
    stats = state_dict["candidate_stats"]
    apply_choice(model, [stats[n]["members"] for n in names], choice)
    used = float(sum(costs[i, f] for i, f in enumerate(choice)))
    state_dict["best"] = {
        "constraints": dict(constraints),
        "recipe": {n: stats[n]["formats"][f] for n, f in zip(names, choice)},
        "effective_bits": used / total,
        "weight_memory_bytes": used / 8,
        "score": float(sum(scores[i, f] for i, f in enumerate(choice))),
        "is_satisfied": used <= budget * (1 + 1e-9),
    }
    return model, state_dict


def format_table(state_dict: dict) -> str:
    best = state_dict["best"]
    stats = state_dict["candidate_stats"]
    width = max(len(n) for n in stats)
    lines = [f"{'layer group'.ljust(width)}  format"]
    for name, fmt in best["recipe"].items():
        lines.append(f"{name.ljust(width)}  {fmt}")
    lines.append(f"effective bits {best['effective_bits']:.3f} for {best['constraints']} "
                 f"({'satisfied' if best['is_satisfied'] else 'NOT satisfied'})")
    return "\n".join(lines)


def auto_quantize_report(state_dict: dict, png_path: str) -> str:
    """Heat map of log10 scores (layer group x format), the chosen format marked per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, scores, _ = _matrices(state_dict)
    formats = state_dict["candidate_stats"][names[0]]["formats"]
    recipe = (state_dict.get("best") or {}).get("recipe", {})
    shown = np.log10(np.maximum(scores, 1e-12))
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(formats), 1.0 + 0.22 * len(names)))
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    for i, n in enumerate(names):
        if n in recipe:
            j = formats.index(recipe[n])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(range(len(formats)), formats, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title("auto_quantize sensitivity (log10 score); red: chosen")
    fig.colorbar(im, ax=ax, label="log10 score")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def auto_quantize_sweep(model: nn.Module, state_dict: dict, bits, eval_fn, png_path: str | None = None) -> list:
    """Re-solve for each effective-bits budget, evaluate ``eval_fn(model)`` (e.g. perplexity), plot.

    Uses the one scoring pass saved in ``state_dict``. Budgets below the minimum are skipped.
    Returns ``[(requested bits, achieved bits, metric)]``; the original choice is re-applied at the end.
    """
    before = state_dict["best"]
    rows = []
    for b in bits:
        try:
            auto_quantize_resolve(model, state_dict, {"effective_bits": b})
        except AutoQuantizeError:
            continue
        rows.append((float(b), state_dict["best"]["effective_bits"], float(eval_fn(model))))
    if before is not None:
        auto_quantize_resolve(model, state_dict, before["constraints"])
    if png_path is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r[1] for r in rows], [r[2] for r in rows], "o-")
        ax.set_xlabel("achieved effective bits")
        ax.set_ylabel("metric (e.g. perplexity)")
        ax.set_title("auto_quantize: metric vs effective bits")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
    return rows
