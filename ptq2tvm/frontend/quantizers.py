"""Fake quantizers: per-output-channel symmetric weights, per-tensor asymmetric/unsigned activations.

Rounding in the fake-quant model is torch.round (half to even); the integer graph's requantize rounds half up
(see docs/integer_arithmetic.md). Ranges are searched by minimizing the L_p error (p=2: MSE) over candidates.

Reconstruction state (ptq2tvm.reconstruct), all off by default so calibration-only models behave as before:

- ``WeightQuantizer``: AdaRound. ``init_adaround(w)`` adds the continuous rounding variable V (``alpha``) with the
  rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, initialised so
  h(V) = frac(w / s). While ``soft`` the forward uses floor(w/s) + h(V); ``harden(w)`` returns the hard integers
  floor(w/s) + [V >= 0] (callers bake them into the weight and drop V, so the fold needs nothing new).
- ``ActQuantizer``: LSQ-style learnable step (``scale`` is an nn.Parameter; with ``lsq_grad_scale`` its gradient is
  scaled by 1/sqrt(numel * Qp)) and QDrop (``drop_prob`` = probability of KEEPING quantization, per element;
  None = always quantize).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import QuantConfigError
from . import fused_quant
from .fused_quant import DropMasks, fake_quant_act

N_CANDIDATES = 100
MAX_OBSERVED = 1 << 17


class NonFiniteActivation(QuantConfigError):
    """A NaN/Inf reached an activation quantizer during calibration (calibrate() names the node and the cause)."""


def check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise QuantConfigError(f"{what} must be an integer in 2..8, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``g`` (LSQ)."""
    return (x - x * g).detach() + x * g


ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def lp_error(x: torch.Tensor, y: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    d = (x - y).square() if p == 2 else (x - y).abs().pow(p)
    return d.sum() if dim is None else d.sum(dim=dim)


def _candidate_chunks(elements: int, budget: int = 1 << 23) -> list[range]:
    """Split the N_CANDIDATES shrink factors into chunks whose broadcast tensors stay under ``budget`` elements."""
    step = max(1, min(N_CANDIDATES, budget // max(elements, 1)))
    return [range(i, min(i + step, N_CANDIDATES)) for i in range(0, N_CANDIDATES, step)]


def _shrink(idx: range) -> torch.Tensor:
    return 1.0 - torch.tensor(list(idx), dtype=torch.float32) / N_CANDIDATES


class WeightQuantizer(nn.Module):
    """Symmetric signed per-output-channel quantizer: q in [-2^(b-1), 2^(b-1)-1], w ~ s_c * q."""

    def __init__(self, bits: int, channels: int):
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.scale = nn.Parameter(torch.ones(channels))
        self.enabled = True
        #: AdaRound rounding variable V (same shape as the weight), None when rounding to nearest.
        self.alpha: nn.Parameter | None = None
        self.soft = True
        #: NWQ's annealing softmax (ASoftmax): with a temperature ``tau`` the soft rounding is sigmoid(V / tau) (the
        #: softmax over {floor, ceil} with logits {0, V}) instead of AdaRound's rectified sigmoid; None: AdaRound.
        self.tau: float | None = None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def _shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (w.dim() - 1)

    @torch.no_grad()
    def init_scale(self, w: torch.Tensor, p: float = 2.0) -> None:
        """Search the per-channel clipping range minimizing the L_p weight error."""
        flat = w.detach().reshape(w.shape[0], -1).float()
        absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
        best_err = torch.full_like(absmax, float("inf"))
        best = absmax.clone()
        for idx in _candidate_chunks(flat.numel()):
            clip = _shrink(idx).to(absmax.device)[:, None] * absmax[None, :]     # (k, C)
            s = (clip / max(self.qmax, 1)).unsqueeze(2)                         # (k, C, 1)
            q = torch.clamp(torch.round(flat / s), self.qmin, self.qmax) * s
            err = lp_error(flat[None], q, p, dim=2)                             # (k, C)
            e, k = err.min(dim=0)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best = torch.where(better, clip.gather(0, k[None])[0], best)
        self.scale.copy_(best / max(self.qmax, 1))

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """The integer weights (as a float tensor of integral values)."""
        if self.alpha is not None:
            return self.harden(w)
        s = self.scale.view(self._shape(w))
        return torch.clamp(torch.round(w / s), self.qmin, self.qmax)

    # ---- AdaRound ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Start AdaRound: V such that h(V) = frac(w / s) (soft rounding reproduces w inside the range)."""
        s = self.scale.detach().view(self._shape(w))
        x = w.detach() / s
        rest = (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6)
        v = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)
        self.alpha = nn.Parameter(v.float())
        self.soft = True
        return self.alpha

    def h(self) -> torch.Tensor:
        """Rectified sigmoid h(V) in [0, 1] (AdaRound), or sigmoid(V / tau) with an ASoftmax temperature (NWQ)."""
        if self.tau is not None:
            return torch.sigmoid(self.alpha / self.tau)
        return torch.clamp(torch.sigmoid(self.alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)

    def round_reg(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser without lambda: SUM(1 - |2 h(V) - 1|^beta) (summed, not averaged)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> torch.Tensor:
        """The hard AdaRound integers floor(w / s) + [V >= 0], clamped to the range."""
        s = self.scale.view(self._shape(w))
        return torch.clamp(torch.floor(w / s) + (self.alpha >= 0).to(w.dtype), self.qmin, self.qmax)

    def clear_adaround(self) -> None:
        self.alpha = None
        self.tau = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.scale.view(self._shape(w))
        if self.alpha is not None:
            base = torch.floor(w.detach() / s.detach())
            r = self.h() if self.soft else (self.alpha >= 0).to(w.dtype)
            return torch.clamp(base + r, self.qmin, self.qmax) * s.detach()
        return torch.clamp(round_ste(w / s), self.qmin, self.qmax) * s


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer, unsigned container: q in [0, 2^b-1], x ~ s * (q - z).

    ``nonneg`` tensors (after ReLU) use z = 0; others are asymmetric with a zero point (the range always contains 0,
    so zero padding is exact).
    """

    def __init__(self, bits: int, nonneg: bool):
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.nonneg = nonneg
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64))
        self.enabled = False
        self.observing = False
        #: QDrop: probability of keeping quantization per element (None: always quantize).
        self.drop_prob: float | None = None
        self.drop_generator: torch.Generator | DropMasks | None = None
        #: LSQ: scale the gradient of ``scale`` by 1/sqrt(numel(x) * qmax) (off: plain gradient).
        self.lsq_grad_scale = False
        self._samples: list[torch.Tensor] = []
        self._min = float("inf")
        self._max = float("-inf")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, nonneg={self.nonneg}, enabled={self.enabled}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise NonFiniteActivation("non-finite activation seen during calibration")
        self._min = min(self._min, float(flat.min()))
        self._max = max(self._max, float(flat.max()))
        if flat.numel() > MAX_OBSERVED // 4:
            idx = torch.randint(0, flat.numel(), (MAX_OBSERVED // 4,), generator=torch.Generator().manual_seed(
                len(self._samples))).to(flat.device)
            flat = flat[idx]
        self._samples.append(flat)

    def _params_for(self, lo: float, hi: float) -> tuple[float, int]:
        if self.nonneg:
            return max(hi, 1e-8) / self.qmax, 0
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = max(hi - lo, 1e-8) / self.qmax
        z = int(min(max(round(-lo / s), 0), self.qmax))
        return s, z

    @torch.no_grad()
    def compute_range(self, p: float = 2.0) -> None:
        """Pick (scale, zero point) minimizing the L_p error over the observed samples."""
        if not self._samples:
            raise QuantConfigError("activation quantizer saw no calibration data")
        x = torch.cat(self._samples).float()
        if x.numel() > MAX_OBSERVED:
            x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MAX_OBSERVED].to(x.device)]
        lo, hi = (0.0 if self.nonneg else self._min), self._max
        params = [self._params_for(lo * (1.0 - i / N_CANDIDATES), hi * (1.0 - i / N_CANDIDATES))
                  for i in range(N_CANDIDATES)]
        errs = []
        for idx in _candidate_chunks(x.numel()):
            s = torch.tensor([params[i][0] for i in idx], dtype=torch.float32, device=x.device)[:, None]
            z = torch.tensor([params[i][1] for i in idx], dtype=torch.float32, device=x.device)[:, None]
            q = (torch.clamp(torch.round(x[None] / s) + z, 0, self.qmax) - z) * s
            errs.append(lp_error(x[None], q, p, dim=1))
        s, z = params[int(torch.cat(errs).argmin())]
        self.scale.data.fill_(s)
        self.zero_point.fill_(z)
        self._samples = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        if not fused_quant.ENABLED:
            return self.forward_reference(x)
        keep = self.qdrop_keep(x)
        drop = None if keep is None else torch.sub(1.0, keep)
        gscale = 1.0 / math.sqrt(x.numel() * self.qmax) if self.lsq_grad_scale else 1.0
        return fake_quant_act(x, self.scale, self._zero_point_float(), self.qmax, keep, drop, gscale)

    def _zero_point_float(self) -> float:
        """The zero point as a Python float, re-read only when the buffer changed (no device sync per call)."""
        zp = self.zero_point
        key = (zp.data_ptr(), zp._version, zp.device)
        if getattr(self, "_zp_key", None) != key:
            self._zp_key, self._zp = key, float(zp)
        return self._zp

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain autograd expression (the specification of the fused forward; used when ``fused_quant.ENABLED`` is False)."""
        z = self.zero_point.to(x.dtype)
        s = grad_scale(self.scale, 1.0 / math.sqrt(x.numel() * self.qmax)) if self.lsq_grad_scale else self.scale
        q = torch.clamp(round_ste(x / s) + z, 0, self.qmax)
        out = (q - z) * s
        keep = self.qdrop_keep(x)
        return out if keep is None else torch.where(keep.bool(), out, x)

    def qdrop_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """QDrop's keep mask for ``x`` (Wei et al. 2022, eq. 7): a float tensor of ``x``'s shape, dtype and device,
        1 where the element is quantized (probability ``drop_prob``) and 0 where it passes through in full precision;
        None when QDrop is off. Drawn from ``drop_generator``: a :class:`DropMasks`, or a ``torch.Generator`` that
        must live on ``x``'s device (``RuntimeError`` naming both devices otherwise; torch's own message named
        neither the quantizer nor the fix)."""
        if self.drop_prob is None or self.drop_prob >= 1.0:
            return None
        src = self.drop_generator
        if isinstance(src, DropMasks):
            return src.masks(x.shape, self.drop_prob, x)[0]
        if src is not None and src.device != x.device:
            raise RuntimeError(f"QDrop mask generator on {src.device} for an activation on {x.device}: make the "
                               f"generator on the reconstruction device (torch.Generator(device=...)) or use DropMasks")
        return (torch.rand(x.shape, generator=src, device=x.device) < self.drop_prob).to(x.dtype)

    def grid_bounds(self, lo: float, hi: float) -> tuple[int, int]:
        """Integer clamp bounds for a float clamp [lo, hi] applied before this quantizer."""
        s, z = float(self.scale.detach()), int(self.zero_point)
        qlo = 0 if lo == float("-inf") else max(0, min(self.qmax, z + int(round_half_even(lo / s))))
        qhi = self.qmax if hi == float("inf") else max(0, min(self.qmax, z + int(round_half_even(hi / s))))
        return qlo, qhi


def round_half_even(v: float) -> float:
    return float(torch.round(torch.tensor(v, dtype=torch.float64)))
