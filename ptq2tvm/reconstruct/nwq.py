"""NWQ: network-wise reconstruction (Wang et al., "Leveraging Inter-Layer Dependency for Post-Training
Quantization", NeurIPS 2022), the base AdaQTransform's main table builds on.

One unit: the whole network, optimised jointly (weights' rounding V, activation steps, and with AdaQTransform the
per-channel xi / eta), against the FP32 (BN-folded) model on the calibration images:

- loss (``nwq_loss``): rec = lp(logits_q, logits_fp) + lambda_AR * mean over the block boundaries b of
  lp(a_b^q, a_b^fp), lp = squared error summed over channels, mean over batch and positions (as every other unit
  loss here). The second term is the Activation Regularisation (AR): it keeps the quantized network's intermediate
  activations near the FP32 ones (the paper's remedy for over-fitting a whole network to ~1k images);
- ASoftmax (annealing softmax) for the weights: the soft rounding of w/s is floor(w/s) + sigmoid(V / tau), the
  softmax over the two candidates {floor, ceil} with logits {0, V}; tau anneals geometrically from ``nwq_tau_start``
  to ``nwq_tau_end`` so the weights move from continuous to discrete without AdaRound's rounding regulariser; at the
  end they are hardened to floor + [V >= 0] (the limit tau -> 0);
- AMixup (annealing mixup) for the activations: every activation quantizer (and the network input) outputs, per
  element, the quantized value with probability p_t, else the FP value; p_t rises linearly from ``nwq_mix_start``
  to 1 over the iterations, so the network moves from mixed to fully quantized activations;
- optimisers as QDrop (the AdaQTransform paper uses QDrop's learning rates with NWQ): Adam 1e-3 for V, Adam 4e-5
  with cosine decay and the LSQ gradient scale for the activation steps, ``lr_adaq`` for xi / eta; 20k network
  iterations in the papers (``iters``; the same compute as ``iters`` per unit of a block-wise method).

Where this deviates from (or guesses) the paper: the NWQ text itself was not available here (only its abstract and
what the AdaQTransform paper says of it: network-wise, BN folded, AdaRound + activation steps, 20k iterations), so
the exact form of AR (which activations, which weight), the tau and mixup schedules and their end points are this
module's reading of "activation regularisation", "annealing softmax" and "annealing mixup" and are settings, not
reproduced constants. See docs/reconstruction.md.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..frontend.qmodel import QuantModel, _key
from .adaq import adaq_params, project_xi
from .adaround import harden_layer
from .budget import deadline_rate
from .units import Unit, block_units, network_unit


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the batch and spatial positions."""
    d = (pred - tgt).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def nwq_loss(out_q: torch.Tensor, out_fp: torch.Tensor, feats_q: list[torch.Tensor], feats_fp: list[torch.Tensor],
             ar_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output term, AR term): lp(out_q, out_fp) and ar_weight * mean_b lp(feats_q[b], feats_fp[b]).

    ``out_*``: (N, classes) logits; ``feats_*``: matching lists of (N, C, H, W) (or (N, C)) block outputs. Their sum
    is the loss NWQ minimises here."""
    rec = lp_loss(out_q, out_fp)
    if not feats_q or ar_weight == 0:
        return rec, torch.zeros((), dtype=rec.dtype)
    ar = sum(lp_loss(a, b) for a, b in zip(feats_q, feats_fp)) / len(feats_q)
    return rec, ar_weight * ar


def tau_at(it: int, iters: int, tau_start: float, tau_end: float) -> float:
    """ASoftmax temperature: geometric from tau_start (it = 0) to tau_end (last iteration)."""
    frac = it / max(iters - 1, 1)
    return float(tau_start * (tau_end / tau_start) ** frac)


def mix_at(it: int, iters: int, mix_start: float) -> float:
    """AMixup: probability of keeping the quantized activation, linear from mix_start to 1."""
    frac = it / max(iters - 1, 1)
    return float(mix_start + (1.0 - mix_start) * frac)


@torch.no_grad()
def init_asoftmax(layer: Any, tau: float) -> torch.nn.Parameter:
    """Start ASoftmax on ``layer``: V with sigmoid(V / tau) = frac(w / s), so the soft weights reproduce w."""
    wq = layer.wq
    v = wq.init_adaround(layer.weight)
    s = wq.scale.detach().view((-1,) + (1,) * (layer.weight.dim() - 1))
    x = layer.weight.detach() / s
    rest = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
    v.copy_(tau * torch.log(rest / (1 - rest)))
    wq.tau = tau
    return v


def ar_points(qm: QuantModel) -> list[str]:
    """The tensors AR regularises: the outputs of every block unit but the last (whose output is the network's)."""
    blocks = block_units(qm.graph)
    return [b.outputs[-1] for b in blocks[:-1] if b.outputs]


def run_nwq(qm: QuantModel, fp: QuantModel, images: torch.Tensor, settings: Any, report: Any, progress: bool,
            done: set[str], on_unit_end: Callable[[str, dict], None] | None = None,
            deadline: float | None = None) -> Unit:
    """Reconstruct ``qm`` network-wise in place (NWQ). Appends the curve to ``report`` under "nwq/network".

    ``deadline`` (``time.perf_counter()`` value; ``--time-budget``): every ``DEADLINE_CHECK_EVERY`` iterations the
    measured rate decides how many iterations still fit (minus the final evaluation, timed like the initial one); the
    run's length only shrinks (at least ``settings.min_iters`` more), and the schedules (tau, mixup, cosine LR, all
    functions of it / iters) follow the new length, so they still end annealed."""
    from .recon import DEADLINE_CHECK_EVERY, DEFAULT_LR_A, UnitRunner, _eval_loss, _unit_act_quantizers, _seed_for, \
        qdrop_mix

    unit = network_unit(qm.graph)[0]
    key = "nwq/network"
    if key in done:
        return unit
    t_start = time.perf_counter()
    g = qm.graph
    qm.set_quant(weights=True, acts=True)
    runner, fp_runner = UnitRunner(qm), UnitRunner(fp)
    points = [p for p in ar_points(qm) if p != g.output_name]
    keep = points + [g.output_name]
    with torch.no_grad():
        x_q = qm.act_quant[_key(g.input_name)](images)
    fp_all = fp_runner.run_all(unit, {g.input_name: images}, settings.chunk, keep)
    tgt = {g.output_name: fp_all[g.output_name]}
    t_eval = time.perf_counter()
    initial = _eval_loss(runner, unit, {g.input_name: x_q}, tgt, settings.chunk)
    t_eval = time.perf_counter() - t_eval

    layers = [qm.layer(n) for n in unit.layers]
    tau0, tau1 = settings.nwq_tau_start, settings.nwq_tau_end
    vs = [init_asoftmax(layer, tau0) for layer in layers]
    groups = [dict(params=vs, lr=settings.lr_w)]
    ad = adaq_params(layers)
    for p in ad:
        p.requires_grad_(True)
    if ad:
        groups.append(dict(params=ad, lr=settings.lr_adaq))
    opt = torch.optim.Adam(groups)
    aqs_all = _unit_act_quantizers(qm, unit)
    aqs = [q for q in aqs_all if q.enabled]
    lr_a = settings.lr_a if settings.lr_a is not None else DEFAULT_LR_A["network"]
    for q in aqs:
        q.scale.requires_grad_(True)
    opt_a = torch.optim.Adam([q.scale for q in aqs], lr=lr_a) if aqs else None
    lsq = True if settings.lsq_grad_scale is None else settings.lsq_grad_scale
    seed = _seed_for(settings.seed, "nwq", unit.name)
    gen = torch.Generator().manual_seed(seed)          # the batches' rows (and on the CPU the QDrop masks: one stream)
    device = next(qm.parameters()).device              # (the images may stay in pinned host memory)
    mask_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    for q in aqs_all:
        q.lsq_grad_scale = lsq
        q.drop_generator = mask_gen

    n_rows = images.shape[0]
    bs = min(settings.batch_size * settings.expand_batch, n_rows)
    iters = planned = settings.iters
    log_every = settings.log_every or max(1, iters // 200)
    curve: dict[str, list] = dict(it=[], rec=[], reg=[], beta=[])
    deadline_note = ""
    t_opt = time.perf_counter()
    bar = tqdm(total=iters, desc="nwq", disable=not progress, leave=False)
    it = 0
    try:
        while it < iters:
            if opt_a is not None:      # cosine annealing to 0 over the (possibly shortened) run
                for group in opt_a.param_groups:
                    group["lr"] = lr_a * 0.5 * (1.0 + math.cos(math.pi * it / iters))
            tau = tau_at(it, iters, tau0, tau1)
            p = mix_at(it, iters, settings.nwq_mix_start)
            for layer in layers:
                layer.wq.tau = tau
            for q in aqs_all:
                q.drop_prob = p if p < 1.0 else None
            idx = torch.randperm(n_rows, generator=gen)[:bs]
            x = x_q[idx] if p >= 1.0 else qdrop_mix(x_q[idx], images[idx], p, gen)
            env = runner.run(unit, {g.input_name: x})
            rec, ar = nwq_loss(env[g.output_name], fp_all[g.output_name][idx], [env[t] for t in points],
                               [fp_all[t][idx] for t in points], settings.nwq_ar_weight)
            loss = rec + ar
            opt.zero_grad(set_to_none=True)
            if opt_a is not None:
                opt_a.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_xi(layers)
            if opt_a is not None:
                opt_a.step()
                with torch.no_grad():
                    for q in aqs:
                        q.scale.clamp_(min=1e-8)
            if it % log_every == 0 or it == iters - 1:
                curve["it"].append(it)
                curve["rec"].append(float(rec.detach()))
                curve["reg"].append(float(ar.detach()))
                curve["beta"].append(tau)
            it += 1
            bar.update(1)
            if deadline is not None and it % DEADLINE_CHECK_EVERY == 0 and it < iters:
                now = time.perf_counter()
                r = deadline_rate(iters - it, (now - t_opt) / it, deadline - now - t_eval, settings.min_iters)
                if r is not None:
                    iters = it + round((iters - it) / r)
                    deadline_note = f"time budget: run shortened to {iters} of {planned} iterations at iteration {it}"
    finally:
        bar.close()
        t_opt = time.perf_counter() - t_opt
        for q in aqs_all:
            q.drop_prob, q.drop_generator, q.lsq_grad_scale = None, None, False
        for q in aqs:
            q.scale.requires_grad_(False)
        for p_ in ad:
            p_.requires_grad_(False)
    changed = sum(harden_layer(layer) for layer in layers)     # floor + [V >= 0]: the tau -> 0 limit; drops tau
    final = _eval_loss(runner, unit, {g.input_name: x_q}, tgt, settings.chunk)
    res = dict(unit=unit.name, stage="nwq", **curve, initial_loss=initial, final_loss=final, iters=iters,
               planned_iters=planned, optim_seconds=t_opt, seconds=time.perf_counter() - t_start,
               iters_per_s=iters / t_opt if t_opt > 0 else 0.0, changed_roundings=changed, batch_size=bs,
               ar_points=points, index=0, **({"deadline": deadline_note} if deadline_note else {}))
    report.curves[key] = res
    report.iterations += iters
    report.optim_seconds += t_opt
    if on_unit_end is not None:
        on_unit_end(key, res)
    return unit
