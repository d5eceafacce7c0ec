"""The format choice: an optimal multiple-choice knapsack.

One binary x[g, f] per (group, format), exactly one per group; minimise the total score subject
to the total cost (weight count x effective bits) staying within the budget. Solved exactly with
``scipy.optimize.milp`` (HiGHS branch and bound).
"""

from __future__ import annotations

import numpy as np

from qpass.errors import QpassError

CONSTRAINT_KEYS = ("effective_bits", "weight_memory_bytes")


class AutoQuantizeError(QpassError):
    """An auto_quantize search cannot run or cannot meet its constraints."""


def budget_bits(constraints: dict, total_weights: int) -> float:
    """The allowed total weight bits for ``constraints`` (one key of CONSTRAINT_KEYS)."""
    if not isinstance(constraints, dict) or len(constraints) != 1 or next(iter(constraints)) not in CONSTRAINT_KEYS:
        raise AutoQuantizeError(
            f"constraints must be one of {{'effective_bits': float}} or {{'weight_memory_bytes': int}}, "
            f"got {constraints!r}"
        )
    (key, value), = constraints.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise AutoQuantizeError(f"constraints[{key!r}] must be a positive number, got {value!r}")
    return float(value) * (total_weights if key == "effective_bits" else 8)


def _describe_budget(constraints: dict, total_weights: int, bits: float) -> str:
    if "weight_memory_bytes" in constraints:
        return f"{bits / 8:.0f} bytes of weights ({bits / total_weights:.4g} effective bits)"
    return f"{bits / total_weights:.4g} effective bits"


def check_budget(costs: np.ndarray, budget: float, constraints: dict | None = None,
                 total_weights: int | None = None) -> None:
    """Raise if even the cheapest format of every group (``costs``: [groups, formats]) exceeds ``budget``."""
    min_cost = np.asarray(costs, dtype=np.float64).min(axis=1).sum()
    if min_cost > budget * (1 + 1e-12):
        tw = total_weights or 1
        need = {"effective_bits": round(float(min_cost / tw), 4)} if "weight_memory_bytes" not in (constraints or {}) \
            else {"weight_memory_bytes": int(np.ceil(min_cost / 8))}
        raise AutoQuantizeError(
            f"the budget of {_describe_budget(constraints or {}, tw, budget)} cannot be met: even the smallest "
            f"format in every group needs {min_cost / tw:.4f} effective bits ({int(np.ceil(min_cost / 8))} bytes "
            f"of weights); the minimum achievable is {need}. Raise the constraint or add a smaller format"
        )


def solve(scores: np.ndarray, costs: np.ndarray, budget: float, constraints: dict | None = None,
          total_weights: int | None = None) -> list[int]:
    """Index of the chosen format per group; ``scores``/``costs`` are [groups, formats] (inf = not allowed)."""
    scores = np.asarray(scores, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    n_groups, n_formats = scores.shape
    allowed = np.isfinite(costs) & np.isfinite(scores)
    check_budget(np.where(allowed, costs, np.inf), budget, constraints, total_weights)
    from scipy.optimize import Bounds, LinearConstraint, milp

    idx = np.flatnonzero(allowed.ravel())
    c = scores.ravel()[idx]
    # Scale the objective so that tiny scores do not fall under the solver's tolerances.
    scale = np.abs(c).max()
    c = c / scale if scale > 0 else c
    one_per_group = np.zeros((n_groups, idx.size))
    one_per_group[idx // n_formats, np.arange(idx.size)] = 1.0
    cost_row = costs.ravel()[idx][None, :]
    cost_scale = max(budget, 1.0)
    res = milp(
        c,
        integrality=np.ones(idx.size),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_per_group, 1, 1),
                     LinearConstraint(cost_row / cost_scale, -np.inf, budget / cost_scale + 1e-12)],
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise AutoQuantizeError(f"the format search found no solution: {res.message}")
    chosen = [-1] * n_groups
    for j in np.flatnonzero(res.x > 0.5):
        chosen[idx[j] // n_formats] = int(idx[j] % n_formats)
    return chosen
