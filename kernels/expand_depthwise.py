"""An inverted-residual pair in one kernel: 1x1 expand conv + requant, then depthwise conv + requant (+ residual),
AVX-512 VNNI, for layers whose shifts are all >= 32 (MobileNetV2 / V3 and EfficientNet blocks).

Unfused, the 1x1 writes the expanded tensor (at batch 8 MobileNetV2's features.2 writes 9.6 MB) and the depthwise
conv reads it back through memory. Here each parallel iteration (image, expanded channel block, band of output rows)
computes the band's expanded rows (with the depthwise conv's halo) straight into its padded buffer, where the
depthwise part (:func:`kernels.depthwise_vnni.depthwise_vnni_primfunc`'s loops) reads them from cache. The expand
per pixel: one ``vpdpbusd`` per 4 input channels against the VNNI-packed 1x1 weight (4 activation bytes broadcast),
requantized by :func:`kernels.vector_tir.paired_requant16`. Halo rows are computed by both bands that need them.
Same integers as the two kernels one after the other (tests/test_expand_depthwise.py).
"""

from __future__ import annotations

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .depthwise_vnni import band_layout, channel_constants, check_geometry, depthwise_band, fill_band, requant16
from .layout import BLOCK
from .vector_tir import (EPILOGUE_INT32, EPILOGUE_INT64, check_epilogue, check_kernel_args, for_pixel_groups,
                         output_args, requant_args, store_pixel_rows, unpack_nibbles64)

EXPAND_DEPTHWISE_KIND = "expand_depthwise_vnni_paired"


def expand_depthwise_primfunc(name: str, x_shape: tuple[int, ...], w1_shape: tuple[int, ...],
                              w2_shape: tuple[int, ...], kernel_width: int, stride: tuple[int, int],
                              padding: tuple[int, int], dilation_h: int, mid_zero_point: int, mid_lo: int,
                              mid_hi: int, output_zero_point: int, lo: int, hi: int, residual_zero_point: int,
                              residual: bool, threads: int | None = None, int4: bool = False,
                              epilogue: tuple[str, str] = (EPILOGUE_INT32, EPILOGUE_INT32)) -> tir.PrimFunc:
    """``name(x, w1, bias1, mult1, shift1, w2, bias2, mult2, shift2, [r, mr], out)``: ``out`` = depthwise(requant(
    conv1x1(x, w1))), the integers of :func:`kernels.conv2d_nchwc_requant` (1x1, stride 1, no residual) followed by
    :func:`kernels.depthwise_taps_requant`; ``epilogue``: per stage (expand, depthwise), the form of
    :func:`kernels.vector_tir.paired_requant16` the caller proved for it (:data:`kernels.vector_tir.EPILOGUES`).

    x uint8 (N, CBin, H, W, 16); w1 int8 (CBmid, CBin, 1, 1, 4, 16, 4) (:func:`kernels.pack_conv_weight`, VNNI,
    its input zero point folded into bias1 as for every conv; with ``int4`` the two-per-byte form (CBmid, CBin, 1,
    1, 4, 32) uint8, each iteration unpacking its block's 64-byte rows first); the expanded values are requantized to
    ``mid_zero_point`` clamped to [mid_lo, mid_hi], which is also the depthwise conv's input zero point (its
    padding value); w2 int8 (CBmid, KH, G, 16, 4) (:func:`kernels.pack_depthwise_taps`); bias / mult / shift int32
    per channel; r, mr as in :func:`kernels.depthwise_vnni.depthwise_vnni_primfunc`; out uint8 (N, CBmid, OH, OW,
    16). Raises ValueError for weights that do not match the input (or an int8 weight with ``int4``), a dimension
    below 1, a zero point outside [0, 255], a clamp outside 0 <= lo <= hi <= 255 or ``epilogue`` not a pair of forms."""
    check_kernel_args("expand_depthwise", {"input": x_shape, "expand weight": w1_shape, "depthwise weight": w2_shape,
                                           "kernel width": (kernel_width,)},
                      {"mid zero point": mid_zero_point, "output zero point": output_zero_point,
                       "residual zero point": residual_zero_point}, {"mid": (mid_lo, mid_hi), "out": (lo, hi)})
    if not (isinstance(epilogue, (tuple, list)) and len(epilogue) == 2):
        raise ValueError(f"expand_depthwise: epilogue must be a pair (expand, depthwise), got {epilogue!r}")
    for form in epilogue:
        check_epilogue("expand_depthwise", form)
    n, cbin, h, w, c = (int(v) for v in x_shape)
    w1_shape = tuple(int(v) for v in w1_shape)
    if int4:        # nibbles (CBmid, CBin, 1, 1, 4, 32): the int8 layout is (..., 16, 4)
        if len(w1_shape) != 6 or w1_shape[-1] != 32:
            raise ValueError(f"expand_depthwise: int4 expand weight must be the two-per-byte (CBmid, CBin, 1, 1, 4, "
                             f"32) uint8 form, got shape {w1_shape}")
        w1_shape = (*w1_shape[:-1], BLOCK, 4)
    if len(w1_shape) != 7 or len(tuple(w2_shape)) != 5:
        raise ValueError(f"expand_depthwise: expand weight {w1_shape} / depthwise weight {tuple(w2_shape)} do not "
                         f"have the packed layouts (7 and 5 dimensions)")
    cbm, cbin_w, one_h, one_w, four_g, lanes, four = w1_shape
    cbm2, kh, g, lanes2, four2 = (int(v) for v in w2_shape)
    kw = int(kernel_width)
    if (c, lanes, four, four_g, one_h, one_w, lanes2, four2) != (BLOCK, BLOCK, 4, 4, 1, 1, BLOCK, 4) \
            or cbin_w != cbin or cbm2 != cbm or not 4 * (g - 1) < kw <= 4 * g:
        raise ValueError(f"expand weight {tuple(w1_shape)} / depthwise weight {tuple(w2_shape)} (kernel width {kw}) "
                         f"do not match input {tuple(x_shape)}")
    (sh, sw), (ph, pw), dh = check_geometry(stride, padding, dilation_h)
    oh, ow, width, bands, band_rows, in_rows = band_layout((n, cbm, h, w, BLOCK), (kh, kw), g, (sh, sw), (ph, pw),
                                                              dh, threads)
    z_mid, z_out, z_r = int(mid_zero_point), int(output_zero_point), int(residual_zero_point)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, EXPAND_DEPTHWISE_KIND, {
                "int32_epilogue": sum(f != EPILOGUE_INT64 for f in epilogue), "epilogue": ",".join(epilogue)}))
            x = T.arg("x", T.buffer((n, cbin, h, w, BLOCK), "uint8"))
            if int4:
                w1 = T.arg("w1", T.buffer((cbm, cbin, 1, 1, 4, 32), "uint8"))
            else:
                w1 = T.arg("w1", T.buffer((cbm, cbin, 1, 1, 4, BLOCK, 4), "int8"))
            bias1, mult1, shift1 = requant_args(cbm, "1")
            w2 = T.arg("w2", T.buffer((cbm, kh, g, BLOCK, 4), "int8"))
            bias2, mult2, shift2 = requant_args(cbm, "2")
            r, mr, out = output_args((n, cbm, oh, ow, BLOCK), residual)
            with T.parallel(0, n * cbm * bands) as t:
                b, o, band = t // (cbm * bands), t // bands % cbm, t % bands
                i0 = band * band_rows
                xp = T.alloc_buffer((in_rows, width, BLOCK), "uint8")
                c1, n1 = channel_constants(bias1, mult1, shift1, o, z_mid, None, 0, epilogue[0])
                if int4:    # block o's expand weights as int8 rows [ic * 4 + k] (a few hundred bytes)
                    w1o = T.alloc_buffer((cbin * 4, 64), "int8")
                    for ic in range(cbin):
                        for k in range(4):
                            T.buffer_store(w1o, unpack_nibbles64(tir.BufferLoad(w1, [o, ic, 0, 0, k,
                                                                                   tir.Ramp(0, 1, 32)])),
                                           [ic * 4 + k, tir.Ramp(0, 1, 64)])

                    def w1_row(ic, k):
                        return tir.BufferLoad(w1o, [ic * 4 + k, tir.Ramp(0, 1, 64)])
                else:
                    def w1_row(ic, k):
                        return tir.BufferLoad(w1, [o, ic, 0, 0, k, 0, tir.Ramp(0, 1, 64)])
                _expand_band(x, w1_row, xp, mult1, c1, n1, b, o, i0 * sh - ph, in_rows, (cbin, h, w), pw, width,
                             (z_mid, int(mid_lo), int(mid_hi)))
                c2, n2 = channel_constants(bias2, mult2, shift2, o, z_out, mr, z_r, epilogue[1])
                depthwise_band(xp, w2, out, mult2, c2, n2, b, o, i0, tir.min(band_rows, oh - i0), ow, (kh, g),
                                (sh, sw), dh, (z_out, lo, hi), (r, mr) if residual else None)
    return ib.get()


