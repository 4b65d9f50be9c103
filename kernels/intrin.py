"""Tensor intrinsics for exact u8 x s8 -> s32 dot products on x86.

Both intrinsics compute the same thing (their TIR "description"): for one 16-lane output-channel vector C and one
group of 4 input channels,

    C[i] += int32(A[k]) * int32(B[i, k])      i in 0..15 (output channels), k in 0..3 (input channels)

with A uint8 (activations) and B int8 (weights). Both are exact for every uint8 x int8 input:

* ``vnni``: one ``vpdpbusd zmm`` (AVX-512 VNNI). vpdpbusd multiplies unsigned bytes by signed bytes, adds the four
  16-bit products of each lane into the int32 accumulator without saturation (``vpdpbusds`` would saturate; it is not
  used). LLVM 22 declares ``llvm.x86.avx512.vpdpbusd.512`` with ``<64 x i8>`` multiplicands, so the operands are
  passed as uint8x64 / int8x64 (the intrinsic TVM 0.27 ships passes int32x16 and fails LLVM verification).
  Weight block layout: ``B[16, 4]`` = 64 contiguous bytes, output channel major.
* ``avx2``: no VNNI. Bytes are widened to int16 (zero-extend activations, sign-extend weights) and multiplied with
  ``vpmaddwd`` (int16 x int16 pairs summed into int32). Every product is at most 255 * 128 = 32640 in magnitude and the
  pair sum at most 65280, so nothing saturates (``vpmaddubsw``, which the shipped ``dot_16x4_avx512`` uses, saturates
  to int16 and is wrong for large values; it is never used here). Weight block layout: ``B[2, 16, 2]`` =
  [input-channel pair, output channel, channel within pair], so one ``vpmaddwd`` yields 8 output channels.

Two more use the VNNI weight layout ``B[16, 4]`` on 256-bit registers (two halves of 8 output channels):

* ``avxvnni``: AVX-VNNI, the VEX-encoded ``{vex} vpdpbusd ymm`` (Alder Lake and newer Intel client cores, Zen 5
  client parts without AVX-512 VNNI); same exact arithmetic as ``vnni``.
* ``ubsw`` (AVX2, no VNNI): ``vpmaddubsw`` (u8 x s8, adjacent pairs summed into *saturating* int16) then ``vpmaddwd``
  with ones (int16 pairs -> int32) and ``vpaddd``: three instructions per 8 lanes x 4 channels instead of the int16
  path's widening + two ``vpmaddwd``. It is exact only when no pair sum ``a0*w0 + a1*w1`` can leave int16, i.e.
  ``amax * (max(w0,0) + max(w1,0)) <= 32767`` and ``amax * (min(w0,0) + min(w1,0)) >= -32768`` for every weight
  pair and the activation maximum ``amax`` (the input's qmax). The compiler proves it per layer from the integer
  weights (:func:`kernels.layout.u8s8_pairs_exact`: always for int4 weights or <= 7-bit activations, and for 8-bit
  weights whose same-sign pairs stay within 128 when amax = 255) and uses the ``avx2`` intrinsic otherwise; the
  schedule refuses a kernel that is not marked exact.

Two more run an AVX2 conv whose weights prove that a whole group of steps fits int16
(:func:`kernels.layout.u8s8_int16_group`): ``ubsw16`` adds the ``vpmaddubsw`` pair sums into an int16 accumulator
``C[32]`` (element ``2*i + p`` = lane i, pair p: the order vpmaddubsw produces) with ``vpaddw``, no widening per
step; ``widen16`` flushes it into the int32 accumulator (``C[i] += A[2i] + A[2i+1]``, one ``vpmaddwd`` with ones per 8
lanes) once per group. ``vpaddw`` wraps; the proof bounds every partial sum, so the result is exact.

Another serves depthwise convs (``vnni_taps``): 16 channels x 4 horizontal taps,

    C[i] += int32(A[t, i]) * int32(B[i, t])   i in 0..15 (channels), t in 0..3 (taps = 4 consecutive input pixels)

A is the 4 x 16-byte input block of 4 consecutive pixels in NCHW16c (64 contiguous bytes); one byte shuffle
(``vpermb`` with AVX512-VBMI, a constant LLVM shufflevector) transposes it to channel-major [i, t] so that one
``vpdpbusd`` adds 4 taps of 16 channels (3 real taps of a 3x3 kernel row + a zero weight).

And one for CUDA (``dp4a``, sm_61+), a single output channel:

    C[0] += int32(A[k]) * int32(B[k])          k in 0..3

one ``__dp4a(uint, int, int)``, i.e. the PTX ``dp4a.u32.s32`` (unsigned activations x signed weights, exact int32
accumulation; the overload is declared by TVM's CUDA codegen header). A and B are staged in shared memory, C is a
register. The 4 bytes of A and of B must be 4-byte aligned: they are 4 consecutive channels of one pixel / one
output channel in the packed layouts, at offsets that are multiples of 4.

The accumulator buffer C of the x86 intrinsics is declared with scope ``"global"`` (what the hand schedules use,
:data:`kernels.schedule.ACC_SCOPE`: a small stack tile that LLVM promotes to registers; and MetaSchedule) or
``"local"`` (the CUDA dp4a register accumulator).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_INTRIN = "ptq2tvm_dot_16x4_u8i8i32_vnni"
TAPS_INTRIN = "ptq2tvm_depthwise_16x4taps_u8i8i32_vnni"
AVX2_INTRIN = "ptq2tvm_dot_16x4_u8i8i32_avx2"
AVX2W_INTRIN = "ptq2tvm_dot_16x4_u16i8i32_avx2"
AVXVNNI_INTRIN = "ptq2tvm_dot_16x4_u8i8i32_avxvnni"
UBSW_INTRIN = "ptq2tvm_dot_16x4_u8i8i32_ubsw"
UBSW16_INTRIN = "ptq2tvm_dot_16x4_u8i8i16_ubsw"
WIDEN16_INTRIN = "ptq2tvm_widen_16x2_i16i32"
DP4A_INTRIN = "ptq2tvm_dp4a_u8i8i32"
UNPACK4_INTRIN = "ptq2tvm_unpack_int4_16x4_gfni"
_SCOPES = ("global", "local")
_registered: set[str] = set()


# Helpers that build the impls' vector expressions. The impls write every value inline, never as a named
# temporary: TVM 0.27 turns a named value of a tensorized body into a "local" buffer, and LowerTVMBuiltin gives every
# "local" buffer a TVMBackendAllocWorkspace / FreeWorkspace pair (not a stack slot) at the top of the enclosing
# parallel-loop body, i.e. once per parallel iteration (measured: ~0.3 us per iteration, 1.3-1.9x on 1x1 convs).
# LLVM merges the repeated pure subexpressions (the broadcast, the ones vector).

def _bcast4(A, lanes: int):
    """The 4 activation bytes ``A[0:4]`` repeated in every dword of a ``lanes``-byte vector (uint8x``lanes``)."""
    return T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes // 4),
                         dtype=f"uint8x{lanes}")


def _madd_ubsw(a, b):
    """``vpmaddubsw``: u8 x s8 adjacent pairs summed into saturating int16 (int16x16)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a, b, dtype="int16x16")


