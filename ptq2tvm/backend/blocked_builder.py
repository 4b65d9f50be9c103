"""Relax module from the blocked kernels in ``kernels/``: x86 CPUs (AVX-512 VNNI, or exact AVX2) and CUDA (dp4a).

The network runs in the blocked NCHW16c layout from the first conv to the classifier: the first conv reads the
uint8 NCHW input through the "rows" layout (1-4 channels; x86) or NCHW4c/16c, every weight is pre-packed in numpy at
compile time, and every conv carries its requantize (+ residual add) epilogue. Same integers as
:mod:`ptq2tvm.ir.reference` (tests check bit-exactness). The CUDA build uses the same computes and the VNNI weight
packing (4 input channels of a dot product are 4 consecutive bytes: one dp4a operand), with the x86-only variants
(rows layout, depthwise taps) switched off.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import numpy as np
import tvm
from tvm import relax

import kernels as K
from kernels.vector_tir import EPILOGUE_INT32, EPILOGUE_INT64, EPILOGUE_LIFTED, EPILOGUE_LIFTED_SHIFT

from ..ir.graph import IntegerGraph, IntNode
from ..ops import ir_op
from .relax_builder import PlainEmitter, add_checked_float_entry, add_float_entry
from .storage import check_subbyte_storage, int4_weights, keeps_int8_storage

NCHW, NCHWC, FLAT = "nchw", "nchwc", "flat"
FUSED = "fused"     # a tensor never materialized: computed inside its only consumer's kernel
#: set to "1" at compile time: no per-layer arithmetic shortcuts (BlockedBuilder.shortcuts)
BASELINE_KERNELS_ENV = "PTQ2TVM_BASELINE_KERNELS"


def packs_int2(isa: str | None, cuda: bool = False) -> bool:
    """Whether a build stores 2-bit weights four per byte (:func:`kernels.pack_conv_weight` ``int2``): CUDA (dp4a;
    bit-exact on an H200 and in the CPU emulation) and every x86 kernel ISA (``isa`` = :func:`kernels.target_isa`:
    AVX2, AVX-512 VNNI, AVX-VNNI; each run bit-exact in tests/test_kernels_x86.py on a host that has it). Packed
    weights never take the AMX kernels (int8 tiles), so AMX builds run those layers on AVX-512 VNNI."""
    return bool(cuda) or isa in ("avx2", "vnni", "avxvnni")


def amx_conv_scheme(weight_shape: tuple[int, ...], groups: int, stride: tuple[int, int], dilation: tuple[int, int],
                    rows_input: bool) -> str | None:
    """The AMX kernel an AMX build gives a conv with an OIHW weight of ``weight_shape`` (kernels/amx.py): "rows"
    (the first conv, on the row layout: ``rows_input``), "c64", "taps", or None (AVX-512 VNNI). A rule measured kernel
    by kernel against VNNI on an Intel Xeon (2 threads; kernels/README.md "AMX-INT8"):

    * "c64" (64-channel blocks; K = 64 per tap) where padding the input channels to 64 adds <= 25%: kernels wider
      than 1 at any stride (1.7-3.4x), 1x1 convs with >= 320 input channels at stride 1 (1.0-1.3x) or any at
      stride 2 (ResNet-18's 64- and 128-channel downsamples: the network 0.99x at batch 1 and 8 with the pipelined
      epilogue, interleaved A/B against VNNI for them);
    * else "taps" (the 16-channel VNNI packing; K = KW x 16) at stride 1 with KW <= 4: small 3x3 and 1x1 convs
      (1.0-1.5x);
    * else None (strided convs with few channels; depthwise convs: no reduction over channels for a tile
      product).

    int8 and int4 (two per byte, unpacked in the kernel: :func:`kernels.pack_amx_int4`) weights take the tiles;
    2-bit layers stored four per byte stay on the VNNI kernels."""
    o, cg, kh, kw = (int(v) for v in weight_shape)
    stride, dilation, groups = tuple(int(v) for v in stride), tuple(int(v) for v in dilation), int(groups)
    if dilation != (1, 1):
        return None
    if rows_input:
        return "rows"
    cin = cg * groups
    if K.conv_weight_mode(o, cin, groups, 16) == "depthwise":
        return None
    dense64 = K.conv_weight_mode(o, cin, groups, 64) in ("dense", "expanded")
    if dense64 and -(-cin // 64) * 64 <= 1.25 * cin and (kh * kw > 1 or cin >= 320 or stride != (1, 1)):
        return "c64"
    if K.conv_weight_mode(o, cin, groups, 16) in ("dense", "expanded") and stride == (1, 1) and kw <= 4:
        return "taps"
    return None


class AmxWeight(NamedTuple):
    """The weight of an AMX conv: ``stored`` (the constant the .so holds: the int8 layout, or with ``int4`` its
    :func:`kernels.pack_amx_int4` nibbles) and ``shape``, the int8 layout's shape the kernel is built for."""
    stored: np.ndarray
    shape: tuple[int, ...]
    int4: bool


