"""MRECG (Ma et al., CVPR 2023): mixed reconstruction granularity.

Base units (``mrecg_base_units``) are the block units of the traced graph (any model, no node names), with the two
fusions the authors' code (MQBench ``extract_block``, which stacks up to three layers of a single-path chain) makes on
MobileNetV2: a single-layer first unit joins the following single-path chain block when the pair has <= 3 weighted
layers (MobileNetV2: stem + first inverted residual), and a single-layer last unit joins a single-layer single-path
unit before it (MobileNetV2: head 1x1 conv + classifier). ResNets are unchanged (stem, blocks, fc).

Three ways to pick which adjacent units are reconstructed jointly (``granularity``):

- ``mrecg-modcap`` (data-free, Eq. 3 and 4): CM_l = SUM over the unit's conv/linear layers of params(W_i) * b_i *
  alpha_i (alpha_i = 1.6 for stride > 1). Normalisation: the pairs are ranked by (log CM_l - log CM_{l+1})^2, i.e. by
  the capacity *ratio*: on raw counts, which grow ~4x per ResNet stage, every top-k difference lands at the deep end
  (ResNet-18: layer4.1 + fc), which is not what the authors merged. The pair holding the last unit is never a
  candidate (the authors never merge it), and ModCap merges pairs only (the paper: a merged pair is no longer
  topologically homogeneous with its neighbours, so no chain): the k best pairs that share no unit. Ties (exact
  capacity ratios repeat stage after stage) go to the shallower pair. On ResNet-18 this gives the authors' released
  merges exactly (layer1.1 + layer2.0, layer2.1 + layer3.0); on ResNet-50 / MobileNetV2 it cannot, since their lists
  hold triples.
- ``mrecg-loss`` (data-dependent): CM_l = the unit's loss after a probe reconstruction (``mrecg_probe_iters``
  iterations per base unit, on a copy of the model), ranked by squared log differences, the last unit excluded,
  overlapping pairs chain into groups of three or more (the paper's global variant).
- ``mrecg-authors``: the merge lists released with the paper (github bytedance/MRECG configs/qdrop/*_2_4.yaml
  ``scheme``) when the base units have the structure of ResNet-18, ResNet-50 or MobileNetV2 (matched by the sequence of
  unit kinds, any width), else the rule those lists follow: every *transition* unit (stride > 1 or a change of
  channels) is merged with the residual unit before it (never the last unit). The rule reproduces 2 of 2 (ResNet-18,
  where the authors stop at k = 2 of its 3 transitions), 3 of 4 (ResNet-50) and 5 of 7 (MobileNetV2) released merges;
  the rest (layer3.0 + layer3.1 in ResNet-50, IR9 / IR12 heading triples in MobileNetV2) follow no rule visible here.

Default k (``default_k``): the paper's 2 / 4 / 7 for ResNet-18 / ResNet-50 / MobileNetV2 come out of
round(f * (L - 1)) with f = 0.25 (0.4 for networks with depthwise convs, whose oscillation the paper calls more
severe), L base units (10 / 18 / 18). A fit to three numbers, not a law. MRECG's expanded calibration batch is
``ReconSettings.expand_batch`` (batch_size x factor rows per iteration).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch

from ..frontend.graph import FloatGraph
from ..frontend.qmodel import QuantModel
from .units import Unit, _body, _is_weighted, block_units, unit_from_range

#: the authors' released merge schemes (configs/qdrop/{r18,r50,mbv2}_2_4.yaml), as group sizes over the base units,
#: keyed by the base units' kind sequence (S stem, R residual, T transition, C other chain, H head; see unit_kinds)
AUTHORS_SCHEMES: dict[str, tuple[str, list[int]]] = {
    "SRRTRTRTRH": ("resnet18", [1, 1, 2, 2, 1, 1, 1, 1]),
    "STRRTRRRTRRRRRTRRH": ("resnet50", [1, 1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1]),
    "STRTRRTRRRTRRTRRTH": ("mobilenet_v2", [1, 1, 2, 1, 2, 1, 3, 3, 1, 2, 1]),
}


# ---- base units --------------------------------------------------------------------------------------------------
def _single_path(graph: FloatGraph, unit: Unit) -> bool:
    nodes = {n.name: n for n in graph.nodes}
    return not any(nodes[n].op == "add" or nodes[n].residual for n in unit.nodes)


def _span(graph: FloatGraph, units: list[Unit], kind: str = "block") -> Unit:
    index = {n.name: i for i, n in enumerate(_body(graph))}
    return unit_from_range(graph, index[units[0].nodes[0]], index[units[-1].nodes[-1]], kind,
                           name="+".join(u.name for u in units))


def mrecg_base_units(graph: FloatGraph) -> list[Unit]:
    """Block units with the authors' chain fusions (module docstring)."""
    units = block_units(graph)
    if len(units) >= 3 and len(units[0].layers) == 1 and _single_path(graph, units[1]) \
            and len(units[0].layers) + len(units[1].layers) <= 3:
        units = [_span(graph, units[:2])] + units[2:]
    if len(units) >= 3 and len(units[-1].layers) == 1 and len(units[-2].layers) == 1 \
            and _single_path(graph, units[-2]):
        units = units[:-2] + [_span(graph, units[-2:])]
    return units


def _channels(graph: FloatGraph, tensor: str) -> int:
    """Channels of ``tensor``: the out channels of the weighted node it comes from (through weight-free nodes)."""
    while tensor != graph.input_name:
        n = graph.node(tensor)
        if _is_weighted(n):
            return int(n.weight.shape[0])
        tensor = n.inputs[0]
    return int(graph.input_shape[0]) if graph.input_shape else -1


