"""Relax module from the blocked kernels in ``kernels/``: x86 CPUs (AVX-512 VNNI, or exact AVX2) and CUDA (dp4a).

The network runs in the blocked NCHW16c layout from the first conv to the classifier: the first conv reads the
uint8 NCHW input through the "rows" layout (1-4 channels; x86) or NCHW4c/16c, every weight is pre-packed in numpy at
compile time, and every conv carries its requantize (+ residual add) epilogue. Same integers as
:mod:`ptq2tvm.ir.reference` (tests check bit-exactness). The CUDA build uses the same computes and the VNNI weight
packing (4 input channels of a dot product are 4 consecutive bytes: one dp4a operand), with the x86-only variants
(rows layout, depthwise taps) switched off.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax

import kernels as K

from ..ir.graph import IntegerGraph, IntNode
from . import te_ops
from .relax_builder import add_float_entry

NCHW, NCHWC, FLAT = "nchw", "nchwc", "flat"


def _c(a: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(a))


def _hint(node: IntNode) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)


class _BlockedBuilder:
    def __init__(self, graph: IntegerGraph, isa: str, cuda: bool = False):
        self.graph = graph
        self.isa = isa
        self.cuda = cuda
        self.bb = relax.BlockBuilder()
        self.env: dict[str, tuple[relax.Expr, str]] = {}
        self.weight_bytes = 0

    def weight(self, packed: np.ndarray) -> relax.Constant:
        self.weight_bytes += int(packed.nbytes)
        return _c(packed)

    @staticmethod
    def int4(node: IntNode) -> bool:
        """Weights of <= 4 bits are stored two per byte and unpacked inside the kernel (not for depthwise)."""
        return int(node.attrs.get("w_bits", 8)) <= 4 and int(node.arrays["weight"].min(initial=0)) >= -8 \
            and int(node.arrays["weight"].max(initial=0)) <= 7

    def layout(self, node: IntNode, pack: Callable[[str], np.ndarray]) -> tuple[str, bool, np.ndarray]:
        """(weight layout, ubsw_exact, packed weight) of a conv/dense: VNNI targets (and CUDA) pack 'vnni'; on AVX2 a
        layer whose weights keep every vpmaddubsw pair sum inside int16 for its input's range (proved here from the
        integers, :func:`kernels.layout.u8s8_pairs_exact`) is packed 'vnni' for the vpmaddubsw kernel, any other
        layer 'avx2' (the int16 vpmaddwd kernel)."""
        isa = K.pack_isa(self.isa)
        if isa == "vnni" or self.cuda:
            return "vnni", False, pack("vnni")
        packed = pack("vnni")
        if K.u8s8_pairs_exact(packed, self.graph.tensor(node.inputs[0]).qmax):
            return "vnni", True, packed
        return "avx2", False, pack("avx2")

    def emit(self, fn: Any, *args: Any, name: str, **kw: Any) -> relax.Expr:
        return self.bb.emit_te(fn, *args, **kw, primfunc_name_hint=name)

    def blocked(self, name: str) -> relax.Expr:
        expr, layout = self.env[name]
        if layout == NCHWC:
            return expr
        if layout == NCHW:
            t = self.graph.tensor(name)
            return self.emit(K.te_nchw_to_nchwc, expr, block=16, pad_value=t.zero_point, name="to_nchwc")
        raise ValueError(f"tensor '{name}' is 2-D; a conv/pool cannot consume it")

    def conv(self, node: IntNode) -> tuple[relax.Expr, str]:
        a, arr = node.attrs, node.arrays
        w = arr["weight"]
        extra: list[relax.Expr] = []
        params = [arr["bias"], arr["multiplier"], arr["shift"]]
        if len(node.inputs) > 1:
            params.append(arr["residual_multiplier"])
            extra = [self.blocked(node.inputs[1])]
        packed = K.pack_channel_params(*params)
        consts = [_c(p) for p in packed]
        if extra:
            extra.append(consts.pop())
        kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                  hi=a["hi"], residual_zero_point=a.get("residual_zero_point", 0), isa=K.pack_isa(self.isa))
        xin, layout = self.env[node.inputs[0]]
        cin = w.shape[1] * a["groups"]
        if not self.cuda and layout == NCHW and a["groups"] == 1 and cin <= 4 and a["dilation"][1] == 1:
            rows = self.emit(K.te_nchw_to_rows, xin, kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]),
                             padding=tuple(a["padding"]), pad_value=a["input_zero_point"], name="to_rows")
            kw["isa"], kw["ubsw_exact"], wp = self.layout(
                node, lambda isa: K.pack_rows_weight(w, isa=isa, int4=self.int4(node)))
            wp = self.weight(wp)
            out = self.emit(K.conv2d_rows_requant, rows, wp, *consts, *extra,
                            in_channels=cin, in_width=self.graph.tensor(node.inputs[0]).shape[2],
                            kernel=tuple(w.shape[2:]), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                            dilation=tuple(a["dilation"]), name=_hint(node), **kw)
            return out, NCHWC
        if layout == NCHW and cin <= 4 and a["groups"] == 1:
            xb, icb = self.emit(K.te_nchw_to_nchwc, xin, block=4, pad_value=a["input_zero_point"], name="to_nchw4c"), 4
        else:
            xb, icb = self.blocked(node.inputs[0]), 16
        depthwise = K.conv_weight_mode(w.shape[0], cin, a["groups"], icb) == "depthwise"
        if depthwise and self.isa == "vnni" and not self.cuda and a["dilation"][1] == 1:
            # 4 horizontal taps x 16 channels per vpdpbusd (kernels.depthwise_taps_requant)
            kw.pop("isa")
            return self.emit(K.depthwise_taps_requant, xb, self.weight(K.pack_depthwise_taps(w)), *consts, *extra,
                             kernel_width=int(w.shape[3]), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                             dilation=tuple(a["dilation"]), name=_hint(node), **kw), NCHWC
        if depthwise:
            wp = self.weight(K.pack_conv_weight(w, groups=a["groups"], ic_block=icb))
        else:
            kw["isa"], kw["ubsw_exact"], wp = self.layout(
                node, lambda isa: K.pack_conv_weight(w, groups=a["groups"], ic_block=icb, isa=isa,
                                                     int4=self.int4(node)))
            wp = self.weight(wp)
        out = self.emit(K.conv2d_nchwc_requant, xb, wp, *consts, *extra, stride=tuple(a["stride"]),
                        padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), groups=a["groups"],
                        name=_hint(node), **kw)
        return out, NCHWC

    def dense(self, node: IntNode) -> tuple[relax.Expr, str]:
        a, arr = node.attrs, node.arrays
        xin, layout = self.env[node.inputs[0]]
        if layout != FLAT:
            raise ValueError(f"dense '{node.name}' needs a 2-D input")
        params = [arr["bias"], arr["multiplier"], arr["shift"]]
        extra: list[relax.Expr] = []
        if len(node.inputs) > 1:
            params.append(arr["residual_multiplier"])
            extra = [self.env[node.inputs[1]][0]]
        consts = [_c(p) for p in K.pack_channel_params(*params)]
        if extra:
            extra.append(consts.pop())
        isa, exact, wp = self.layout(node, lambda isa: K.pack_dense_weight(arr["weight"], isa=isa,
                                                                             int4=self.int4(node)))
        out = self.emit(K.dense_requant, xin, self.weight(wp), *consts, *extra,
                        out_features=int(arr["weight"].shape[0]), input_zero_point=a["input_zero_point"],
                        output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"],
                        residual_zero_point=a.get("residual_zero_point", 0), isa=isa, ubsw_exact=exact,
                        name=_hint(node))
        return out, FLAT

    def node(self, node: IntNode) -> tuple[relax.Expr, str]:
        a, arr = node.attrs, node.arrays
        if node.op == "conv2d":
            return self.conv(node)
        if node.op == "dense":
            return self.dense(node)
        xin, layout = self.env[node.inputs[0]]
        if node.op == "flatten":
            if layout == FLAT:
                return xin, FLAT
            c, h, w = self.graph.tensor(node.inputs[0]).shape
            if layout == NCHWC and h == w == 1:
                return self.emit(K.nchwc_flatten, xin, channels=c, name=_hint(node)), FLAT
            if layout == NCHWC:
                xin = self.emit(K.te_nchwc_to_nchw, xin, channels=c, name="to_nchw")
            return self.emit(te_ops.flatten, xin, name=_hint(node)), FLAT
        if layout == FLAT:   # elementwise ops on 2-D tensors: the generic NCHW definitions handle any rank
            return self._generic(node), FLAT
        x = self.blocked(node.inputs[0])
        if node.op == "maxpool2d":
            return self.emit(K.maxpool2d_nchwc, x, kernel=tuple(a["kernel"]), stride=tuple(a["stride"]),
                             padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), name=_hint(node)), NCHWC
        if node.op == "avgpool2d":
            m, s = (_c(p) for p in K.pack_channel_params(arr["multiplier"], arr["shift"], kinds="ms"))
            _, h, w = self.graph.tensor(node.inputs[0]).shape
            kw = dict(input_zero_point=a["input_zero_point"], output_zero_point=a["output_zero_point"], lo=a["lo"],
                      hi=a["hi"], name=_hint(node))
            if list(a["kernel"]) == [h, w] and list(a["padding"]) == [0, 0]:
                return self.emit(K.global_avgpool_nchwc_requant, x, m, s, **kw), NCHWC
            return self.emit(K.avgpool2d_nchwc_requant, x, m, s, kernel=tuple(a["kernel"]),
                             stride=tuple(a["stride"]), padding=tuple(a["padding"]), **kw), NCHWC
        if node.op == "add":
            ma, mb, s = (_c(p) for p in K.pack_channel_params(arr["multiplier_a"], arr["multiplier_b"],
                                                              arr["shift"], kinds="mms"))
            return self.emit(K.add_requant_nchwc, x, self.blocked(node.inputs[1]), ma, mb, s,
                             zero_points=tuple(a["zero_points"]), output_zero_point=a["output_zero_point"],
                             lo=a["lo"], hi=a["hi"], name=_hint(node)), NCHWC
        if node.op == "clamp":
            return self.emit(K.clamp_nchwc, x, lo=a["lo"], hi=a["hi"], name=_hint(node)), NCHWC
        raise ValueError(f"unknown op {node.op!r} at '{node.name}'")

    def _generic(self, node: IntNode) -> relax.Expr:
        a, arr = node.attrs, node.arrays
        x = self.env[node.inputs[0]][0]
        if node.op == "add":
            return self.emit(te_ops.add_requant, x, self.env[node.inputs[1]][0], _c(arr["multiplier_a"]),
                             _c(arr["multiplier_b"]), _c(arr["shift"]), zero_points=a["zero_points"],
                             output_zero_point=a["output_zero_point"], lo=a["lo"], hi=a["hi"], name=_hint(node))
        if node.op == "clamp":
            return self.emit(te_ops.clamp, x, lo=a["lo"], hi=a["hi"], name=_hint(node))
        raise ValueError(f"op {node.op!r} at '{node.name}' cannot take a 2-D input")

    def build(self, batch: int) -> tvm.IRModule:
        g = self.graph
        x = relax.Var("x", relax.TensorType((batch, *g.input.shape), "uint8"))
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                self.env[g.input.name] = (x, NCHW if len(g.input.shape) == 3 else FLAT)
                for node in g.nodes:
                    self.env[node.name] = self.node(node)
                out, layout = self.env[g.output_name]
                if layout == NCHWC:
                    out = self.emit(K.te_nchwc_to_nchw, out, channels=g.output.shape[0], name="to_nchw")
                res = self.bb.emit_output(out)
            self.bb.emit_func_output(res)
        return self.bb.get()


def x86_isa(target: dict[str, Any]) -> tuple[str | None, str]:
    """('vnni' | 'avxvnni' | 'avx2', '') when the kernels can serve ``target``, else (None, the reason)."""
    if target.get("kind") != "llvm":
        return None, f"target kind {target.get('kind')!r} is not an x86 CPU"
    try:
        return K.target_isa(tvm.target.Target(target)), ""
    except Exception as e:  # a target the kernels do not know (no AVX2, other architecture)
        return None, f"{type(e).__name__}: {e}"


def build_x86_module(graph: IntegerGraph, batch: int, target: dict[str, Any],
                     scheduler: Callable[[tvm.IRModule], tvm.IRModule] | None = None) -> tuple[tvm.IRModule, int]:
    """The scheduled Relax module for ``target`` (pass it to ``tvm.compile`` unchanged) and the bytes of its packed
    weights (int4 layers two values per byte). ``scheduler`` schedules the kernels (default: the hand schedules,
    ``kernels.schedule_module``; ``backend.tune.KernelTuner`` measures and replays records)."""
    isa, why = x86_isa(target)
    if isa is None:
        raise ValueError(f"the x86 kernels do not support target {target}: {why}")
    mod, weight_bytes = build_blocked_module(graph, batch, isa)
    if scheduler is None:
        return K.schedule_module(mod, tvm.target.Target(target)), weight_bytes
    return scheduler(mod), weight_bytes


def build_blocked_module(graph: IntegerGraph, batch: int, isa: str, cuda: bool = False) -> tuple[tvm.IRModule, int]:
    """The unscheduled blocked Relax module (with the float entry) and the bytes of its packed weights. ``cuda``
    switches off the x86-only kernels (rows layout, depthwise taps): what the CUDA build schedules."""
    builder = _BlockedBuilder(graph, isa, cuda=cuda)
    return add_float_entry(builder.build(batch), graph, batch), builder.weight_bytes


def build_cuda_module(graph: IntegerGraph, batch: int) -> tuple[tvm.IRModule, int]:
    """The Relax module for a CUDA target: convs scheduled for dp4a (:mod:`kernels.cuda`), every other kernel left
    to TVM's default GPU schedules; and the bytes of its packed weights (int4 layers two values per byte)."""
    mod, weight_bytes = build_blocked_module(graph, batch, "vnni", cuda=True)
    return K.schedule_module_cuda(mod), weight_bytes
