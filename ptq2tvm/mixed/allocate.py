"""From sensitivities and measured costs to bits per layer: budgets, the ILP's inputs, the plan.

Budgets (``--latency-budget``, ``--size-budget``, ``--bops-budget``): a bare number is a fraction of the uniform
W8A8 figure of the same model (first/last layers included), a number with a unit is absolute: ``ms`` / ``s`` for
latency (predicted .so latency of one batch), ``B`` / ``KB`` / ``MB`` for stored weight bytes (what the .so stores:
<= 4-bit weights two per byte, 2-bit four per byte), ``G`` / ``M`` for BOPs (per image: sum of MACs x
weight bits x activation bits).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import QuantConfigError
from ..frontend.qmodel import QuantConfig
from ..ir.graph import IntegerGraph
from .ilp import smallest_total, solve_allocation
from .latency import LayerCosts
from .layerbits import CANDIDATES, candidate_name
from .sensitivity import SensitivityReport

UNITS = {"latency": {"ms": 1e-3, "s": 1.0, "us": 1e-6},
         "size": {"b": 1.0, "kb": 1e3, "mb": 1e6},
         "bops": {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}}


def parse_budget(kind: str, spec: str | float, w8a8: float) -> float:
    """``'0.8'`` -> 0.8 * w8a8; ``'3.5ms'`` / ``'0.6MB'`` / ``'1.2G'`` -> absolute (seconds, bytes, BOPs)."""
    text = str(spec).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)([a-z]*)", text)
    if not m:
        raise QuantConfigError(f"--{kind}-budget {spec!r}: expected a fraction of W8A8 (e.g. 0.8) or a value with "
                               f"a unit ({', '.join(u for u in UNITS[kind] if u)})")
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        if not 0 < value <= 4:
            raise QuantConfigError(f"--{kind}-budget {spec!r}: a fraction of W8A8 must be in (0, 4]")
        return value * w8a8
    if unit not in UNITS[kind]:
        raise QuantConfigError(f"--{kind}-budget {spec!r}: unknown unit {unit!r}; use one of "
                               f"{', '.join(u for u in UNITS[kind] if u)}")
    return value * UNITS[kind][unit]


def fixed_layers(graph: IntegerGraph) -> tuple[set[str], set[str]]:
    """(first layers: reading the network input, last layers: producing an output through pools/flatten/clamp; one
    per output of a multi-output model)."""
    first = {n.name for n in graph.nodes if n.op in ("conv2d", "dense") and n.inputs[0] == graph.input.name}
    by_name = {n.name: n for n in graph.nodes}
    last: set[str] = set()
    for name in graph.output_names:
        while name in by_name and by_name[name].op in ("maxpool2d", "flatten", "clamp"):
            name = by_name[name].inputs[0]
        if name in by_name and by_name[name].op in ("conv2d", "dense"):
            last.add(name)
    return first, last


#: the unit of each budget kind in a plan's ``budgets`` / ``predicted`` / ``w8a8`` (run.json ``mixed_precision``)
PLAN_UNITS = {"latency": "s", "size": "bytes", "bops": "BOPs"}


@dataclass
class MixedPlan:
    """The chosen bits and what the ILP predicted for them (and for uniform W8A8)."""

    bits: dict[str, list[int]]                 # layer -> [w_bits, a_bits]
    measure: str
    objective: float
    budgets: dict[str, float]
    predicted: dict[str, float]
    w8a8: dict[str, float]
    fixed: list[str] = field(default_factory=list)
    #: the uniform plans that meet the budgets (allocate), measured against this one (pipeline.pick_measured_plan)
    uniform: list["MixedPlan"] = field(default_factory=list, repr=False)
    #: what the measurement found: {plan label: label-free output loss} and the one chosen (pick_measured_plan)
    measured: dict[str, Any] = field(default_factory=dict)

    #: where the plan comes from: "ILP" (allocate's solution) or "uniform W4A8" (one candidate on every free layer)
    source: str = "ILP"

    def label(self) -> str:
        return self.source

    def config(self, base: QuantConfig) -> QuantConfig:
        """``base`` with the plan's per-layer bits (every layer explicit)."""
        d = asdict(base)
        d["layer_w_bits"] = {n: int(b[0]) for n, b in self.bits.items()}
        d["layer_a_bits"] = {n: int(b[1]) for n, b in self.bits.items()}
        return QuantConfig(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        """The plan as run.json records it; ``units`` names the unit of the ``budgets`` / ``predicted`` / ``w8a8``
        figures (latency in seconds, size in bytes with channel padding, BOPs a count)."""
        d = asdict(self)
        d.pop("uniform")
        return dict(d, units=dict(PLAN_UNITS))

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for w, a in self.bits.values():
            counts[f"W{w}A{a}"] = counts.get(f"W{w}A{a}", 0) + 1
        parts = [f"{k} x{v}" for k, v in sorted(counts.items())]
        pred = ", ".join(f"{k} {_value_text(k, v)} ({v / self.w8a8[k]:.2f} of W8A8)"
                         for k, v in self.predicted.items() if self.w8a8.get(k))
        text = f"mixed precision ({self.measure} sensitivity): {', '.join(parts)}; predicted {pred}"
        if self.measured.get("losses"):
            losses = ", ".join(f"{k} {v:.4g}" for k, v in self.measured["losses"].items())
            text += f"\n  measured output loss against FP32 (RTN, {self.measured['images']} images): {losses}"
            if self.measured["chosen"] != "ILP":
                text += (f"; the {self.measured['chosen']} plan fits the budgets and measures better than the "
                         "sensitivity-based one: using it")
        return text


def _value_text(kind: str, v: float) -> str:
    """A predicted budget figure: size in B / kB / MB with channel padding, latency in ms, BOPs as a number."""
    from ..units import size_text

    if kind == "size":
        return f"{size_text(v)} with channel padding"
    if kind == "latency":
        return f"{1e3 * v:.4g} ms"
    return f"{v:.4g}"


def _check_reachable(kind: str, spec: str | float, limit: float, layers_min: float, w8a8: float,
                     constant: float) -> None:
    """Raise QuantConfigError, in the budget's own units, when even the cheapest plan (every free layer at its
    cheapest candidate, the fixed first/last layers at W8A8, plus ``constant``: the latency of the kernels that are
    not conv/linear layers) exceeds ``limit``."""
    reach = layers_min + constant
    if reach <= limit * (1 + 1e-9):
        return
    rel = f" ({reach / w8a8:.2f}x W8A8)" if w8a8 > 0 else ""
    outside = (f"; {_value_text(kind, constant)} of it outside the conv/linear layers, which no bit width changes"
               if constant > 0 else "")
    raise QuantConfigError(f"--{kind}-budget {spec}: no bit allocation fits {_value_text(kind, limit)}"
                           + (f" ({limit / w8a8:.2f}x W8A8)" if w8a8 > 0 else "")
                           + f"; the cheapest plan is predicted at {_value_text(kind, reach)}{rel}{outside}")


def cost_matrices(costs: LayerCosts, layers: list[str], candidates: list[tuple[int, int]],
                  timed: bool) -> dict[str, np.ndarray]:
    """(L, C) cost per budget kind: latency seconds (only if ``timed``), stored bytes, BOPs per image."""
    out = {"size": np.array([[costs.stored_bytes[n][costs.storage(w)] for w, _ in candidates] for n in layers],
                            dtype=np.float64),
           "bops": np.array([[costs.macs[n] * w * a for w, a in candidates] for n in layers], dtype=np.float64)}
    if timed:
        out["latency"] = np.array([[costs.seconds[n][costs.timing(w, a)] for w, a in candidates] for n in layers])
    return out


def check_budgets(costs: LayerCosts, graph: IntegerGraph, budgets: dict[str, str | float],
                  first_last_8bit: bool = True, candidates: Sequence[tuple[int, int]] = CANDIDATES) -> None:
    """Raise QuantConfigError when a budget is out of reach whatever the sensitivities: even with every free layer at
    its cheapest candidate (and, with ``first_last_8bit``, the first/last layers at W8A8) the W8A8 fold's ``costs``
    exceed it; also for an unknown budget kind, a malformed budget, or a latency budget without measured latencies.
    The costs alone decide, so :func:`ptq2tvm.mixed.pipeline.plan_mixed_precision` checks this before the
    sensitivity pass; :func:`allocate` checks again with the candidates the sensitivity allows."""
    bad = set(budgets) - set(UNITS)
    if bad or not budgets:
        raise QuantConfigError(f"budgets must be some of {', '.join(UNITS)}; got {sorted(budgets) or 'none'}")
    layers = [n.name for n in graph.nodes if n.op in ("conv2d", "dense") and n.name in costs.stored_bytes]
    cands = [tuple(c) for c in candidates]
    if (8, 8) not in cands:
        raise QuantConfigError("the candidates must include W8A8 (the reference of the budgets)")
    timed = all(costs.seconds.get(n) for n in layers)
    if "latency" in budgets and not timed:
        raise QuantConfigError("a latency budget needs measured per-layer latencies (measure_layer_costs)")
    mats = cost_matrices(costs, layers, cands, timed)
    ref = cands.index((8, 8))
    allowed = np.ones((len(layers), len(cands)), dtype=bool)
    if first_last_8bit:
        first, last = fixed_layers(graph)
        for i, n in enumerate(layers):
            if n in first | last:
                allowed[i, :] = False
                allowed[i, ref] = True
    for k, spec in budgets.items():
        constant = costs.constant_seconds if k == "latency" else 0.0
        w8a8 = float(mats[k][:, ref].sum()) + constant
        _check_reachable(k, spec, parse_budget(k, spec, w8a8), smallest_total(mats[k], allowed), w8a8, constant)


def allocate(report: SensitivityReport, costs: LayerCosts, graph: IntegerGraph, budgets: dict[str, str | float],
             measure: str = "hessian", first_last_8bit: bool = True) -> MixedPlan:
    """Solve the ILP (:mod:`ptq2tvm.mixed.ilp`) for ``budgets`` (kind -> spec, see the module docstring).

    ``graph``: any integer graph of the model (gives the first/last layers). With ``first_last_8bit`` those layers
    are fixed at W8A8. Layers reading the same tensor get the same activation bits. Raises QuantConfigError for an
    unknown budget kind, a budget no allocation meets, or a latency budget without measured latencies.
    """
    if measure not in ("hessian", "output"):
        raise QuantConfigError(f"sensitivity measure must be 'hessian' or 'output', got {measure!r}")
    bad = set(budgets) - set(UNITS)
    if bad or not budgets:
        raise QuantConfigError(f"budgets must be some of {', '.join(UNITS)}; got {sorted(budgets) or 'none'}")
    layers = report.layer_names()
    cands = [tuple(c) for c in report.candidates]
    if (8, 8) not in cands:
        raise QuantConfigError("the candidates must include W8A8 (the reference of the budgets)")
    timed = all(costs.seconds[n] for n in layers)
    if "latency" in budgets and not timed:
        raise QuantConfigError("a latency budget needs measured per-layer latencies (measure_layer_costs)")
    mats = cost_matrices(costs, layers, cands, timed)
    ref = cands.index((8, 8))
    w8a8 = {k: float(m[:, ref].sum()) for k, m in mats.items()}
    if "latency" in mats:
        w8a8["latency"] += costs.constant_seconds
    sens = report.matrix(measure).astype(np.float64)
    sens = np.maximum(sens, 0.0)         # a Hutchinson estimate below zero is noise around a PSD trace (Gauss-Newton: >= 0)
    first, last = fixed_layers(graph)
    fixed = sorted((first | last) & set(layers)) if first_last_8bit else []
    for n in fixed:
        i = layers.index(n)
        sens[i, :] = np.nan
        sens[i, ref] = 0.0
    limits = {k: parse_budget(k, v, w8a8[k]) for k, v in budgets.items()}
    for k, limit in limits.items():
        _check_reachable(k, budgets[k], limit, smallest_total(mats[k], np.isfinite(sens)), w8a8[k],
                         costs.constant_seconds if k == "latency" else 0.0)
    if "latency" in limits:
        limits["latency"] -= costs.constant_seconds
    groups: dict[str, list[int]] = {}
    for i, lay in enumerate(report.layers):
        groups.setdefault(lay.input_tensor, []).append(i)
    tied = [g for g in groups.values() if len(g) > 1]
    shown = {k: (v + costs.constant_seconds if k == "latency" else v) for k, v in limits.items()}
    try:
        sol = solve_allocation(sens, {k: mats[k] for k in limits}, limits, a_bits=[a for _, a in cands], tied=tied,
                               layer_names=layers)
    except QuantConfigError as e:
        if len(limits) < 2 or not str(e).startswith("no bit allocation satisfies the budgets"):
            raise
        # each budget alone is reachable (checked above): say so in the budgets' own units, not the solver's
        parts = [f"--{k}-budget {budgets[k]} ({_value_text(k, shown[k])}, {shown[k] / w8a8[k]:.2f}x W8A8)"
                 for k in limits]
        raise QuantConfigError(f"no bit allocation meets {' and '.join(parts)} together (each alone is reachable; "
                               "layers that read the same tensor share activation bits): relax one of them") from e

    def plan(choice: list[int], objective: float, source: str = "ILP") -> MixedPlan:
        bits = {n: list(cands[c]) for n, c in zip(layers, choice)}
        predicted = {k: float(sum(m[i, c] for i, c in enumerate(choice))) for k, m in mats.items()}
        if "latency" in predicted:
            predicted["latency"] += costs.constant_seconds
        return MixedPlan(bits, measure, objective, shown, predicted, w8a8, fixed, source=source)

    best = plan(list(sol.choice), sol.objective)
    # the uniform plans (every free layer at one candidate) that meet every budget, none with both bit widths at or
    # below another's: what a user would try by hand, measured against the ILP's plan (pipeline.pick_measured_plan)
    fits = []
    for c, (w, a) in enumerate(cands):
        choice = [ref if n in fixed else c for n in layers]
        if all(sum(mats[k][i, ch] for i, ch in enumerate(choice)) <= limits[k] * (1 + 1e-9) for k in limits):
            fits.append((w, a, choice))
    best.uniform = [plan(choice, float(np.nansum([sens[i, ch] for i, ch in enumerate(choice)])), f"uniform W{w}A{a}")
                    for w, a, choice in fits
                    if choice != list(sol.choice)
                    and not any((w2 >= w and a2 >= a) and (w2, a2) != (w, a) for w2, a2, _ in fits)]
    return best


__all__ = ["MixedPlan", "allocate", "check_budgets", "cost_matrices", "fixed_layers", "parse_budget"]
