"""The requant epilogue of the TE conv kernels on AVX-512, as a tensor intrinsic over one output block (16 channels).

The TE kernels (:func:`kernels.ops.conv2d_nchwc_requant`) write their epilogue per channel
(:func:`kernels.ops.requant_expr`); vectorized over the 16 channels of a block, LLVM computes it on two int64x8
halves: sign-extend the accumulators, multiply, add, shift, clamp and narrow each half, about 26 vector
instructions per 16 outputs (the int32-clamp form, ``shift_ge32``, about 20). A 1x1 expand conv from 24 channels
spends 6 ``vpdpbusd`` per 16 outputs, so the epilogue was most of it (Zen 4: 24 -> 144 at 56x56 ran 2.9x faster
with the epilogue replaced by a plain narrowing).

:func:`register_requant16_intrinsic` describes that same per-channel integer expression (the description is built
by :func:`kernels.ops.requant_channel`, as the kernel's own block is, so that tensorize matches it exactly) and
implements it with :func:`kernels.vector_tir.paired_requant16`, the explicit-vector form the hand-written kernels
use: the 16 int32 lanes read as 8 int64 lanes, ``vpmuldq`` of the even and of the odd channels, then an int32
shift / clamp (every shift >= 32) or an int64 one (any shift), about 12 instructions. Same integers (both are
:func:`ptq2tvm.ir.reference.requantize`); the rounding constants ``bias * mult + 2^(shift - 1) [- z_r * mr]`` are
formed in the same int64 pairs (the multipliers are >= 0, so ``vpmuldq``'s sign extension equals the zero
extension :func:`kernels.ops.requant_expr` uses for them).
"""

from __future__ import annotations

import re

import tvm.tirx as tir
from tvm.s_tir import TensorIntrin
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .layout import BLOCK
from .ops import requant_channel
from .vector_tir import LIFTED_EPILOGUES, LiftedShift, _even, _i64x8, _odd, lift_amount, paired_requant16

_registered: set[str] = set()
#: the buffers in the order the conv's output block reads them (tensorize compares the read regions in order)
_READ_ORDER = {False: ("A", "M", "B", "S"), True: ("A", "M", "R", "RM", "B", "S")}


