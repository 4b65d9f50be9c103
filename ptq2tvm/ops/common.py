"""Small helpers shared by the op families."""

from __future__ import annotations

from typing import Any

from ..ir.reference import requantize  # noqa: F401  (the one numpy requantize, re-exported for the op modules)

#: activation layouts of the blocked builder: plain NCHW, blocked NCHW16c, 2-D (N, features)
NCHW, NCHWC, FLAT = "nchw", "nchwc", "flat"


def pair(v: Any) -> tuple[int, int]:
    """An int or a 2-sequence -> (int, int)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def arg(node: Any, idx: int, key: str, default: Any) -> Any:
    """Positional argument ``idx`` or keyword ``key`` of an fx node."""
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(key, default)
