"""Time budget and early stopping for reconstruction.

Time budget (``ReconSettings.time_budget``, seconds; CLI ``--time-budget 10m``): the schedule of a unit (AdaRound's
beta decay and warm-up, the cosine learning rate of the activation steps) is defined over its iteration count, so
the count must be known when the unit starts. Before the first unit, each unit's cost per iteration is measured
(``recon.probe_rates``: a few training steps of every unit on one batch, on a copy of the model). Before every
unit, the remaining wall time (deadline minus now, minus the caching/evaluation overhead of a unit, estimated from
the finished units) is split into the same number of iterations ``x`` for every remaining unit (as the papers give
every unit the same count): ``x = remaining / SUM_remaining(cost_per_iter * stage_share)``, corrected by the ratio
of measured to probed rate of the finished units (the machine's load changes), clamped to ``[min_iters, iters]``.
Each unit also gets a deadline: its cost share of the remaining time (:meth:`BudgetPlanner.unit_deadline`). When the
rate drops inside a unit (the load rises: measured here, a unit ran at 4.5 it/s against 15 probed and left the last
two units 50 iterations each), the unit compresses the rest of its schedule so that it ends by its deadline
(:func:`deadline_rate`) instead of taking the later units' time; the annealing still ends in hard 0/1 roundings.

Early stopping (``ReconSettings.early_stop``): every ``window`` iterations (window = max(50, iters // 20)) after the
warm-up fraction, the loss has *converged* when the mean batch loss of the last window is no more than ``tol``
(0.5%) below the mean of the window before it. Then

- if the rounding is already decided (at most ``EARLY_SOFT_FRACTION`` = 0.1% of the AdaRound variables have h(V)
  strictly between 0 and 1; saturated ones have zero gradient, so hardening gives what more iterations would), or
  the unit learns no rounding, the unit stops;
- otherwise the rest of its schedule (beta decay of the rounding regulariser, cosine LR of the activation steps) is
  compressed into a tail of ``max(2 * window, iters // 10)`` iterations, so the rounding is still annealed to hard
  0/1 decisions, only faster. (Measured on small units: the loss plateaus long before beta reaches its end, while the
  roundings stay soft until the last ~10-20% of the schedule, so stopping on "decided" alone would rarely save time.)

The activation steps and AdaQTransform parameters would still creep in the skipped iterations; the criterion trades
that tail for time (with a time budget, the saved time goes to the later units).
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import QuantConfigError

EARLY_SOFT_FRACTION = 1e-3
EARLY_TOL = 5e-3


def parse_duration(text: str | float | int | None) -> float | None:
    """'10m', '90s', '1.5h', '1h30m', '600' (seconds) -> seconds. None/'' -> None."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        s = str(text).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            v = float(s)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
            if not parts or "".join(f"{a}{b}" for a, b in parts) != re.sub(r"\s+", "", s):
                raise QuantConfigError(f"time budget {text!r}: use e.g. 10m, 90s, 1h30m or seconds")
            v = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
    if not v > 0 or math.isinf(v):
        raise QuantConfigError(f"time budget must be > 0, got {text!r}")
    return v


