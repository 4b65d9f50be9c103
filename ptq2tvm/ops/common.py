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


def known_value(a: Any, what: str) -> Any:
    """An fx call argument as a plain Python value: nodes that computed one during tracing (``x.size(1) // 2``, kept
    by the tracer's shape propagation as ``meta['py_value']``) give that value, tuples / lists element by element.
    Raises ``Unsupported`` naming ``what`` and the node for a node whose value is unknown (a tensor)."""
    from .base import Unsupported

    if hasattr(a, "meta") and hasattr(a, "op"):          # an fx.Node
        if "py_value" not in a.meta:
            raise Unsupported(f"{what} with a computed argument {a.name!r} whose value is unknown")
        return a.meta["py_value"]
    if isinstance(a, (tuple, list)):
        return type(a)(known_value(u, what) for u in a)
    return a
