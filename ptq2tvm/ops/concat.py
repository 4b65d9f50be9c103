"""Concatenation along channels: every input requantized onto the output grid, exactly.

Integer contract (docs/integer_arithmetic.md)::

    q_out[:, channels of input i] = clamp(z_out + RHU((q_i - z_i) * m_i, n_i), 0, qmax)     (m_i / 2^n_i ~ s_i / s_out)

An input already on the output grid (same scale and zero point) gets m_i = 2^30, n_i = 30: RHU((q - z) * 2^30, 30)
= q - z exactly, a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import OpDef, Unsupported, register
from .common import NCHWC, arg, requantize, rhu


def _multipliers(in_scales: list[float], out_scale: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(m_i, n_i), the dyadic form of s_i / s_out: the fold's integers and the fake-quant model's."""
    from ..fold.dyadic import dyadic_multipliers

    mant, shift = dyadic_multipliers(np.array([[float(s) / float(out_scale) for s in in_scales]]), f"concat '{name}'")
    return mant[0], shift


@register
class Concat(OpDef):
    op = ir_op = "concat"
    kind = "requant"
    functions = (torch.cat, torch.concat, torch.concatenate)
    summary = "torch.cat along channels"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        import torch.fx as fx

        from ..frontend.graph import FloatNode

        tensors = arg(node, 0, "tensors", None)
        dim = arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise Unsupported("cat of something other than a list of tensors")
        rank = len(b.shape(node))
        if dim % rank != 1:
            raise Unsupported(f"cat along dim {dim} (only the channel dim 1)")
        b.add(FloatNode(name, "concat", [b.name(t) for t in tensors]))

    def nonneg(self, n: Any, inputs_nonneg: list[bool]) -> bool:
        return all(inputs_nonneg) or (n.act is not None and n.act[0] >= 0)

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([env[i] for i in n.inputs], dim=1)

    def integer_values(self, n: Any, codes: list[torch.Tensor], in_scales: list[float], out_scale: float
                       ) -> torch.Tensor:
        mant, shift = _multipliers(in_scales, out_scale, n.name)
        return torch.cat([rhu(c, m, s) for c, m, s in zip(codes, mant, shift)], dim=1)

    def fold(self, f: Any, n: Any):
        from ..ir.graph import IntNode

        tins = [f.tensors[i] for i in n.inputs]
        tout = f.qtensor(n.name)
        mant, shift = _multipliers([t.scale for t in tins], tout.scale, n.name)
        lo, hi = f.clamp_bounds(n.name, n.act)
        return IntNode(n.name, "concat", list(n.inputs), tout,
                       dict(zero_points=[t.zero_point for t in tins], channels=[int(t.shape[0]) for t in tins],
                            output_zero_point=tout.zero_point, lo=lo, hi=hi),
                       dict(multiplier=mant, shift=shift))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        a, arr = node.attrs, node.arrays
        parts = []
        for i, name in enumerate(node.inputs):
            x = env[name].astype(np.int64) - a["zero_points"][i]
            c = x.shape[1]
            parts.append(requantize([(x, np.full(c, arr["multiplier"][i]))], np.full(c, arr["shift"][i]),
                                    a["output_zero_point"], a["lo"], a["hi"]))
        return np.concatenate(parts, axis=1)

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a, arr = node.attrs, node.arrays
        return e.emit(te_ops.concat_requant, [e.x(i) for i in range(len(node.inputs))],
                      multipliers=[int(v) for v in arr["multiplier"]], shifts=[int(v) for v in arr["shift"]],
                      zero_points=a["zero_points"], output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        if any(b.layout(i) != NCHWC for i in node.inputs):
            return b.generic(self, node)
        a, arr = node.attrs, node.arrays
        return b.emit(K.concat_requant_nchwc, [b.blocked(i) for i in node.inputs], channels=a["channels"],
                      multipliers=[int(v) for v in arr["multiplier"]], shifts=[int(v) for v in arr["shift"]],
                      zero_points=a["zero_points"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                      hi=a["hi"], name=b.hint(node)), NCHWC



