"""Depthwise conv for AVX-512 VNNI written as explicit-vector TIR, for layers whose requant shifts are all >= 32.

The compute is that of :func:`kernels.depthwise_taps_requant` (per output pixel, kernel row and group of 4 horizontal
taps: one 64-byte load of 4 consecutive input pixels x 16 channels, one ``vpermb`` to channel-major, one
``vpdpbusd`` against the tap-packed weight of :func:`kernels.pack_depthwise_taps`), with the accumulator kept in a
register and requantized by :func:`kernels.vector_tir.paired_requant16` (the int32-clamp epilogue on int64 lane
pairs). The TE kernel spends ~19 vector instructions per 16 outputs on the int64 epilogue against 6 on the products
(3x3); this one ~10. Same integers as :func:`kernels.reference` (tests/test_depthwise_vnni.py).

Work split: one parallel iteration per (image, channel block, band of output rows), as few bands as give 2
iterations per thread; a kernel of fewer than :data:`kernels.vector_tir.SERIAL_OUTPUTS` outputs runs them on the
calling thread. An iteration copies its band's input rows, padded with the zero point, into its own buffer
(L2-resident; a padded copy of the whole input went through memory and took 25-45% of the kernel), forms the 16
channels' requant constants, and runs output pixels in groups of ``U`` independent accumulators (the last group
of 8, then 4, then the rest: no pixel computed twice) and clamps and narrows four pixels at a time
(:func:`kernels.vector_tir.pack4_clamp`). Standalone on the
Xeon (2 threads, MobileNetV2's 3x3 shapes, interleaved medians): 1.24-1.58x the TE tap kernel. The building blocks
(arguments, row bands, padded band rows, per-block constants, the band's depthwise loop) also make the fused
expand + depthwise kernel of :mod:`kernels.expand_depthwise`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .intrin import TAPS_TRANSPOSE
from .layout import BLOCK
from .vector_tir import (EPILOGUE_INT32, LIFTED_EPILOGUES, block_shift, check_epilogue, check_kernel_args,
                         epilogue_attrs, for_pixel_groups, lift_constant, output_args, paired_requant16, requant_args,
                         residual16, split_for_threads, store_paired_constants, store_pixel_rows, task_plan)

DEPTHWISE_VNNI_KIND = "depthwise_vnni_paired"     # function attribute ``ptq2tvm_kernel`` of these PrimFuncs


def depthwise_vnni_out_shape(x_shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
                             padding: tuple[int, int], dilation_h: int = 1) -> tuple[int, int, int, int, int]:
    """(N, CB, OH, OW, 16) of :func:`depthwise_vnni_primfunc`."""
    n, cb, h, w, _ = (int(v) for v in x_shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (n, cb, (h + 2 * ph - int(dilation_h) * (kh - 1) - 1) // sh + 1, (w + 2 * pw - kw) // sw + 1, BLOCK)


def check_geometry(stride: tuple[int, int], padding: tuple[int, int], dilation_h: int):
    """((sh, sw), (ph, pw), dh) as ints; ValueError naming the value unless strides and dilation are >= 1 and padding
    >= 0."""
    (sh, sw), (ph, pw) = (tuple(int(v) for v in p) for p in (stride, padding))
    dh = int(dilation_h)
    if min(sh, sw) < 1 or dh < 1 or min(ph, pw) < 0:
        raise ValueError(f"depthwise conv needs strides >= 1, dilation >= 1 and padding >= 0, got stride "
                         f"{(sh, sw)}, vertical dilation {dh}, padding {(ph, pw)}")
    return (sh, sw), (ph, pw), dh


class BandLayout(NamedTuple):
    """How a depthwise kernel covers its output: size, the padded band buffer's width and the row bands
    (:func:`band_layout`)."""
    oh: int
    ow: int
    width: int
    bands: int
    band_rows: int
    in_rows: int


def band_layout(x_shape: tuple[int, ...], kernel: tuple[int, int], taps_groups: int, stride: tuple[int, int],
                padding: tuple[int, int], dh: int, threads: int | None) -> BandLayout:
    """The :class:`BandLayout` of a depthwise conv on the blocked ``x_shape`` (N, CB, H, W, 16) with ``taps_groups``
    groups of 4 horizontal taps: the band buffer is wide enough for the 4th tap of the last group. Raises
    ValueError for a kernel larger than the padded input."""
    n, cb, h, w, _ = (int(v) for v in x_shape)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    _, _, oh, ow, _ = depthwise_vnni_out_shape(x_shape, (kh, kw), (sh, sw), (ph, pw), dh)
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kh}x{kw} larger than the padded input {h + 2 * ph}x{w + 2 * pw}")
    width = max(w + 2 * pw, (ow - 1) * sw + 4 * taps_groups)
    return BandLayout(oh, ow, width, *row_bands(oh, n * cb, sh, kh, dh, threads))


def row_bands(oh: int, planes: int, sh: int, kh: int, dh: int, threads: int | None) -> tuple[int, int, int]:
    """(bands, output rows per band, input rows per band) of ``planes`` (image, channel block) planes of ``oh``
    output rows: as few bands per plane as give >= 2 parallel iterations per thread."""
    bands, band_rows = split_for_threads(oh, planes, threads)
    return bands, band_rows, (band_rows - 1) * sh + (kh - 1) * dh + 1


def depthwise_vnni_primfunc(name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], kernel_width: int,
                            stride: tuple[int, int], padding: tuple[int, int], dilation_h: int,
                            input_zero_point: int, output_zero_point: int, lo: int, hi: int,
                            residual_zero_point: int, residual: bool, threads: int | None = None,
                            epilogue: str = EPILOGUE_INT32) -> tir.PrimFunc:
    """The PrimFunc ``name(x, w, bias, mult, shift, [r, mr], out)``: the buffers and integers of
    :func:`kernels.depthwise_taps_requant`; ``epilogue``: the form of :func:`kernels.vector_tir.paired_requant16`
    the caller proved for the layer (:data:`kernels.vector_tir.EPILOGUES`: "int32" every shift >= 32, "lifted",
    "int64" any shift in [1, 62]).

    x uint8 (N, CB, H, W, 16); w int8 (CB, KH, G, 16, 4) (:func:`kernels.pack_depthwise_taps`); bias / mult / shift
    int32 (CB*16,); r uint8 (N, CB, OH, OW, 16) and mr int32 (CB*16,) with ``residual``; out uint8 (N, CB, OH, OW,
    16). Horizontal dilation 1 (the 4 taps of a group are consecutive pixels), any stride, vertical dilation
    ``dilation_h``; ``threads``: the threads the build runs on (default this machine's cores). Raises ValueError
    for a weight that does not match the input or the kernel width, a dimension below 1, a zero point outside
    [0, 255], a clamp outside 0 <= lo <= hi <= 255 (:func:`kernels.vector_tir.check_kernel_args`) or an unknown
    ``epilogue``."""
    check_epilogue("depthwise_vnni", epilogue)
    check_kernel_args("depthwise_vnni", {"input": x_shape, "weight": w_shape, "kernel width": (kernel_width,)},
                      {"input zero point": input_zero_point, "output zero point": output_zero_point,
                       "residual zero point": residual_zero_point}, {"out": (lo, hi)})
    n, cb, h, w, c = (int(v) for v in x_shape)
    wcb, kh, g, wc, four = (int(v) for v in w_shape)
    kw = int(kernel_width)
    if c != BLOCK or wc != BLOCK or four != 4 or wcb != cb or not 4 * (g - 1) < kw <= 4 * g:
        raise ValueError(f"depthwise tap weight {tuple(w_shape)} (kernel width {kw}) does not match input "
                         f"{tuple(x_shape)}")
    (sh, sw), (ph, pw), dh = check_geometry(stride, padding, dilation_h)
    outputs = n * cb * BLOCK * math.prod(depthwise_vnni_out_shape(x_shape, (kh, kw), (sh, sw), (ph, pw), dh)[2:4])
    task_loop, task_threads = task_plan(outputs, threads)
    oh, ow, width, bands, band_rows, in_rows = band_layout(x_shape, (kh, kw), g, (sh, sw), (ph, pw), dh,
                                                           task_threads)
    z_out, z_r = int(output_zero_point), int(residual_zero_point)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, DEPTHWISE_VNNI_KIND, epilogue_attrs(epilogue)))
            x = T.arg("x", T.buffer((n, cb, h, w, BLOCK), "uint8"))
            wt = T.arg("w", T.buffer((cb, kh, g, BLOCK, 4), "int8"))
            bias, mult, shift = requant_args(cb)
            r, mr, out = output_args((n, cb, oh, ow, BLOCK), residual)
            with task_loop(0, n * cb * bands) as t:
                b, o, band = t // (cb * bands), t // bands % cb, t % bands
                i0 = band * band_rows
                # this band's input rows, padded with the zero point (stays in L2: a whole padded copy of the
                # input went through memory and took 25-45% of the kernel)
                xp = T.alloc_buffer((in_rows, width, BLOCK), "uint8")
                _pad_band(x, xp, b, o, i0 * sh - ph, in_rows, h, w, pw, width, int(input_zero_point))
                c_pairs, shift_n = channel_constants(bias, mult, shift, o, z_out, mr, z_r, epilogue)
                depthwise_band(xp, wt, out, mult, c_pairs, shift_n, b, o, i0, tir.min(band_rows, oh - i0), ow,
                               (kh, g), (sh, sw), dh, (z_out, lo, hi), (r, mr) if residual else None)
    return ib.get()


def channel_constants(bias, mult, shift, o, z_out: int, mr, z_r: int, epilogue: str = EPILOGUE_INT32):
    """(c_pairs, shift_n): block ``o``'s 16 rounding constants ([bias * mult] [+ the residual's -z_r * mr] +
    2^(shift-1), :func:`kernels.ops.requant_channel_constants`; ``bias`` / ``mr`` None: no such term; lifted in
    the lifted ``epilogue``, :func:`kernels.vector_tir.lift_constant`) in a small buffer, even channels then odd,
    and its shifts as :func:`kernels.vector_tir.paired_requant16` takes them
    (:func:`kernels.vector_tir.block_shift`)."""
    from .ops import requant_channel_constants

    c_nat = T.alloc_buffer((BLOCK,), "int64")
    c_pairs = T.alloc_buffer((BLOCK,), "int64")
    with T.vectorized(0, BLOCK) as oc:
        ch = o * BLOCK + oc
        consts = ([(bias[ch], mult[ch])] if bias is not None else []) + \
            ([(tir.const(-int(z_r), "int32"), mr[ch])] if mr is not None else [])
        c = requant_channel_constants(shift[ch], int(z_out), consts, True)["c"]
        T.buffer_store(c_nat, lift_constant(c, shift[ch]) if epilogue in LIFTED_EPILOGUES else c, [oc])
    store_paired_constants(c_pairs, c_nat)
    return c_pairs, block_shift(shift, o, epilogue)


def requant16(acc, mult, c_pairs, shift_n, o, z_lo_hi, residual=None, unclamped: bool = False):
    """uint8x16 (int32x16 ``q + z`` with ``unclamped``): :func:`kernels.vector_tir.paired_requant16` of block
    ``o``'s accumulator ``acc``."""
    half = BLOCK // 2
    return paired_requant16(acc, tir.BufferLoad(mult, [tir.Ramp(o * BLOCK, 1, BLOCK)]),
                            tir.BufferLoad(c_pairs, [tir.Ramp(0, 1, half)]),
                            tir.BufferLoad(c_pairs, [tir.Ramp(half, 1, half)]), shift_n, *z_lo_hi, residual,
                            unclamped)


