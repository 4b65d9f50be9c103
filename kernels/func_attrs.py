"""PrimFunc attribute keys that TVM 0.27 reads, and the attributes of every hand-written kernel.

TVM 0.27 renamed the ``tir.*`` function attributes to ``tirx.*`` and ignores the old keys without a warning
(``libtvm_compiler.so`` holds no ``"tir.noalias"`` / ``"tir.is_scheduled"`` string any more):

* ``tirx.noalias``: the buffer parameters get LLVM ``noalias`` and the parallel bodies their ``<name>_compute_``
  noalias scopes. A PrimFunc that holds a root ``SBlock`` and carries the old key made TVM lower the *whole module*
  without those scopes (ResNet-18's convs 4-9% slower; kernels/README.md, "The row layout as a shuffle").
* ``tirx.is_scheduled``: the default GPU schedules (dlight) and the legalization passes leave the function alone.

tests/test_func_attrs.py checks that no kernel module writes an old key.
"""

from __future__ import annotations

from typing import Mapping

from .ops import KERNEL_ATTR

NOALIAS_ATTR = "tirx.noalias"
SCHEDULED_ATTR = "tirx.is_scheduled"


def hand_kernel_attrs(name: str, kind: str | None = None, extra: Mapping[str, object] | None = None
                      ) -> dict[str, object]:
    """The function attributes of a hand-written (IRBuilder) kernel called ``name``.

    Args:
        name: the PrimFunc's global symbol.
        kind: the kernel kind under :data:`kernels.ops.KERNEL_ATTR` (what ``kernel_kind`` and the benchmarks read),
            or None for a kernel without one.
        extra: further attributes (its epilogue forms, ...); they may not override the keys set here.

    Returns:
        ``{"global_symbol": name, NOALIAS_ATTR: True, SCHEDULED_ATTR: True, [KERNEL_ATTR: kind,] **extra}``, for
        ``T.func_attr``.

    Raises:
        TypeError: if ``kind`` is not a string (a mapping meant for ``extra``).
        ValueError: if ``extra`` sets one of those keys.
    """
    if kind is not None and not isinstance(kind, str):
        raise TypeError(f"hand kernel {name!r}: kind must be a str, got {type(kind).__name__} (pass extra=...)")
    attrs: dict[str, object] = {"global_symbol": name, NOALIAS_ATTR: True, SCHEDULED_ATTR: True}
    if kind is not None:
        attrs[KERNEL_ATTR] = kind
    clash = sorted(set(attrs) & set(extra or {}))
    if clash:
        raise ValueError(f"hand kernel {name!r}: extra attributes may not override {clash}")
    attrs.update(extra or {})
    return attrs