def _madd_wd(a, b):
    """``vpmaddwd``: int16 x int16 adjacent pairs summed into int32 (int32x8)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype="int32x8")


def _ones16():
    return T.broadcast(T.int16(1), 16)


def _vnni_pair(scope: str):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                _bcast4(A, 64),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return desc, impl


def _taps_pair(scope: str):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4, 16), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for t in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vt = T.axis.remap("SR", [i, t])
                        C[vi] = C[vi] + T.cast(A[vt, vi], "int32") * T.cast(B[vi, vt], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4, 16), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.Shuffle([A.vload([0, 0], dtype="uint8x64")], TAPS_TRANSPOSE),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return desc, impl


# byte 4*i + t of the shuffled vector = byte 16*t + i of the loaded pixels (channel i of pixel t); also used by
# kernels.depthwise_vnni
TAPS_TRANSPOSE = [16 * (k % 4) + k // 4 for k in range(64)]


# byte k of the zero-extended activation pair vector: per dword j, [a[4j + 2h], 0, a[4j + 2h + 1], 0] (h = 0: channels
# 0, 1; h = 1: channels 2, 3) from the 4 broadcast bytes (index 32 = the zero vector's first byte)
_PAIR_LO = [v for j in range(8) for v in (4 * j, 32, 4 * j + 1, 32)]
_PAIR_HI = [v for j in range(8) for v in (4 * j + 2, 32, 4 * j + 3, 32)]


def _avx2_pair(scope: str, wdt: str = "int8", adt: str = "uint8"):
    """vpmaddwd 16x4 dot product on int8 weights ``[2, 16, 2]`` (sign-extended in the kernel; ``wdt="int16"``, weights
    widened at compile time, measured no faster: twice the weight bytes). ``adt="uint16"``: the 4 activations come
    already zero-extended to 16 bits (the kernel's pad stage widens them), so each pair (a0, a1) / (a2, a3) is one
    ``vpbroadcastd`` from memory instead of a broadcast + a ``vpshufb`` per pair."""
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), adt, offset_factor=1), B: T.Buffer((2, 16, 2), wdt, offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:2, 0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vk // 2, vi, vk % 2], "int32")

    def wload(B, p, o):
        v = B.vload([p, o, 0], f"{wdt}x16")
        return v if wdt == "int16" else T.cast(v, "int16x16")

    def apairs(A, order):
        if adt == "uint16":     # pair p = (A[2p], A[2p+1]) as one dword, broadcast to the 8 dwords
            p = 0 if order is _PAIR_LO else 2
            return T.reinterpret(T.broadcast(T.reinterpret(A.vload([p], "uint16x2"), dtype="int32"), 8),
                                 dtype="int16x16")
        return T.reinterpret(T.Shuffle([_bcast4(A, 32), T.broadcast(T.uint8(0), 32)], order), dtype="int16x16")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), adt, offset_factor=1), B: T.Buffer((2, 16, 2), wdt, offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:2, 0:16, 0:2])
            T.writes(C[0:16])
            # the zero-extended int16 activation pairs (a0, a1) and (a2, a3) in every dword (uint8 input: the 4
            # bytes broadcast, then one zeroing byte shuffle each, vpshufb); weights of input-channel pair p
            # for output channels 0-7 / 8-15, as int16
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + (
                _madd_wd(apairs(A, _PAIR_LO), wload(B, 0, 0)) + _madd_wd(apairs(A, _PAIR_HI), wload(B, 1, 0)))
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + (
                _madd_wd(apairs(A, _PAIR_LO), wload(B, 0, 8)) + _madd_wd(apairs(A, _PAIR_HI), wload(B, 1, 8)))

    return desc, impl


def _ymm_pair(scope: str, kind: str):
    """VNNI-layout 16x4 dot product on two 256-bit halves: AVX-VNNI ``vpdpbusd ymm`` or AVX2 ``vpmaddubsw`` +
    ``vpmaddwd`` (ones) + ``vpaddd`` (exact only for bounded weight pairs, see the module docstring)."""
    desc, _ = _vnni_pair(scope)

    @T.prim_func(s_tir=True)
    def impl_avxvnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                     C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), C.vload([0], dtype="int32x8"),
                _bcast4(A, 32), B.vload([0, 0], dtype="int8x32"), dtype="int32x8")
            C[T.ramp(T.int32(8), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), C.vload([8], dtype="int32x8"),
                _bcast4(A, 32), B.vload([8, 0], dtype="int8x32"), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def impl_ubsw(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                  C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + _madd_wd(
                _madd_ubsw(_bcast4(A, 32), B.vload([0, 0], dtype="int8x32")), _ones16())
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + _madd_wd(
                _madd_ubsw(_bcast4(A, 32), B.vload([8, 0], dtype="int8x32")), _ones16())

    return desc, (impl_avxvnni if kind == "avxvnni" else impl_ubsw)


def _ubsw16_pair(scope: str):
    """AVX2 ``vpmaddubsw`` into an *int16* accumulator (no widening per step, see the module docstring): C holds
    ``[16 output channels x 2 channel pairs]`` int16 (element ``2*i + p`` = lane ``i``, pair ``p``: exactly the lane
    order ``vpmaddubsw`` produces from a VNNI weight block), two ``vpmaddubsw`` + two ``vpaddw`` per call."""
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((32,), "int16", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:32], A[0:4], B[0:16, 0:4])
            T.writes(C[0:32])
            for e in T.serial(0, 32):
                for j in T.serial(0, 2):
                    with T.sblock("update"):
                        ve, vj = T.axis.remap("SR", [e, j])
                        C[ve] = C[ve] + T.cast(A[ve % 2 * 2 + vj], "int16") * T.cast(B[ve // 2, ve % 2 * 2 + vj],
                                                                                       "int16")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((32,), "int16", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:32], A[0:4], B[0:16, 0:4])
            T.writes(C[0:32])
            C[T.ramp(T.int32(0), 1, 16)] = C.vload([0], dtype="int16x16") + _madd_ubsw(
                _bcast4(A, 32), B.vload([0, 0], dtype="int8x32"))
            C[T.ramp(T.int32(16), 1, 16)] = C.vload([16], dtype="int16x16") + _madd_ubsw(
                _bcast4(A, 32), B.vload([8, 0], dtype="int8x32"))

    return desc, impl


def _widen16_pair(scope: str):
    """``C[i] += int32(A[2i]) + int32(A[2i+1])`` for 16 int32 lanes: the flush of an int16 accumulator of
    :func:`_ubsw16_pair` into the int32 one, two ``vpmaddwd`` with ones + two ``vpaddd``."""
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((32,), "int16", offset_factor=1, scope=scope),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:32])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for p in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vp = T.axis.remap("SR", [i, p])
                        C[vi] = C[vi] + T.cast(A[vi * 2 + vp], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((32,), "int16", offset_factor=1, scope=scope),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:32])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + _madd_wd(A.vload([0], dtype="int16x16"),
                                                                                     _ones16())
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + _madd_wd(A.vload([16], dtype="int16x16"),
                                                                                     _ones16())

    return desc, impl


def _dp4a_pair(scope: str):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=4, scope="shared"),
             B: T.Buffer((4,), "int8", offset_factor=4, scope="shared"),
             C: T.Buffer((1,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=4, scope="shared"),
             B: T.Buffer((4,), "int8", offset_factor=4, scope="shared"),
             C: T.Buffer((1,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = T.call_pure_extern("__dp4a", A.vload([0], "uint8x4"), B.vload([0], "int8x4"), C[0],
                                      dtype="int32")

    return desc, impl


def _unpack4_pair(scope: str):
    """int4 -> int8 of one VNNI weight vector: the 32 packed bytes ``P`` -> ``W[16, 4]`` (element ``e = 4 i + k`` is
    nibble ``e // 32`` of byte ``e % 32``, sign-extended: :func:`kernels.ops._unpack_weight`'s formula, which the
    description repeats so that tensorize matches the ``w_unpack`` block), as one ``vbroadcasti64x4`` + one
    ``vgf2p8affineqb`` + one 64-byte store (:func:`kernels.vector_tir.unpack_nibbles64`; GFNI + AVX-512 BW).
    ``scope`` is the storage scope of ``W``."""
    from .vector_tir import unpack_nibbles64

    @T.prim_func(s_tir=True)
    def desc(P: T.Buffer((32,), "uint8", offset_factor=1), W: T.Buffer((16, 4), "int8", offset_factor=1, scope=scope)) \
            -> None:
        with T.sblock("root"):
            T.reads(P[0:32])
            T.writes(W[0:16, 0:4])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("w_unpack"):
                        vi, vk = T.axis.remap("SS", [i, k])
                        W[vi, vk] = T.Cast("int8", T.bitwise_xor(T.bitwise_and(T.shift_right(
                            P[vi % 8 * 4 + vk], T.Cast("uint8", vi // 8 * 4)), T.uint8(15)), T.uint8(8))) - T.int8(8)

    @T.prim_func(s_tir=True)
    def impl(P: T.Buffer((32,), "uint8", offset_factor=1), W: T.Buffer((16, 4), "int8", offset_factor=1, scope=scope)) \
            -> None:
        with T.sblock("root"):
            T.reads(P[0:32])
            T.writes(W[0:16, 0:4])
            W.vstore([0, 0], unpack_nibbles64(P.vload([0], dtype="uint8x32")))

    return desc, impl


def _name(base: str, scope: str) -> str:
    return base if scope == "global" else f"{base}_{scope}"


def _register(base: str, maker, scope: str) -> str:
    if scope not in _SCOPES:
        raise ValueError(f"accumulator scope must be one of {_SCOPES}, got {scope!r}")
    name = _name(base, scope)
    if name not in _registered:
        desc, impl = maker(scope)
        TensorIntrin.register(name, desc, impl, override=True)
        _registered.add(name)
    return name


def register_vnni_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX-512 VNNI u8 x s8 16x4 dot product; return its name.

    ``scope`` is the storage scope of the int32 accumulator buffer the intrinsic may be tensorized onto.
    """
    return _register(VNNI_INTRIN, _vnni_pair, scope)


def register_taps_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX-512 VNNI depthwise intrinsic (16 channels x 4 taps, see the module
    docstring); return its name. Its weight operand is laid out ``[16, 4]`` = (channel, tap)."""
    return _register(TAPS_INTRIN, _taps_pair, scope)


def register_avx2_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the exact AVX2 (vpmaddwd) u8 x s8 16x4 dot product; return its name.

    Its weight operand is laid out ``[2, 16, 2]`` (see the module docstring), i.e. packed with ``isa="avx2"``.
    """
    return _register(AVX2_INTRIN, _avx2_pair, scope)


def register_avx2w_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX2 (vpmaddwd) 16x4 dot product whose activations are uint16 (zero-extended by
    the kernel's pad stage); weights ``[2, 16, 2]`` as for :func:`register_avx2_intrinsic`; return its name."""
    return _register(AVX2W_INTRIN, lambda sc: _avx2_pair(sc, adt="uint16"), scope)


def register_avxvnni_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX-VNNI (256-bit VEX ``vpdpbusd``) u8 x s8 16x4 dot product (VNNI weight layout);
    return its name."""
    return _register(AVXVNNI_INTRIN, lambda sc: _ymm_pair(sc, "avxvnni"), scope)


def register_ubsw_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX2 ``vpmaddubsw`` u8 x s8 16x4 dot product (VNNI weight layout; exact only for
    weights that pass :func:`kernels.layout.u8s8_pairs_exact`); return its name."""
    return _register(UBSW_INTRIN, lambda sc: _ymm_pair(sc, "ubsw"), scope)


def register_ubsw16_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the AVX2 ``vpmaddubsw`` 16x4 dot product into an int16 ``[16 x 2]`` accumulator
    (exact only for weights and input range that pass :func:`kernels.layout.u8s8_int16_group`); return its name."""
    return _register(UBSW16_INTRIN, _ubsw16_pair, scope)


def register_widen16_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the int16 ``[16 x 2]`` -> int32 ``[16]`` accumulator flush (``vpmaddwd`` with ones);
    return its name."""
    return _register(WIDEN16_INTRIN, _widen16_pair, scope)


def register_dp4a_intrinsic(scope: str = "local") -> str:
    """Register (idempotently) the CUDA dp4a u8 x s8 dot product of 4 (shared-memory operands, accumulator in
    ``scope``); return its name."""
    return _register(DP4A_INTRIN, _dp4a_pair, scope)


def register_unpack4_intrinsic(scope: str = "global") -> str:
    """Register (idempotently) the int4 -> int8 unpack of one VNNI weight vector (``[32]`` uint8 -> ``[16, 4]``
    int8, GFNI + AVX-512 BW: one ``vgf2p8affineqb`` on a zmm) for the ``w_unpack`` block of sub-byte convs / dense;
    return its name. ``scope``: the storage scope of the unpacked buffer."""
    return _register(UNPACK4_INTRIN, _unpack4_pair, scope)


def patch_tvm_vnni_intrinsic() -> str:
    """Re-register TVM's own ``dot_16x4_vnni`` with the LLVM-22-compatible implementation (override=True).

    MetaSchedule's x86 "vnni" rules tensorize with that name; after this call the code they produce verifies and
    uses vpdpbusd. Returns the name. Idempotent.
    """
    from tvm.s_tir.tensor_intrin import x86  # noqa: F401  (registers the originals first, so ours wins)

    name = "dot_16x4_vnni"
    if name not in _registered:
        desc, impl = _vnni_pair("global")
        TensorIntrin.register(name, desc, impl, override=True)
        _registered.add(name)
    return name
