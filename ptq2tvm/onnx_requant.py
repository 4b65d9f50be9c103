"""Choose the float32 scales of the ONNX export so that ONNX Runtime's float requantization reproduces the dyadic one.

The integer graph requantizes an int32 accumulator ``acc`` with a dyadic multiplier (the reference executor,
``ptq2tvm.ir.reference.requantize``; rounding half up)::

    q = clamp(z + ((acc * m + 2^(n-1)) >> n), lo, hi)                       (m < 2^31, n <= 62)

ONNX Runtime's integer kernels (``QLinearConv``, ``QGemm``, ``QLinearGlobalAveragePool``) requantize the same
accumulator in float32 (MLAS ``MlasRequantizeOutput``: ``_mm_cvtepi32_ps``, ``_mm_mul_ps``, clamp to the container,
``_mm_cvtps_epi32``: round half to even)::

    q = z + rint_half_even(clamp(float32(float32(acc) * M), -z, qmax - z))

with the float32 multiplier ``M`` that ORT derives from the QDQ scales (QLinearConv / QGemm:
``M = float32(float32(s_x * s_w,c) / s_y)``; QLinearGlobalAveragePool: ``M = float32(s_x / float32(s_y * N))``).
``m * 2^-n`` has up to 31 significant bits, a float32 24: ``M`` can in general not equal it. The two results differ
only for accumulators whose exact value ``acc * m * 2^-n`` lies within ``|acc| * |M - m 2^-n| + ulp`` of a
half-integer (or exactly on one: a tie, which ORT rounds to even and the reference up). Those accumulators are
few and can be listed: around each rounding boundary ``h = j + 1/2 - z`` (``j`` in ``[lo, hi - 1]``) only the
integers ``acc`` with ``|acc * m 2^-n - h| <= delta(M)``. So for every candidate scale (the float32 neighbours of the
ideal one) this module counts exactly the accumulator values, among all the layer can produce
(``[acc_min, acc_max]`` from its weights, bias and input code range), at which ORT and the reference differ, and
picks a candidate with none (else the fewest, then the closest). A layer fitted with 0 is provably bit-exact in ORT
for every input; the count that remains is an upper bound on its distinct differing accumulator values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_F32 = np.float32


def dyadic_round(acc: np.ndarray, m: int, n: int) -> np.ndarray:
    """``(acc * m + 2^(n-1)) >> n`` in int64 (the reference executor's rounding; ``|acc| < 2^31``, ``m < 2^31``)."""
    acc = np.asarray(acc, dtype=np.int64)
    return (acc * np.int64(m) + (np.int64(1) << np.int64(n - 1))) >> np.int64(n)


def ort_round(acc: np.ndarray, mult: np.ndarray, z: int, qmax: int) -> np.ndarray:
    """ONNX Runtime's (MLAS) requantization without the zero point: ``rint_half_even(clamp(f32(f32(acc) * M),
    -z, qmax - z))`` as int64. ``mult``: float32, broadcast against ``acc``."""
    v = np.asarray(acc, dtype=np.int64).astype(_F32) * np.asarray(mult, dtype=_F32)
    v = np.clip(v, _F32(-z), _F32(qmax - z))
    return np.rint(v).astype(np.int64)


def risky_accumulators(m: int, n: int, acc_lo: int, acc_hi: int, z: int, lo: int, hi: int, delta: float
                       ) -> np.ndarray:
    """Every integer ``acc`` in ``[acc_lo, acc_hi]`` whose exact value ``acc * m 2^-n`` is within ``delta`` (output
    LSB) of a rounding boundary ``j + 1/2 - z``, ``j`` in ``[lo, hi - 1]``: the only accumulators at which a
    requantization that is off by less than ``delta`` can round differently."""
    t = m * 2.0 ** -n
    if t <= 0 or acc_hi < acc_lo or hi <= lo:
        return np.zeros(0, dtype=np.int64)
    h = np.arange(lo, hi, dtype=np.float64) + 0.5 - z
    a0 = np.maximum(np.ceil((h - delta) / t) - 1, acc_lo).astype(np.int64)
    a1 = np.minimum(np.floor((h + delta) / t) + 1, acc_hi).astype(np.int64)
    keep = a1 >= a0
    a0, a1 = a0[keep], a1[keep]
    if not len(a0):
        return np.zeros(0, dtype=np.int64)
    lens = a1 - a0 + 1
    starts = np.repeat(a0 - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return starts + np.arange(int(lens.sum()), dtype=np.int64)


@dataclass
class RequantFit:
    """Per channel: the chosen float32 scale, ORT's float32 multiplier from it, and how many accumulator values of
    the layer's range ORT requantizes differently from the reference (``mismatches``, exact: 0 = bit-exact for every
    input) among the ``checked`` ones near a rounding boundary."""

    scale: np.ndarray
    multiplier: np.ndarray
    mismatches: np.ndarray
    checked: np.ndarray
    ulps_from_nearest: np.ndarray

    @property
    def exact_channels(self) -> int:
        return int((self.mismatches == 0).sum())


def _neighbours(base: np.float32, ulps: int) -> np.ndarray:
    """``base`` and its float32 neighbours, ``base, +1, -1, +2, -2, ...`` ulps (positive values only)."""
    out = [_F32(base)]
    up = down = _F32(base)
    for _ in range(ulps):
        up, down = np.nextafter(up, _F32(np.inf)), np.nextafter(down, _F32(0))
        out += [up, down]
    return np.array([c for c in out if c > 0 and np.isfinite(c)], dtype=_F32)


def fit_channel(m: int, n: int, ideal: float, to_multiplier: Callable[[np.ndarray], np.ndarray], acc_lo: int,
                acc_hi: int, z: int, lo: int, hi: int, qmax: int = 255, ulps: int = 24
                ) -> tuple[np.float32, np.float32, int, int, int]:
    """The float32 scale near ``ideal`` (within ``ulps``) whose ORT multiplier ``to_multiplier(scale)`` requantizes
    every accumulator in ``[acc_lo, acc_hi]`` as the dyadic ``m 2^-n`` does, else the one with the fewest differing
    accumulator values (ties: the multiplier closest to ``m 2^-n``). Returns (scale, multiplier, mismatches,
    checked, ulps from the nearest float32 scale)."""
    t = m * 2.0 ** -n
    cands = _neighbours(_F32(ideal), ulps)
    mults = np.asarray(to_multiplier(cands), dtype=_F32)
    rel = np.abs(mults.astype(np.float64) / t - 1.0) if t > 0 else np.zeros(len(cands))
    order = np.lexsort((np.arange(len(cands)), rel))
    best: tuple[int, float, int] | None = None
    hbound = max(abs(lo - z), abs(hi - z)) + 1.0
    for k in order:
        # |f32(f32(acc) * M) - acc t| <= |acc t| |M / t - 1| + 2 ulp-relative roundings (float32(acc), the product)
        delta = hbound * (rel[k] + 2.0 ** -22) * (1 + 1e-6) + 2.0 ** -30
        accs = risky_accumulators(m, n, acc_lo, acc_hi, z, lo, hi, delta)
        ref = np.clip(dyadic_round(accs, m, n) + z, lo, hi)
        got = np.clip(ort_round(accs, mults[k], z, qmax) + z, lo, hi)
        bad = int((ref != got).sum())
        if best is None or bad < best[0]:
            best = (bad, k, len(accs))
        if bad == 0:
            break
    bad, k, checked = best
    return cands[k], mults[k], bad, checked, int((k + 1) // 2)


def accumulator_range(weight: np.ndarray, bias: np.ndarray, in_lo: int, in_hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the int32 accumulator range ``bias + sum q_w * q_x`` over input codes in
    ``[in_lo, in_hi]`` (weight (C, ...) int, bias (C,) int)."""
    w = weight.astype(np.int64).reshape(len(weight), -1)
    pos, neg = np.where(w > 0, w, 0).sum(1), np.where(w < 0, w, 0).sum(1)
    b = bias.astype(np.int64)
    return b + pos * in_lo + neg * in_hi, b + pos * in_hi + neg * in_lo


def fit_weight_scales(multiplier: np.ndarray, shift: np.ndarray, s_x: float, s_y: float, acc_lo: np.ndarray,
                      acc_hi: np.ndarray, z: int, lo: int, hi: int, qmax: int = 255, ulps: int = 24) -> RequantFit:
    """Per-channel float32 weight scales for ``QLinearConv`` / ``QGemm`` (``M_c = f32(f32(s_x * s_w,c) / s_y)``)
    fitted with :func:`fit_channel`. Arrays are (C,); ``multiplier``/``shift`` the IR's dyadic ``m_c``, ``n_c``."""
    sx, sy = _F32(s_x), _F32(s_y)
    res = []
    for c in range(len(multiplier)):
        m, n = int(multiplier[c]), int(shift[c])
        ideal = m * 2.0 ** -n * float(sy) / float(sx)
        res.append(fit_channel(m, n, ideal, lambda s: (sx * s) / sy, int(acc_lo[c]), int(acc_hi[c]), z, lo, hi,
                               qmax, ulps))
    cols = list(zip(*res)) if res else [[]] * 5
    return RequantFit(np.array(cols[0], dtype=_F32), np.array(cols[1], dtype=_F32),
                      np.array(cols[2], dtype=np.int64), np.array(cols[3], dtype=np.int64),
                      np.array(cols[4], dtype=np.int64))
