import itertools

import numpy as np
import pytest

from qpass.auto_quantize.solver import AutoQuantizeError, budget_bits, solve


def brute_force(scores, costs, budget):
    best, best_choice = np.inf, None
    for choice in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        cost = sum(costs[g, f] for g, f in enumerate(choice))
        score = sum(scores[g, f] for g, f in enumerate(choice))
        if cost <= budget and score < best:
            best, best_choice = score, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups, formats = rng.integers(2, 6), rng.integers(2, 4)
    weights = rng.integers(10, 1000, size=(groups, 1))
    bits = np.sort(rng.uniform(2, 16, size=formats))
    costs = weights * bits[None, :]
    scores = rng.exponential(size=(groups, formats)) * np.linspace(1, 0, formats)[None, :] ** 2
    budget = costs.min(1).sum() + rng.uniform(0, 1) * (costs.max(1).sum() - costs.min(1).sum())
    choice = solve(scores, costs, budget)
    best, _ = brute_force(scores, costs, budget)
    got = sum(scores[g, f] for g, f in enumerate(choice))
    assert sum(costs[g, f] for g, f in enumerate(choice)) <= budget + 1e-6
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_infeasible_budget_states_minimum():
    costs = np.array([[4.0 * 100, 16.0 * 100], [8.0 * 300, 16.0 * 300]])
    scores = np.ones_like(costs)
    with pytest.raises(AutoQuantizeError, match=r"minimum achievable is \{'effective_bits': 7.0"):
        solve(scores, costs, budget_bits({"effective_bits": 3.0}, 400), {"effective_bits": 3.0}, 400)


def test_constraint_shapes():
    assert budget_bits({"effective_bits": 4.0}, 10) == 40.0
    assert budget_bits({"weight_memory_bytes": 5}, 10) == 40.0
    with pytest.raises(AutoQuantizeError, match="constraints must be one of"):
        budget_bits({"bits": 4}, 10)
