"""conv / linear: weights (BN folded in), int32 bias, per-channel dyadic requantize, fused residual add and clamp.

Integer contract (docs/integer_arithmetic.md)::

    acc_c = bias_c + sum q_x * q_w          (q_x padded with z_x: padding is a real zero)
    q_out = clamp(z_out + RHU(acc_c * m_c [+ (q_r - z_r) * mr_c], n_c), lo, hi)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


from .base import OpDef, Unsupported, register
from .common import FLAT, NCHWC, arg, pair, requantize


def _conv_node(name: str, inp: str, m: nn.Conv2d):
    from ..frontend.graph import FloatNode

    if m.padding_mode != "zeros":
        raise Unsupported(f"padding_mode={m.padding_mode!r} (only 'zeros')")
    k = pair(m.kernel_size)
    d = pair(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0, 0)
        elif all((d[i] * (k[i] - 1)) % 2 == 0 for i in range(2)):
            pad = tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
        else:
            raise Unsupported("padding='same' with an even kernel (asymmetric padding)")
    else:
        pad = pair(m.padding)
    w = m.weight.detach().clone().float()
    b = m.bias.detach().clone().float() if m.bias is not None else torch.zeros(w.shape[0])
    attrs = dict(stride=pair(m.stride), padding=tuple(pad), dilation=d, groups=int(m.groups))
    return FloatNode(name, "conv", [inp], attrs, weight=w, bias=b)


class _Weighted(OpDef):
    kind = "weighted"

    def forward(self, qm: Any, n: Any, env: dict[str, torch.Tensor]) -> torch.Tensor:
        q_in = qm.act_quantizer(n.inputs[0])
        y = qm.layer(n.name)(env[n.inputs[0]], q_in.scale if q_in.enabled else None)
        if n.residual:
            y = y + env[n.residual]
        return y

    def fold(self, f: Any, n: Any):
        from ..fold.fold import fold_weighted

        return fold_weighted(f, n)

    def _terms(self, node: Any, env: dict[str, np.ndarray], acc: np.ndarray) -> list:
        a, arr = node.attrs, node.arrays
        from ..ir.reference import check_int32

        terms = [(check_int32(acc, node), arr["multiplier"])]
        if len(node.inputs) > 1:
            r = env[node.inputs[1]].astype(np.int64) - a["residual_zero_point"]
            terms.append((r, arr["residual_multiplier"]))
        return terms

    def _plain_args(self, e: Any, node: Any) -> tuple[list, dict]:
        a, arr = node.attrs, node.arrays
        args = [e.x(0), e.const(arr["weight"]), e.const(arr["bias"]), e.const(arr["multiplier"]),
                e.const(arr["shift"])]
        kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                  hi=a["hi"])
        if len(node.inputs) > 1:
            args += [e.x(1), e.const(arr["residual_multiplier"])]
            kw["residual_zero_point"] = a["residual_zero_point"]
        return args, kw

    @staticmethod
    def _channel_consts(b: Any, node: Any, residual: Any | None) -> tuple[list, list]:
        import kernels as K

        arr = node.arrays
        params = [arr["bias"], arr["multiplier"], arr["shift"]]
        if residual is not None:
            params.append(arr["residual_multiplier"])
        consts = [b.const(p) for p in K.pack_channel_params(*params)]
        extra: list = []
        if residual is not None:
            extra = [residual, consts.pop()]
        return consts, extra


def lifted_epilogue_bounds(b: Any, node: Any) -> tuple[list[tuple[Any, np.ndarray]], list[int]]:
    """(lanes, const) of a conv node for :func:`kernels.layout.lifted_epilogue_exact`, the builder's choice of
    epilogue form: the accumulator without its bias over every input code in [0, qmax_in]
    (:func:`ptq2tvm.fold.bounds.accumulator_range` of a zero bias) and the residual's uint8 code, with their
    multipliers; the rest of the rounding constant ``|bias * m| + z_r * mr`` per channel (Python ints)."""
    from ..fold.bounds import accumulator_range

    a, arr = node.attrs, node.arrays
    bias, m = arr["bias"], arr["multiplier"]
    lo, hi = accumulator_range(arr["weight"], np.zeros_like(bias), b.graph.tensor(node.inputs[0]).qmax)
    lanes = [(np.maximum(-lo, hi), m)]
    const = [abs(int(v)) * abs(int(x)) for v, x in zip(bias, m)]
    if len(node.inputs) > 1:
        z, mr = int(a["residual_zero_point"]), arr["residual_multiplier"]
        lanes.append((255, mr))
        const = [c + z * abs(int(x)) for c, x in zip(const, mr)]
    return lanes, const


def _epilogue(b: Any, node: Any) -> str:
    """The builder's paired epilogue form for conv ``node`` (:meth:`BlockedBuilder.paired_epilogue`)."""
    return b.paired_epilogue(node, lambda: lifted_epilogue_bounds(b, node))


