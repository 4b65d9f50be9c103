"""Small helpers shared by the op families."""

from __future__ import annotations

from typing import Any

from ..ir.reference import requantize  # noqa: F401  (the one numpy requantize, re-exported for the op modules)

#: activation layouts of the blocked builder: plain NCHW, blocked NCHW16c, 2-D (N, features)
NCHW, NCHWC, FLAT = "nchw", "nchwc", "flat"


def rhu(v: Any, m: Any, n: Any) -> Any:
    """RHU(v * m, n) = (v * m + 2^(n-1)) >> n on an int64 torch tensor ``v``, one integer multiplier ``m`` and shift
    ``n`` (the fake-quant side of :func:`requantize`, ``OpDef.integer_values``)."""
    m, n = int(m), int(n)
    return (v * m + (1 << (n - 1))) >> n


def pair(v: Any) -> tuple[int, int]:
    """An int or a 2-sequence -> (int, int)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def arg(node: Any, idx: int, key: str, default: Any) -> Any:
    """Positional argument ``idx`` or keyword ``key`` of an fx node."""
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(key, default)
