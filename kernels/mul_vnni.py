"""Requantized elementwise multiply (squeeze-excitation's channel scaling) as explicit-vector TIR for AVX-512, for
any requant shifts (the int32-clamp epilogue where every shift is >= 32).

``out = clamp(z + RHU((a - za) * (b - zb) * m, sh), lo, hi)`` per channel, either input broadcast over H and W
(shape (N, CB, 1, 1, 16)): :func:`kernels.mul_requant_nchwc`'s integers. The product of two centred uint8 codes
fits int32 (|p| <= 255 * 255), so per 16 channels it is one int32 multiply and the requant on int64 lane pairs
(:func:`kernels.vector_tir.paired_requant16`, with the depthwise kernel's per-block constants,
:func:`kernels.depthwise_vnni.channel_constants` without a bias); four pixels are clamped and narrowed together
(:func:`kernels.vector_tir.store_pixel_rows`). The TE kernel formed int64 products and shifted them with the
emulated arithmetic shift, vectorized over int64 lanes: EfficientNet-B0's SE multiplies took more time than its
1x1 convs. Same integers (tests/test_eltwise_vnni.py).
"""

from __future__ import annotations

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .depthwise_vnni import channel_constants, requant16
from .layout import BLOCK
from .vector_tir import (EPILOGUE_INT32, check_epilogue, check_kernel_args, epilogue_attrs, for_pixel_groups,
                         split_for_threads, store_pixel_rows, task_plan)

MUL_VNNI_KIND = "mul_vnni_paired"   # function attribute ``ptq2tvm_kernel`` of these PrimFuncs


def mul_vnni_out_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast (N, CB, H, W, 16) of two blocked shapes; ValueError unless each is that shape or (N, CB, 1, 1,
    16)."""
    a, b = (tuple(int(v) for v in s) for s in (a_shape, b_shape))
    out = tuple(max(u, v) for u, v in zip(a, b))
    for s in (a, b):
        if len(s) != 5 or s[-1] != BLOCK or s[:2] != out[:2] or s[2:4] not in (out[2:4], (1, 1)):
            raise ValueError(f"mul_vnni needs blocked (N, CB, H, W, 16) inputs, equal or one of them (N, CB, 1, 1, "
                             f"16), got {a} and {b}")
    return out


def mul_vnni_primfunc(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], zero_points: tuple[int, int],
                      output_zero_point: int, lo: int, hi: int, threads: int | None = None,
                      epilogue: str = EPILOGUE_INT32) -> tir.PrimFunc:
    """The PrimFunc ``name(a, b, mult, shift, out)``: a, b uint8 blocked (:func:`mul_vnni_out_shape`), mult / shift
    int32 (CB * 16,); ``epilogue``: the form of :func:`kernels.vector_tir.paired_requant16` the caller proved for
    the layer (:data:`kernels.vector_tir.EPILOGUES`), out uint8 (N, CB, H, W, 16). Parallel over (image, channel
    block, band of pixels), as few bands as give 2 iterations per thread (``threads``, default this machine's cores);
    a band's pixels in groups of 8 / 4 (the last band ends at the last pixel and may rewrite a few of the band
    before it with the same values). Raises ValueError for shapes that do not broadcast so, a dimension below 1, a
    zero point outside [0, 255], a clamp outside 0 <= lo <= hi <= 255 or an unknown ``epilogue``."""
    check_epilogue("mul_vnni", epilogue)
    check_kernel_args("mul_vnni", {"a": a_shape, "b": b_shape})
    if len(tuple(zero_points)) != 2:
        raise ValueError(f"mul_vnni: zero_points must be (za, zb), got {zero_points!r}")
    check_kernel_args("mul_vnni", zero_points={"za": zero_points[0], "zb": zero_points[1],
                                               "output zero point": output_zero_point}, clamps={"out": (lo, hi)})
    out_shape = mul_vnni_out_shape(a_shape, b_shape)
    n, cb, h, w, _ = out_shape
    planes, pixels = n * cb, h * w
    outputs = planes * pixels * BLOCK
    task_loop, task_threads = task_plan(outputs, threads)
    bands, per = split_for_threads(pixels, planes, task_threads)
    za, zb, z = (int(v) for v in (*zero_points, output_zero_point))
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, MUL_VNNI_KIND, epilogue_attrs(epilogue)))
            a = T.arg("a", T.buffer(tuple(int(v) for v in a_shape), "uint8"))
            b = T.arg("b", T.buffer(tuple(int(v) for v in b_shape), "uint8"))
            mult = T.arg("mult", T.buffer((cb * BLOCK,), "int32"))
            shift = T.arg("shift", T.buffer((cb * BLOCK,), "int32"))
            out = T.arg("out", T.buffer(out_shape, "uint8"))
            flat = [T.decl_buffer((planes, int(s[2]) * int(s[3]), BLOCK), "uint8", data=t.data)
                    for t, s in ((a, a_shape), (b, b_shape))]
            of = T.decl_buffer((planes, pixels, BLOCK), "uint8", data=out.data)
            with task_loop(0, planes * bands) as t:      # small: serial
                plane, band = t // bands, t % bands
                o = plane % cb
                start = tir.min(band * per, pixels - per)
                c_pairs, shift_n = channel_constants(None, mult, shift, o, z, None, 0, epilogue)   # no bias

                def centred(buf, shape, j, zp):
                    pix = j if int(shape[2]) * int(shape[3]) == pixels else 0
                    return tir.BufferLoad(buf, [plane, pix, tir.Ramp(0, 1, BLOCK)]).astype(f"int32x{BLOCK}") - \
                        tir.Broadcast(tir.const(zp, "int32"), BLOCK)

                def group(first, size: int) -> None:
                    def row(k: int, unclamped: bool):
                        j = start + first + k
                        prod = centred(flat[0], a_shape, j, za) * centred(flat[1], b_shape, j, zb)
                        return requant16(prod, mult, c_pairs, shift_n, o, (z, lo, hi), None, unclamped)

                    store_pixel_rows(of, [plane], start + first, size, row, lo, hi)

                for_pixel_groups(per, group)
    return ib.get()


__all__ = ["MUL_VNNI_KIND", "mul_vnni_out_shape", "mul_vnni_primfunc"]
