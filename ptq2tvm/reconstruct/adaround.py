"""AdaRound pieces: temperature schedule, regulariser over a unit, hardening (as BRECQ/QDrop's reference code does).

- h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1 (``WeightQuantizer.h``).
- Regulariser lambda * SUM over every weight of the unit of (1 - |2 h(V) - 1|^beta): summed, not averaged.
- It is off for the first ``warmup`` fraction of the iterations (beta held at ``beta_start``), then beta decays
  linearly from ``beta_start`` (20) to ``beta_end`` (2) over the remaining iterations.
- Hardening: integers floor(w / s) + [V >= 0]; they are baked into the layer weight (weight := q * s, so the
  round-to-nearest integer of the fold is exactly q) and V is dropped.
"""

from __future__ import annotations

import torch

from ..frontend.qmodel import QLayer


def beta_at(it: int, iters: int, warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0) -> float:
    """BRECQ's LinearTempDecay: beta_start during warm-up, then linear to beta_end at the last iteration."""
    start = warmup * iters
    if it < start:
        return beta_start
    rel = (it - start) / max(iters - start, 1e-12)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)


def reg_active(it: int, iters: int, warmup: float = 0.2) -> bool:
    """The rounding regulariser is off while it < warmup * iters."""
    return it >= warmup * iters


def round_loss(layers: list[QLayer], it: int, iters: int, lam: float, warmup: float = 0.2,
               beta_start: float = 20.0, beta_end: float = 2.0) -> torch.Tensor:
    """lambda * SUM_layers SUM(1 - |2h - 1|^beta), zero during warm-up."""
    if not reg_active(it, iters, warmup):
        return torch.zeros(())
    b = beta_at(it, iters, warmup, beta_start, beta_end)
    total = torch.zeros(())
    for layer in layers:
        if layer.wq.alpha is not None:
            total = total + layer.wq.round_reg(b)
    return lam * total


@torch.no_grad()
def harden_layer(layer: QLayer) -> int:
    """Bake the hard AdaRound integers into the weight and drop V. Returns how many weights differ from nearest."""
    wq = layer.wq
    if wq.alpha is None:
        return 0
    w = layer.weight.detach()
    q = wq.harden(w)
    s = wq.scale.detach().view((-1,) + (1,) * (w.dim() - 1))
    nearest = torch.clamp(torch.round(w / s), wq.qmin, wq.qmax)
    changed = int((q != nearest).sum())
    layer.weight.data.copy_(q * s)
    wq.clear_adaround()
    assert torch.equal(wq.integer(layer.weight.detach()), q)
    return changed
