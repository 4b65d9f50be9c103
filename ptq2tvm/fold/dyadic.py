"""Dyadic (HAWQ-style) requantization multipliers: M ~ m * 2^-n with an int32 mantissa m and a right shift n."""

from __future__ import annotations

import numpy as np

from ..errors import QuantConfigError

MANTISSA_BITS = 31
MIN_SHIFT, MAX_SHIFT = 1, 62


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def dyadic_multipliers(multipliers: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decompose float multipliers (K, C) into int32 mantissas (K, C) sharing one shift per channel (C,).

    For each channel the largest of the K multipliers gets a 31-bit mantissa in [2^30, 2^31); the others use the same
    shift so several terms can be summed before a single rounding. Shifts are kept in [1, 62].
    """
    M = np.atleast_2d(np.asarray(multipliers, dtype=np.float64))
    if not np.all(np.isfinite(M)) or np.any(M < 0):
        raise QuantConfigError(f"{where}: requantization multipliers must be finite and >= 0, got {M.ravel()[:4]}")
    mmax = M.max(axis=0)
    _, exp = np.frexp(np.where(mmax > 0, mmax, 1.0))
    shift = MANTISSA_BITS - exp.astype(np.int64)
    mant = round_half_up(M * np.ldexp(1.0, shift)[None, :])
    overflow = mant.max(axis=0) >= (1 << MANTISSA_BITS)
    shift = np.where(overflow, shift - 1, shift)
    if np.any(shift < MIN_SHIFT):
        raise QuantConfigError(f"{where}: requantization multiplier {mmax.max():.3g} is too large (> 2^30)")
    shift = np.minimum(shift, MAX_SHIFT)
    mant = round_half_up(M * np.ldexp(1.0, shift)[None, :])
    return mant.astype(np.int32), shift.astype(np.int32)