@dataclass
class BudgetPlanner:
    """Chooses per-unit iteration counts from a deadline and measured per-iteration costs (module docstring)."""

    deadline: float                                  # time.perf_counter() value
    max_iters: int
    min_iters: int
    sec_per_iter: dict[str, float]                   # unit name -> probed seconds per iteration
    overhead: float = 0.0                            # estimated seconds of caching/eval per unit
    correction: list[float] = field(default_factory=list)   # measured / probed, per finished unit
    overheads: list[float] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    warned: bool = False

    def unit_overhead(self) -> float:
        """Seconds of caching/evaluation per unit: the mean over the finished units, else the probe's estimate."""
        return (sum(self.overheads) / len(self.overheads)) if self.overheads else self.overhead

    def iters_for(self, key: str, remaining: list[tuple[str, float]]) -> int:
        """Iterations for the unit ``remaining[0]``; ``remaining``: (unit name, stage share) of it and every later
        unit-pass. Stage share: the pass's iterations relative to ``max_iters`` (BRECQ's activation pass: 1/4)."""
        left = self.deadline - time.perf_counter()
        corr = sorted(self.correction)[len(self.correction) // 2] if self.correction else 1.0
        ov = self.unit_overhead()
        cost = sum(self.sec_per_iter[u] * share for u, share in remaining) * corr
        x = (left - ov * len(remaining)) / cost if cost > 0 else self.max_iters
        share = remaining[0][1]
        n = int(max(self.min_iters, min(self.max_iters * share, math.floor(x * share))))
        floored = x * share < self.min_iters
        self.decisions.append(dict(unit=key, iters=n, seconds_left=round(left, 1), correction=round(corr, 3),
                                   floored=floored))
        if floored and not self.warned:
            self.warned = True
            print(f"time budget: {max(left, 0):.0f} s left for {len(remaining)} unit pass(es) buys fewer than "
                  f"min_iters = {self.min_iters} iterations each (caching/evaluation alone ~{ov:.1f} s per unit); "
                  f"running {self.min_iters}: the budget will be exceeded", file=sys.stderr)
        return max(1, n)

    def unit_deadline(self, remaining: list[tuple[str, float]]) -> float:
        """``time.perf_counter()`` value by which the unit ``remaining[0]`` should end: now + its share of the
        remaining time (net of the per-unit overhead) in proportion to its probed cost."""
        now = time.perf_counter()
        ov = self.unit_overhead()
        costs = [self.sec_per_iter[u] * share for u, share in remaining]
        frac = costs[0] / sum(costs) if sum(costs) > 0 else 1.0 / len(remaining)
        return now + max(0.0, self.deadline - now - ov * len(remaining)) * frac

    def record(self, unit: str, iters: int, optim_seconds: float, seconds: float) -> None:
        if iters > 0 and unit in self.sec_per_iter and self.sec_per_iter[unit] > 0:
            self.correction.append((optim_seconds / iters) / self.sec_per_iter[unit])
        self.overheads.append(max(0.0, seconds - optim_seconds))


def deadline_rate(steps_left: float, sec_per_step: float, seconds_left: float, min_steps: int) -> float | None:
    """Schedule rate (> 1: schedule positions advanced per iteration) that ends a unit's remaining
    ``steps_left`` schedule positions within ``seconds_left`` at ``sec_per_step`` seconds per iteration, never in
    fewer than ``min(min_steps, steps_left)`` iterations; None when the unit already ends in time."""
    if steps_left <= 0 or sec_per_step <= 0:
        return None
    affordable = seconds_left / sec_per_step
    if affordable >= steps_left:
        return None
    r = steps_left / max(1.0, affordable, float(min(min_steps, steps_left)))
    return r if r > 1.0 + 1e-9 else None


class EarlyStop:
    """The convergence test of the module docstring, fed every iteration's batch loss."""

    def __init__(self, iters: int, warmup: float, tol: float = EARLY_TOL, window: int | None = None):
        self.window = window or max(50, iters // 20)
        self.start = int(warmup * iters)
        self.tol = tol
        self.losses: list[float] = []
        self.reason = ""

    def tail(self, iters: int) -> int:
        return max(2 * self.window, iters // 10)

    def update(self, it: int, loss: float, soft_fraction: Callable[[], float]) -> str | None:
        """After iteration ``it``: None (go on), "stop" (converged, rounding decided) or "compress" (converged,
        rounding still soft: finish the schedule in :meth:`tail` iterations)."""
        self.losses.append(loss)
        w = self.window
        if it < self.start or (it + 1) % w or len(self.losses) < 2 * w:
            return None
        last = sum(self.losses[-w:]) / w
        prev = sum(self.losses[-2 * w:-w]) / w
        if last < (1.0 - self.tol) * prev:
            return None
        soft = soft_fraction()
        self.reason = (f"converged at iteration {it + 1}: window mean loss {last:.4g} vs {prev:.4g} before "
                       f"(< {self.tol:.1%} better), {soft:.2%} of the rounding variables soft")
        return "stop" if soft <= EARLY_SOFT_FRACTION else "compress"