def _c(a: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(a))


def _hint(node: IntNode) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)


class _BlockedBuilder:
    """Emits every node through its op family (:meth:`ptq2tvm.ops.OpDef.emit_blocked`) and tracks each tensor's
    layout (NCHW, blocked NCHW16c or 2-D); ops ask for their inputs in the layout they need."""

    def __init__(self, graph: IntegerGraph, isa: str, cuda: bool = False, amx: bool = False,
                 threads: int | None = None, fuse: bool = True, vbmi: bool = True, subbyte_storage: str = "auto",
                 gfni: bool = True):
        self.graph = graph
        self.isa = isa
        self.vbmi = vbmi                 # AVX-512 VBMI (kernels.lut_vbmi's vpermi2b): not on Cascade Lake
        self.gfni = gfni                 # GFNI (vgf2p8affineqb: the fused expand's int4 unpack): not on Cascade Lake
        self.cuda = cuda
        self.amx = amx and not cuda      # AMX-INT8 conv kernels where they apply (kernels/amx.py)
        self.threads = threads           # the target's threads (the AMX int4 kernels' chunking); None: this host
        self.fuse = fuse                 # False: every layer its own kernel (per-layer latency measurement)
        self.expand_of: dict[str, IntNode] = {}     # depthwise node -> the 1x1 expand fused into its kernel
        self.pool_of: dict[str, IntNode] = {}       # max pool node -> the first conv fused into its kernel
        self.fused_into: set[str] = set()
        self.bb = relax.BlockBuilder()
        self.env: dict[str, tuple[relax.Expr, str]] = {}
        self.weight_bytes = 0
        self.batch = 1                   # set by build()
        self.subbyte_storage = check_subbyte_storage(subbyte_storage)     # keeps_int8_storage

    # ---- the API op families use ------------------------------------------------------------------------------
    def weight(self, packed: np.ndarray) -> relax.Constant:
        self.weight_bytes += int(packed.nbytes)
        return _c(packed)

    @staticmethod
    def const(a: np.ndarray) -> relax.Constant:
        return _c(a)

    @staticmethod
    def hint(node: IntNode) -> str:
        return _hint(node)

    @staticmethod
    def int4(node: IntNode) -> bool:
        """Weights of <= 4 bits (values in [-8, 7]) are stored packed and unpacked inside the kernel (not for
        depthwise): two per byte, or four per byte where :meth:`int2` holds."""
        return int4_weights(node)

    def int2(self, node: IntNode) -> bool:
        """Weights of <= 2 bits (values in [-2, 1]) are stored four per byte when this build's kernels take them
        (:func:`packs_int2`: every x86 kernel ISA and CUDA)."""
        return packs_int2(self.isa, self.cuda) and int(node.attrs.get("w_bits", 8)) <= 2 \
            and int(node.arrays["weight"].min(initial=0)) >= -2 and int(node.arrays["weight"].max(initial=0)) <= 1

    def packing(self, node: IntNode) -> dict[str, bool]:
        """The sub-byte storage of a conv/dense weight as keyword arguments of :func:`kernels.pack_conv_weight`,
        :func:`kernels.pack_dense_weight` and :func:`kernels.pack_rows_weight`: ``int2`` (four per byte), else
        ``int4`` (two per byte), else neither (int8; also for a layer whose weights meet few output pixels per call,
        :func:`keeps_int8_storage`)."""
        if keeps_int8_storage(node, self.batch, self.cuda, self.subbyte_storage):
            return {"int4": False, "int2": False}
        two = self.int2(node)
        return {"int4": self.int4(node) and not two, "int2": two}

    def weight_layout(self, node: IntNode, pack: Callable[[str], np.ndarray]) -> tuple[str, bool, np.ndarray]:
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

    def shortcuts(self) -> bool:
        """Whether this x86 build may use the arithmetic shortcuts each proved per layer below (int16 accumulators,
        the int32-clamp epilogue); not on CUDA. ``PTQ2TVM_BASELINE_KERNELS=1`` at compile time turns them off (A/B
        timing of the same graph; the outputs are the same integers)."""
        return not self.cuda and os.environ.get(BASELINE_KERNELS_ENV) != "1"

    def int16_group(self, node: IntNode, packed: np.ndarray) -> int:
        """Input blocks per int16 accumulator flush of an AVX2 ``vpmaddubsw`` conv, proved from the integer weights
        and the input's range (:func:`kernels.layout.u8s8_int16_group`); 0: the int32 kernel."""
        if not self.shortcuts():
            return 0
        return K.u8s8_int16_group(packed, self.graph.tensor(node.inputs[0]).qmax)

    def depthwise_int16(self, node: IntNode, packed: np.ndarray) -> bool:
        """Whether a depthwise conv sums its taps in int16, proved from the integer weights and the input's range
        (:func:`kernels.layout.depthwise_int16_exact`)."""
        return self.shortcuts() and K.depthwise_int16_exact(packed, self.graph.tensor(node.inputs[0]).qmax)

    def int32_epilogue(self, node: IntNode) -> bool:
        """Whether a TE conv kernel requantizes with the int32-clamp epilogue: every shift of the layer >= 32
        (:func:`kernels.layout.shifts_allow_int32_epilogue`). On 256-bit targets (AVX2, AVX-VNNI) it replaces
        emulated int64 compares; on AVX-512 the tensorized paired epilogue (kernels/epilogue_intrin.py) then
        shifts and clamps int32 lanes instead of int64 ones (Zen 4, standalone 1x1 expand convs 1.0-1.08x more)."""
        return self.shortcuts() and K.shifts_allow_int32_epilogue(node.arrays["shift"])

    def paired_epilogue(self, node: IntNode,
                        bounds: Callable[[], tuple[list[tuple[Any, np.ndarray]], Any]]) -> str:
        """The form of the paired epilogue (:func:`kernels.vector_tir.paired_requant16`) for a layer of the
        hand-written AVX-512 kernels (AMX convs, depthwise, fused expand + depthwise, multiply): "int32" when every
        shift of the layer is >= 32 (measured 3-7% faster than "int64" on the AMX kernels, whose epilogue is a large
        part of their time); else a lifted form when :func:`kernels.layout.lifted_epilogue_exact` proves it from
        the op's ``(lanes, const)`` bounds, which ``bounds()`` computes only when needed (for a conv it walks
        the weights) ("lifted" where every shift is <= 32: no right shift at all,
        "lifted+shift" else); else "int64" (any shift). W4A4 convs feeding an 8-bit table input have shifts of
        28-31: lifted, they keep the int32 clamp and narrowing."""
        shift = node.arrays["shift"]
        if not self.shortcuts():
            return EPILOGUE_INT64
        if K.shifts_allow_int32_epilogue(shift):
            return EPILOGUE_INT32
        if not K.lifted_epilogue_exact(shift, *bounds()):
            return EPILOGUE_INT64
        return EPILOGUE_LIFTED if int(np.max(shift)) <= 32 else EPILOGUE_LIFTED_SHIFT

    def emit(self, fn: Any, *args: Any, name: str, **kw: Any) -> relax.Expr:
        return self.bb.emit_te(fn, *args, **kw, primfunc_name_hint=name)

    def amx_scheme(self, node: IntNode) -> str | None:
        """:func:`amx_conv_scheme` of a conv node in this build (None unless AMX; "rows" where the builder takes the
        row-layout path for the first conv)."""
        if not self.amx or node.op != "conv2d":
            return None
        a, w = node.attrs, node.arrays["weight"]
        rows_input = self.env[node.inputs[0]][1] == NCHW and int(w.shape[1]) * int(a["groups"]) <= 4 \
            and int(a["groups"]) == 1
        return amx_conv_scheme(w.shape, a["groups"], a["stride"], a["dilation"], rows_input)

    def _amx_storage(self, node: IntNode, packed: np.ndarray, ubsw_exact: bool,
                     int8_layout: Callable[[], np.ndarray]) -> AmxWeight | None:
        """``packed`` (the VNNI kernels' weight) as an :class:`AmxWeight`: int8 as is, int4 (two per byte) from
        ``int8_layout()`` packed by :func:`kernels.pack_amx_int4`; None for four-per-byte (int2) or AVX2 layouts."""
        if ubsw_exact or packed.ndim not in (6, 7):
            return None
        if packed.dtype == np.int8 and packed.ndim == 7:
            return AmxWeight(packed, tuple(int(v) for v in packed.shape), False)
        if self.packing(node)["int4"]:
            full = int8_layout()
            return AmxWeight(K.pack_amx_int4(full), tuple(int(v) for v in full.shape), True)
        return None

    def amx_weight(self, node: IntNode, x: relax.Expr, packed16: np.ndarray, ubsw_exact: bool) -> AmxWeight | None:
        """The weight of a conv that runs the AMX kernel (:func:`kernels.amx_conv_primfunc`) by :meth:`amx_scheme`
        ("c64": repacked with ``ic_block=64``; "taps": the layout of ``packed16``), or None for VNNI."""
        scheme = self.amx_scheme(node)
        if scheme not in ("c64", "taps"):
            return None
        a = node.attrs
        stride, dilation = tuple(a["stride"]), tuple(a["dilation"])
        if scheme == "c64":
            packed16 = K.pack_conv_weight(node.arrays["weight"], groups=a["groups"], ic_block=64, isa="vnni",
                                          **self.packing(node))
        amx = self._amx_storage(node, packed16, ubsw_exact, lambda: K.pack_conv_weight(
            node.arrays["weight"], groups=a["groups"], ic_block=64 if scheme == "c64" else 16, isa="vnni"))
        ok = amx is not None and K.amx_conv_supported(amx.shape, self.shape(x), stride, dilation, "int8")
        return amx if ok else None

    def amx_rows(self, node: IntNode, packed: np.ndarray, ubsw_exact: bool) -> AmxWeight | None:
        """The weight of a first conv (row layout, 1-4 input channels) that runs on AMX tiles
        (:func:`kernels.amx_rows_conv_primfunc`; :meth:`amx_scheme` "rows", int8 or int4 storage), or None.
        Measured against the VNNI rows kernel (Intel Xeon, 2 threads): ResNet's 7x7/2 RGB stem 1.62x, MobileNetV2's
        3x3/2 stem 1.01x."""
        if self.amx_scheme(node) != "rows":
            return None
        return self._amx_storage(node, packed, ubsw_exact,
                                 lambda: K.pack_rows_weight(node.arrays["weight"], isa="vnni"))

    def emit_amx_rows_conv(self, rows: relax.Expr, amx: AmxWeight, consts: list, extra: list, *, name: str,
                           in_channels: int, in_width: int, kernel: tuple[int, int], stride: tuple[int, int],
                           padding: tuple[int, int], output_zero_point: int, lo: int, hi: int,
                           residual_zero_point: int, epilogue: str) -> relax.Expr:
        """The AMX first conv as a ``call_tir`` on the row-layout input: same arguments and integers as
        :func:`kernels.conv2d_rows_requant`."""
        x_shape = self.shape(rows)
        prim = K.amx_rows_conv_primfunc(name, x_shape, amx.shape, in_channels, in_width, kernel, stride, padding,
                                        output_zero_point, lo, hi, residual_zero_point, residual=bool(extra),
                                        epilogue=epilogue, int4=amx.int4, threads=self.threads)
        return self.call_prim(prim, [rows, self.weight(amx.stored), *consts, *extra],
                              K.amx_rows_out_shape(x_shape, amx.shape, in_channels, in_width, kernel, stride, padding))

    def call_prim(self, prim: tvm.tirx.PrimFunc, args: list, out_shape: tuple[int, ...]) -> relax.Expr:
        """A hand-written (already scheduled) kernel ``prim`` added to the module under its own name and called on
        ``args`` with one uint8 output of ``out_shape``: how the AMX, depthwise and fused kernels are emitted. A name
        the module already has gets a suffix (``to_rows_1``: two inputs in the row layout), since TVM refuses a
        duplicate global symbol."""
        name = str(prim.attrs["global_symbol"])
        taken = {gv.name_hint for gv in self.bb.get().get_global_vars()}
        unique, k = name, 0
        while unique in taken:
            k += 1
            unique = f"{name}_{k}"
        if unique != name:
            prim = prim.with_attr("global_symbol", unique)
        gv = self.bb.add_func(prim, unique)
        return self.bb.emit(relax.call_tir(gv, relax.Tuple(args), relax.TensorType(list(out_shape), "uint8")))

    @staticmethod
    def shape(x: relax.Expr) -> tuple[int, ...]:
        """The static shape of a tensor expression of the module being built."""
        return tuple(int(v) for v in x.ty.shape.values)

    def emit_amx_conv(self, x: relax.Expr, amx: AmxWeight, consts: list, extra: list, *, name: str,
                      stride: tuple[int, int], padding: tuple[int, int], input_zero_point: int,
                      output_zero_point: int, lo: int, hi: int, residual_zero_point: int,
                      epilogue: str) -> relax.Expr:
        """The AMX conv (:func:`kernels.amx_conv_primfunc`) as a ``call_tir`` on the blocked input ``x`` and the
        weight from :meth:`amx_weight`: same arguments and integers as :func:`kernels.conv2d_nchwc_requant`."""
        x_shape = self.shape(x)
        prim = K.amx_conv_primfunc(name, x_shape, amx.shape, padding, input_zero_point, output_zero_point, lo, hi,
                                   residual_zero_point, residual=bool(extra), epilogue=epilogue, stride=stride,
                                   int4=amx.int4, threads=self.threads)
        return self.call_prim(prim, [x, self.weight(amx.stored), *consts, *extra],
                              K.amx_conv_out_shape(x_shape, amx.shape, padding, stride))

    def vbmi_lut(self, x: relax.Expr) -> bool:
        """Whether a table lookup on ``x`` runs :func:`kernels.lut_vbmi_primfunc` (``vpermi2b``; AVX-512 VNNI builds
        whose target has VBMI, tensors of >= 64 bytes) instead of the TE gather. EfficientNet-B0 W8A8 on the Xeon
        (2 threads, batch 1): its SiLU tables had taken more time than its convolutions."""
        return self.vector_kernels() and self.vbmi and K.lut_vbmi_supported(self.shape(x))

    def paired_mul(self, a: relax.Expr, b: relax.Expr) -> bool:
        """Whether a requantized multiply of this AVX-512 VNNI build runs :func:`kernels.mul_vnni_primfunc`:
        shortcuts allowed, blocked inputs equal or one broadcast over H and W (squeeze-excitation). EfficientNet-B0
        W8A8 on the Xeon (2 threads, batch 1): the TE multiply's int64 lanes had made its SE scaling cost more than
        its 1x1 convs."""
        if not self.vector_kernels():
            return False
        try:
            K.mul_vnni_out_shape(self.shape(a), self.shape(b))
        except ValueError:
            return False
        return True

    def vector_kernels(self) -> bool:
        """Whether this build runs the explicit-vector AVX-512 kernels (kernels/depthwise_vnni.py, expand_depthwise.py,
        mul_vnni.py, lut_vbmi.py; the paired epilogue, any shift): an AVX-512 VNNI x86 build with shortcuts. The
        depthwise one against the TE tap kernel (Xeon, 2 threads, every shift >= 32): MobileNetV2's 3x3 shapes
        1.24-1.58x; the whole MobileNetV2 W8A8 1.14x at batch 1, 1.23x at batch 8."""
        return self.shortcuts() and self.isa == "vnni"

    def emit_depthwise_vnni(self, x: relax.Expr, packed: np.ndarray, consts: list, extra: list, *, name: str,
                            kernel_width: int, stride: tuple[int, int], padding: tuple[int, int], dilation_h: int,
                            input_zero_point: int, output_zero_point: int, lo: int, hi: int,
                            residual_zero_point: int, epilogue: str) -> relax.Expr:
        """The depthwise conv (:func:`kernels.depthwise_vnni_primfunc`) as a ``call_tir`` on the blocked input and
        the tap-packed weight: same arguments and integers as :func:`kernels.depthwise_taps_requant`."""
        x_shape = self.shape(x)
        prim = K.depthwise_vnni_primfunc(name, x_shape, packed.shape, kernel_width, stride, padding, dilation_h,
                                         input_zero_point, output_zero_point, lo, hi, residual_zero_point,
                                         residual=bool(extra), threads=self.threads, epilogue=epilogue)
        return self.call_prim(prim, [x, self.weight(packed), *consts, *extra],
                              K.depthwise_vnni_out_shape(x_shape, (int(packed.shape[1]), kernel_width), stride,
                                                         padding, dilation_h))

    def emit_expand_depthwise(self, x: relax.Expr, w1: np.ndarray, consts1: list, w2: np.ndarray, consts2: list,
                              extra: list, *, name: str, kernel_width: int, stride: tuple[int, int],
                              padding: tuple[int, int], dilation_h: int, mid: IntNode, output_zero_point: int,
                              lo: int, hi: int, residual_zero_point: int,
                              epilogue: tuple[str, str]) -> relax.Expr:
        """The fused 1x1 expand ``mid`` + depthwise conv (:func:`kernels.expand_depthwise_primfunc`) as one
        ``call_tir``: the integers of the two kernels one after the other."""
        a1 = mid.attrs
        x_shape = self.shape(x)
        prim = K.expand_depthwise_primfunc(name, x_shape, w1.shape, w2.shape, kernel_width, stride, padding,
                                           dilation_h, a1["output_zero_point"], a1["lo"], a1["hi"],
                                           output_zero_point, lo, hi, residual_zero_point, residual=bool(extra),
                                           threads=self.threads, int4=w1.dtype == np.uint8, epilogue=epilogue)
        return self.call_prim(prim, [x, self.weight(w1), *consts1, self.weight(w2), *consts2, *extra],
                              K.depthwise_vnni_out_shape((x_shape[0], int(w1.shape[0]), *x_shape[2:]),
                                                         (int(w2.shape[1]), kernel_width), stride, padding,
                                                         dilation_h))

    def layout(self, name: str) -> str:
        return self.env[name][1]

    def blocked(self, name: str) -> relax.Expr:
        """Tensor ``name`` in the blocked NCHW16c layout (converted once if it is NCHW; the conversion is cached)."""
        expr, layout = self.env[name]
        if layout == NCHWC:
            return expr
        if layout == NCHW:
            t = self.graph.tensor(name)
            out = self.emit(K.te_nchw_to_nchwc, expr, block=16, pad_value=t.zero_point, name="to_nchwc")
            self.env[name] = (out, NCHWC)
            return out
        raise ValueError(f"tensor '{name}' is 2-D; a conv/pool cannot consume it")

    def nchw(self, name: str) -> relax.Expr:
        """Tensor ``name`` in plain NCHW (2-D tensors as they are)."""
        expr, layout = self.env[name]
        if layout == NCHWC:
            return self.emit(K.te_nchwc_to_nchw, expr, channels=self.graph.tensor(name).shape[0], name="to_nchw")
        return expr

    def flat(self, name: str) -> relax.Expr:
        expr, layout = self.env[name]
        if layout != FLAT:
            raise ValueError(f"tensor '{name}' is not 2-D; a dense layer cannot consume it")
        return expr

    def generic(self, opdef: Any, node: IntNode) -> tuple[relax.Expr, str]:
        """The op's plain NCHW compute on NCHW (or 2-D) inputs; the output stays NCHW (or 2-D)."""
        em = PlainEmitter(self.bb, node, [self.nchw(i) for i in node.inputs], prefix="k_")
        return opdef.emit_plain(em, node), (FLAT if len(node.out.shape) == 1 else NCHW)

    def node(self, node: IntNode) -> tuple[relax.Expr, str]:
        if node.name in self.fused_into:        # emitted with its consumer (emit_expand_depthwise, the stem's pool)
            return None, FUSED
        return ir_op(node.op).emit_blocked(self, node)

    def readers(self) -> dict[str, list[IntNode]]:
        """{tensor name: the nodes that read it, in graph order}: what the fusion rules ask of a producer."""
        readers: dict[str, list[IntNode]] = {}
        for n in self.graph.nodes:
            for i in n.inputs:
                readers.setdefault(i, []).append(n)
        return readers

    def expand_depthwise_pairs(self) -> dict[str, IntNode]:
        """{depthwise node name: its 1x1 expand node} for the pairs this build fuses into one kernel
        (:func:`kernels.expand_depthwise_primfunc`): a build with :meth:`vector_kernels` and fusion on; a depthwise
        conv (horizontal dilation 1) whose input is produced by a 1x1 conv (stride 1, no padding, no residual, int8
        or int4 storage, any shifts) from 16 or fewer channels (not the network input), read by nothing else and not
        a graph output. Measured against the two kernels (Xeon, 2 threads, MobileNetV2's features.2, 16 -> 96
        channels at 112x112, stride 2): 1.13x at batch 1, 1.31-1.35x at batch 8 (the whole MobileNetV2 W8A8 1.02x /
        1.04x); with 24-64 input channels the fused VNNI expand mostly lost to the AMX 1x1 (0.78-0.99x, one shape
        1.17x), so only single-block inputs are fused. int4 expand weights stay two per byte (unpacked in the
        kernel, on GFNI targets only: Cascade Lake has AVX-512 VNNI without GFNI, and LLVM aborts the build on its
        ``vgf2p8affineqb``); 2-bit ones (four per byte) are not fused."""
        if not (self.vector_kernels() and self.fuse):
            return {}
        g = self.graph
        producers = {n.name: n for n in g.nodes}
        readers = self.readers()
        pairs = {}
        for d in g.nodes:
            if d.op != "conv2d" or not d.inputs:
                continue
            w2, a2 = d.arrays["weight"], d.attrs
            e = producers.get(d.inputs[0])
            if e is None or e.op != "conv2d" or len(e.inputs) != 1 or e.inputs[0] == g.input.name:
                continue
            w1, a1 = e.arrays["weight"], e.attrs
            depthwise = K.conv_weight_mode(w2.shape[0], w2.shape[1] * a2["groups"], a2["groups"]) == "depthwise"
            ok = depthwise and a2["dilation"][1] == 1 and len(readers.get(e.name, [])) == 1 \
                and e.name not in g.output_names and int(a1["groups"]) == 1 and tuple(w1.shape[2:]) == (1, 1) \
                and tuple(a1["stride"]) == (1, 1) and tuple(a1["padding"]) == (0, 0) and int(w1.shape[1]) <= 16 \
                and not self.packing(e)["int2"] and (self.gfni or not self.packing(e)["int4"]) \
                and int(a2["input_zero_point"]) == int(a1["output_zero_point"])
            if ok:
                pairs[d.name] = e
        return pairs

    def stem_pool_pairs(self) -> dict[str, IntNode]:
        """{max pool node name: the first conv it pools} for the pairs this build runs as one kernel
        (:func:`kernels.rows_conv_maxpool_primfunc`, the pool taken on the int32 accumulators): a build with
        :meth:`vector_kernels` and fusion on, without AMX (the AMX row-layout conv stays there: not measured
        against); a conv on the network input in the row layout (1-4 input channels, groups 1, dilation 1, int8
        weight storage, no residual, every multiplier >= 0: the requantization is then non-decreasing in the
        accumulator) read only by a max pool (dilation 1, no ceil-mode padding, padding below its kernel) and not a
        graph output. ResNet-18's 7x7/2 stem + 3x3/2 pool against the two kernels: see kernels/README.md."""
        if not (self.vector_kernels() and self.fuse) or self.amx:
            return {}
        g = self.graph
        readers = self.readers()
        pairs = {}
        for conv in g.nodes:
            if conv.op != "conv2d" or list(conv.inputs) != [g.input.name] or len(g.input.shape) != 3:
                continue
            a, w = conv.attrs, conv.arrays["weight"]
            pool = readers.get(conv.name, [None])[0]
            if len(readers.get(conv.name, [])) != 1 or conv.name in g.output_names or pool.op != "maxpool2d":
                continue
            pa = pool.attrs
            ok = int(a["groups"]) == 1 and int(w.shape[1]) <= 4 and tuple(a["dilation"]) == (1, 1) \
                and not any(self.packing(conv).values()) and int(np.min(conv.arrays["multiplier"])) >= 0 \
                and tuple(pa["dilation"]) == (1, 1) and not any(pa.get("padding_end", (0, 0))) \
                and all(int(p) < int(k) for p, k in zip(pa["padding"], pa["kernel"])) \
                and int(pool.out.shape[1]) >= 2
            # a pool output of one row: TVM 0.27's CompactBufferAllocation sizes the kernel's ring of conv rows by
            # the pool-row loop variable once that loop has a single iteration ('variable v has been used before
            # definition!' at build; e.g. a (1, 1, W) signal with MaxPool2d(3, 2, 1)); the two kernels are exact
            if ok:
                pairs[pool.name] = conv
        return pairs

    def emit_rows(self, x: relax.Expr, *, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], pad_value: int) -> relax.Expr:
        """The network input ``x`` (uint8 NCHW, 1-4 channels) in the first conv's row layout
        (:func:`kernels.ops.nchw_to_rows`): the shuffle kernel (:func:`kernels.nchw_to_rows_primfunc`, 0.11x the TE
        kernel's time on ResNet-18's input) where the width is a multiple of 16, else the TE kernel; same bytes."""
        geometry = dict(kernel=kernel, stride=stride, padding=padding, pad_value=pad_value)
        x_shape = self.shape(x)
        if not K.rows_shuffle_supported(x_shape):
            return self.emit(K.te_nchw_to_rows, x, **geometry, name="to_rows")
        prim = K.nchw_to_rows_primfunc("to_rows", x_shape, **geometry)
        return self.call_prim(prim, [x], K.rows_out_shape(x_shape, kernel, stride, padding))

    def emit_rows_conv_maxpool(self, rows: relax.Expr, packed: np.ndarray, consts: list, *, name: str,
                               in_channels: int, in_width: int, kernel: tuple[int, int], stride: tuple[int, int],
                               padding: tuple[int, int], pool: IntNode, output_zero_point: int, lo: int, hi: int,
                               epilogue: str) -> relax.Expr:
        """The first conv + its max pool (:func:`kernels.rows_conv_maxpool_primfunc`) as one ``call_tir`` on the row
        layout: the integers of the conv's and the pool's kernels one after the other."""
        pa = pool.attrs
        geometry = dict(in_channels=in_channels, in_width=in_width, kernel=kernel, stride=stride, padding=padding,
                        pool_kernel=tuple(pa["kernel"]), pool_stride=tuple(pa["stride"]),
                        pool_padding=tuple(pa["padding"]))
        rows_shape = self.shape(rows)
        prim = K.rows_conv_maxpool_primfunc(name, rows_shape, packed.shape, **geometry,
                                            output_zero_point=output_zero_point, lo=lo, hi=hi, threads=self.threads,
                                            epilogue=epilogue)
        return self.call_prim(prim, [rows, self.weight(packed), *consts],
                              K.rows_conv_maxpool_out_shape(rows_shape, packed.shape, **geometry))

    def build(self, batch: int) -> tvm.IRModule:
        g = self.graph
        self.batch = batch
        x = relax.Var("x", relax.TensorType((batch, *g.input.shape), "uint8"))
        self.expand_of = self.expand_depthwise_pairs()
        self.pool_of = self.stem_pool_pairs()
        self.fused_into = {e.name for e in self.expand_of.values()} | {c.name for c in self.pool_of.values()}
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                self.env[g.input.name] = (x, NCHW if len(g.input.shape) == 3 else FLAT)
                for node in g.nodes:
                    self.env[node.name] = self.node(node)
                outs = [self.nchw(name) for name in g.output_names]
                res = self.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
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


