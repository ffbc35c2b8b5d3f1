"""The layout search's dynamic program against exhaustive search on random instances."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from s2dit_mlx.errors import S2DiTError
from train.layout_dp import LayoutProblem, exhaustive, solve

KINDS = ["lcha", "ssa", "full"]


def random_problem(rng, layers, kinds, memory: bool, switches: bool, tightness: float):
    latency = rng.uniform(1.0, 10.0, (layers, kinds))
    mem = rng.uniform(0.0, 5.0, (layers, kinds))
    penalty = rng.normal(0.0, 1.0, (layers, kinds))
    cheapest, dearest = latency.min(1).sum(), latency.max(1).sum()
    budget = cheapest + tightness * (dearest - cheapest)
    mem_budget = None
    if memory:
        mem_budget = mem.min(1).sum() + tightness * (mem.max(1).sum() - mem.min(1).sum()) + 1e-3
    return LayoutProblem(
        KINDS[:kinds],
        latency,
        mem,
        penalty,
        latency_budget=float(budget) + 1e-3,
        memory_budget=mem_budget,
        max_switches=int(rng.integers(0, layers)) if switches else None,
    )


def test_dynamic_program_equals_exhaustive_search_on_random_instances():
    rng = np.random.default_rng(0)
    checked = feasible = 0
    for n in range(240):
        problem = random_problem(
            rng,
            layers=int(rng.integers(1, 9)),
            kinds=int(rng.integers(2, 4)),
            memory=n % 2 == 0,
            switches=n % 3 == 0,
            tightness=float(rng.choice([0.1, 0.3, 0.6, 1.0])),
        )
        resolution = int(rng.choice([20, 60]))
        want = exhaustive(problem, resolution)
        if want is None:
            with pytest.raises(S2DiTError, match="no layout fits"):
                solve(problem, resolution)
        else:
            got = solve(problem, resolution)
            assert got.penalty == pytest.approx(want.penalty, abs=1e-9), n
            # The layout found meets the real (unrounded) budgets.
            assert got.latency <= problem.latency_budget + 1e-9
            if problem.memory_budget is not None:
                assert got.memory <= problem.memory_budget + 1e-9
            if problem.max_switches is not None:
                assert got.switches <= problem.max_switches
            feasible += 1
        checked += 1
    assert checked >= 200 and feasible >= 150


def test_objective_never_worsens_as_the_budget_grows():
    rng = np.random.default_rng(1)
    for _ in range(30):
        base = random_problem(rng, 6, 3, memory=True, switches=False, tightness=0.5)
        penalties = []
        for scale in (1.0, 1.1, 1.3, 1.6, 2.0, 3.0):
            problem = replace(base, latency_budget=base.latency_budget * scale)
            try:
                penalties.append(solve(problem, resolution=60).penalty)
            except S2DiTError:  # infeasible at a small budget: nothing to compare yet
                assert not penalties
        assert len(penalties) >= 3
        assert all(b <= a + 1e-12 for a, b in zip(penalties, penalties[1:], strict=False))
        # With every budget unlimited the search finds the best kind per layer.
        free = replace(base, latency_budget=1e9, memory_budget=1e9)
        assert solve(free, resolution=60).penalty == pytest.approx(base.penalty.min(axis=1).sum())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(latency_budget=0.5), "below the cheapest layout"),
        (dict(latency_budget=-1.0), "latency budget must be a positive number"),
        (dict(memory_budget=0.001), "memory budget .* below the smallest layout"),
        (dict(max_switches=-1), "max switches must be >= 0"),
        (dict(penalty=np.full((3, 2), np.nan)), "penalty holds a non-finite value"),
        (dict(latency=np.ones((2, 2))), "latency must have one entry per layer and kind"),
    ],
)
def test_bad_budgets_and_inputs_are_one_clear_error(change, match):
    problem = LayoutProblem(
        ["lcha", "ssa"],
        latency=np.array([[1.0, 2.0]] * 3),
        memory=np.array([[1.0, 0.5]] * 3),
        penalty=np.zeros((3, 2)),
        latency_budget=5.0,
        memory_budget=4.0,
    )
    for key, value in change.items():
        setattr(problem, key, value)
    with pytest.raises(S2DiTError, match=match):
        solve(problem)
