"""The first conv (row layout, 1-4 input channels) and the max pool after it in one AVX-512 VNNI kernel, the pool taken
on the int32 accumulators: ResNet's 7x7/2 stem + 3x3/2 max pool.

Why it is exact: the requantization ``clamp((acc * m + c) >> n, lo - z, hi - z) + z`` is non-decreasing in ``acc``
(every multiplier ``m`` is >= 0, :func:`kernels.vector_tir.paired_requant16`), so the max of the requantized values
over a window is the requantization of the max accumulator over it. The max pool pads with code 0, below every real
code, so a window's padding never wins where the window holds a real element (checked: padding < kernel).

Why it is faster: unfused, the conv requantizes and stores every output (ResNet-18 at batch 8: 6.4 MB) and the pool
reads it back through memory; here the epilogue runs on a quarter of the outputs (after a 3x3/2 pool) and the conv's
outputs never leave the registers and a small ring of rows in cache. Each parallel iteration (image, group of ``Q``
output blocks, band of pool rows) computes the conv rows under its pool rows in order: a conv row is a run of tiles
of ``P`` pixels x ``Q`` blocks (``P * Q`` accumulators in registers, one ``vpdpbusd`` per accumulator, kernel row and
group of 4 input bytes, the 4 bytes broadcast as in :func:`kernels.ops.conv2d_rows_requant`). ``P`` is a multiple of
the pool's column stride, so a tile completes the pool windows that end in it: their max over columns is taken from
the registers (the columns of a window that began in the tile before from a small ``carry`` of that tile's last
columns) and stored into a ring of ``KPH`` rows; each pool row is the vertical max of its window's rows there,
requantized by :func:`kernels.vector_tir.paired_requant16` and narrowed four pixels at a time. A band's first pool
row recomputes the conv rows it shares with the band above (one row for a 3x3/2 pool). The products are bound to
variables in step order (``T.bind``): as one expression tree per accumulator, LLVM issued one 42-long dependency
chain after another (1.5x slower).

Fewer products: a kernel row's ``KW * C`` bytes take ceil(KW * C / 4) groups of 4, the last one partly zero weights
(RGB 7x7: 21 bytes, 5 groups and 1 byte). Where that last group holds 1 or 2 real bytes, the last groups of 4 (or 2)
kernel rows are packed into one: each pixel's tail bytes gathered from those rows into one int32, the weight groups
shifted into place and OR-ed (their padding bytes are zero, so the OR is exact). ResNet's stem: 7 x 5 + 2 = 37
``vpdpbusd`` per accumulator instead of 42; the kernel ran 0.90-0.91x its time (Zen 4, batch 1 and 8).

ResNet-18's stem + pool on a Zen 4 (2 threads, interleaved): 0.89x the time of the TE conv + pool kernels standalone
(batch 8); in the network, kernel by kernel, 0.90x at batch 8 and 0.93x at batch 1 before the tail packing, about
0.8x with it (kernels/README.md, "The stem and its max pool in one kernel").
"""

from __future__ import annotations

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .depthwise_vnni import channel_constants, requant16
from .layout import BLOCK
from .vector_tir import (EPILOGUE_INT32, check_epilogue, check_kernel_args, epilogue_attrs, for_pixel_groups,
                         requant_args, split_for_threads, store_pixel_rows)

STEM_POOL_KIND = "rows_conv_maxpool_vnni"      # function attribute ``ptq2tvm_kernel`` of these PrimFuncs
#: the register tile (pixels, output blocks): 12 accumulators; (7, 2) is rounded to it for a stride-2 pool, and
#: (8, 2), (8, 1), (4, 4) ran 1.0-1.03x its time (Zen 4, ResNet-18's stem at batch 8)
STEM_POOL_TILE = (6, 2)