def x86_build_options(target: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kernel ISA, the :func:`build_blocked_module` keywords that follow from ``target``: amx, threads, vbmi,
    gfni). Raises ValueError naming the reason when the x86 kernels do not support ``target``."""
    isa, why = x86_isa(target)
    if isa is None:
        raise ValueError(f"the x86 kernels do not support target {target}: {why}")
    tgt = tvm.target.Target(target)
    threads = int(tgt.attrs["num-cores"]) if "num-cores" in tgt.attrs else None
    return isa, dict(amx=K.target_has_amx(tgt), threads=threads, vbmi=K.target_has_vbmi(tgt),
                     gfni=K.target_has_gfni512(tgt))


def build_x86_module(graph: IntegerGraph, batch: int, target: dict[str, Any],
                     scheduler: Callable[[tvm.IRModule], tvm.IRModule] | None = None,
                     fuse: bool = True, subbyte_storage: str = "auto") -> tuple[tvm.IRModule, int]:
    """The scheduled Relax module for ``target`` (pass it to ``tvm.compile`` unchanged) and the bytes of its packed
    weights (int4 layers two values per byte, int2 layers four per byte, :func:`packs_int2`, except where
    ``subbyte_storage`` "auto" keeps a layer one per byte: :func:`keeps_int8_storage`). ``scheduler``
    schedules the kernels (default: the hand schedules, ``kernels.schedule_module``; ``backend.tune.KernelTuner``
    measures and replays records). ``fuse=False``: no layer runs inside another's kernel
    (:meth:`_BlockedBuilder.expand_depthwise_pairs`; the per-layer latency measurement times each layer's own)."""
    isa, options = x86_build_options(target)
    mod, weight_bytes = build_blocked_module(graph, batch, isa, fuse=fuse, subbyte_storage=subbyte_storage, **options)
    mod = add_checked_float_entry(mod, graph, batch, options["threads"])
    if scheduler is None:
        return K.schedule_module(mod, tvm.target.Target(target)), weight_bytes
    return scheduler(mod), weight_bytes


def build_blocked_module(graph: IntegerGraph, batch: int, isa: str, cuda: bool = False,
                         amx: bool = False, threads: int | None = None,
                         fuse: bool = True, vbmi: bool = True,
                         subbyte_storage: str = "auto", gfni: bool = True) -> tuple[tvm.IRModule, int]:
    """The unscheduled blocked Relax module (with the float entry) and the bytes of its packed weights. ``cuda``
    switches off the x86-only kernels (rows layout, depthwise taps): what the CUDA build schedules. ``amx``: the
    convs :meth:`_BlockedBuilder.amx_scheme` selects are AMX kernels (already scheduled PrimFuncs), chunked for
    ``threads`` (default: this machine's cores); ``fuse``: as in :func:`build_x86_module`; ``vbmi``: the target has
    AVX-512 VBMI (the table lookups' ``vpermi2b``; Cascade Lake has VNNI without it); ``gfni``: the target has GFNI +
    AVX-512 BW (the fused expand's int4 unpack); ``subbyte_storage``: see
    :func:`keeps_int8_storage` (CUDA always packs)."""
    builder = _BlockedBuilder(graph, isa, cuda=cuda, amx=amx, threads=threads, fuse=fuse, vbmi=vbmi,
                              subbyte_storage=subbyte_storage, gfni=gfni)
    return add_float_entry(builder.build(batch), graph, batch), builder.weight_bytes


def build_cuda_module(graph: IntegerGraph, batch: int) -> tuple[tvm.IRModule, int]:
    """The Relax module for a CUDA target: convs scheduled for dp4a (:mod:`kernels.cuda`), every other kernel left
    to TVM's default GPU schedules; and the bytes of its packed weights (int4 layers two values per byte, int2 layers
    four per byte)."""
    mod, weight_bytes = build_blocked_module(graph, batch, "vnni", cuda=True)
    return K.schedule_module_cuda(mod), weight_bytes