def _requant_args(kw: dict[str, Any]) -> dict[str, Any]:
    """The output requant arguments (zero point, clamp, residual zero point) of a conv's kernel keywords."""
    return {k: kw[k] for k in ("output_zero_point", "lo", "hi", "residual_zero_point")}


@register
class Conv(_Weighted):
    op, ir_op = "conv", "conv2d"
    modules = (nn.Conv2d,)
    functions = (F.conv2d,)
    summary = "Conv2d (any groups, depthwise included, zero padding; F.conv2d with constant weights)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        if module is None:      # F.conv2d(x, weight, bias, stride, padding, dilation, groups), weights constant
            w = b.constant(arg(node, 1, "weight", None))
            bias = b.constant(arg(node, 2, "bias", None))
            module = nn.Conv2d(w.shape[1] * int(arg(node, 6, "groups", 1)), w.shape[0], tuple(w.shape[2:]),
                               arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1),
                               int(arg(node, 6, "groups", 1)), bias=bias is not None)
            with torch.no_grad():
                module.weight.copy_(w)
                if bias is not None:
                    module.bias.copy_(bias)
        b.add(_conv_node(name, b.inp(node), module))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        from ..ir.reference import conv_accumulate

        a, arr = node.attrs, node.arrays
        acc = conv_accumulate(env[node.inputs[0]], arr["weight"], arr["bias"], a["stride"], a["padding"],
                              a["dilation"], a["groups"], a["input_zero_point"])
        return requantize(self._terms(node, env, acc), arr["shift"], a["output_zero_point"], a["lo"], a["hi"])

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        a = node.attrs
        args, kw = self._plain_args(e, node)
        kw.update(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
        return e.emit(te_ops.conv2d_requant, *args, **kw)

    @staticmethod
    def _rows_input(b: Any, node: Any) -> Any:
        """The network input of a first conv in the row layout (the builder's ``emit_rows``)."""
        a, w = node.attrs, node.arrays["weight"]
        return b.emit_rows(b.env[node.inputs[0]][0], kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]),
                           padding=tuple(a["padding"]), pad_value=a["input_zero_point"])

    def emit_blocked_with_maxpool(self, b: Any, node: Any, pool: Any) -> tuple[Any, str]:
        """First conv ``node`` and the max pool ``pool`` that alone reads it, as one kernel
        (:meth:`_BlockedBuilder.stem_pool_pairs` decides where; :func:`kernels.rows_conv_maxpool_primfunc`)."""
        import kernels as K

        a, w = node.attrs, node.arrays["weight"]
        consts, _ = self._channel_consts(b, node, None)
        out = b.emit_rows_conv_maxpool(self._rows_input(b, node), K.pack_rows_weight(w, isa="vnni"), consts,
                                       name=f"{b.hint(node)}_{b.hint(pool)[2:]}", in_channels=int(w.shape[1]),
                                       in_width=b.graph.tensor(node.inputs[0]).shape[2],
                                       kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]),
                                       padding=tuple(a["padding"]), pool=pool,
                                       output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"],
                                       epilogue=_epilogue(b, node))
        return out, NCHWC

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K
        from kernels.vector_tir import LIFTED_EPILOGUES

        a, arr = node.attrs, node.arrays
        w = arr["weight"]
        residual = b.blocked(node.inputs[1]) if len(node.inputs) > 1 else None
        consts, extra = self._channel_consts(b, node, residual)
        kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                  hi=a["hi"], residual_zero_point=a.get("residual_zero_point", 0), isa=K.pack_isa(b.isa))
        xin, layout = b.env[node.inputs[0]]
        cin = w.shape[1] * a["groups"]
        name = b.hint(node)
        mid = b.expand_of.get(node.name)
        if mid is not None:     # the 1x1 expand that produces this input runs inside the same kernel
            consts1, _ = self._channel_consts(b, mid, None)
            w1 = K.pack_conv_weight(mid.arrays["weight"], groups=1, ic_block=16, isa="vnni", **b.packing(mid))
            return b.emit_expand_depthwise(b.blocked(mid.inputs[0]), w1, consts1, K.pack_depthwise_taps(w),
                                           consts, extra, name=name, kernel_width=int(w.shape[3]),
                                           epilogue=(_epilogue(b, mid), _epilogue(b, node)),
                                           stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                                           dilation_h=int(a["dilation"][0]), mid=mid, **_requant_args(kw)), NCHWC
        if not b.cuda and layout == "nchw" and a["groups"] == 1 and cin <= 4 and a["dilation"][1] == 1:
            rows = self._rows_input(b, node)
            kw["isa"], kw["ubsw_exact"], wp = b.weight_layout(
                node, lambda isa: K.pack_rows_weight(w, isa=isa, **b.packing(node)))
            amx = b.amx_rows(node, wp, kw["ubsw_exact"])
            if amx is not None:
                return b.emit_amx_rows_conv(rows, amx, consts, extra, name=name, in_channels=cin,
                                            in_width=b.graph.tensor(node.inputs[0]).shape[2],
                                            kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]),
                                            padding=tuple(a["padding"]), epilogue=_epilogue(b, node),
                                            **_requant_args(kw)), NCHWC
            wp = b.weight(wp)
            kw["shift_ge32"] = b.int32_epilogue(node)
            out = b.emit(K.conv2d_rows_requant, rows, wp, *consts, *extra,
                         in_channels=cin, in_width=b.graph.tensor(node.inputs[0]).shape[2],
                         kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                         dilation=tuple(a["dilation"]), name=name, **kw)
            return out, NCHWC
        if layout == "nchw" and cin <= 4 and a["groups"] == 1:
            xb, icb = b.emit(K.te_nchw_to_nchwc, xin, block=4, pad_value=a["input_zero_point"], name="to_nchw4c"), 4
        else:
            xb, icb = b.blocked(node.inputs[0]), 16
        depthwise = K.conv_weight_mode(w.shape[0], cin, a["groups"], icb) == "depthwise"
        if depthwise and b.isa == "vnni" and not b.cuda and a["dilation"][1] == 1:
            # 4 horizontal taps x 16 channels per vpdpbusd (kernels.depthwise_taps_requant); with shortcuts the
            # explicit-vector kernel with the paired epilogue (kernels.depthwise_vnni)
            if b.vector_kernels():
                return b.emit_depthwise_vnni(xb, K.pack_depthwise_taps(w), consts, extra, name=name,
                                             epilogue=_epilogue(b, node),
                                             kernel_width=int(w.shape[3]), stride=tuple(a["stride"]),
                                             padding=tuple(a["padding"]), dilation_h=int(a["dilation"][0]),
                                             input_zero_point=kw["input_zero_point"], **_requant_args(kw)), NCHWC
            kw.pop("isa")
            return b.emit(K.depthwise_taps_requant, xb, b.weight(K.pack_depthwise_taps(w)), *consts, *extra,
                          kernel_width=int(w.shape[3]), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                          dilation=tuple(a["dilation"]), name=name, **kw), NCHWC
        if depthwise:
            wp = K.pack_conv_weight(w, groups=a["groups"], ic_block=icb)
            kw["i16_group"] = int(b.depthwise_int16(node, wp))
            wp = b.weight(wp)
        else:
            kw["isa"], kw["ubsw_exact"], wp = b.weight_layout(
                node, lambda isa: K.pack_conv_weight(w, groups=a["groups"], ic_block=icb, isa=isa,
                                                     **b.packing(node)))
            kw["i16_group"] = b.int16_group(node, wp) if kw["ubsw_exact"] else 0
            amx = b.amx_weight(node, xb, wp, kw["ubsw_exact"])
            if amx is not None:
                return b.emit_amx_conv(xb, amx, consts, extra, name=name, stride=tuple(a["stride"]),
                                       padding=tuple(a["padding"]), input_zero_point=kw["input_zero_point"],
                                       epilogue=_epilogue(b, node), **_requant_args(kw)), NCHWC
            wp = b.weight(wp)
        kw["shift_ge32"] = b.int32_epilogue(node)
        if not depthwise and not kw["shift_ge32"] and not b.cuda and b.vector_kernels():
            form = _epilogue(b, node)      # AVX-512: the tensorized epilogue runs the lifted form where proved
            if form in LIFTED_EPILOGUES:
                kw["lifted"] = form
        if not depthwise and a["groups"] == 1 and not b.cuda:   # a 1x1 conv skips the padded channels' steps
            kw["in_channels"] = cin
        out = b.emit(K.conv2d_nchwc_requant, xb, wp, *consts, *extra, stride=tuple(a["stride"]),
                     padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), groups=a["groups"], name=name, **kw)
        return out, NCHWC


