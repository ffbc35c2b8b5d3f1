"""Budget-aware layout search: the dynamic program over layers (S2DiT's sandwich search).

Each layer i can take one attention kind k; choosing it adds a latency cost c[i][k], a state
memory m[i][k] and a quality penalty q[i][k] (the loss increase measured when that layer alone
takes kind k). The search picks one kind per layer to minimise the summed penalty with the
summed latency within a latency budget, the summed memory within a memory budget and,
optionally, at most `max_switches` changes of kind between neighbouring layers.

Costs are quantised to whole units of `budget / resolution`, each rounded up, so a layout the
program accepts always meets the real budget (it may miss a layout that fits only by less than
a unit). The program runs over numpy arrays indexed by (latency units, memory units, last
kind, switches), one layer at a time, so it is exact for the quantised costs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from s2dit_mlx.errors import S2DiTError


@dataclass
class LayoutProblem:
    """Per-layer, per-kind latency, memory and quality penalty, and the budgets."""

    kinds: list[str]
    latency: np.ndarray  # [layers, kinds]
    memory: np.ndarray  # [layers, kinds]
    penalty: np.ndarray  # [layers, kinds], lower is better
    latency_budget: float
    memory_budget: float | None = None  # None: no memory bound
    max_switches: int | None = None  # None: any number of kind changes

    def validate(self) -> None:
        """Raise S2DiTError naming the first inconsistent input or impossible budget."""
        shape = (self.penalty.shape[0], len(self.kinds))
        for name in ("latency", "memory", "penalty"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != shape:
                raise S2DiTError(f"{name} must have one entry per layer and kind {shape}")
            if not np.all(np.isfinite(value)):
                raise S2DiTError(f"{name} holds a non-finite value")
        if shape[0] < 1 or shape[1] < 1:
            raise S2DiTError("the layout search needs at least one layer and one kind")
        if np.any(self.latency < 0) or np.any(self.memory < 0):
            raise S2DiTError("latency and memory costs must be >= 0")
        budgets = [("latency budget", self.latency_budget)]
        if self.memory_budget is not None:
            budgets.append(("memory budget", self.memory_budget))
        for name, value in budgets:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise S2DiTError(f"{name} must be a positive number, got {value!r}")
        if self.max_switches is not None and self.max_switches < 0:
            raise S2DiTError(f"max switches must be >= 0, got {self.max_switches!r}")
        cheapest = float(self.latency.min(axis=1).sum())
        if cheapest > self.latency_budget:
            raise S2DiTError(
                f"latency budget {self.latency_budget:g} is below the cheapest layout "
                f"({cheapest:g}: every layer at its cheapest kind)"
            )
        if self.memory_budget is not None:
            smallest = float(self.memory.min(axis=1).sum())
            if smallest > self.memory_budget:
                raise S2DiTError(
                    f"memory budget {self.memory_budget:g} is below the smallest layout "
                    f"({smallest:g})"
                )


@dataclass
class LayoutChoice:
    """The layout found, with its totals."""

    layers: list[str]
    penalty: float
    latency: float
    memory: float
    switches: int


def _units(costs: np.ndarray, budget: float, resolution: int) -> tuple[np.ndarray, int]:
    """Costs in whole units of budget / resolution, rounded up; the budget in units."""
    unit = budget / resolution
    return np.ceil(costs / unit - 1e-9).astype(np.int64), resolution


def _totals(problem: LayoutProblem, picks: list[int]) -> LayoutChoice:
    rows = range(len(picks))
    switches = sum(a != b for a, b in zip(picks, picks[1:], strict=False))
    return LayoutChoice(
        layers=[problem.kinds[k] for k in picks],
        penalty=float(sum(problem.penalty[i, k] for i, k in zip(rows, picks, strict=True))),
        latency=float(sum(problem.latency[i, k] for i, k in zip(rows, picks, strict=True))),
        memory=float(sum(problem.memory[i, k] for i, k in zip(rows, picks, strict=True))),
        switches=switches,
    )


def solve(problem: LayoutProblem, resolution: int = 2000) -> LayoutChoice:
    """The layout of least penalty within the budgets (quantised to `resolution` units each)."""
    problem.validate()
    layers, kinds = problem.penalty.shape
    lat, lat_cap = _units(
        np.asarray(problem.latency, np.float64), problem.latency_budget, resolution
    )
    if problem.memory_budget is None:
        mem, mem_cap = np.zeros_like(lat), 0
    else:
        mem, mem_cap = _units(
            np.asarray(problem.memory, np.float64), problem.memory_budget, resolution
        )
    switches = layers - 1 if problem.max_switches is None else min(problem.max_switches, layers - 1)
    inf = np.inf
    # best[c, m, k, s]: least penalty of the layers so far using c latency and m memory units,
    # the last layer of kind k, s switches; choice[i] remembers the previous kind.
    shape = (lat_cap + 1, mem_cap + 1, kinds, switches + 1)
    best = np.full(shape, inf)
    back: list[np.ndarray] = []
    for k in range(kinds):
        c, m = lat[0, k], mem[0, k]
        if c <= lat_cap and m <= mem_cap:
            best[c, m, k, 0] = problem.penalty[0, k]
    back.append(np.full(shape, -1, dtype=np.int64))
    for i in range(1, layers):
        new = np.full(shape, inf)
        prev_kind = np.full(shape, -1, dtype=np.int64)
        for k in range(kinds):
            c, m = lat[i, k], mem[i, k]
            if c > lat_cap or m > mem_cap:
                continue
            for j in range(kinds):
                extra = int(j != k)
                # Arrive in kind k from kind j: shift by this layer's costs (and a switch).
                src = best[: lat_cap + 1 - c, : mem_cap + 1 - m, j, : switches + 1 - extra]
                cand = src + problem.penalty[i, k]
                dst = new[c:, m:, k, extra:]
                better = cand < dst
                dst[better] = cand[better]
                prev_kind[c:, m:, k, extra:][better] = j
        best = new
        back.append(prev_kind)
    if not np.isfinite(best).any():
        raise S2DiTError(
            "no layout fits the budgets (after rounding each cost up to 1/"
            f"{resolution} of its budget); raise a budget or the resolution"
        )
    c, m, k, s = np.unravel_index(int(np.argmin(best)), best.shape)
    picks = [int(k)]
    for i in range(layers - 1, 0, -1):
        j = int(back[i][c, m, k, s])
        c -= lat[i, k]
        m -= mem[i, k]
        s -= int(j != k)
        k = j
        picks.append(k)
    return _totals(problem, picks[::-1])


def exhaustive(problem: LayoutProblem, resolution: int = 2000) -> LayoutChoice | None:
    """Every layout tried (for tests and small searches), with the same quantised budgets."""
    problem.validate()
    layers, kinds = problem.penalty.shape
    lat, lat_cap = _units(
        np.asarray(problem.latency, np.float64), problem.latency_budget, resolution
    )
    if problem.memory_budget is None:
        mem, mem_cap = np.zeros_like(lat), 0
    else:
        mem, mem_cap = _units(
            np.asarray(problem.memory, np.float64), problem.memory_budget, resolution
        )
    picks = np.array(list(itertools.product(range(kinds), repeat=layers)))  # [K^L, L]
    rows = np.arange(layers)
    ok = (lat[rows, picks].sum(1) <= lat_cap) & (mem[rows, picks].sum(1) <= mem_cap)
    if problem.max_switches is not None:
        ok &= (picks[:, 1:] != picks[:, :-1]).sum(1) <= problem.max_switches
    if not ok.any():
        return None
    penalty = np.where(ok, problem.penalty[rows, picks].sum(1), np.inf)
    return _totals(problem, [int(k) for k in picks[int(np.argmin(penalty))]])
