"""Fake quantizers: per-output-channel symmetric weights, per-tensor asymmetric/unsigned activations.

Rounding in the fake-quant model is torch.round (half to even); the integer graph's requantize rounds half up
(see docs/integer_arithmetic.md). Ranges are searched by minimizing the L_p error (p=2: MSE) over candidates.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import QuantConfigError

N_CANDIDATES = 100
MAX_OBSERVED = 1 << 18


def check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise QuantConfigError(f"{what} must be an integer in 2..8, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def lp_error(x: torch.Tensor, y: torch.Tensor, p: float, dim: int | None = None) -> torch.Tensor:
    d = (x - y).abs().pow(p)
    return d.sum() if dim is None else d.sum(dim=dim)


class WeightQuantizer(nn.Module):
    """Symmetric signed per-output-channel quantizer: q in [-2^(b-1), 2^(b-1)-1], w ~ s_c * q."""

    def __init__(self, bits: int, channels: int):
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.scale = nn.Parameter(torch.ones(channels))
        self.enabled = True

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
        flat = w.detach().reshape(w.shape[0], -1).double()
        absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
        best_err = torch.full_like(absmax, float("inf"))
        best = absmax.clone()
        for i in range(N_CANDIDATES):
            clip = absmax * (1.0 - i / N_CANDIDATES)
            s = (clip / max(self.qmax, 1)).unsqueeze(1)
            q = torch.clamp(torch.round(flat / s), self.qmin, self.qmax) * s
            err = lp_error(flat, q, p, dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
        self.scale.copy_((best / max(self.qmax, 1)).float())

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """The integer weights (as a float tensor of integral values)."""
        s = self.scale.view(self._shape(w))
        return torch.clamp(torch.round(w / s), self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.scale.view(self._shape(w))
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
            raise QuantConfigError("non-finite activation seen during calibration")
        self._min = min(self._min, float(flat.min()))
        self._max = max(self._max, float(flat.max()))
        if flat.numel() > MAX_OBSERVED // 4:
            idx = torch.randint(0, flat.numel(), (MAX_OBSERVED // 4,), generator=torch.Generator().manual_seed(
                len(self._samples)))
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
        x = torch.cat(self._samples).double()
        if x.numel() > MAX_OBSERVED:
            x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MAX_OBSERVED]]
        lo, hi = (0.0 if self.nonneg else self._min), self._max
        best, best_err = None, float("inf")
        for i in range(N_CANDIDATES):
            t = 1.0 - i / N_CANDIDATES
            s, z = self._params_for(lo * t, hi * t)
            q = (torch.clamp(torch.round(x / s) + z, 0, self.qmax) - z) * s
            err = float(lp_error(x, q, p))
            if err < best_err:
                best, best_err = (s, z), err
        s, z = best
        self.scale.data.fill_(s)
        self.zero_point.fill_(z)
        self._samples = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        z = self.zero_point.to(x.dtype)
        q = torch.clamp(round_ste(x / self.scale) + z, 0, self.qmax)
        return (q - z) * self.scale

    def grid_bounds(self, lo: float, hi: float) -> tuple[int, int]:
        """Integer clamp bounds for a float clamp [lo, hi] applied before this quantizer."""
        s, z = float(self.scale.detach()), int(self.zero_point)
        qlo = 0 if lo == float("-inf") else max(0, min(self.qmax, z + int(round_half_even(lo / s))))
        qhi = self.qmax if hi == float("inf") else max(0, min(self.qmax, z + int(round_half_even(hi / s))))
        return qlo, qhi


def round_half_even(v: float) -> float:
    return float(torch.round(torch.tensor(v, dtype=torch.float64)))