@register
class Linear(_Weighted):
    op, ir_op = "linear", "dense"
    modules = (nn.Linear,)
    functions = (F.linear,)
    summary = "Linear (on (N, features); F.linear with constant weights; not x @ W: use nn.Linear or F.linear)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        shape = b.shape(node.args[0])
        if len(shape) != 2:
            raise Unsupported(f"Linear on a {len(shape)}-D input (only 2-D (N, features))")
        if module is None:      # F.linear(x, weight, bias), weights constant
            w = b.constant(arg(node, 1, "weight", None)).detach().clone().float()
            bias = b.constant(arg(node, 2, "bias", None))
            bias = bias.detach().clone().float() if bias is not None else torch.zeros(w.shape[0])
        else:
            w = module.weight.detach().clone().float()
            bias = module.bias.detach().clone().float() if module.bias is not None else torch.zeros(w.shape[0])
        b.add(FloatNode(name, "linear", [b.inp(node)], {}, weight=w, bias=bias))

    def reference(self, node: Any, env: dict[str, np.ndarray]) -> np.ndarray:
        a, arr = node.attrs, node.arrays
        x = env[node.inputs[0]]
        acc = np.rint(x.astype(np.float64) @ arr["weight"].astype(np.float64).T).astype(np.int64)
        acc += arr["bias"].astype(np.int64)[None, :]
        return requantize(self._terms(node, env, acc), arr["shift"], a["output_zero_point"], a["lo"], a["hi"])

    def emit_plain(self, e: Any, node: Any) -> Any:
        from ..backend import te_ops

        args, kw = self._plain_args(e, node)
        return e.emit(te_ops.dense_requant, *args, **kw)

    def emit_blocked(self, b: Any, node: Any) -> tuple[Any, str]:
        import kernels as K

        a, arr = node.attrs, node.arrays
        xin = b.flat(node.inputs[0])
        residual = b.flat(node.inputs[1]) if len(node.inputs) > 1 else None
        consts, extra = self._channel_consts(b, node, residual)
        isa, exact, wp = b.weight_layout(node, lambda isa: K.pack_dense_weight(arr["weight"], isa=isa,
                                                                               **b.packing(node)))
        out = b.emit(K.dense_requant, xin, b.weight(wp), *consts, *extra,
                     out_features=int(arr["weight"].shape[0]), input_zero_point=a["input_zero_point"],
                     output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"],
                     residual_zero_point=a.get("residual_zero_point", 0), isa=isa, ubsw_exact=exact,
                     name=b.hint(node))
        return out, FLAT


@register
class BatchNorm(OpDef):
    """BatchNorm2d: folded into the preceding conv by the tracer's fusion pass (never reaches the fake-quant model)."""

    op, kind = "bn", "trace"
    modules = (nn.BatchNorm2d,)
    summary = "BatchNorm2d (after a conv)"

    def trace(self, b: Any, node: Any, name: str, module: Any | None) -> None:
        from ..frontend.graph import FloatNode

        if not module.track_running_stats or module.running_mean is None:
            raise Unsupported("BatchNorm2d without running statistics")
        b.add(FloatNode(name, "bn", [b.inp(node)], dict(module=module)))



