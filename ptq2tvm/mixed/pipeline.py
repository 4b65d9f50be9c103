"""The mixed-precision pipeline behind ``ptq2tvm quantize --mixed-precision`` and ``ptq2tvm sensitivity``:
sensitivity (cached), per-layer costs of a W8A8 fold (kernel times cached), the ILP, the plan - all kept in the run
directory: ``sensitivity.json`` + ``sensitivity.png``, ``layer_costs.json``, ``latency_cache.json``,
``mixed_precision.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn as nn

from ..atomic import write_json
from ..fold.fold import fold_to_integer
from ..frontend.calibrate import quantize_rtn
from ..frontend.qmodel import QuantConfig
from ..ir.graph import IntegerGraph
from .allocate import MixedPlan, allocate, check_budgets
from .latency import LayerCosts, measure_layer_costs
from .sensitivity import SensitivityReport, analyze_sensitivity, plot_sensitivity

SENSITIVITY_FILE, COSTS_FILE, KERNEL_CACHE, PLAN_FILE = ("sensitivity.json", "layer_costs.json",
                                                         "latency_cache.json", "mixed_precision.json")


def run_sensitivity(model: nn.Module, images: np.ndarray, run_dir: str | Path, samples: int = 32,
                    max_images: int = 256, seed: int = 0, config: QuantConfig | None = None,
                    progress: bool = True, estimator: str = "gauss-newton") -> SensitivityReport:
    """Sensitivity of every layer (reused from ``run_dir/sensitivity.json`` when its key matches) + the PNG."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rep = analyze_sensitivity(model, images, hutchinson_samples=samples, seed=seed, max_images=max_images,
                              config=config, progress=progress, cache=run_dir / SENSITIVITY_FILE,
                              estimator=estimator)
    rep.save(run_dir / SENSITIVITY_FILE)
    plot_sensitivity(rep, run_dir / "sensitivity.png")
    return rep


def run_layer_costs(graph: IntegerGraph, run_dir: str | Path, batch: int = 1, timed: bool = True,
                    progress: bool = True) -> LayerCosts:
    """Per-layer costs of ``graph`` (kernel times cached in ``run_dir/latency_cache.json``), saved as
    ``run_dir/layer_costs.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    costs = measure_layer_costs(graph, batch=batch, cache=run_dir / KERNEL_CACHE, progress=progress, timed=timed)
    write_json(run_dir / COSTS_FILE, costs.to_dict())
    return costs


def plan_mixed_precision(model: nn.Module, images: np.ndarray, config: QuantConfig, budgets: dict[str, str],
                         run_dir: str | Path, measure: str = "hessian", samples: int = 32, max_images: int = 256,
                         batch: int = 1, seed: int = 0, progress: bool = True,
                         estimator: str = "gauss-newton") -> MixedPlan:
    """Costs of the W8A8 fold, sensitivity, ILP -> the plan (also saved as ``run_dir/mixed_precision.json``).
    Latencies are measured only for a latency budget. Raises QuantConfigError when no allocation fits: a budget
    that even the cheapest bits exceed is refused from the costs alone (:func:`ptq2tvm.mixed.allocate.check_budgets`),
    before the sensitivity pass and before anything is written for a size / BOPs budget (a latency budget first
    times the kernels, cached in ``run_dir/latency_cache.json``)."""
    ref = QuantConfig(w_bits=8, a_bits=8, first_last_8bit=config.first_last_8bit, weight_lp=config.weight_lp,
                      act_lp=config.act_lp)
    graph = fold_to_integer(quantize_rtn(model, images, ref, progress=progress))
    run_dir = Path(run_dir)
    timed = "latency" in budgets
    if timed:                                       # kernel times are cached in the run directory
        run_dir.mkdir(parents=True, exist_ok=True)
    costs = measure_layer_costs(graph, batch=batch, cache=run_dir / KERNEL_CACHE if timed else None,
                                progress=progress, timed=timed)
    check_budgets(costs, graph, budgets, config.first_last_8bit)      # before the expensive sensitivity pass
    rep = run_sensitivity(model, images, run_dir, samples, max_images, seed, config, progress, estimator)
    write_json(run_dir / COSTS_FILE, costs.to_dict())
    plan = allocate(rep, costs, graph, budgets, measure, config.first_last_8bit)
    plan = pick_measured_plan(model, images[:max_images], config, plan, progress)
    write_json(Path(run_dir) / PLAN_FILE, plan.to_dict())
    return plan


#: images the plans are measured on (the first of the calibration images)
MEASURE_IMAGES = 128


def pick_measured_plan(model: nn.Module, images: np.ndarray, config: QuantConfig, plan: MixedPlan,
                       progress: bool = False) -> MixedPlan:
    """The ILP's ``plan`` or one of its ``uniform`` alternatives (every free layer at one candidate, meeting the same
    budgets), whichever has the lowest measured label-free output loss against FP32 (the sensitivity's loss: KL of
    the softmax for class scores, half the MSE per element for other outputs) after RTN calibration on the first
    :data:`MEASURE_IMAGES` of ``images``. The sensitivity is a second-order estimate per layer; at 2 bits it can
    miss by far (a user's two-head model: the ILP's W2 on its largest conv measured 61% top-1, uniform W4A8 79%),
    and a plan worse than what a user would try by hand is not a plan. The result records the losses in
    ``measured``; ``progress`` says on stderr what is measured."""
    import torch

    from ..model_outputs import flatten_outputs, squashed_outputs
    from .sensitivity import is_logits_shape, output_loss

    if not plan.uniform:
        return plan
    x = torch.from_numpy(np.ascontiguousarray(images[:MEASURE_IMAGES]))
    if progress:
        import sys

        print(f"measuring the ILP's plan against {len(plan.uniform)} uniform plan(s) that fit the budgets "
              f"({', '.join(u.label() for u in plan.uniform)}): RTN on {len(x)} images each", file=sys.stderr)
    with torch.no_grad():
        targets = [t.float() for t in flatten_outputs(model.eval()(x))[0]]       # graph order
    losses: dict[str, float] = {}
    for cand in [plan, *plan.uniform]:
        qm = quantize_rtn(model, x.numpy(), cand.config(config), progress=False)
        logits = [is_logits_shape(t) and not sq for t, sq in zip(targets, squashed_outputs(qm.graph))]
        with torch.no_grad():
            env = qm(x, return_all=True)
            outs = [env[o] for o in qm.graph.output_names]
            losses[cand.label()] = float(sum(output_loss(y, lg, t) for y, t, lg in zip(outs, targets, logits)))
    chosen = min([plan, *plan.uniform], key=lambda c: losses[c.label()])
    chosen.measured = dict(images=int(len(x)), losses=losses, chosen=chosen.label())
    return chosen


__all__ = ["MEASURE_IMAGES", "pick_measured_plan", "plan_mixed_precision", "run_layer_costs", "run_sensitivity"]
