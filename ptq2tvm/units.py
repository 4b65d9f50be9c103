"""Numbers as the command line prints them: percentages that never round to 100 (or 0) unless exact, and byte
sizes in B / kB / MB (decimal units, as `ls -h --si`)."""

from __future__ import annotations


def percent(fraction: float, digits: int = 2, width: int = 0) -> str:
    """``fraction`` (0..1) in percent with ``digits`` decimals, right-aligned to ``width``; never 100 (or 0) when
    ``fraction`` is not exactly 1 (or 0): 0.99996 -> '99.99', not '100.00'; 0.00004 -> '0.01'. So an exact-match
    column reads 100.00 only when everything matched."""
    step = 10.0 ** -digits
    v = round(100 * fraction, digits)
    if fraction < 1 and v >= 100:
        v = 100 - step
    elif fraction > 0 and v <= 0:
        v = step
    return f"{v:{width}.{digits}f}"


def size_text(n_bytes: float) -> str:
    """'980 B', '13.8 kB', '13.8 MB' (1 kB = 1000 B; MB from 1000 kB on): one form for every size the CLI prints."""
    n = float(n_bytes)
    if n < 1e3:
        return f"{int(n)} B"
    if round(n / 1e3, 1) < 1000:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.1f} MB"


__all__ = ["percent", "size_text"]