def unit_kinds(graph: FloatGraph, units: list[Unit]) -> str:
    """One letter per unit: S first, H last, T transition (a conv with stride > 1 or a change of channels), R
    residual, C other single-path unit."""
    nodes = {n.name: n for n in graph.nodes}
    out = []
    for i, u in enumerate(units):
        if i == 0:
            out.append("S")
            continue
        if i == len(units) - 1:
            out.append("H")
            continue
        strided = any(max(nodes[n].attrs.get("stride", (1, 1))) > 1 for n in u.layers)   # convs, not pooling
        changed = _channels(graph, u.inputs[0]) != _channels(graph, u.outputs[-1])
        out.append("T" if strided or changed else ("C" if _single_path(graph, u) else "R"))
    return "".join(out)


# ---- metrics -----------------------------------------------------------------------------------------------------
def layer_modcap(qm: QuantModel, name: str, alpha: float = 1.6) -> float:
    """params(W) * bits * alpha (alpha for stride > 1)."""
    layer = qm.layer(name)
    stride = layer.attrs.get("stride", (1, 1)) if layer.op == "conv" else (1, 1)
    a = alpha if max(stride) > 1 else 1.0
    return float(layer.weight.numel() * layer.wq.bits * a)


def modcap(qm: QuantModel, unit: Unit, alpha: float = 1.6) -> float:
    """ModCap of a unit (Eq. 3)."""
    return sum(layer_modcap(qm, n, alpha) for n in unit.layers)


def has_depthwise(graph: FloatGraph) -> bool:
    return any(n.op == "conv" and n.attrs["groups"] > 1 and n.attrs["groups"] == n.weight.shape[0]
               and n.weight.shape[1] == 1 for n in graph.nodes)


def default_k(n_units: int, depthwise: bool = False) -> int:
    """round(f * (L - 1)), f = 0.4 with depthwise convs else 0.25, at least 1 (module docstring)."""
    if n_units <= 2:
        return 1 if n_units == 2 else 0
    return max(1, int(math.floor((0.4 if depthwise else 0.25) * (n_units - 1) + 0.5)))


def log_diffs(capacities: list[float]) -> list[float]:
    """(log CM_l - log CM_{l+1})^2, rounded to 12 significant digits so equal ratios tie exactly."""
    logs = [math.log(max(c, 1e-30)) for c in capacities]
    return [float(f"{(logs[i] - logs[i + 1]) ** 2:.12g}") for i in range(len(logs) - 1)]


def top_k_pairs(diffs: list[float], k: int, exclude_last: bool = True, disjoint: bool = False) -> list[int]:
    """Indices l of the k largest ``diffs`` (l merges unit l with l + 1); ties: the earlier pair. ``exclude_last``:
    never the pair holding the last unit; ``disjoint``: pairs only (no two chosen pairs share a unit)."""
    cand = list(range(len(diffs) - (1 if exclude_last else 0)))
    order = sorted(cand, key=lambda i: (-diffs[i], i))
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= k:
            break
        if disjoint and (i - 1 in chosen or i + 1 in chosen):
            continue
        chosen.append(i)
    return sorted(chosen)


def groups_from_pairs(names: list[str], pairs: list[int]) -> list[list[str]]:
    sel, out, i = set(pairs), [], 0
    while i < len(names):
        j = i
        while j in sel and j + 1 < len(names):
            j += 1
        out.append(names[i:j + 1])
        i = j + 1
    return out


def pairs_from_groups(sizes: list[int]) -> list[int]:
    pairs, i = [], 0
    for s in sizes:
        pairs += list(range(i, i + s - 1))
        i += s
    return pairs


def authors_pairs(graph: FloatGraph, units: list[Unit]) -> tuple[list[int], str]:
    """The authors' released merges when the structure matches one of their networks, else their rule."""
    kinds = unit_kinds(graph, units)
    if kinds in AUTHORS_SCHEMES:
        name, sizes = AUTHORS_SCHEMES[kinds]
        return pairs_from_groups(sizes), f"released list ({name})"
    pairs = [i - 1 for i in range(2, len(units) - 1) if kinds[i] == "T" and kinds[i - 1] == "R"]
    return pairs, "rule: transition unit merged with the residual unit before it"


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
    """Choose the merges. Returns a JSON-able plan (``merged_pairs`` indexes ``mrecg_base_units``)."""
    t0 = time.perf_counter()
    units = mrecg_base_units(qm.graph)
    names = [u.name for u in units]
    extra: dict[str, Any] = dict(kinds=unit_kinds(qm.graph, units))
    k = settings.mrecg_k if settings.mrecg_k is not None else default_k(len(units), has_depthwise(qm.graph))
    cms: list[float] = []
    diffs: list[float] = []
    if granularity == "mrecg-authors":
        metric = "authors"
        pairs, extra["source"] = authors_pairs(qm.graph, units)
        if settings.mrecg_k is not None:
            pairs = pairs[:settings.mrecg_k]
        k = len(pairs)
    else:
        if granularity == "mrecg-modcap":
            metric = "modcap"
            cms = [modcap(qm, u, settings.mrecg_alpha) for u in units]
        else:
            metric = "loss"
            cms, more = loss_metric(qm, fp, images, units, settings, lam, stage_list, progress)
            extra.update(more)
        diffs = log_diffs(cms)
        pairs = top_k_pairs(diffs, k, exclude_last=True, disjoint=(metric == "modcap"))
    return dict(metric=metric, k=k, base_units=names, capacities=cms, diffs=diffs, merged_pairs=pairs,
                groups=groups_from_pairs(names, pairs), seconds=time.perf_counter() - t0, **extra)
