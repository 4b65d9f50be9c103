"""Bit allocation as an integer linear program (HAWQ-V3, Yao et al. 2021, Sec. 3.4 / Eq. 10-13).

One binary variable x[i, c] per layer i and candidate setting c (e.g. W4A8); exactly one candidate per layer:

    minimise    sum_i sum_c  sens[i, c] * x[i, c]
    subject to  sum_c x[i, c] = 1                                   for every layer i
                sum_i sum_c  cost_k[i, c] * x[i, c] <= budget_k     for every budget k (latency, size, BOPs)
                sum_{c: a_c = a} x[i, c] = sum_{c: a_c = a} x[j, c]  for layers i, j reading the same tensor, every a
                x[i, c] = 0                                          where sens[i, c] is NaN (candidate not allowed)

solved exactly with ``scipy.optimize.milp`` (HiGHS branch and bound). Costs are additive per layer; a constant part
(kernels that are not conv/linear layers) is subtracted from the budget by the caller.

The solution does not depend on the units of the sensitivities or the costs. HiGHS stops once its gap is under an
*absolute* 1e-6 and accepts a row ~1e-7 over its limit, so: each budget row is divided by its budget; each
layer's least sensitive candidate is shifted to 0 and the objective divided by its largest coefficient (relative gap
0); when the plan found is under half that coefficient, the candidates above it (which no better plan can hold)
are dropped and the problem solved again at the new scale (Hessian sensitivities of 1e-15..1e-5 otherwise all look
equal); a plan over a budget by more than 1e-9 of it is solved again with the budget tightened; a last pass moves
single layers to less sensitive candidates while every budget and tie holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import QuantConfigError


@dataclass
class Allocation:
    """The solution: ``choice[i]`` is the candidate index of layer i; ``totals[k]`` the summed cost of budget k."""

    choice: list[int]
    objective: float
    totals: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)


def smallest_total(cost: np.ndarray, allowed: np.ndarray) -> float:
    """The smallest total a budget can reach (every layer at its cheapest allowed candidate; ties ignored)."""
    return float(np.where(allowed, cost, np.inf).min(axis=1).sum())


def solve_allocation(sens: np.ndarray, costs: dict[str, np.ndarray], budgets: dict[str, float],
                     a_bits: Sequence[int] | None = None, tied: Sequence[Sequence[int]] = (),
                     layer_names: Sequence[str] | None = None) -> Allocation:
    """Solve the allocation ILP (module docstring).

    ``sens``: (L, C) float, NaN = candidate not allowed for that layer. ``costs[k]``: (L, C) float, same units as
    ``budgets[k]`` (only the budgets given are constrained). ``a_bits``: (C,) activation bits of each candidate;
    ``tied``: groups of layer indices that must get the same activation bits (they read the same tensor).
    Raises QuantConfigError when no allocation fits, naming the budget and the smallest total it could reach.
    """
    sens = np.asarray(sens, dtype=np.float64)
    n_layers, n_cand = sens.shape
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(n_layers)]
    allowed = np.isfinite(sens)
    empty = [names[i] for i in np.nonzero(~allowed.any(axis=1))[0]]
    if empty:
        raise QuantConfigError(f"no allowed candidate for layer(s) {', '.join(empty)}")
    n = n_layers * n_cand
    cost_mats = {k: np.asarray(costs[k], dtype=np.float64) for k in budgets}
    rows, lo, hi = [], [], []
    for i in range(n_layers):                                   # one-hot per layer
        r = np.zeros(n)
        r[i * n_cand:(i + 1) * n_cand] = 1
        rows.append(r), lo.append(1.0), hi.append(1.0)
    budget_rows = []
    for k, budget in budgets.items():
        cost = cost_mats[k]
        if cost.shape != sens.shape:
            raise ValueError(f"cost {k!r} has shape {cost.shape}, expected {sens.shape}")
        if smallest_total(cost, allowed) > budget * (1 + 1e-9):
            raise QuantConfigError(f"no bit allocation fits the {k} budget {budget:.6g}: the smallest reachable "
                                   f"total is {smallest_total(cost, allowed):.6g}")
        # rows in units of the budget: HiGHS's feasibility tolerance is absolute (~1e-7), a real share of a
        # budget of microseconds given in seconds
        unit = max(abs(float(budget)), float(np.abs(np.where(allowed, cost, 0.0)).max()), 1e-300)
        budget_rows.append(len(rows))
        rows.append(np.where(allowed, cost, 0.0).reshape(n) / unit), lo.append(-np.inf), hi.append(budget / unit)
    if tied:
        if a_bits is None:
            raise ValueError("tied layers need the candidates' a_bits")
        a_bits = np.asarray(a_bits)
        for group in tied:
            for i, j in zip(group[:-1], group[1:]):
                for a in np.unique(a_bits)[:-1]:                # the last value follows from the one-hot rows
                    r = np.zeros(n)
                    r[i * n_cand:(i + 1) * n_cand] = a_bits == a
                    r[j * n_cand:(j + 1) * n_cand] -= a_bits == a
                    rows.append(r), lo.append(0.0), hi.append(0.0)
    # each layer's least sensitive candidate at 0 (a constant per layer, since exactly one is chosen): every
    # coefficient >= 0, so a candidate above the best total found cannot be in a better plan
    rel = np.where(allowed, sens - np.where(allowed, sens, np.inf).min(axis=1, keepdims=True), np.inf)

    def fits(ch: list[int]) -> bool:
        return all(cost_mats[k][range(n_layers), ch].sum() <= budgets[k] + 1e-9 * abs(budgets[k]) for k in budgets)

    best, usable = None, allowed.copy()
    for _ in range(8):
        choice = _solve(rel, usable, np.array(rows), lo, hi, budget_rows, fits, n_layers, n_cand)
        if choice is None:
            if best is None:
                raise QuantConfigError(f"no bit allocation satisfies the budgets {budgets} together (with layers "
                                       "that read the same tensor sharing activation bits)")
            break
        obj = float(rel[range(n_layers), choice].sum())
        if best is not None and obj >= best[1]:
            break
        best = (choice, obj)
        scale = float(rel[usable].max())
        if obj == 0.0 or obj > 0.5 * scale:       # the 1e-6 gap is < 2e-6 of this objective: optimal enough
            break
        usable = usable & (rel <= obj)          # refine: only candidates that can be in a plan this good
    choice = _improve_locally(best[0], sens, cost_mats, budgets, None if a_bits is None else np.asarray(a_bits), tied)
    totals = {k: float(sum(np.asarray(costs[k])[i, ch] for i, ch in enumerate(choice))) for k in budgets}
    obj = float(sum(sens[i, ch] for i, ch in enumerate(choice)))
    return Allocation(choice, obj, totals, dict(budgets))


def _solve(rel: np.ndarray, usable: np.ndarray, rows: np.ndarray, lo: list[float], hi: list[float],
           budget_rows: list[int], fits: Callable[[list[int]], bool], n_layers: int,
           n_cand: int) -> list[int] | None:
    """One HiGHS solve over the ``usable`` candidates, objective ``rel`` scaled to its largest usable coefficient,
    relative gap 0. A plan over a budget by more than 1e-9 of it (HiGHS accepts rows ~1e-7 over their limit) is
    solved again with the budget rows tightened; None when infeasible."""
    n = n_layers * n_cand
    c = np.where(usable, rel, 0.0).reshape(n)
    scale = float(c.max()) if n else 0.0
    hi = np.array(hi, dtype=np.float64)
    for tighten in (0.0, 1e-7, 1e-6, 1e-5):
        h = hi.copy()
        h[budget_rows] -= tighten * np.maximum(np.abs(h[budget_rows]), 1.0)
        res = milp(c / scale if scale > 0 else c, constraints=LinearConstraint(rows, lo, h), integrality=np.ones(n),
                   bounds=Bounds(np.zeros(n), usable.reshape(n).astype(float)), options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        choice = [int(v) for v in np.rint(res.x).reshape(n_layers, n_cand).argmax(axis=1)]
        if fits(choice):
            return choice
    return None


def _improve_locally(choice: list[int], sens: np.ndarray, costs: dict[str, np.ndarray], budgets: dict[str, float],
                     a_bits: np.ndarray | None, tied: Sequence[Sequence[int]]) -> list[int]:
    """Move single layers to a less sensitive allowed candidate while every budget holds; a layer in a ``tied``
    group keeps its activation bits. Each move lowers the objective, so the loop ends; it only removes what the
    solver's absolute gap left (see the module docstring)."""
    choice = list(choice)
    in_group = {i for g in tied for i in g}
    totals = {k: float(sum(costs[k][i, ch] for i, ch in enumerate(choice))) for k in budgets}
    improved = True
    while improved:
        improved = False
        for i, cur in enumerate(choice):
            for cand in np.argsort(np.where(np.isfinite(sens[i]), sens[i], np.inf)):
                cand = int(cand)
                if not np.isfinite(sens[i, cand]) or sens[i, cand] >= sens[i, cur]:
                    break
                if i in in_group and a_bits is not None and a_bits[cand] != a_bits[cur]:
                    continue
                new = {k: totals[k] - costs[k][i, cur] + costs[k][i, cand] for k in budgets}
                if all(new[k] <= budgets[k] + 1e-9 * abs(budgets[k]) for k in budgets):
                    choice[i], totals, improved = cand, new, True
                    break
    return choice


__all__ = ["Allocation", "smallest_total", "solve_allocation"]
