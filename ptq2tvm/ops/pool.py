"""Pooling: max pool on integer codes (same grid), average pool as an integer window sum + requantize.

Integer contracts (docs/integer_arithmetic.md)::

    maxpool2d: q = max over the window of q_in (padding: code 0, below every real code; ceil_mode adds
               ``padding_end`` rows/columns at the bottom/right, every window keeps at least one real element)
    avgpool2d: acc = sum over the window of (q_in padded with z_in) - z_in * KH * KW;
               q = clamp(z_out + RHU(acc * m, n), lo, hi)          (m / 2^n ~ s_in / (s_out * KH * KW))

``AdaptiveAvgPool2d`` and ``mean`` over (H, W) become an ``avgpool`` (an integer output size divides the input).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpDef, Unsupported, ir_op, register
from .common import NCHWC, arg, pair, requantize, rhu


def _pool_attrs(kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> dict[str, Any]:
    k = pair(kernel)
    s = pair(stride if stride not in (None, ()) else kernel)
    return dict(kernel=k, stride=s, padding=pair(padding), dilation=pair(dilation))


def _ceil_padding(in_hw: tuple[int, int], attrs: dict[str, Any]) -> tuple[int, int]:
    out = []
    for i in range(2):
        size, k, s, p, d = in_hw[i], attrs["kernel"][i], attrs["stride"][i], attrs["padding"][i], attrs["dilation"][i]
        span = d * (k - 1) + 1
        n_ceil = -(-(size + 2 * p - span) // s) + 1
        if (n_ceil - 1) * s >= size + p:
            n_ceil -= 1
        need = (n_ceil - 1) * s + span - (size + 2 * p)
        out.append(max(0, need))
    return out[0], out[1]


@register
class MaxPool(OpDef):
    op, ir_op = "maxpool", "maxpool2d"
    kind = "grid"
    modules = (nn.MaxPool2d,)
    functions = (F.max_pool2d,)
    summary = "MaxPool2d (ceil_mode too)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        if module is not None:
            k, s, p, d, ceil, ri = (module.kernel_size, module.stride, module.padding, module.dilation,
                                    module.ceil_mode, module.return_indices)
        else:
            k, s, p, d, ceil, ri = (arg(node, 1, "kernel_size", None), arg(node, 2, "stride", None),
                                    arg(node, 3, "padding", 0), arg(node, 4, "dilation", 1),
                                    arg(node, 5, "ceil_mode", False), arg(node, 6, "return_indices", False))
        if ri:
            raise Unsupported("MaxPool2d with return_indices=True")
        attrs = _pool_attrs(k, s, p, d)
        if ceil:
            shape = b.shape(node.args[0])
            attrs["padding_end"] = _ceil_padding((int(shape[-2]), int(shape[-1])), attrs)
        b.add(FloatNode(name, "maxpool", [b.inp(node)], attrs))

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = n.attrs
        x = env[n.inputs[0]]
        pe = a.get("padding_end", (0, 0))
        if any(pe):
            return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"], ceil_mode=True)
        return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"])

    def fold(self, f: Any, n: Any):
        attrs = {k: list(n.attrs[k]) for k in ("kernel", "stride", "padding", "dilation")}
        if any(n.attrs.get("padding_end", (0, 0))):
            attrs["padding_end"] = list(n.attrs["padding_end"])
        return f.grid_node(n, "maxpool2d", attrs)

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        from ..ir.reference import pad, windows

        a = node.attrs
        x = pad(env[node.inputs[0]], a["padding"], 0, a.get("padding_end"))
        return windows(x, a["kernel"], a["stride"], a["dilation"]).max(axis=(4, 5))

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a = node.attrs
        return e.emit(te_ops.maxpool, e.x(0), kernel=a["kernel"], stride=a["stride"], padding=a["padding"],
                      dilation=a["dilation"], padding_end=a.get("padding_end", (0, 0)))

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        conv = b.pool_of.get(node.name)
        if conv is not None:        # the first conv and this pool in one kernel, the pool on its accumulators
            return ir_op(conv.op).emit_blocked_with_maxpool(b, conv, node)
        a = node.attrs
        return b.emit(K.maxpool2d_nchwc, b.blocked(node.inputs[0]), kernel=tuple(a["kernel"]),
                      stride=tuple(a["stride"]), padding=tuple(a["padding"]), dilation=tuple(a["dilation"]),
                      padding_end=tuple(a.get("padding_end", (0, 0))), name=b.hint(node)), NCHWC


def _adaptive(b: Any, node: Any, name: str, output_size: Any) -> None:
    from ..frontend.graph import FloatNode

    shape = b.shape(node.args[0])
    h, w = int(shape[-2]), int(shape[-1])
    size = (None, None) if output_size is None else (output_size,) * 2 if isinstance(output_size, int) else output_size
    oh, ow = (h if size[0] is None else int(size[0])), (w if size[1] is None else int(size[1]))
    if h % oh or w % ow:
        raise Unsupported(f"AdaptiveAvgPool2d to {(oh, ow)} from {(h, w)} (input size must be a multiple)")
    k = (h // oh, w // ow)
    b.add(FloatNode(name, "avgpool", [b.inp(node)], dict(kernel=k, stride=k, padding=(0, 0), dilation=(1, 1))))


@register
class AvgPool(OpDef):
    op, ir_op = "avgpool", "avgpool2d"
    kind = "requant"
    modules = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    functions = (F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean)
    methods = ("mean",)
    summary = "AvgPool2d, AdaptiveAvgPool2d (to a divisor of the input size), mean over (H, W) (keepdim too)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        if isinstance(module, nn.AdaptiveAvgPool2d):
            return _adaptive(b, node, name, module.output_size)
        if node.target is F.adaptive_avg_pool2d:
            return _adaptive(b, node, name, arg(node, 1, "output_size", None))
        if node.target is torch.mean or node.target == "mean":
            return self._mean(b, node, name)
        if module is not None:
            k, s, p, ceil, cip, div = (module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                       module.count_include_pad, module.divisor_override)
        else:
            k, s, p, ceil, cip, div = (arg(node, 1, "kernel_size", None), arg(node, 2, "stride", None),
                                       arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False),
                                       arg(node, 5, "count_include_pad", True), arg(node, 6, "divisor_override", None))
        attrs = _pool_attrs(k, s, p)
        if ceil:
            raise Unsupported("AvgPool2d with ceil_mode=True")
        if div is not None:
            raise Unsupported("AvgPool2d with divisor_override")
        if not cip and attrs["padding"] != (0, 0):
            raise Unsupported("AvgPool2d with padding and count_include_pad=False")
        b.add(FloatNode(name, "avgpool", [b.inp(node)], attrs))

    def _mean(self, b: Any, node: Any, name: str) -> None:
        from ..frontend.graph import FloatNode

        shape = b.shape(node.args[0])
        dims = arg(node, 1, "dim", None)
        if dims is None:
            raise Unsupported("mean over all dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(shape)
        if rank != 4 or sorted(d % rank for d in dims) != [2, 3]:
            raise Unsupported(f"mean over dims {dims} (only the spatial dims 2 and 3 of a 4-D tensor)")
        keep = bool(arg(node, 2, "keepdim", False))
        k = (int(shape[2]), int(shape[3]))
        b.add(FloatNode(name, "avgpool", [b.inp(node)], dict(kernel=k, stride=k, padding=(0, 0), dilation=(1, 1))))
        if not keep:
            b.add(FloatNode(name + ".flatten", "flatten", [name]))
            b.alias[name] = name + ".flatten"

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        a = n.attrs
        return F.avg_pool2d(env[n.inputs[0]], a["kernel"], a["stride"], a["padding"], count_include_pad=True)

    @staticmethod
    def _multipliers(n: Any, s_in: float, s_out: float, c: int) -> tuple[np.ndarray, np.ndarray]:
        from ..fold.dyadic import dyadic_multipliers

        kh, kw = n.attrs["kernel"]
        return dyadic_multipliers(np.full((1, c), s_in / (s_out * kh * kw)), f"avgpool '{n.name}'")

    def integer_values(self, n: Any, codes: list[torch.Tensor], in_scales: list[float], out_scale: float
                       ) -> torch.Tensor:
        a = n.attrs
        # the window sums of q - z (padding is z: 0 here), exact in float64 (|sum| <= 2^31), as the integer op forms them
        acc = F.avg_pool2d(codes[0].double(), a["kernel"], a["stride"], a["padding"], count_include_pad=True,
                           divisor_override=1)
        mant, shift = self._multipliers(n, in_scales[0], out_scale, 1)
        return rhu(torch.round(acc).to(torch.int64), mant[0, 0], shift[0])

    def fold(self, f: Any, n: Any):
        from ..ir.graph import IntNode

        tin, tout = f.tensors[n.inputs[0]], f.qtensor(n.name)
        kh, kw = n.attrs["kernel"]
        c = tout.shape[0]
        mant, shift = self._multipliers(n, tin.scale, tout.scale, c)
        lo, hi = f.clamp_bounds(n.name, n.act)
        return IntNode(n.name, "avgpool2d", list(n.inputs), tout,
                       dict(kernel=[kh, kw], stride=list(n.attrs["stride"]), padding=list(n.attrs["padding"]),
                            input_zero_point=tin.zero_point, output_zero_point=tout.zero_point, lo=lo, hi=hi),
                       dict(multiplier=mant[0], shift=shift))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        from ..ir.reference import pad, windows

        a, arr = node.attrs, node.arrays
        z = a["input_zero_point"]
        win = windows(pad(env[node.inputs[0]], a["padding"], z), a["kernel"], a["stride"], [1, 1])
        acc = win.astype(np.int64).sum(axis=(4, 5)) - z * a["kernel"][0] * a["kernel"][1]
        return requantize([(acc, arr["multiplier"])], arr["shift"], a["output_zero_point"], a["lo"], a["hi"])

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a, arr = node.attrs, node.arrays
        return e.emit(te_ops.avgpool_requant, e.x(0), e.const(arr["multiplier"]), e.const(arr["shift"]),
                      kernel=a["kernel"], stride=a["stride"], padding=a["padding"],
                      input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"],
                      lo=a["lo"], hi=a["hi"])

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        a, arr = node.attrs, node.arrays
        x = b.blocked(node.inputs[0])
        m, s = (b.const(p) for p in K.pack_channel_params(arr["multiplier"], arr["shift"], kinds="ms"))
        _, h, w = b.graph.tensor(node.inputs[0]).shape
        kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                  hi=a["hi"], name=b.hint(node))
        if list(a["kernel"]) == [h, w] and list(a["padding"]) == [0, 0]:
            return b.emit(K.global_avgpool_nchwc_requant, x, m, s, **kw), NCHWC
        return b.emit(K.avgpool2d_nchwc_requant, x, m, s, kernel=tuple(a["kernel"]), stride=tuple(a["stride"]),
                      padding=tuple(a["padding"]), **kw), NCHWC
