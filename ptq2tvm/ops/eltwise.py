"""Element-wise ops: residual add, multiply (squeeze-excitation gating), clamps (ReLU / ReLU6 / Hardtanh), identity.

Integer contracts (docs/integer_arithmetic.md)::

    add:  q = clamp(z + RHU((q_a - z_a) * m_a + (q_b - z_b) * m_b, n), lo, hi)       (m_a / 2^n ~ s_a / s_out)
    mul:  q = clamp(z + RHU((q_a - z_a) * (q_b - z_b) * m, n), lo, hi)                (m / 2^n ~ s_a s_b / s_out)
    clamp: q = clamp(q_in, lo, hi)                                                     (same grid as the input)

``mul`` broadcasts numpy-style: (N, C, 1, 1) x (N, C, H, W) is the SE gate, (N, 1, H, W) x (N, C, H, W) a spatial
gate. |(q_a - z_a)(q_b - z_b)| <= 255^2, so the product times a 31-bit mantissa stays far inside int64.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpDef, Unsupported, register
from .common import NCHWC, arg, requantize, rhu

INF = math.inf


def _tensor_args(b: Any, node: Any, what: str) -> tuple[Any, Any]:
    import torch.fx as fx

    x, y = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
        raise Unsupported(f"{what} with a constant (only tensor {what} tensor)")
    for v in (x, y):
        if v.op == "get_attr":       # nn.Parameter (layer scale), buffer or tensor constant: no quantizer, no tensor
            raise Unsupported(f"{what} with the parameter / buffer / constant tensor {str(v.target)!r} (only tensor "
                              f"{what} tensor, both computed from the input; fold a per-channel scale into the "
                              "conv before it)")
    return x, y


@register
class Identity(OpDef):
    op, kind = "identity", "trace"
    modules = (nn.Dropout, nn.Dropout2d, nn.Identity)
    functions = (F.dropout, F.dropout2d)
    methods = ("contiguous",)
    summary = "Dropout, Identity"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        b.add(FloatNode(name, "identity", [b.inp(node)]))


@register
class Act(OpDef):
    """ReLU / ReLU6 / Hardtanh before fusion: the tracer fuses them into their producer's clamp, or makes a
    standalone ``clamp``."""

    op, kind = "act", "trace"
    modules = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
    functions = (F.relu, torch.relu, torch.relu_, F.relu6, F.hardtanh)
    methods = ("relu", "relu_")
    summary = "ReLU, ReLU6, Hardtanh"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        if isinstance(module, nn.ReLU6) or node.target is F.relu6:
            bounds = (0.0, 6.0)
        elif isinstance(module, nn.Hardtanh):
            bounds = (float(module.min_val), float(module.max_val))
        elif node.target is F.hardtanh:
            bounds = (float(arg(node, 1, "min_val", -1.0)), float(arg(node, 2, "max_val", 1.0)))
        else:
            bounds = (0.0, INF)
        b.add(FloatNode(name, "act", [b.inp(node)], dict(bounds=bounds)))


@register
class Clamp(OpDef):
    op = ir_op = "clamp"
    kind = "grid"

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        x = env[n.inputs[0]]
        q = qm.act_quantizer(n.inputs[0])
        if not q.enabled:
            return torch.clamp(x, n.act[0], n.act[1])
        qlo, qhi = q.grid_bounds(*n.act)
        z, s = float(q.zero_point), q.scale
        return torch.maximum(torch.minimum(x, (qhi - z) * s), (qlo - z) * s)

    def fold(self, f: Any, n: Any):
        lo, hi = f.qm.act_quantizer(n.inputs[0]).grid_bounds(*n.act)
        return f.grid_node(n, "clamp", dict(lo=lo, hi=hi))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        return np.clip(env[node.inputs[0]], node.attrs["lo"], node.attrs["hi"]).astype(np.uint8)

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        return e.emit(te_ops.clamp, e.x(0), lo=node.attrs["lo"], hi=node.attrs["hi"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        if b.layout(node.inputs[0]) != NCHWC:
            return b.generic(self, node)
        return b.emit(K.clamp_nchwc, b.blocked(node.inputs[0]), lo=node.attrs["lo"], hi=node.attrs["hi"],
                      name=b.hint(node)), NCHWC


@register
class Add(OpDef):
    op, ir_op = "add", "add"
    kind = "requant"
    functions = (operator.add, operator.iadd, torch.add)
    methods = ("add", "add_")
    summary = "residual add (tensor + tensor)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        x, y = _tensor_args(b, node, "add")
        if node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("add with alpha != 1")
        sx, sy = tuple(b.shape(x)), tuple(b.shape(y))
        if sx != sy:      # the integer add kernels read both operands at the output's shape
            raise Unsupported(f"add of tensors of different shapes {sx} + {sy} (broadcasting): only tensors of the "
                              "same shape (a residual add); expand the smaller one first")
        b.add(FloatNode(name, "add", [b.name(x), b.name(y)]))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[n.inputs[0]] + env[n.inputs[1]]

    @staticmethod
    def _multipliers(sa: float, sb: float, s_out: float, c: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        from ..fold.dyadic import dyadic_multipliers

        return dyadic_multipliers(np.stack([np.full(c, sa / s_out), np.full(c, sb / s_out)]), f"add '{name}'")

    def integer_values(self, n: Any, codes: list[torch.Tensor], in_scales: list[float], out_scale: float
                       ) -> torch.Tensor:
        mant, shift = self._multipliers(in_scales[0], in_scales[1], out_scale, 1, n.name)
        m_a, m_b, sh = int(mant[0, 0]), int(mant[1, 0]), int(shift[0])
        return rhu(codes[0] * m_a + codes[1] * m_b, 1, sh)

    def fold(self, f: Any, n: Any):
        from ..ir.graph import IntNode

        ta, tb = f.tensors[n.inputs[0]], f.tensors[n.inputs[1]]
        tout = f.qtensor(n.name)
        c = tout.shape[0]
        mant, shift = self._multipliers(ta.scale, tb.scale, tout.scale, c, n.name)
        lo, hi = f.clamp_bounds(n.name, n.act)
        return IntNode(n.name, "add", list(n.inputs), tout,
                       dict(zero_points=[ta.zero_point, tb.zero_point], output_zero_point=tout.zero_point,
                            lo=lo, hi=hi),
                       dict(multiplier_a=mant[0], multiplier_b=mant[1], shift=shift))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        a, arr = node.attrs, node.arrays
        za, zb = a["zero_points"]
        terms = [(env[node.inputs[0]].astype(np.int64) - za, arr["multiplier_a"]),
                 (env[node.inputs[1]].astype(np.int64) - zb, arr["multiplier_b"])]
        return requantize(terms, arr["shift"], a["output_zero_point"], a["lo"], a["hi"])

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a, arr = node.attrs, node.arrays
        return e.emit(te_ops.add_requant, e.x(0), e.x(1), e.const(arr["multiplier_a"]),
                      e.const(arr["multiplier_b"]), e.const(arr["shift"]), zero_points=a["zero_points"],
                      output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        if b.layout(node.inputs[0]) != NCHWC or b.layout(node.inputs[1]) != NCHWC:
            return b.generic(self, node)
        a, arr = node.attrs, node.arrays
        ma, mb, s = (b.const(p) for p in K.pack_channel_params(arr["multiplier_a"], arr["multiplier_b"],
                                                                arr["shift"], kinds="mms"))
        return b.emit(K.add_requant_nchwc, b.blocked(node.inputs[0]), b.blocked(node.inputs[1]), ma, mb, s,
                      zero_points=tuple(a["zero_points"]), output_zero_point=a["output_zero_point"],
                      lo=a["lo"], hi=a["hi"], name=b.hint(node)), NCHWC


@register
class Mul(OpDef):
    op, ir_op = "mul", "mul"
    kind = "requant"
    functions = (operator.mul, operator.imul, torch.mul)
    methods = ("mul", "mul_")
    summary = ("multiply of two tensors with broadcasting (squeeze-excitation gate (N, C, 1, 1), spatial gate "
               "(N, 1, H, W) or (N, 1, 1, 1))")

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        x, y = _tensor_args(b, node, "mul")
        sx, sy, so = tuple(b.shape(x)), tuple(b.shape(y)), tuple(b.shape(node))
        if len(sx) != len(sy):
            raise Unsupported(f"mul of a {len(sx)}-D and a {len(sy)}-D tensor (same rank needed)")
        if tuple(so) not in (sx, sy):
            raise Unsupported(f"mul broadcasting both inputs {sx} x {sy}: one input must have the output shape")
        b.add(FloatNode(name, "mul", [b.name(x), b.name(y)]))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        return env[n.inputs[0]] * env[n.inputs[1]]

    def nonneg(self, n: Any, inputs_nonneg: list[bool]) -> bool:
        if n.act is not None and n.act[0] >= 0:
            return True
        return all(inputs_nonneg)

    def multiplier_numerator(self, n: Any, input_scales: list[float]) -> float:
        """The multiplier is s_a s_b / s_out: the product of the input scales (not the larger one)."""
        return float(input_scales[0]) * float(input_scales[1])

    @staticmethod
    def _multipliers(sa: float, sb: float, s_out: float, c: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        from ..fold.dyadic import dyadic_multipliers

        return dyadic_multipliers(np.full((1, c), sa * sb / s_out), f"mul '{name}'")

    def integer_values(self, n: Any, codes: list[torch.Tensor], in_scales: list[float], out_scale: float
                       ) -> torch.Tensor:
        mant, shift = self._multipliers(in_scales[0], in_scales[1], out_scale, 1, n.name)
        return rhu(codes[0] * codes[1], mant[0, 0], shift[0])

    def fold(self, f: Any, n: Any):
        from ..ir.graph import IntNode

        ta, tb = f.tensors[n.inputs[0]], f.tensors[n.inputs[1]]
        tout = f.qtensor(n.name)
        c = tout.shape[0]
        mant, shift = self._multipliers(ta.scale, tb.scale, tout.scale, c, n.name)
        lo, hi = f.clamp_bounds(n.name, n.act)
        return IntNode(n.name, "mul", list(n.inputs), tout,
                       dict(zero_points=[ta.zero_point, tb.zero_point], output_zero_point=tout.zero_point,
                            lo=lo, hi=hi),
                       dict(multiplier=mant[0], shift=shift))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        a, arr = node.attrs, node.arrays
        za, zb = a["zero_points"]
        prod = (env[node.inputs[0]].astype(np.int64) - za) * (env[node.inputs[1]].astype(np.int64) - zb)
        return requantize([(prod, arr["multiplier"])], arr["shift"], a["output_zero_point"], a["lo"], a["hi"])

    @staticmethod
    def lifted_epilogue_bounds(node: Any) -> tuple[list[tuple[int, np.ndarray]], int]:
        """(lanes, const) for :func:`kernels.layout.lifted_epilogue_exact`: the one int32 lane value, ``(q_a - z_a)
        (q_b - z_b)`` over uint8 codes, with its multiplier; no constant term."""
        za, zb = (int(z) for z in node.attrs["zero_points"])
        return [(max(za, 255 - za) * max(zb, 255 - zb), node.arrays["multiplier"])], 0

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a, arr = node.attrs, node.arrays
        return e.emit(te_ops.mul_requant, e.x(0), e.x(1), e.const(arr["multiplier"]), e.const(arr["shift"]),
                      zero_points=a["zero_points"], output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        if b.layout(node.inputs[0]) != NCHWC or b.layout(node.inputs[1]) != NCHWC:
            return b.generic(self, node)
        a, arr = node.attrs, node.arrays
        m, s = (b.const(p) for p in K.pack_channel_params(arr["multiplier"], arr["shift"], kinds="ms"))
        x, y = b.blocked(node.inputs[0]), b.blocked(node.inputs[1])
        # an input of one channel broadcast over the others (a spatial gate): its lane 0 only, the rest is padding
        one_channel = tuple(b.graph.tensor(i).shape[0] == 1 < node.out.shape[0] for i in node.inputs)
        if not any(one_channel) and b.paired_mul(x, y):   # int32 products, requant on int64 lane pairs (mul_vnni.py)
            prim = K.mul_vnni_primfunc(b.hint(node), b.shape(x), b.shape(y), tuple(a["zero_points"]),
                                       a["output_zero_point"], a["lo"], a["hi"], threads=b.threads,
                                       epilogue=b.paired_epilogue(node, lambda: self.lifted_epilogue_bounds(node)))
            return b.call_prim(prim, [x, y, m, s], K.mul_vnni_out_shape(b.shape(x), b.shape(y))), NCHWC
        return b.emit(K.mul_requant_nchwc, x, y, m, s, zero_points=tuple(a["zero_points"]),
                      output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"], one_channel=one_channel,
                      name=b.hint(node)), NCHWC