def rows_conv_maxpool_out_shape(rows_shape: tuple[int, ...], w_shape: tuple[int, ...], in_channels: int,
                                in_width: int, kernel: tuple[int, int], stride: tuple[int, int],
                                padding: tuple[int, int], pool_kernel: tuple[int, int],
                                pool_stride: tuple[int, int], pool_padding: tuple[int, int],
                                left: int = 16) -> tuple[int, int, int, int, int]:
    """(N, O/16, PH, PW, 16): the pooled output of :func:`rows_conv_maxpool_primfunc`."""
    from .ops import _out_hw, rows_layout

    n, rows, _ = (int(v) for v in rows_shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    g = rows_layout(int(in_channels), rows - 2 * ph, int(in_width), (kh, kw), (sh, sw), (ph, pw), left)
    oh, ow = (rows - kh) // sh + 1, g["out_width"]
    return (n, int(w_shape[0]), *_out_hw(oh, ow, pool_kernel, pool_stride, pool_padding, (1, 1)), BLOCK)


def rows_conv_maxpool_primfunc(name: str, rows_shape: tuple[int, ...], w_shape: tuple[int, ...], in_channels: int,
                               in_width: int, kernel: tuple[int, int], stride: tuple[int, int],
                               padding: tuple[int, int], pool_kernel: tuple[int, int], pool_stride: tuple[int, int],
                               pool_padding: tuple[int, int], output_zero_point: int, lo: int, hi: int,
                               threads: int | None = None, epilogue: str = EPILOGUE_INT32, left: int = 16,
                               tile: tuple[int, int] = STEM_POOL_TILE) -> tir.PrimFunc:
    """The PrimFunc ``name(x, w, bias, mult, shift, out)``: ``out`` = :func:`kernels.maxpool2d_nchwc` (``pool_*``,
    dilation 1, no ceil-mode padding) of :func:`kernels.conv2d_rows_requant` (``kernel``, ``stride``, ``padding``,
    dilation 1, no residual), the same integers.

    x uint8 (N, H + 2ph, Wa * C): the row layout of :func:`kernels.nchw_to_rows` (padding applied there); w int8
    (O/16, 1, KH, 1, G, 16, 4) (:func:`kernels.pack_rows_weight`, VNNI, int8 storage; zero past the KW * C real bytes
    of a kernel row, which the packed tail groups rely on); bias / mult / shift int32
    (O,); out uint8 (N, O/16, PH, PW, 16) (:func:`rows_conv_maxpool_out_shape`). ``epilogue``: the form of
    :func:`kernels.vector_tir.paired_requant16` the caller proved for the conv (:data:`kernels.vector_tir.EPILOGUES`);
    ``threads``: the threads the build runs on (default this machine's cores); ``tile``: (pixels, output blocks)
    of the register tile (pixels rounded down to a multiple of the pool's column stride, at least ``KPW - 1``;
    blocks 1 where they do not divide the output blocks). Raises ValueError for a weight that does not match the row
    layout, a dimension below 1, a zero point outside [0, 255], a clamp outside 0 <= lo <= hi <= 255, a pool padding
    not below its kernel (a window of padding only) or a pool larger than the conv output."""
    from .ops import _out_hw, rows_layout

    check_epilogue("rows_conv_maxpool", epilogue)
    check_kernel_args("rows_conv_maxpool", {"row input": rows_shape, "weight": w_shape, "tile": tile},
                      {"output zero point": output_zero_point}, {"out": (lo, hi)})
    n, rows, rowbytes = (int(v) for v in rows_shape)
    c = int(in_channels)
    (kh, kw), (sh, sw), (ph, pw) = ((int(a), int(b)) for a, b in (kernel, stride, padding))
    (kph, kpw), (sph, spw), (pph, ppw) = ((int(a), int(b)) for a, b in (pool_kernel, pool_stride, pool_padding))
    g = rows_layout(c, rows - 2 * ph, int(in_width), (kh, kw), (sh, sw), (ph, pw), left)
    ob, one_a, wkh, one_b, groups, lanes, four = (int(v) for v in w_shape) if len(w_shape) == 7 else (0,) * 7
    if (one_a, wkh, one_b, groups, lanes, four) != (1, kh, 1, g["groups"], BLOCK, 4) or ob < 1 \
            or rowbytes != g["row_pixels"] * c or rows != g["rows"]:
        raise ValueError(f"rows_conv_maxpool: weight {tuple(w_shape)} / row input {tuple(rows_shape)} do not match "
                         f"a {kh}x{kw} conv on {c} channels of width {in_width} (expect weight (O/16, 1, {kh}, 1, "
                         f"{g['groups']}, 16, 4) int8 and rows ({n}, {g['rows']}, {g['row_pixels'] * c}))")
    if min(sh, sw, kph, kpw, sph, spw) < 1 or min(pph, ppw) < 0 or pph >= kph or ppw >= kpw:
        raise ValueError(f"rows_conv_maxpool: pool kernel {(kph, kpw)}, stride {(sph, spw)}, padding {(pph, ppw)} "
                         f"needs strides >= 1 and 0 <= padding < kernel")
    oh, ow = (rows - kh) // sh + 1, g["out_width"]
    poh, pow_ = _out_hw(oh, ow, (kph, kpw), (sph, spw), (pph, ppw), (1, 1))
    if min(oh, ow, poh, pow_) < 1:
        raise ValueError(f"rows_conv_maxpool: pool {(kph, kpw)} larger than the conv output {oh}x{ow}")
    tp, tq = (int(v) for v in tile)
    q_blocks = tq if ob % tq == 0 else 1
    block_groups = ob // q_blocks
    bands, band_rows = split_for_threads(poh, n * block_groups, threads)
    off = (left - pw) * c
    z = int(output_zero_point)
    new_from = max(kph - sph, 0)        # window rows that the pool row above did not have
    # tiles of tp conv columns, tp a multiple of the pool's column stride and >= the columns carried: tile t holds
    # conv columns [t * tp, t * tp + tp) and completes the pool columns t * tp / spw + c0 + [0, tp / spw), whose
    # windows start up to carry_n columns before the tile
    tp = max(spw * max(1, tp // spw), spw * -(-(kpw - 1) // spw))
    tiles = -(-ow // tp)
    # the real bytes of each kernel row's last 4-byte group (KW * C = 21 for an RGB 7x7: 5 groups + 1 byte); where
    # they are 1 or 2, the last groups of 4 or 2 kernel rows go into one group (ResNet's stem: 7 x 5 + 2 = 37
    # vpdpbusd per accumulator instead of 7 x 6 = 42)
    tail = kw * c - 4 * (g["groups"] - 1)
    per_tail = 4 // tail if tail <= 2 else 1
    full_groups = g["groups"] - (per_tail > 1)
    tail_sets = [tuple(range(r0, min(r0 + per_tail, kh))) for r0 in range(0, kh, per_tail)] if per_tail > 1 else []
    c0 = -((kpw - 1 - ppw) // spw)
    carry_n = max(0, ppw - c0 * spw)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, STEM_POOL_KIND, epilogue_attrs(epilogue)))
            x = T.arg("x", T.buffer((n, rows, rowbytes), "uint8"))
            wt = T.arg("w", T.buffer((ob, 1, kh, 1, g["groups"], BLOCK, 4), "int8"))
            bias, mult, shift = requant_args(ob)
            out = T.arg("out", T.buffer((n, ob, poh, pow_, BLOCK), "uint8"))
            with T.parallel(0, n * block_groups * bands) as t:
                b, og, band = t // (block_groups * bands), t // bands % block_groups, t % bands
                p0 = band * band_rows
                # the last ``carry_n`` conv columns of the tile before (their pool windows end in the next tile)
                carry = T.alloc_buffer((max(carry_n, 1), q_blocks, BLOCK), "int32")
                ring = T.alloc_buffer((kph, pow_, q_blocks, BLOCK), "int32")   # conv rows, max over pool columns
                consts = [channel_constants(bias, mult, shift, og * q_blocks + q, z, None, 0, epilogue)
                          for q in range(q_blocks)]

                def weight_group(q: int, r_: int, gg: int):
                    return tir.BufferLoad(wt, [og * q_blocks + q, 0, r_, 0, gg, 0, tir.Ramp(0, 1, 4 * BLOCK)])

                def tail_weight(q: int, rows_: tuple[int, ...]):
                    """The last weight group of kernel rows ``rows_`` (``tail`` real bytes each, zeros after them)
                    as one group: row k's bytes shifted up by ``k * tail`` bytes and OR-ed (bit patterns, exact)."""
                    v = None
                    for k, r_ in enumerate(rows_):
                        w32 = tir.reinterpret(f"int32x{BLOCK}", weight_group(q, r_, g["groups"] - 1))
                        if k:
                            w32 = tir.shift_left(w32, tir.Broadcast(tir.const(8 * tail * k, "int32"), BLOCK))
                        v = w32 if v is None else tir.bitwise_or(v, w32)
                    return tir.reinterpret(f"int8x{4 * BLOCK}", v)

                def conv_row(r) -> None:
                    """Conv row ``r`` of the group's blocks, max over each pool window's columns, into the ring."""
                    slot = tir.floormod(r, kph)

                    def tile_at(j0, size: int, first: bool, last: bool) -> None:
                        # each product bound to a variable in step order (T.bind): the tile's accumulators
                        # advance together, independent chains interleaved (as expression trees, one per
                        # accumulator, LLVM issued one 42-long dependency chain after another)
                        accs = [[tir.Broadcast(tir.const(0, "int32"), BLOCK) for _ in range(q_blocks)]
                                for _ in range(size)]

                        def step(wrows: list, inputs) -> None:
                            """One vpdpbusd per accumulator: the 4 bytes ``inputs(px)`` (int32) of each pixel
                            broadcast against the weight rows of each block."""
                            for px in range(size):
                                a64 = T.bind(tir.reinterpret("uint8x64", tir.Broadcast(inputs(px), BLOCK)))
                                for q in range(q_blocks):
                                    accs[px][q] = T.bind(tir.call_llvm_pure_intrin(
                                        f"int32x{BLOCK}", "llvm.x86.avx512.vpdpbusd.512", accs[px][q], a64,
                                        wrows[q]))

                        def column(px, gg: int):
                            return (j0 + px) * (sw * c) + off + 4 * gg

                        for r_ in range(kh):
                            for gg in range(full_groups):
                                step([weight_group(q, r_, gg) for q in range(q_blocks)],
                                     lambda px, r_=r_, gg=gg: tir.reinterpret("int32", tir.BufferLoad(
                                         x, [b, r * sh + r_, tir.Ramp(column(px, gg), 1, 4)])))
                        # the last group's real bytes of the kernel rows of each of ``tail_sets`` packed into one group
                        for rows_ in tail_sets:
                            step([tail_weight(q, rows_) for q in range(q_blocks)],
                                 lambda px, rows_=rows_: _pack_bytes([
                                     tir.BufferLoad(x, [b, r * sh + r_, column(px, g["groups"] - 1) + i])
                                     for r_ in rows_ for i in range(tail)]))
                        # the pool columns whose window ends in this tile (the last tile: every one left), from
                        # the registers and the previous tile's last columns (``carry``); columns outside the row
                        # are padding (each window has a real one)
                        i_first = -c0 if first else 0
                        i_end = pow_ - (j0 // spw + c0) if last else tp // spw
                        for i in range(i_first, i_end):
                            jx = j0 // spw + c0 + i
                            for q in range(q_blocks):
                                vals = []
                                for u in range(kpw):
                                    rel = (c0 + i) * spw - ppw + u
                                    if rel >= size or (rel < 0 and first):
                                        continue
                                    vals.append(accs[rel][q] if rel >= 0 else
                                                tir.BufferLoad(carry, [carry_n + rel, q, tir.Ramp(0, 1, BLOCK)]))
                                v = vals[0]
                                for other in vals[1:]:
                                    v = tir.max(v, other)
                                T.buffer_store(ring, v, [slot, jx, q, tir.Ramp(0, 1, BLOCK)])
                        if not last:
                            for k in range(carry_n):
                                for q in range(q_blocks):
                                    T.buffer_store(carry, accs[size - carry_n + k][q], [k, q, tir.Ramp(0, 1, BLOCK)])

                    tile_at(0, min(tp, ow), True, tiles == 1)
                    if tiles > 2:
                        with T.serial(1, tiles - 1) as jt:
                            tile_at(jt * tp, tp, False, False)      # j0 an expression: i_end static
                    if tiles > 1:
                        tile_at((tiles - 1) * tp, ow - (tiles - 1) * tp, False, True)

                with T.serial(0, tir.min(band_rows, poh - p0)) as pi:
                    p = p0 + pi
                    with T.serial(0, kph) as tt:
                        r = p * sph - pph + tt
                        with T.If(tir.all(r >= 0, r < oh, tir.any(pi == 0, tt >= new_from))):
                            with T.Then():
                                conv_row(r)
                    # the window's rows, clamped into the conv output (a padding row then repeats a real row of
                    # the same window, which leaves the max unchanged)
                    slots = [tir.floormod(tir.min(tir.max(p * sph - pph + u, 0), oh - 1), kph) for u in range(kph)]
                    for q in range(q_blocks):
                        o = og * q_blocks + q
                        c_pairs, shift_n = consts[q]

                        def group(first, size: int, q=q, o=o, c_pairs=c_pairs, shift_n=shift_n) -> None:
                            def row(k: int, unclamped: bool):
                                v = tir.BufferLoad(ring, [slots[0], first + k, q, tir.Ramp(0, 1, BLOCK)])
                                for s_ in slots[1:]:
                                    v = tir.max(v, tir.BufferLoad(ring, [s_, first + k, q, tir.Ramp(0, 1, BLOCK)]))
                                return requant16(v, mult, c_pairs, shift_n, o, (z, int(lo), int(hi)), None,
                                                 unclamped)

                            store_pixel_rows(out, [b, o, p], first, size, row, int(lo), int(hi))

                        for_pixel_groups(pow_, group)
    return ib.get()


def _pack_bytes(values: list) -> tir.PrimExpr:
    """uint8 values -> one int32 holding value ``i`` in byte ``i`` (little-endian, as a 4-byte load reads them)."""
    v = None
    for i, byte in enumerate(values):
        term = tir.Cast("int32", byte)
        if i:
            term = tir.shift_left(term, tir.const(8 * i, "int32"))
        v = term if v is None else tir.bitwise_or(v, term)
    return v


__all__ = ["STEM_POOL_KIND", "STEM_POOL_TILE", "rows_conv_maxpool_out_shape", "rows_conv_maxpool_primfunc"]
