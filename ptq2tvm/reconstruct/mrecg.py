"""MRECG (Ma et al., CVPR 2023): mixed reconstruction granularity.

Start from the block units of the traced graph (stem, blocks, head, classifier: any model, no node names), give each
a capacity metric CM_l, and jointly reconstruct the adjacent pairs with the largest squared capacity difference:

- data-free ModCap (Eq. 3): CM = SUM over the unit's conv/linear layers of params(W_i) * b_i * alpha_i, with b_i the
  layer's weight bits and alpha_i = 1.6 for a layer with stride 2 (any stride > 1), else 1;
- data-dependent loss metric: CM = the unit's reconstruction loss after a probe reconstruction pass (block units,
  ``mrecg_probe_iters`` iterations per unit, on a copy of the model);
- Eq. 4: minimise SUM_l (CM_l - CM_{l+1})^2 m_l + lambda (m.1 - k)^2 over binary m; for a large lambda the solution
  is the top-k squared adjacent differences: m_l = 1 merges unit l with unit l+1. Selected pairs that overlap
  (l and l+1 both chosen) chain into one group of three or more units.

Default k = max(1, round((L - 1) / 4)) for L units (R18: 10 units -> 2 merges, R50: 18 -> 4, MBV2: 20 -> 5; the
paper used 2 / 4 / 7). MRECG's expanded calibration batch is ``ReconSettings.expand_batch`` (batch_size x factor).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch

from ..frontend.qmodel import QuantModel
from .units import Unit, block_units


def layer_modcap(qm: QuantModel, name: str, alpha: float = 1.6) -> float:
    """params(W) * bits * alpha (alpha for stride > 1)."""
    layer = qm.layer(name)
    stride = layer.attrs.get("stride", (1, 1)) if layer.op == "conv" else (1, 1)
    a = alpha if max(stride) > 1 else 1.0
    return float(layer.weight.numel() * layer.wq.bits * a)


def modcap(qm: QuantModel, unit: Unit, alpha: float = 1.6) -> float:
    """ModCap of a unit (Eq. 3)."""
    return sum(layer_modcap(qm, n, alpha) for n in unit.layers)


def default_k(n_units: int) -> int:
    return max(1, round((n_units - 1) / 4)) if n_units > 1 else 0


def top_k_pairs(capacities: list[float], k: int) -> tuple[list[float], list[int]]:
    """Squared adjacent differences and the indices l of the k largest (ties: the earlier pair)."""
    diffs = [(capacities[i] - capacities[i + 1]) ** 2 for i in range(len(capacities) - 1)]
    k = max(0, min(k, len(diffs)))
    order = sorted(range(len(diffs)), key=lambda i: (-diffs[i], i))
    return diffs, sorted(order[:k])


def groups_from_pairs(names: list[str], pairs: list[int]) -> list[list[str]]:
    sel, out, i = set(pairs), [], 0
    while i < len(names):
        j = i
        while j in sel and j + 1 < len(names):
            j += 1
        out.append(names[i:j + 1])
        i = j + 1
    return out


def loss_metric(qm: QuantModel, fp: QuantModel, images: torch.Tensor, units: list[Unit], settings: Any, lam: float,
                stage_list: list, progress: bool) -> tuple[list[float], dict[str, Any]]:
    """Per-unit reconstruction loss of a probe reconstruction on a copy of ``qm``."""
    from .recon import ReconReport, run_stages

    probe_iters = settings.mrecg_probe_iters or settings.iters
    stages = [dataclasses.replace(s, iters=max(1, min(s.iters, probe_iters))) for s in stage_list]
    probe = copy.deepcopy(qm)
    rep = ReconReport(settings.method, "block", settings.adaqtransform, {})
    run_stages(probe, fp, images, units, settings, lam, rep, progress, stages, key_prefix="probe:")
    last = stages[-1].name
    by_unit = {c["unit"]: c["final_loss"] for c in rep.curves.values() if c["stage"] == last}
    return [by_unit[u.name] for u in units], dict(probe_iters=stages[0].iters, probe_iterations=rep.iterations,
                                                 probe_optim_seconds=rep.optim_seconds)


def plan_mrecg(qm: QuantModel, fp: QuantModel, images: torch.Tensor, settings: Any, lam: float, granularity: str,
               stage_list: list, progress: bool) -> dict[str, Any]:
    """Choose the merges. Returns a JSON-able plan (``merged_pairs`` indexes the block units)."""
    t0 = time.perf_counter()
    units = block_units(qm.graph)
    extra: dict[str, Any] = {}
    if granularity == "mrecg-modcap":
        metric = "modcap"
        cms = [modcap(qm, u, settings.mrecg_alpha) for u in units]
    else:
        metric = "loss"
        cms, extra = loss_metric(qm, fp, images, units, settings, lam, stage_list, progress)
    k = settings.mrecg_k if settings.mrecg_k is not None else default_k(len(units))
    diffs, pairs = top_k_pairs(cms, k)
    names = [u.name for u in units]
    return dict(metric=metric, k=k, base_units=names, capacities=cms, diffs=diffs, merged_pairs=pairs,
                groups=groups_from_pairs(names, pairs), seconds=time.perf_counter() - t0, **extra)
