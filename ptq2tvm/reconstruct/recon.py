"""The reconstruction driver: per-unit optimisation over cached unit inputs/targets (AdaRound, BRECQ, QDrop, NWQ-style
network-wise), optionally with MRECG merges and AdaQTransform.

Per unit (see docs/reconstruction.md):

- inputs come from the partly quantized model (every earlier unit already reconstructed and hardened), targets from
  the FP32 (BN-folded) model; both are computed once per unit for all calibration images and kept in memory;
- each iteration samples ``batch_size`` cached rows, runs the unit's nodes and minimises
  rec = SUM over the unit's outputs of mean_over_(N,H,W) SUM_c (y_hat - y)^2  (+ AdaRound's regulariser);
- QDrop: each unit input element is the quantized one with probability p (else the FP one) and every activation
  quantizer of the unit keeps quantization per element with probability p; reset to always-quantize afterwards;
- at the end of the unit the rounding is hardened and baked into the weights, and (with a checkpoint directory) the
  model and the loss curves are saved, so an interrupted run resumes after the last finished unit.

Schedules (``method``):

- ``adaround``: V only (Adam lr_w), activation quantizers on with their calibrated steps (frozen). Layer units.
- ``brecq``: two passes over the network: (1) V with activations unquantized, (2) activation steps only (Adam lr_a =
  4e-4, cosine, ``iters_act`` iterations) with hardened weights. Block units.
- ``qdrop``: one joint pass: V (1e-3) + activation steps (4e-5, cosine, LSQ gradient scale) with drop p = 0.5.
- ``network``: the QDrop joint schedule on one unit: the whole network, loss on the logits only.
- ``nwq``: NWQ (Wang et al. 2022, ``nwq.py``): the whole network with activation regularisation, annealing softmax
  rounding and annealing mixup.
With AdaQTransform on, xi and eta (Adam ``lr_adaq``) are learned in every pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import QuantConfigError
from ..fold.bounds import fit_integer_bounds
from ..frontend.calibrate import quantize_rtn, validate_calibration
from ..frontend.graph import FloatNode
from ..frontend.qmodel import QuantConfig, QuantModel, _key
from ..frontend import fused_quant as _fused
from ..frontend.fused_quant import DropMasks
from .adaq import adaq_params, adaq_summary, project_xi
from .adaround import beta_at, harden_layer, reg_active, round_loss
from .budget import BudgetPlanner, EarlyStop, deadline_rate, parse_duration
from .checkpoint import Checkpoint
from .device import CachePlan, PeakMemory, plan_caches, resolve_device
from .mrecg import mrecg_base_units, plan_mrecg
from .units import Unit, block_units, discover_units, merge_units

METHODS = ("rtn", "adaround", "brecq", "qdrop", "network", "nwq")
GRANULARITIES = ("layer", "block", "mrecg-modcap", "mrecg-loss", "mrecg-authors", "network")
DEFAULT_GRANULARITY = {"rtn": "layer", "adaround": "layer", "brecq": "block", "qdrop": "block", "network": "network",
                       "nwq": "network"}
DEFAULT_LR_A = {"brecq": 4e-4, "qdrop": 4e-5, "network": 4e-5, "nwq": 4e-5}
DEADLINE_CHECK_EVERY = 10                 # iterations between two checks of a unit's time-budget deadline


@dataclass
class ReconSettings:
    """Reconstruction settings. ``None`` fields take the documented per-method default."""

    method: str = "qdrop"                 # rtn | adaround | brecq | qdrop | network | nwq
    granularity: str | None = None        # layer | block | mrecg-modcap | mrecg-loss | mrecg-authors | network
    adaqtransform: bool = False
    iters: int = 20000                    # per unit (per pass)
    iters_act: int | None = None          # BRECQ activation pass (None: iters // 4, i.e. 5k for 20k)
    batch_size: int = 32
    expand_batch: int = 1                 # MRECG's expanded calibration batch: batch_size * expand_batch
    lr_w: float = 1e-3                    # AdaRound V
    lr_a: float | None = None             # activation steps (None: brecq 4e-4, qdrop/network 4e-5)
    lr_adaq: float = 1e-2                 # AdaQTransform xi, eta (benchmarks/results/adaq_lr_sweep*.md)
    lam: float | None = None              # rounding regulariser weight (None: 0.1 with depthwise convs, else 0.01)
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5                # QDrop: probability of KEEPING quantization
    lsq_grad_scale: bool | None = None    # None: on for qdrop/network (QDrop), off for brecq
    mrecg_k: int | None = None            # number of adjacent merges (None: mrecg.default_k, the paper's 2/4/7)
    mrecg_alpha: float = 1.6              # ModCap factor of stride-2 layers
    mrecg_probe_iters: int | None = None  # loss metric: iterations of the probe reconstruction (None: iters)
    nwq_ar_weight: float = 1.0            # NWQ: activation regularisation weight (nwq.py)
    nwq_tau_start: float = 1.0            # NWQ: ASoftmax temperature, geometric from start to end
    nwq_tau_end: float = 0.01
    nwq_mix_start: float = 0.5            # NWQ: AMixup keep-quantized probability, linear from this to 1
    seed: int = 0
    chunk: int = 256                      # rows per forward when caching / evaluating
    log_every: int | None = None          # loss-curve sampling period (None: ~200 points per unit)
    calib_batch_size: int = 64            # RTN calibration batch
    threads: int | None = None            # torch intra-op threads during reconstruction (None: leave as is). On a
    #                                       loaded machine 1 thread can be 10x faster than 2 (spinning OpenMP).
    device: str = "auto"                  # auto (cuda if available) | cpu | cuda | cuda:N (reconstruct/device.py)
    time_budget: float | None = None      # seconds for the whole reconstruction: iterations per unit chosen from
    #                                       measured rates, capped at ``iters`` (reconstruct/budget.py)
    min_iters: int = 50                   # floor of the per-unit iterations a time budget may choose
    early_stop: bool = False              # a unit whose loss converged finishes its schedule in a short tail
    #                                       (or stops when its rounding is already decided); reconstruct/budget.py

    def validate(self) -> "ReconSettings":
        if self.method not in METHODS:
            raise QuantConfigError(f"unknown reconstruction method {self.method!r}; available: {', '.join(METHODS)}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise QuantConfigError(f"unknown granularity {self.granularity!r}; available: {', '.join(GRANULARITIES)}")
        if self.method in ("network", "nwq") and self.granularity not in (None, "network"):
            raise QuantConfigError(f"method '{self.method}' reconstructs the whole network as one unit (granularity "
                                   f"'network'), got granularity {self.granularity!r}")
        for name in ("iters", "batch_size", "expand_batch", "chunk", "min_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QuantConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.iters_act is not None and self.iters_act < 1:
            raise QuantConfigError(f"iters_act must be >= 1, got {self.iters_act!r}")
        if not 0.0 < self.drop_prob <= 1.0:
            raise QuantConfigError(f"drop_prob (probability of keeping quantization) must be in (0, 1], "
                                   f"got {self.drop_prob!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise QuantConfigError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.mrecg_k is not None and self.mrecg_k < 0:
            raise QuantConfigError(f"mrecg_k must be >= 0, got {self.mrecg_k!r}")
        if not 0.0 < self.nwq_tau_end <= self.nwq_tau_start or not 0.0 <= self.nwq_mix_start <= 1.0 \
                or self.nwq_ar_weight < 0:
            raise QuantConfigError(f"NWQ settings: need 0 < nwq_tau_end <= nwq_tau_start, nwq_mix_start in [0, 1], "
                                   f"nwq_ar_weight >= 0; got {self.nwq_tau_start!r}, {self.nwq_tau_end!r}, "
                                   f"{self.nwq_mix_start!r}, {self.nwq_ar_weight!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise QuantConfigError(f"seed must be an integer >= 0 (--seed), got {self.seed!r}")
        for name in ("lr_w", "lr_adaq"):
            if not getattr(self, name) > 0:
                raise QuantConfigError(f"{name} must be > 0")
        resolve_device(self.device)
        if self.time_budget is not None:
            self.time_budget = parse_duration(self.time_budget)
        return self

    @property
    def resolved_granularity(self) -> str:
        return self.granularity or DEFAULT_GRANULARITY[self.method]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stage:
    """One pass over the units."""

    name: str
    learn_w: bool
    learn_a: bool
    acts_on: bool
    drop: float | None
    iters: int
    lr_a: float
    lsq: bool


def stages_for(s: ReconSettings) -> list[Stage]:
    lr_a = s.lr_a if s.lr_a is not None else DEFAULT_LR_A.get(s.method, 4e-5)
    if s.method == "adaround":
        return [Stage("adaround", True, False, True, None, s.iters, lr_a, False)]
    if s.method == "brecq":
        lsq = bool(s.lsq_grad_scale)
        return [Stage("weights", True, False, False, None, s.iters, lr_a, lsq),
                Stage("acts", False, True, True, None, s.iters_act or max(1, s.iters // 4), lr_a, lsq)]
    if s.method in ("qdrop", "network"):
        lsq = True if s.lsq_grad_scale is None else s.lsq_grad_scale
        drop = s.drop_prob if s.drop_prob < 1.0 else None
        return [Stage("joint", True, True, True, drop, s.iters, lr_a, lsq)]
    if s.method == "nwq":
        lsq = True if s.lsq_grad_scale is None else s.lsq_grad_scale
        return [Stage("nwq", True, True, True, None, s.iters, lr_a, lsq)]
    return []


@dataclass
class ReconReport:
    """What a reconstruction did: units, per-unit loss curves, timings."""

    method: str
    granularity: str
    adaqtransform: bool
    settings: dict[str, Any]
    lam: float = 0.0
    units: list[dict[str, Any]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    #: key "stage/unit" -> dict(unit, stage, index, it, rec, reg, beta, initial_loss, final_loss, seconds,
    #: iters, iters_per_s, changed_roundings)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    mrecg: dict[str, Any] | None = None
    seconds: float = 0.0
    rtn_seconds: float = 0.0
    iterations: int = 0
    optim_seconds: float = 0.0
    resumed_units: int = 0
    adaq: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: reconstruct/device.py CachePlan: bytes per unit, peak, where the caches live
    cache_plan: dict[str, Any] = field(default_factory=dict)
    #: time budget: probed seconds per iteration, per-unit decisions (reconstruct/budget.py)
    budget: dict[str, Any] | None = None

    @property
    def iters_per_s(self) -> float:
        return self.iterations / self.optim_seconds if self.optim_seconds > 0 else 0.0

    def final_losses(self, stage: str | None = None) -> dict[str, float]:
        """unit -> final (hardened, full calibration set) loss of ``stage`` (default: the last stage)."""
        stage = stage or (self.stages[-1] if self.stages else None)
        return {c["unit"]: c["final_loss"] for c in self.curves.values() if c["stage"] == stage}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iters_per_s"] = self.iters_per_s
        return d

    def save(self, directory: str | Path, stem: str = "recon_loss") -> tuple[Path, Path | None]:
        """Write ``<stem>.json`` and ``<stem>.png`` (per-unit loss curves) into ``directory``."""
        from .losscurve import save_loss_json, plot_losses

        directory = Path(directory)
        j = save_loss_json(self, directory / f"{stem}.json")
        p = plot_losses(self, directory / f"{stem}.png")
        return j, p


# ---- helpers ---------------------------------------------------------------------------------------------------
def default_lambda(qm: QuantModel) -> float:
    """0.1 for MobileNet-like models (any depthwise conv), 0.01 otherwise (ResNet-like)."""
    for n in qm.graph.nodes:
        if n.op == "conv" and n.attrs["groups"] > 1 and n.attrs["groups"] == n.weight.shape[0] \
                and n.weight.shape[1] == 1:
            return 0.1
    return 0.01


_LEGACY = False


@contextlib.contextmanager
def legacy_code_path(on: bool = True):
    """Run the reconstruction loop as before the speed work (plain autograd activation quantizers, torch.clamp
    activations, torch.rand + torch.where QDrop masks, pow loss): what ``benchmarks/recon_speed.py`` compares against, in one process."""
    global _LEGACY
    old = (_LEGACY, _fused.ENABLED)
    _LEGACY, _fused.ENABLED = on, not on
    try:
        yield
    finally:
        _LEGACY, _fused.ENABLED = old


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the batch and spatial positions."""
    if not _LEGACY:      # the same quantity through one native op (fewer passes forward and backward)
        return F.mse_loss(pred, tgt, reduction="sum") / (pred.numel() // pred.shape[1] if pred.dim() > 1
                                                         else pred.numel())
    d = (pred - tgt).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def qdrop_mix(xq: torch.Tensor, xf: torch.Tensor, p: float, gen: torch.Generator | DropMasks | None = None
              ) -> torch.Tensor:
    """QDrop at the unit input: each element is the quantized one with probability ``p``, else the FP one.
    ``gen``: a :class:`DropMasks` (fast path: exact float select, no torch.where) or a torch.Generator."""
    if isinstance(gen, DropMasks):
        keep, drop = gen.masks(xq.shape, p, xq)
        return torch.addcmul(xq * keep, xf, drop)
    # drawn where the generator lives (a CPU generator gives the same masks whatever device the unit runs on)
    where = gen.device if gen is not None else xq.device
    keep = torch.rand(xq.shape, generator=gen, device=where).to(xq.device) < p
    return torch.where(keep, xq, xf)