def _paired_constants(bias, mult, shift, rm=None, z_r: int = 0) -> tuple[tir.PrimExpr, tir.PrimExpr]:
    """(even, odd) int64x8 rounding constants ``bias * mult + 2^(shift - 1) [- z_r * rm]`` of 16 channels."""
    b, m, s = (_i64x8(v) for v in (bias, mult, shift))
    one = tir.Broadcast(tir.const(1, "int64"), BLOCK // 2)
    out = []
    for half in (_even, _odd):
        c = half(b) * half(m) + tir.shift_left(one, half(s) - one)
        if rm is not None and z_r:
            c = c + tir.Broadcast(tir.const(-int(z_r), "int64"), BLOCK // 2) * half(_i64x8(rm))
        out.append(c)
    return out[0], out[1]


_NAME = re.compile(r"ptq2tvm_requant16_z(\d+)_(\d+)_(\d+)_(s32|s64|l32|ls32)_(none|r\d+)_(global|local)")
#: the name's form tag: int32-clamp (every shift >= 32), int64, and the two lifted forms
_FORMS = {(True, None): "s32", (False, None): "s64", (False, "lifted"): "l32", (False, "lifted+shift"): "ls32"}


def requant16_intrinsic_name(zero_point: int, lo: int, hi: int, shift_ge32: bool, residual_zero_point: int | None,
                             scope: str = "global", lifted: str | None = None) -> str:
    """The registered name of :func:`register_requant16_intrinsic`'s intrinsic: every parameter is in it, so
    :func:`register_named_epilogues` can register it again from a recorded trace."""
    res = "none" if residual_zero_point is None else f"r{int(residual_zero_point)}"
    return (f"ptq2tvm_requant16_z{int(zero_point)}_{int(lo)}_{int(hi)}_{_FORMS[(bool(shift_ge32), lifted)]}_{res}"
            f"_{scope}")


def register_named_epilogues(text: str) -> list[str]:
    """Register every requant intrinsic whose name (:func:`requant16_intrinsic_name`) occurs in ``text`` (e.g.
    MetaSchedule's tuning-record file, whose traces tensorize with them: TVM parses the traces when it opens the
    database and fails on a name not registered in this process); return the names."""
    names = []
    for found in sorted({m.group(0) for m in _NAME.finditer(text)}):
        z, lo, hi, tag, res, scope = _NAME.fullmatch(found).groups()
        shift_ge32, lifted = next(k for k, v in _FORMS.items() if v == tag)
        names.append(register_requant16_intrinsic(int(z), int(lo), int(hi), shift_ge32,
                                                  None if res == "none" else int(res[1:]), scope, lifted))
    return names


def _intrinsic_func(scope: str, residual: bool, body) -> tir.PrimFunc:
    """A description or implementation PrimFunc of the requant intrinsic: the (16,) buffers A (int32 accumulators,
    in ``scope``), M, B, S (int32 mult, bias, shift), with ``residual`` R (uint8) and RM (int32), and O (uint8 out),
    a root block reading them in the order the conv's output block reads them, and ``body(buffers)`` inside."""
    specs = [("A", "int32"), ("M", "int32"), ("B", "int32"), ("S", "int32")]
    specs += [("R", "uint8"), ("RM", "int32")] if residual else []
    with IRBuilder() as ib:
        with T.prim_func():
            buf = {k: T.arg(k, T.buffer((BLOCK,), dtype, offset_factor=1, scope=scope if k == "A" else "global"))
                   for k, dtype in [*specs, ("O", "uint8")]}
            with T.sblock("root"):
                T.reads(*[buf[k][0:BLOCK] for k in _READ_ORDER[residual]])
                T.writes(buf["O"][0:BLOCK])
                body(buf)
    return ib.get()


def register_requant16_intrinsic(zero_point: int, lo: int, hi: int, shift_ge32: bool,
                                 residual_zero_point: int | None = None, scope: str = "global",
                                 lifted: str | None = None) -> str:
    """Register (idempotently) the requant of one 16-channel output block; return its name.

    Buffers: the int32 accumulators (16,) in ``scope`` (the conv's accumulator scope), the int32 ``mult``, ``bias``
    and ``shift`` of the block's channels (16,) each, with a residual (``residual_zero_point`` not None) its uint8
    codes (16,) and int32 multipliers (16,), and the uint8 output (16,). ``shift_ge32``: every shift of the layer is
    >= 32 (:func:`kernels.layout.shifts_allow_int32_epilogue`): the int32 shift and clamp; else int64 ones (any shift
    in [1, 62]). ``lifted`` ("lifted" / "lifted+shift", with ``shift_ge32`` False): the same int64 description,
    implemented in the lifted form (:class:`kernels.vector_tir.LiftedShift`: the accumulator, the residual's codes
    and the rounding constants shifted left by ``max(32 - shift, 0)``, then the int32 form's high words, shift and
    clamp), exact only where the caller proved it (:func:`kernels.layout.lifted_epilogue_exact`). AVX-512 targets
    only (int64x8 lanes). Raises ValueError for a ``lifted`` value outside those two or given with ``shift_ge32``."""
    if lifted is not None and (lifted not in LIFTED_EPILOGUES or shift_ge32):
        raise ValueError(f"lifted must be one of {LIFTED_EPILOGUES} without shift_ge32, got {lifted!r}")
    name = requant16_intrinsic_name(zero_point, lo, hi, shift_ge32, residual_zero_point, scope, lifted)
    if name in _registered:
        return name
    z, lo, hi = int(zero_point), int(lo), int(hi)
    zr = None if residual_zero_point is None else int(residual_zero_point)

    def vector(acc, mult, bias, shift, r=None, rm=None):
        ce, co = _paired_constants(bias, mult, shift, rm, zr or 0)
        residual = None if r is None else (r.astype(f"int32x{BLOCK}"), rm)
        if lifted is not None:      # the constants lifted like the products: c << max(32 - shift, 0)
            lift = lift_amount(shift, BLOCK)
            ce = tir.shift_left(ce, _even(_i64x8(lift)))
            co = tir.shift_left(co, _odd(_i64x8(lift)))
            n32 = None if lifted == "lifted" else tir.max(shift - tir.Broadcast(tir.const(32, "int32"), BLOCK),
                                                          tir.Broadcast(tir.const(0, "int32"), BLOCK))
            return paired_requant16(acc, mult, ce, co, LiftedShift(n32, lift), z, lo, hi, residual=residual)
        if shift_ge32:
            n = tir.max(shift - tir.Broadcast(tir.const(32, "int32"), BLOCK), tir.Broadcast(tir.const(0, "int32"),
                                                                                          BLOCK))
        else:
            s64 = _i64x8(shift)
            n = (_even(s64), _odd(s64))
        return paired_requant16(acc, mult, ce, co, n, z, lo, hi, residual=residual)

    def desc_body(buf) -> None:
        with T.serial(0, BLOCK) as i:
            with T.sblock("out"):
                vi = T.axis.spatial(BLOCK, i)
                T.reads(*[buf[k][vi] for k in _READ_ORDER[zr is not None]])
                T.writes(buf["O"][vi])
                residual = None if zr is None else (buf["R"][vi], buf["RM"][vi])
                T.buffer_store(buf["O"], requant_channel(buf["A"][vi], buf["M"][vi], buf["B"][vi], buf["S"][vi], z, lo,
                                                         hi, residual, zr or 0, shift_ge32), [vi])

    def impl_body(buf) -> None:
        loads = [buf[k].vload([0], dtype=f"{buf[k].dtype}x{BLOCK}") for k in ("A", "M", "B", "S")]
        if zr is not None:
            loads += [buf[k].vload([0], dtype=f"{buf[k].dtype}x{BLOCK}") for k in ("R", "RM")]
        T.buffer_store(buf["O"], vector(*loads), [tir.Ramp(tir.const(0, "int32"), 1, BLOCK)])

    desc, impl = (_intrinsic_func(scope, zr is not None, body) for body in (desc_body, impl_body))
    TensorIntrin.register(name, desc, impl, override=True)
    _registered.add(name)
    return name


__all__ = ["register_named_epilogues", "register_requant16_intrinsic",
           "requant16_intrinsic_name"]