def depthwise_band(xp, wt, out, mult, c_pairs, shift_n, b, o, i0, rows, ow: int, kh_g: tuple[int, int],
                    stride: tuple[int, int], dh: int, z_lo_hi: tuple[int, int, int], residual) -> None:
    """Output rows ``i0 .. i0 + rows`` of image ``b``, block ``o`` from the band's padded input ``xp`` (row 0 =
    padded input row ``i0 * stride``): per pixel and kernel row, one 64-byte load of 4 consecutive pixels, ``vpermb``
    to channel-major and ``vpdpbusd`` per group of 4 taps; groups of 8 / 4 independent pixels
    (:func:`kernels.vector_tir.pixel_runs`), clamped and narrowed four pixels at a time."""
    (kh, g), (sh, sw) = kh_g, stride
    with T.serial(0, rows) as ii:
        i = i0 + ii

        def group(first, size: int) -> None:
            accs = []
            for ju in range(size):
                j = first + ju
                acc = tir.Broadcast(tir.const(0, "int32"), BLOCK)
                for r_ in range(kh):
                    for q in range(g):
                        a = tir.BufferLoad(xp, [ii * sh + r_ * dh, j * sw + 4 * q, tir.Ramp(0, 1, 64)])
                        acc = tir.call_llvm_pure_intrin(f"int32x{BLOCK}", "llvm.x86.avx512.vpdpbusd.512", acc,
                                                        tir.Shuffle([a], TAPS_TRANSPOSE),
                                                        tir.BufferLoad(wt, [o, r_, q, 0, tir.Ramp(0, 1, 64)]))
                accs.append(acc)

            def row(k: int, unclamped: bool):
                res = None if residual is None else residual16(*residual, [b, o, i, first + k], o)
                return requant16(accs[k], mult, c_pairs, shift_n, o, z_lo_hi, res, unclamped)

            store_pixel_rows(out, [b, o, i], first, size, row, z_lo_hi[1], z_lo_hi[2])

        for_pixel_groups(ow, group)