def _seed_for(seed: int, *parts: Any) -> int:
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:7], "little")


class UnitRunner:
    """Executes unit node ranges of a QuantModel on dicts of tensors. ``run_all`` moves each chunk of the (cached)
    tensors to ``device`` and the results to ``out_device`` (pinned when ``pin``)."""

    def __init__(self, qm: QuantModel, device: torch.device | None = None, out_device: torch.device | None = None,
                 pin: bool = False):
        self.qm = qm
        self.nodes: dict[str, FloatNode] = {n.name: n for n in qm.graph.nodes}
        self.device, self.out_device, self.pin = device, out_device, pin

    def run(self, unit: Unit, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = dict(env)
        for name in unit.nodes:
            env[name] = self.qm._run_node(self.nodes[name], env)
        return env

    @torch.no_grad()
    def run_all(self, unit: Unit, live: dict[str, torch.Tensor], chunk: int, keep: list[str]
                ) -> dict[str, torch.Tensor]:
        n = next(iter(live.values())).shape[0]
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
        for i in range(0, n, chunk):
            env = self.run(unit, {t: _to(live[t][i:i + chunk], self.device) for t in unit.inputs})
            for k in keep:
                outs[k].append(_to(env[k], self.out_device))
        res = {k: torch.cat(v) for k, v in outs.items()}
        return {k: v.pin_memory() for k, v in res.items()} if self.pin else res


def _rows(cache: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cache[idx]`` (index_select: ~3x faster than advanced indexing on the CPU) gathered where the cache lives,
    then moved to ``device``. Legacy path: advanced indexing, as before."""
    if _LEGACY:
        return _to(cache[idx], device)
    if idx.device != cache.device:
        idx = idx.to(cache.device, non_blocking=True)
    return _to(cache.index_select(0, idx), device)


def _to(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return x if device is None or x.device == device else x.to(device, non_blocking=True)


class Stream:
    """The live tensors at a unit boundary, for the quantized model (``q``) and the FP model (``f``)."""

    def __init__(self, qm: QuantModel, fp: QuantModel, images: torch.Tensor, acts_on: bool, chunk: int,
                 device: torch.device | None = None, cache_device: torch.device | None = None, pin: bool = False):
        self.q_run = UnitRunner(qm, device, cache_device, pin)
        self.f_run = UnitRunner(fp, device, cache_device, pin)
        self.qm, self.chunk = qm, chunk
        g = qm.graph
        xq = qm.act_quant[_key(g.input_name)]
        with torch.no_grad():
            if acts_on:
                parts = [_to(xq(_to(images[i:i + chunk], device)), cache_device)
                         for i in range(0, images.shape[0], chunk)]
                q_img = torch.cat(parts)
                self.q = {g.input_name: q_img.pin_memory() if pin else q_img}
            else:
                self.q = {g.input_name: images.clone().pin_memory() if pin else images.clone()}
        self.f = {g.input_name: images}

    def targets(self, unit: Unit) -> dict[str, torch.Tensor]:
        return self.f_run.run_all(unit, self.f, self.chunk, unit.outputs)

    def advance(self, unit: Unit, later_inputs: set[str], fp_out: dict[str, torch.Tensor] | None = None) -> None:
        """Run ``unit`` on the live tensors (quantized model in its current state, FP model) and move past it."""
        q_out = self.q_run.run_all(unit, self.q, self.chunk, unit.outputs)
        f_out = fp_out if fp_out is not None else self.f_run.run_all(unit, self.f, self.chunk, unit.outputs)
        self.q.update(q_out)
        self.f.update(f_out)
        for d in (self.q, self.f):
            for k in list(d):
                if k not in later_inputs:
                    del d[k]


def _later_inputs(units: list[Unit], i: int) -> set[str]:
    return {t for u in units[i + 1:] for t in u.inputs}


def _unit_act_quantizers(qm: QuantModel, unit: Unit) -> list:
    pts = set(qm.quant_points()) - {qm.graph.input_name}
    return [qm.act_quant[_key(n)] for n in unit.nodes if n in pts]


# ---- one unit --------------------------------------------------------------------------------------------------
def _eval_loss(runner: UnitRunner, unit: Unit, live: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
               chunk: int) -> float:
    out = runner.run_all(unit, live, chunk, unit.targets)
    n = next(iter(tgt.values())).shape[0]
    return float(sum(lp_loss(out[t], tgt[t]) for t in unit.targets)) if n else 0.0


def _soft_fraction(layers: list) -> float:
    """Fraction of AdaRound variables whose h(V) is strictly between 0 and 1 (not yet decided)."""
    soft = total = 0
    with torch.no_grad():
        for layer in layers:
            if layer.wq.alpha is not None:
                h = layer.wq.h()
                soft += int(((h > 0) & (h < 1)).sum())
                total += h.numel()
    return soft / total if total else 0.0


def optimize_unit(qm: QuantModel, unit: Unit, stage: Stage, settings: ReconSettings, lam: float,
                  q_in: dict[str, torch.Tensor], f_in: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                  seed: int, progress: bool = False, desc: str = "", device: torch.device | None = None,
                  deadline: float | None = None) -> dict[str, Any]:
    """Reconstruct one unit in place (hardening its weights at the end). Returns its loss curve and timings.

    ``deadline`` (a ``time.perf_counter()`` value; time budget): when the measured rate says the unit would end
    later, the rest of its schedule is compressed to end by then (:func:`budget.deadline_rate`; at least
    ``settings.min_iters`` more iterations), so a slowdown inside one unit does not eat the later units' time.

    ``q_in``/``f_in``/``tgt`` may live on another device than ``device`` (pinned host caches): each iteration's
    rows are gathered where they live and copied to ``device``."""
    device = device or torch.device("cpu")
    runner = UnitRunner(qm, device, device)
    layers = [qm.layer(name) for name in unit.layers]
    aqs = [q for q in _unit_act_quantizers(qm, unit) if q.enabled] if stage.learn_a else []
    peak = PeakMemory(device)
    peak.reset()
    t_start = time.perf_counter()
    initial = _eval_loss(runner, unit, q_in, tgt, settings.chunk)

    gen = torch.Generator().manual_seed(seed)
    masks: torch.Generator | DropMasks = gen if _LEGACY else DropMasks(seed)
    groups = []
    if stage.learn_w:
        vs = [layer.wq.init_adaround(layer.weight) for layer in layers]
        if vs:
            groups.append(dict(params=vs, lr=settings.lr_w))
    ad = adaq_params(layers)
    for p in ad:
        p.requires_grad_(True)
    if ad:
        groups.append(dict(params=ad, lr=settings.lr_adaq))
    opt = torch.optim.Adam(groups) if groups else None
    opt_a = sched_a = None
    if aqs:
        for q in aqs:
            q.scale.requires_grad_(True)
        opt_a = torch.optim.Adam([q.scale for q in aqs], lr=stage.lr_a)
        sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=stage.iters, eta_min=0.0)
    all_aqs = _unit_act_quantizers(qm, unit)
    for q in all_aqs:
        q.lsq_grad_scale = stage.lsq and stage.learn_a
        if stage.drop is not None:
            q.drop_prob, q.drop_generator = stage.drop, masks

    n_rows = next(iter(q_in.values())).shape[0]
    bs = min(settings.batch_size * settings.expand_batch, n_rows)
    log_every = settings.log_every or max(1, stage.iters // 200)
    curve: dict[str, list] = dict(it=[], rec=[], reg=[], beta=[])
    stopper = EarlyStop(stage.iters, settings.warmup) if settings.early_stop else None
    T = stage.iters
    pos, rate, lr_debt = 0.0, 1.0, 0.0          # schedule position (rate > 1 after an early-stop compression)
    deadline_note = ""
    ran = 0
    t_opt = time.perf_counter()
    bar = tqdm(total=T, desc=desc, disable=not progress, leave=False)
    try:
        while pos <= T - 1 + 1e-9:
            it = ran
            sp = min(pos, T - 1)
            idx = torch.randperm(n_rows, generator=gen)[:bs]
            env = {}
            for t in unit.inputs:
                x = _rows(q_in[t], idx, device)
                env[t] = x if stage.drop is None else qdrop_mix(x, _rows(f_in[t], idx, device), stage.drop, masks)
            env = runner.run(unit, env)
            rec = sum(lp_loss(env[t], _rows(tgt[t], idx, device)) for t in unit.targets)
            reg = (round_loss(layers, sp, T, lam, settings.warmup, settings.beta_start, settings.beta_end)
                   if stage.learn_w else torch.zeros(()))
            loss = rec + reg
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            if opt_a is not None:
                opt_a.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            if opt is not None:
                opt.step()
                project_xi(layers)
            if opt_a is not None:
                opt_a.step()
                lr_debt += rate
                while lr_debt >= 1.0 - 1e-9:       # the cosine schedule follows the (possibly compressed) position
                    sched_a.step()
                    lr_debt -= 1.0
                with torch.no_grad():
                    for q in aqs:
                        q.scale.clamp_(min=1e-8)
            ran = it + 1
            pos += rate
            bar.update(1)
            last = pos > T - 1 + 1e-9
            action = (stopper.update(it, float(rec.detach()), lambda: _soft_fraction(layers))
                      if stopper is not None and rate == 1.0 else None)
            if action == "compress":
                tail = stopper.tail(T)
                if T - 1 - pos > tail:
                    rate = (T - 1 - pos) / tail
                    stopper.reason += f"; annealing compressed into the next {tail} iterations"
                else:
                    stopper.reason = ""
            if it % log_every == 0 or last or action == "stop":
                curve["it"].append(it)
                curve["rec"].append(float(rec.detach()))
                curve["reg"].append(float(reg.detach()))
                curve["beta"].append(beta_at(sp, T, settings.warmup, settings.beta_start, settings.beta_end)
                                     if reg_active(sp, T, settings.warmup) else None)
            if deadline is not None and not last and ran % DEADLINE_CHECK_EVERY == 0:
                now = time.perf_counter()
                r = deadline_rate((T - 1 - pos) / rate, (now - t_opt) / ran, deadline - now, settings.min_iters)
                if r is not None:
                    rate *= r
                    deadline_note = (f"time budget: schedule compressed {rate:.2f}x at iteration {ran} to end by the "
                                     "unit's deadline")
            if action == "stop":
                break
    finally:
        bar.close()
        t_opt = time.perf_counter() - t_opt
        for q in all_aqs:            # QDrop reset: always quantize again
            q.drop_prob, q.drop_generator, q.lsq_grad_scale = None, None, False
        for q in aqs:
            q.scale.requires_grad_(False)
        for p in ad:
            p.requires_grad_(False)
    changed = sum(harden_layer(layer) for layer in layers)
    final = _eval_loss(runner, unit, q_in, tgt, settings.chunk)
    res = dict(unit=unit.name, stage=stage.name, **curve, initial_loss=initial, final_loss=final,
               iters=ran, planned_iters=stage.iters, optim_seconds=t_opt, seconds=time.perf_counter() - t_start,
               iters_per_s=ran / t_opt if t_opt > 0 else 0.0, changed_roundings=changed, batch_size=bs,
               device=str(device), **peak.read())
    if stopper is not None and stopper.reason:
        res["early_stop"] = stopper.reason
    if deadline_note:
        res["deadline"] = deadline_note
    return res


# ---- driver ----------------------------------------------------------------------------------------------------
def _set_quant_stage(qm: QuantModel, acts_on: bool) -> None:
    qm.set_quant(weights=True, acts=acts_on)


def run_stages(qm: QuantModel, fp: QuantModel, images: torch.Tensor, units: list[Unit], settings: ReconSettings,
               lam: float, report: ReconReport, progress: bool, stage_list: list[Stage],
               done: set[str] | None = None, on_unit_end: Callable[[str, dict], None] | None = None,
               key_prefix: str = "", planner: BudgetPlanner | None = None) -> None:
    """Run every stage over ``units``; skip the "stage/unit" keys in ``done`` (resume).

    The compute device is the model's; the caches live where ``images`` lives (pinned host memory when
    ``images`` is pinned and the model is on a GPU). With a ``planner`` (time budget) each unit's iterations are
    chosen just before it starts."""
    done = done or set()
    device = next(qm.parameters()).device
    cache_device, pin = images.device, bool(images.device.type == "cpu" and device.type != "cpu"
                                           and images.is_pinned())
    todo = [(stage.name, u.name, stage.iters / max(1, settings.iters)) for stage in stage_list for u in units
            if f"{key_prefix}{stage.name}/{u.name}" not in done]
    for si, stage in enumerate(stage_list):
        _set_quant_stage(qm, stage.acts_on)
        stream = Stream(qm, fp, images, stage.acts_on, settings.chunk, device, cache_device, pin)
        bar = tqdm(units, desc=f"{key_prefix}{stage.name}", disable=not progress, leave=False)
        for ui, unit in enumerate(bar):
            key = f"{key_prefix}{stage.name}/{unit.name}"
            later = _later_inputs(units, ui)
            if key in done:
                stream.advance(unit, later)
                continue
            t_unit = time.perf_counter()
            tgt = stream.targets(unit)
            unit_stage, deadline = stage, None
            if planner is not None:
                remaining = [(u, sh) for _, u, sh in todo]
                unit_stage = dataclasses.replace(stage, iters=planner.iters_for(key, remaining))
                deadline = planner.unit_deadline(remaining)
            res = optimize_unit(qm, unit, unit_stage, settings, lam, stream.q, stream.f, tgt,
                                _seed_for(settings.seed, key_prefix, si, ui, unit.name), progress=progress,
                                desc=unit.name, device=device, deadline=deadline)
            todo.pop(0)
            res["index"] = ui
            report.curves[key] = res
            report.iterations += res["iters"]
            report.optim_seconds += res["optim_seconds"]
            stream.advance(unit, later, fp_out=tgt)
            if on_unit_end is not None:
                on_unit_end(key, res)
            if planner is not None:     # overhead = the unit's whole wall time (caching, eval, checkpoint) - loop
                planner.record(unit.name, res["iters"], res["optim_seconds"], time.perf_counter() - t_unit)
    qm.set_quant(weights=True, acts=True)


def probe_rates(qm: QuantModel, fp: QuantModel, images: torch.Tensor, units: list[Unit], settings: ReconSettings,
                lam: float, stage_list: list[Stage], steps: int = 5) -> tuple[dict[str, float], float]:
    """Seconds per iteration of every unit (``steps`` iterations of each pass on one batch of ``images``, on a copy
    of ``qm``; the first pass's rates, weighted like the passes) and the estimated caching/evaluation seconds per
    unit for all of ``images``."""
    probe = copy.deepcopy(qm)
    bs = min(settings.batch_size * settings.expand_batch, images.shape[0])
    rep = ReconReport(settings.method, "probe", settings.adaqtransform, {})
    stages = [dataclasses.replace(s, iters=steps) for s in stage_list[:1]]
    run_stages(probe, fp, images[:bs], units, dataclasses.replace(settings, early_stop=False), lam, rep, False,
               stages, key_prefix="rate:")
    rates = {c["unit"]: c["optim_seconds"] / max(1, c["iters"]) for c in rep.curves.values()}
    over = [(c["seconds"] - c["optim_seconds"]) * images.shape[0] / bs for c in rep.curves.values()]
    return rates, (sum(over) / len(over) if over else 0.0)


def _place_images(images: torch.Tensor, device: torch.device, plan: CachePlan) -> torch.Tensor:
    """The calibration images where the caches live (device, or pinned host memory)."""
    if plan.pinned:
        return images.pin_memory()
    return images.to(plan.cache_device)


def _images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def _model_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reconstruct(model: torch.nn.Module, calib_images: np.ndarray, config: QuantConfig | None = None,
                settings: ReconSettings | None = None, progress: bool = True,
                checkpoint_dir: str | Path | None = None) -> tuple[QuantModel, ReconReport]:
    """RTN calibration, then reconstruction per ``settings``. Returns the fake-quant model (weights hardened,
    foldable by ``fold_to_integer``) and a :class:`ReconReport`.

    With ``checkpoint_dir`` the model and report are saved after every unit; calling again with the same arguments
    resumes after the last finished unit and gives the same result as an uninterrupted run.
    """
    settings = (settings or ReconSettings()).validate()
    config = (config or QuantConfig()).validate()
    old_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        qm, report = _reconstruct(model, calib_images, config, settings, progress, checkpoint_dir)
        fit_integer_bounds(qm)  # learned act scales / xi / eta may have moved a channel out of int32 (a no-op else)
        return qm, report
    finally:
        torch.set_num_threads(old_threads)


def _reconstruct(model: torch.nn.Module, calib_images: np.ndarray, config: QuantConfig, settings: ReconSettings,
                 progress: bool, checkpoint_dir: str | Path | None) -> tuple[QuantModel, ReconReport]:
    t0 = time.perf_counter()
    images_np = validate_calibration(calib_images)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    qm = quantize_rtn(model, images_np, config, batch_size=settings.calib_batch_size, progress=progress,
                      device=device)
    rtn_seconds = time.perf_counter() - t0
    gran = settings.resolved_granularity
    report = ReconReport(settings.method, gran, settings.adaqtransform, settings.to_dict(), rtn_seconds=rtn_seconds,
                         device=str(device))
    if settings.method == "rtn":
        report.seconds = time.perf_counter() - t0
        return qm.cpu(), report
    fp = copy.deepcopy(qm).set_quant(weights=False, acts=False)
    for p in list(qm.parameters()) + list(fp.parameters()):
        p.requires_grad_(False)
    if settings.adaqtransform:
        qm.enable_adaq()
        for p in qm.parameters():
            p.requires_grad_(False)
    lam = settings.lam if settings.lam is not None else default_lambda(qm)
    report.lam = lam
    images = torch.from_numpy(np.ascontiguousarray(images_np))
    stage_list = stages_for(settings)
    report.stages = [s.name for s in stage_list]
    plan = plan_caches(fp, images, discover_units(qm.graph, gran if gran in ("layer", "network") else "block"),
                       device)
    report.cache_plan = plan.to_dict()
    tqdm.write(plan.summary(), file=sys.stderr)          # always: the memory the run will need, before it starts
    images = _place_images(images, device, plan)

    ckpt = None
    done: set[str] = set()
    if checkpoint_dir is not None:
        fingerprint = dict(settings={k: v for k, v in settings.to_dict().items() if k not in ("threads", "device")},
                           config=asdict(config), images=_images_digest(images_np), n_images=int(images_np.shape[0]),
                           model=_model_digest(model))
        ckpt = Checkpoint(Path(checkpoint_dir), fingerprint)
        state = ckpt.load()
        if state is not None:
            qm, saved = state
            qm.to(device)
            for p in qm.parameters():
                p.requires_grad_(False)
            done = set(saved["done"])
            report.curves = saved["curves"]
            report.mrecg = saved.get("mrecg")
            report.iterations = saved.get("iterations", 0)
            report.optim_seconds = saved.get("optim_seconds", 0.0)
            report.resumed_units = len(done)

    # ---- units ----
    if gran.startswith("mrecg"):
        if report.mrecg is None:
            report.mrecg = plan_mrecg(qm, fp, images, settings, lam, gran, stage_list, progress)
            if ckpt is not None:
                ckpt.save(qm, report, done)
        units = merge_units(qm.graph, mrecg_base_units(qm.graph), report.mrecg["merged_pairs"])
    else:
        units = discover_units(qm.graph, gran)
    report.units = [u.to_dict() for u in units]

    def on_unit_end(key: str, res: dict) -> None:
        done.add(key)
        if ckpt is not None:
            ckpt.save(qm, report, done)

    planner = None
    if settings.time_budget is not None and settings.method != "nwq":
        rates, overhead = probe_rates(qm, fp, images, units, settings, lam, stage_list)
        planner = BudgetPlanner(t0 + settings.time_budget, settings.iters, min(settings.min_iters, settings.iters),
                                rates, overhead)
        report.budget = dict(seconds=settings.time_budget, probed_sec_per_iter=rates, overhead_estimate=overhead,
                             decisions=planner.decisions)
        tqdm.write(f"time budget {settings.time_budget:.0f} s: probed {len(rates)} units, "
                   f"{sum(rates.values()):.3f} s per iteration of all units; "
                   f"{time.perf_counter() - t0:.0f} s used so far", file=sys.stderr)
    if settings.method == "nwq":
        from .nwq import run_nwq

        run_nwq(qm, fp, images, settings, report, progress, done, on_unit_end,
                deadline=None if settings.time_budget is None else t0 + settings.time_budget)
    else:
        run_stages(qm, fp, images, units, settings, lam, report, progress, stage_list, done, on_unit_end,
                   planner=planner)
    report.adaq = adaq_summary(qm)
    report.seconds = time.perf_counter() - t0
    if ckpt is not None:
        ckpt.save(qm, report, done, finished=True)
    for p in qm.parameters():
        p.requires_grad_(True)
    return qm.cpu().eval(), report
