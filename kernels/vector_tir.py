"""Explicit-vector TIR shared by the hand-written kernels (kernels/amx.py, kernels/depthwise_vnni.py,
kernels/expand_depthwise.py): their requant / output arguments, the zero-point pad stage of an NCHW16c input, the
int32-clamp requant of 16 channels formed on int64 lane pairs and the int4 nibble unpack.

Both build TIR with the IR builder (``tvm.script.ir_builder.tirx``) inside a kernel being written; the requant
returns one ``uint8x16`` expression (no buffer), so a caller may keep the accumulator in a register.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import tvm.tirx as tir
from tvm.script.ir_builder import tirx as T

from .layout import BLOCK

_HALF = BLOCK // 2

#: The forms of the paired epilogue (:func:`paired_requant16`), fastest first. ``int32``: every shift of the layer
#: >= 32; ``lifted``: every shift <= 32, ``lifted+shift``: shifts on both sides of 32, each proved exact for the
#: layer (:func:`kernels.layout.lifted_epilogue_exact`); ``int64``: any shift in [1, 62].
EPILOGUE_INT32, EPILOGUE_LIFTED, EPILOGUE_LIFTED_SHIFT, EPILOGUE_INT64 = "int32", "lifted", "lifted+shift", "int64"
EPILOGUES = (EPILOGUE_INT32, EPILOGUE_LIFTED, EPILOGUE_LIFTED_SHIFT, EPILOGUE_INT64)
LIFTED_EPILOGUES = (EPILOGUE_LIFTED, EPILOGUE_LIFTED_SHIFT)


def _i64x8(v: tir.PrimExpr) -> tir.PrimExpr:
    return tir.reinterpret(f"int64x{_HALF}", v)


def _even(v: tir.PrimExpr) -> tir.PrimExpr:
    """The low int32 half of each int64 lane, sign-extended (``vpmuldq`` reads only the low half: free)."""
    s32 = tir.Broadcast(tir.const(32, "int64"), _HALF)
    return tir.shift_right(tir.shift_left(v, s32), s32)


def _odd(v: tir.PrimExpr) -> tir.PrimExpr:
    """The high int32 half of each int64 lane, sign-extended."""
    return tir.shift_right(v, tir.Broadcast(tir.const(32, "int64"), _HALF))


def paired_requant16(acc: tir.PrimExpr, mult: tir.PrimExpr, c_even: tir.PrimExpr, c_odd: tir.PrimExpr,
                     shift: tir.PrimExpr | tuple[tir.PrimExpr, tir.PrimExpr] | LiftedShift, zero_point: int,
                     lo: int, hi: int,
                     residual: tuple[tir.PrimExpr, tir.PrimExpr] | None = None,
                     unclamped: bool = False) -> tir.PrimExpr:
    """uint8x16 = the requant (:func:`kernels.ops.requant_finish`) of 16 channels: ``clamp((acc * mult [+ r * mr] +
    c) >> shift, lo - z, hi - z) + z`` per channel.

    ``acc``, ``mult`` (and the residual's ``r``, ``mr``) int32x16; ``c_even`` / ``c_odd`` int64x8: the rounding
    constants (:func:`kernels.ops.requant_channel_constants` ``"c"``) of channels 0, 2, .. 14 and 1, 3, .. 15.
    The 16 int32 lanes are read as 8 int64 lanes: the even channels' products are ``vpmuldq`` of the low halves,
    the odd ones' of the high halves (arithmetic shift). ``shift``:

    * int32x16 ``shift - 32`` (every shift >= 32, the int32-clamp epilogue, :func:`block_shift`): the high
      words of both go back into the int32 lanes with one permute, then an int32 shift and clamp: about 10 vector
      instructions per 16 outputs instead of the 15 of sign-extending to two int64 vectors and narrowing back;
    * a pair of int64x8, the shifts of the even and of the odd channels (any shift in [1, 62]): ``vpsravq``, the
      clamp on int64 lanes (``vpminsq`` / ``vpmaxsq``) and the low words of both interleaved back: ~4 instructions
      more;
    * a :class:`LiftedShift` (int32x16 ``n = max(shift - 32, 0)`` or None, int32x16 ``lift = max(32 - shift, 0)``): the
      *lifted* form of the first, for shifts below 32 too: ``acc`` (and the residual's codes) shifted left by
      ``lift`` (one ``vpsllvd``; the caller's rounding constants lifted alike, :func:`lift_constant`) make every
      sum ``v * 2^lift``, whose high word is ``v >> shift`` where ``shift < 32``. Exact only where no lifted value
      overflows (int32 lanes, int64 sums), which the builder proves per layer from the weights and the input
      ranges (:func:`kernels.layout.lifted_epilogue_exact`). W4A4 convs that feed an 8-bit table input have shifts
      of 28-31.

    Each int64 lane holds exactly the integer :func:`kernels.ops.requant_finish` computes. ``unclamped``: int32x16
    ``q + z`` for :func:`pack4_clamp` (with a pair of shifts, already clamped: the same bytes)."""
    n32 = shift
    if isinstance(shift, LiftedShift):      # acc (and the residual's codes) << lift: the products come out lifted
        n32 = shift.n
        acc = tir.shift_left(acc, shift.lift)
        if residual is not None:
            residual = (tir.shift_left(residual[0], shift.lift), residual[1])
    a, m = _i64x8(acc), _i64x8(mult)
    ev = _even(a) * _even(m) + c_even
    od = _odd(a) * _odd(m) + c_odd
    if residual is not None:
        r, mr = (_i64x8(v) for v in residual)
        ev = ev + _even(r) * _even(mr)
        od = od + _odd(r) * _odd(mr)
    z = int(zero_point)
    if isinstance(shift, tuple) and not isinstance(shift, LiftedShift):      # the int64 form
        bounds = [tir.Broadcast(tir.const(int(v) - z, "int64"), _HALF) for v in (lo, hi)]
        qe, qo = (tir.max(tir.min(tir.shift_right(v, n), bounds[1]), bounds[0]) for v, n in zip((ev, od), shift))
        q = tir.reinterpret(f"int32x{BLOCK}", tir.bitwise_or(
            tir.bitwise_and(qe, tir.Broadcast(tir.const((1 << 32) - 1, "int64"), _HALF)),
            tir.shift_left(qo, tir.Broadcast(tir.const(32, "int64"), _HALF))))
        q = q + tir.Broadcast(tir.const(z, "int32"), BLOCK)
        return q if unclamped else q.astype(f"uint8x{BLOCK}")
    high = tir.bitwise_or(
        tir.reinterpret(f"int64x{_HALF}", tir.shift_right(tir.reinterpret(f"uint64x{_HALF}", ev),
                                                          tir.Broadcast(tir.const(32, "uint64"), _HALF))),
        tir.bitwise_and(od, tir.Broadcast(tir.const(-(1 << 32), "int64"), _HALF)))
    q = tir.reinterpret(f"int32x{BLOCK}", high)
    if n32 is not None:     # None: every shift of the layer <= 32 (lifted form)
        q = tir.shift_right(q, n32)
    if unclamped:       # q + z, before the clamp: for pack4_clamp
        return q + tir.Broadcast(tir.const(z, "int32"), BLOCK)
    q = tir.max(tir.min(q, tir.Broadcast(tir.const(int(hi) - z, "int32"), BLOCK)),
                tir.Broadcast(tir.const(int(lo) - z, "int32"), BLOCK))
    return (q + tir.Broadcast(tir.const(z, "int32"), BLOCK)).astype(f"uint8x{BLOCK}")


def pack4_clamp(rows: list[tir.PrimExpr], lo: int, hi: int) -> tir.PrimExpr:
    """uint8x64 = four int32x16 rows (``paired_requant16(..., unclamped=True)``: ``q + z``) clamped to [lo, hi] and
    narrowed, row k in bytes 16k..16k+15: ``vpackssdw`` (int32 -> int16, signed saturation) twice, ``vpackuswb``
    (int16 -> uint8, unsigned saturation: [0, 255] for free), one ``vpermd`` to undo their per-lane interleave,
    and a byte ``vpmaxub`` / ``vpminub`` only where [lo, hi] is narrower than [0, 255]: 6-8 instructions per 64
    outputs where the per-row clamp and narrow take 8-12."""
    a = tir.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512.packssdw.512", rows[0], rows[1])
    b = tir.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512.packssdw.512", rows[2], rows[3])
    u = tir.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.packuswb.512", a, b)
    d = tir.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.permvar.si.512", tir.reinterpret("int32x16", u),
                                  _pack4_index())
    out = tir.reinterpret("uint8x64", d)
    if int(lo) > 0:
        out = tir.max(out, tir.Broadcast(tir.const(int(lo), "uint8"), 64))
    if int(hi) < 255:
        out = tir.min(out, tir.Broadcast(tir.const(int(hi), "uint8"), 64))
    return out


def pixel_runs(count: int) -> list[tuple[int, int, int]]:
    """(first pixel, groups, pixels per group): ``count`` consecutive pixels covered once, in groups of 8, then
    one of 4, then one of the 1-3 left. Groups of 4 and 8 are narrowed four pixels at a time
    (:func:`store_pixel_rows`); the pixels of a group are independent accumulators."""
    runs, first = [], 0
    for size in (8, 4):
        groups = (int(count) - first) // size
        if groups:
            runs.append((first, groups, size))
            first += groups * size
    if first < count:
        runs.append((first, 1, int(count) - first))
    return runs


def for_pixel_groups(count: int, body) -> None:
    """``body(first, size)`` for every group of :func:`pixel_runs`: a serial loop over a run's groups (none for a
    single group); ``first`` is an expression, ``size`` an int."""
    for first, groups, size in pixel_runs(count):
        if groups == 1:
            body(tir.const(first, "int32"), size)
        else:
            with T.serial(0, groups) as jg:
                body(first + jg * size, size)


def store_pixel_rows(buf, lead: list, first, size: int, row, lo: int, hi: int) -> None:
    """buf[*lead, first + k, 0:16] = ``row(k, False)`` (uint8x16: a requantized, clamped pixel) for k < ``size``;
    where ``size`` is a multiple of 4, four pixels at a time: :func:`pack4_clamp` of ``row(k, True)`` (int32x16
    ``q + z`` before the clamp: ``paired_requant16(..., unclamped=True)``) and one 64-byte store. ``buf``'s last
    axis holds the 16 channels of a pixel, the one before it consecutive pixels."""
    if size % 4 == 0:
        for q in range(0, size, 4):
            T.buffer_store(buf, pack4_clamp([row(q + k, True) for k in range(4)], lo, hi),
                           [*lead, first + q, tir.Ramp(0, 1, 4 * BLOCK)])
    else:
        for k in range(size):
            T.buffer_store(buf, row(k, False), [*lead, first + k, tir.Ramp(0, 1, BLOCK)])


def _pack4_index() -> tir.PrimExpr:
    """The int32x16 ``vpermd`` index of :func:`pack4_clamp`: dword ``d' = 4k + L`` of the packed rows takes dword
    ``4L + k`` of ``packssdw`` / ``packuswb``'s lane-interleaved result, i.e. index ``4 * (d' % 4) + d' // 4``."""
    r = tir.Ramp(tir.const(0, "int32"), tir.const(1, "int32"), 16)
    four = tir.Broadcast(tir.const(4, "int32"), 16)
    return tir.floormod(r, four) * four + tir.floordiv(r, four)     # LLVM folds it to a constant


def _gf2_qword(source_bits: list[int]) -> int:
    """The ``vgf2p8affineqb`` matrix (one int64) whose output bit ``i`` is input bit ``source_bits[i]`` (row ``i`` of
    the matrix is byte ``7 - i``: Intel SDM, GF2P8AFFINEQB), as a signed int64."""
    v = sum((1 << s) << (8 * (7 - i)) for i, s in enumerate(source_bits))
    return v - (1 << 64) if v >= 1 << 63 else v


#: nibble -> sign-extended int8 on the low / high nibble of each byte (bits 0-3 / 4-7, the top one repeated)
_LOW_NIBBLE, _HIGH_NIBBLE = _gf2_qword([0, 1, 2, 3, 3, 3, 3, 3]), _gf2_qword([4, 5, 6, 7, 7, 7, 7, 7])


def unpack_nibbles64(packed: tir.PrimExpr) -> tir.PrimExpr:
    """int8x64 = the 64 int4 weights of one 32-byte block (uint8x32; byte ``i``: weight ``i`` in the low nibble,
    ``i + 32`` in the high one: :func:`kernels.layout.pack_conv_weight`'s and :func:`kernels.pack_amx_int4`'s
    order), sign-extended: the 32 bytes broadcast to both halves of a zmm (``vbroadcasti64x4``) and one
    ``vgf2p8affineqb`` whose matrix sign-extends the low nibbles in the lower half and the high ones in the upper
    half (GFNI + AVX-512 BW)."""
    matrix = tir.reinterpret("int8x64", tir.Shuffle([tir.Broadcast(tir.const(_LOW_NIBBLE, "int64"), 4),
                                                     tir.Broadcast(tir.const(_HIGH_NIBBLE, "int64"), 4)],
                                                    list(range(8))))
    both = tir.reinterpret("int8x64", tir.Shuffle([packed, packed], list(range(64))))
    return tir.call_llvm_pure_intrin("int8x64", "llvm.x86.vgf2p8affineqb.512", both, matrix, tir.const(0, "int8"))


#: a hand-written kernel with fewer output elements than this runs its task loop on the calling thread: a parallel
#: loop costs ~0.5 us to start and join on the 2-core Zen 4 (~2 us in the VM's slow stretches), more than such a
#: kernel's work. Depthwise 3x3 (kernels/depthwise_vnni.py), standalone, warm, serial / parallel time: 3-4 K outputs
#: (c96 at 7x7, c192 at 4x4, stride-2 c96 at 14x14) 0.61-0.72, 6 K 0.92, 9 K 0.97-1.01, 18 K 1.22, 73 K 1.59.
SERIAL_OUTPUTS = 1 << 13


def task_plan(outputs: int, threads: int | None) -> tuple[Any, int | None]:
    """(loop constructor, threads) of a hand-written kernel of ``outputs`` output elements: ``T.serial`` and 1 thread
    under :data:`SERIAL_OUTPUTS` (the tasks run on the calling thread: a parallel loop's start and join cost more
    there), else ``T.parallel`` and ``threads``. The same iterations either way, so the same integers; the kernel
    splits its tasks for the threads returned."""
    return (T.serial, 1) if outputs < SERIAL_OUTPUTS else (T.parallel, threads)


def split_for_threads(count: int, groups: int, threads: int | None) -> tuple[int, int]:
    """(parts, per part): ``count`` items of each of ``groups`` groups split into as few equal parts as give >= 2
    parallel iterations per thread (``threads``, default this machine's cores), no empty part. The hand-written
    kernels' chunking: AMX int4 output-block pairs into chunks, depthwise planes into row bands."""
    parts = min(count, max(1, -(-2 * int(threads or os.cpu_count() or 1) // groups)))
    per = -(-count // parts)
    return -(-count // per), per


def residual16(r, mr, index: list, o) -> tuple[tir.PrimExpr, tir.PrimExpr]:
    """(r, mr) of :func:`paired_requant16` for output block ``o``: the residual's 16 uint8 values at ``index`` (the
    leading indices of ``r``) as int32x16 and their multipliers."""
    return (tir.BufferLoad(r, [*index, tir.Ramp(0, 1, BLOCK)]).astype(f"int32x{BLOCK}"),
            tir.BufferLoad(mr, [tir.Ramp(o * BLOCK, 1, BLOCK)]))


def check_kernel_args(kernel: str, shapes: dict[str, tuple] = (), zero_points: dict[str, int] = (),
                      clamps: dict[str, tuple[int, int]] = ()) -> None:
    """Raise ValueError naming ``kernel`` and the argument unless every shape in ``shapes`` (name -> shape) has
    integer dimensions >= 1, every zero point is an integer in [0, 255] and every clamp (name -> (lo, hi)) has
    0 <= lo <= hi <= 255: the hand-written kernels' common preconditions (a zero-sized dimension was a
    ZeroDivisionError, an out-of-range zero point TVM's own literal check, lo > hi silently built)."""
    for name, shape in dict(shapes).items():
        dims = tuple(shape)
        if not dims or any(not isinstance(d, (int, np.integer)) or int(d) < 1 for d in dims):
            raise ValueError(f"{kernel}: {name} shape {dims} needs integer dimensions >= 1")
    for name, z in dict(zero_points).items():
        if not isinstance(z, (int, np.integer)) or not 0 <= int(z) <= 255:
            raise ValueError(f"{kernel}: {name} {z!r} is not a uint8 zero point (0..255)")
    for name, (lo, hi) in dict(clamps).items():
        if not 0 <= int(lo) <= int(hi) <= 255:
            raise ValueError(f"{kernel}: clamp {name} [{lo}, {hi}] needs 0 <= lo <= hi <= 255")


def requant_args(blocks: int, suffix: str = "") -> tuple:
    """The PrimFunc arguments ``bias``, ``mult``, ``shift`` (+ ``suffix``): int32 (blocks * 16,) each."""
    return tuple(T.arg(f"{k}{suffix}", T.buffer((blocks * BLOCK,), "int32")) for k in ("bias", "mult", "shift"))


def output_args(out_shape: tuple[int, ...], residual: bool) -> tuple:
    """(r, mr, out): the residual's uint8 ``out_shape`` input and int32 multiplier (None, None without one), then the
    uint8 output argument."""
    r = mr = None
    if residual:
        r = T.arg("r", T.buffer(out_shape, "uint8"))
        mr = T.arg("mr", T.buffer((int(out_shape[1]) * BLOCK,), "int32"))
    return r, mr, T.arg("out", T.buffer(out_shape, "uint8"))


def check_epilogue(kernel: str, epilogue: str) -> str:
    """``epilogue`` if it names a form of :data:`EPILOGUES`, else ValueError naming ``kernel``."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"{kernel}: epilogue {epilogue!r} is not one of {EPILOGUES}")
    return epilogue


def epilogue_attrs(epilogue: str) -> dict[str, object]:
    """A kernel's PrimFunc attributes naming its epilogue form: ``epilogue`` and ``int32_epilogue`` (1 for the int32
    and lifted forms, which clamp and narrow int32 lanes, as :func:`kernels.schedule.arithmetic_shortcuts` counts them)."""
    return {"epilogue": epilogue, "int32_epilogue": int(epilogue != EPILOGUE_INT64)}


class LiftedShift(NamedTuple):
    """The ``shift`` argument of :func:`paired_requant16`'s lifted form: int32x16 ``n = max(shift - 32, 0)`` (None
    where every shift of the layer is <= 32: no right shift) and ``lift = max(32 - shift, 0)``."""

    n: tir.PrimExpr | None
    lift: tir.PrimExpr


def lift_amount(s: tir.PrimExpr, lanes: int = 1) -> tir.PrimExpr:
    """``max(32 - s, 0)`` of an int32 shift (``lanes`` 1) or of int32x``lanes`` shifts: the lifted form's left
    shift."""
    def const(v: int) -> tir.PrimExpr:
        return tir.const(v, "int32") if lanes == 1 else tir.Broadcast(tir.const(v, "int32"), lanes)
    return tir.max(const(32) - s, const(0))


def lift_constant(c: tir.PrimExpr, s: tir.PrimExpr) -> tir.PrimExpr:
    """The int64 rounding constant ``c`` of a channel with int32 shift ``s`` in the lifted form: ``c << max(32 - s,
    0)``."""
    return tir.shift_left(c, lift_amount(s).astype("int64"))


def block_shift(shift, o, epilogue: str):
    """The ``shift`` argument of :func:`paired_requant16` for output block ``o`` of the int32 (CB * 16,) per-channel
    shifts ``shift`` in form ``epilogue`` (:data:`EPILOGUES`): the int32x16 ``max(shift - 32, 0)``; the
    :class:`LiftedShift` (the lifted forms); or the pair of int64x8 shifts of the even and of the odd channels (``int64``,
    small buffers in the caller's scope, filled here)."""
    s = tir.BufferLoad(shift, [tir.Ramp(o * BLOCK, 1, BLOCK)])
    n32 = tir.max(s - tir.Broadcast(tir.const(32, "int32"), BLOCK), tir.Broadcast(tir.const(0, "int32"), BLOCK))
    if epilogue == EPILOGUE_INT32:
        return n32
    if epilogue in LIFTED_EPILOGUES:
        # the lifted form without a right shift: every shift <= 32, so n32 is 0
        return LiftedShift(None if epilogue == EPILOGUE_LIFTED else n32, lift_amount(s, BLOCK))
    nat = T.alloc_buffer((BLOCK,), "int64")
    pairs = T.alloc_buffer((BLOCK,), "int64")
    with T.vectorized(0, BLOCK) as oc:
        T.buffer_store(nat, shift[o * BLOCK + oc].astype("int64"), [oc])
    store_paired_constants(pairs, nat)
    return tuple(tir.BufferLoad(pairs, [tir.Ramp(h * _HALF, 1, _HALF)]) for h in range(2))


def store_paired_constants(dst, src, base: tir.PrimExpr | int = 0, lead: tuple = ()) -> None:
    """dst[*lead, base + 0:8] = src[*lead, base + 0, 2, .. 14], dst[*lead, base + 8:16] = src[*lead, base + 1, 3,
    .. 15]: the rounding constants of 16 channels in the order :func:`paired_requant16` loads them (two 8-lane
    loads)."""
    for half in range(2):
        with T.vectorized(0, _HALF) as e:
            T.buffer_store(dst, src[(*lead, base + 2 * e + half)], [*lead, base + half * _HALF + e])


def pad_stage(x, xp, n: int, cb: int, cbp: int, h: int, w: int, ph: int, pw: int, z_x: int, kblock: int,
              width: int | None = None, subsample: tuple[int, int] = (1, 1)) -> None:
    """xp = x (N, CB, H, W, 16) padded with the input zero point ``z_x`` to (N, CBP, H + 2ph, ``width``, kblock)
    (``width`` default W + 2pw; more columns on the right read as the zero point too), regrouped from 16- into
    ``kblock``-channel blocks (16 or 64; channels past the input's read as the zero point).

    Row by row in parallel, rows outer (each thread writes the band of rows its AMX tasks read): a border row is one
    fill, an inner row a fill of the left columns, per pixel ``kblock / 16`` 16-byte moves (one per source block; a
    block past the input's channels is a fill) and a fill of the right ones; explicit vector loads and stores, no
    per-element conditions (the select-per-16-bytes form, parallel over images x blocks only, took a third of a
    56x56x64 3x3 conv at batch 1, and ~45% of a 3x3/2 depthwise conv at 112x112).

    ``subsample`` (sh, sw) with no padding: xp (N, CBP, ceil(H / sh), ceil(W / sw), kblock) holds every sh-th row
    and sw-th column only (a strided 1x1 conv then reads it at stride 1: a quarter of the copy at stride 2)."""
    sh, sw = (int(v) for v in subsample)
    if (sh, sw) != (1, 1):
        if ph or pw or width is not None:
            raise ValueError(f"pad_stage subsamples only without padding, got padding ({ph}, {pw})")
        h, w = -(-h // sh), -(-w // sw)
    hp, wp = h + 2 * ph, (w + 2 * pw if width is None else int(width))
    sub = kblock // BLOCK
    zero16 = tir.Broadcast(tir.const(z_x, "uint8"), BLOCK)
    right = wp - w - pw
    with T.parallel(0, n * hp * cbp) as t:
        b, i, ic = t // (hp * cbp), t // cbp % hp, t % cbp

        def fill(first: int, count: int) -> None:
            with T.serial(0, count) as j:
                for q in range(sub):
                    T.buffer_store(xp, zero16, [b, ic, i, first + j, tir.Ramp(q * BLOCK, 1, BLOCK)])

        with T.If(tir.any(i < ph, i >= h + ph)):
            with T.Then():
                fill(0, wp)
            with T.Else():
                if pw:
                    fill(0, pw)
                with T.serial(0, w) as j:
                    for q in range(sub):
                        blk = ic * sub + q
                        src = tir.BufferLoad(x, [b, tir.min(blk, cb - 1), (i - ph) * sh, j * sw,
                                                 tir.Ramp(0, 1, BLOCK)])
                        if cb % sub:        # the last block is part zero point
                            src = tir.Select(tir.Broadcast(blk < cb, BLOCK), src, zero16)
                        T.buffer_store(xp, src, [b, ic, i, pw + j, tir.Ramp(q * BLOCK, 1, BLOCK)])
                if right:
                    fill(w + pw, right)


__all__ = ["SERIAL_OUTPUTS", "block_shift", "check_kernel_args", "for_pixel_groups", "output_args", "pack4_clamp",
           "pad_stage", "paired_requant16", "pixel_runs", "requant_args", "residual16", "split_for_threads",
           "store_paired_constants", "store_pixel_rows", "task_plan", "unpack_nibbles64"]