def fill_band(xp, first_row, rows: int, h: int, w: int, pw: int, width: int, z: int, row_fn) -> None:
    """xp[rr] for rr < ``rows``: padded row ``first_row + rr`` of a ``h`` x ``w`` plane, ``width`` columns with the
    plane at column ``pw``: rows outside the plane and the columns around it hold the zero point ``z`` (16-byte
    stores, no per-element conditions); ``row_fn(rr, src)`` writes the plane's row ``src`` into columns
    ``[pw, pw + w)``."""
    zero = tir.const(int(z), "uint8")
    right = width - w - pw

    def fill(rr, first: int, count: int) -> None:
        with T.serial(0, count) as j:
            with T.vectorized(0, BLOCK) as ci:
                T.buffer_store(xp, zero, [rr, first + j, ci])

    with T.serial(0, rows) as rr:
        src = first_row + rr
        with T.If(tir.any(src < 0, src >= h)):
            with T.Then():
                fill(rr, 0, width)
            with T.Else():
                if pw:
                    fill(rr, 0, pw)
                row_fn(rr, src)
                if right:
                    fill(rr, w + pw, right)


def _pad_band(x, xp, b, o, first_row, rows: int, h: int, w: int, pw: int, width: int, z_x: int) -> None:
    """xp[r] = padded input row ``first_row + r`` of image ``b``, block ``o`` (:func:`fill_band` with a copy of the
    input row)."""
    def copy(rr, src):
        with T.serial(0, w) as j:
            with T.vectorized(0, BLOCK) as ci:
                T.buffer_store(xp, x[b, o, src, j, ci], [rr, pw + j, ci])

    fill_band(xp, first_row, rows, h, w, pw, width, z_x, copy)


__all__ = ["DEPTHWISE_VNNI_KIND", "BandLayout", "band_layout", "channel_constants", "check_geometry", "depthwise_band",
           "depthwise_vnni_out_shape", "depthwise_vnni_primfunc", "fill_band", "requant16", "row_bands"]
