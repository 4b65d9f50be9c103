"""Fused activation fake-quant (+ QDrop) with a hand-written backward, and cheap QDrop keep masks.

Why: in reconstruction the activation quantizers dominate an iteration on the CPU. The autograd graph of the plain
expression ``(clamp(round_ste(x / s) + z, 0, qmax) - z) * s`` followed by QDrop's ``torch.where(rand < p, ...)``
runs ~25 full passes over every activation tensor per iteration (forward and backward), and two of them are slow
on the CPU: ``torch.where`` with a bool mask and ``torch.rand`` (MT19937) cost ~2 ms each on a 32x16x28x28 tensor,
~25x a float multiply (measured, torch 2.13 CPU, AMD EPYC Zen 3). ``FakeQuantAct`` computes the same forward values
with float-only passes and saves two float tensors for a two-pass backward; ``DropMasks`` draws the keep masks from
numpy's PCG64 raw bits (CPU) or the device's generator (CUDA).

Forward (unchanged values; docs/integer_arithmetic.md): ``qz = clamp(round(x / s), -z, qmax - z)`` (integers,
exact in float32, so ``qz = clamp(round(x/s) + z, 0, qmax) - z``), ``y = qz * s``; with QDrop ``y = y * keep + x *
drop`` (keep, drop in {0, 1}, drop = 1 - keep: an exact select, no rounding).

Backward (LSQ, Esser et al. 2020, Eq. 3; straight-through rounding): with ``in`` = [round(x/s) inside the range]:
``dy/dx = drop + keep * in`` and ``dy/ds = keep * (qz - in * x / s)``, times ``gscale`` (LSQ's 1/sqrt(numel * qmax),
or 1). These are the gradients autograd computes for the plain expression, up to float rounding (autograd forms
dy/dx as g * s / s).
"""

from __future__ import annotations

import numpy as np
import torch

#: the fused paths (ActQuantizer.forward, act_clamp); False: the plain autograd expressions they replace, kept as
#: their specification and for the in-process before/after benchmark (reconstruct.recon.legacy_code_path)
ENABLED = True


class FakeQuantAct(torch.autograd.Function):
    """y = clamp(round(x / s), -z, qmax - z) * s, optionally QDrop-mixed with x. See the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, z: float, qmax: int, keep: torch.Tensor | None,
                drop: torch.Tensor | None, gscale: float) -> torch.Tensor:
        v = x / s
        r = torch.round(v)
        qz = r.clamp(-z, qmax - z)
        out = qz * s
        if keep is not None:
            out = torch.addcmul(out.mul_(keep), x, drop)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            outr = r.sub_(qz).abs_().clamp_(max=1.0)          # 1 where round(x/s) was clamped, else 0
            inr = outr.neg_().add_(1.0)                        # 1 inside the range
            ds = torch.addcmul(qz, v, inr, value=-1.0)         # qz - in * x / s
            if keep is not None:
                ds.mul_(keep)
                dx = torch.addcmul(drop, keep, inr)            # drop + keep * in
            else:
                dx = inr
            ctx.save_for_backward(dx, ds)
        ctx.gscale = gscale
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dx, ds = ctx.saved_tensors
        gx = g * dx if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = torch.dot(g.reshape(-1), ds.reshape(-1)).mul_(ctx.gscale).reshape(())
        return gx, gs, None, None, None, None, None


def fake_quant_act(x: torch.Tensor, s: torch.Tensor, z: float, qmax: int, keep: torch.Tensor | None = None,
                   drop: torch.Tensor | None = None, gscale: float = 1.0) -> torch.Tensor:
    """Per-tensor fake quantization of ``x`` (any shape, float) with step ``s`` (0-dim), zero point ``z``, unsigned
    range [0, qmax]; ``keep``/``drop``: QDrop masks of x's shape (float 0/1, drop = 1 - keep) or None."""
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
        return FakeQuantAct.apply(x, s, z, qmax, keep, drop, gscale)
    out = torch.round(x / s).clamp_(-z, qmax - z).mul_(s)
    if keep is not None:
        out = torch.addcmul(out.mul_(keep), x, drop)
    return out


#: CPU tensors with fewer elements draw their masks with torch.rand (the device generator)
SMALL = 1 << 15


class DropMasks:
    """Seeded source of QDrop keep masks: ``masks(shape, p, like)`` -> (keep, drop) float tensors of ``like``'s
    dtype and device, keep = 1 with probability ``p`` per element, drop = 1 - keep.

    CPU tensors of at least ``SMALL`` elements: numpy PCG64 raw bits (64 bits per draw), 8-bit thresholds when
    p * 256 is an integer (p = 0.5: exact), else 16-bit (p resolution 2^-16). Other devices and small tensors:
    ``torch.rand`` with a generator of that device seeded from the same seed. Deterministic for a given seed and call sequence.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._bits = np.random.PCG64(self.seed)
        self._dev_gen: dict[str, torch.Generator] = {}

    def _device_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._dev_gen:
            self._dev_gen[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._dev_gen[key]

    def masks(self, shape: torch.Size | tuple[int, ...], p: float, like: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(np.prod(shape)) if len(shape) else 1
        if like.device.type == "cpu" and n >= SMALL:
            k8 = p * 256.0
            if k8 == int(k8):
                raw = torch.from_numpy(self._bits.random_raw((n + 7) // 8)).view(torch.uint8)[:n]
                keep = raw.to(like.dtype).lt_(k8)
            else:
                raw = torch.from_numpy(self._bits.random_raw((n + 3) // 4)).view(torch.int16)[:n]
                keep = raw.to(like.dtype).lt_(p * 65536.0 - 32768.0)
            keep = keep.view(shape)
        else:        # GPUs; small CPU tensors (numpy's call overhead exceeds torch.rand's cost there)
            keep = (torch.rand(shape, generator=self._device_generator(like.device), device=like.device) < p
                    ).to(like.dtype)
        return keep, torch.sub(1.0, keep)


def act_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) for the activation functions folded into a node (ReLU, ReLU6, Hardtanh) through F.relu /
    F.hardtanh, whose backward is a native threshold (~0.06 ms on a 32x16x28x28 tensor) where torch.clamp's is a
    bool-mask torch.where (~3 ms on this CPU). Same values; the gradient differs only at x exactly on a bound (0
    instead of 1)."""
    if not ENABLED:
        return torch.clamp(x, lo, hi)
    if lo == 0.0 and hi == float("inf"):
        return torch.nn.functional.relu(x)
    if lo != float("-inf") and hi != float("inf"):
        return torch.nn.functional.hardtanh(x, lo, hi)
    return torch.clamp(x, lo, hi)