def _expand_band(x, w1_row, xp, mult1, c1, n1, b, o, first_row, rows: int, chw: tuple[int, int, int], pw: int,
                 width: int, z_lo_hi: tuple[int, int, int]) -> None:
    """xp[rr] = expanded (1x1 conv + requant) row ``first_row + rr`` of block ``o``, padded with the mid zero
    point (rows outside the image, columns outside ``[pw, pw + W)``); ``w1_row(ic, k)``: the int8x64 expand weights
    of input block ``ic``, channel group ``k``; groups of 8 / 4 independent pixels, narrowed four at a time."""
    cbin, h, w = chw

    def expand_row(rr, src):
        def group(first, size: int) -> None:
            accs = []
            for ju in range(size):
                acc = tir.Broadcast(tir.const(0, "int32"), BLOCK)
                for ic in range(cbin):
                    for k in range(4):
                        a4 = tir.reinterpret("int32", tir.BufferLoad(x, [b, ic, src, first + ju,
                                                                         tir.Ramp(4 * k, 1, 4)]))
                        acc = tir.call_llvm_pure_intrin(
                            f"int32x{BLOCK}", "llvm.x86.avx512.vpdpbusd.512", acc,
                            tir.reinterpret("uint8x64", tir.Broadcast(a4, BLOCK)), w1_row(ic, k))
                accs.append(acc)
            store_pixel_rows(xp, [rr], pw + first, size,
                             lambda k, unclamped: requant16(accs[k], mult1, c1, n1, o, z_lo_hi, None, unclamped),
                             z_lo_hi[1], z_lo_hi[2])

        for_pixel_groups(w, group)

    fill_band(xp, first_row, rows, h, w, pw, width, z_lo_hi[0], expand_row)


__all__ = ["EXPAND_DEPTHWISE_KIND", "expand_depthwise_primfunc"]
