"""The row layout of the first conv (:func:`kernels.ops.nchw_to_rows`) as one vector shuffle per 16 pixels.

:func:`kernels.ops.nchw_to_rows` (TE, :func:`kernels.schedule.schedule_to_rows`) copies each channel's 16-pixel
vector into the interleaved row with a stride of ``C`` bytes: LLVM emits that store byte by byte. Here each chunk of
16 pixels loads its ``C`` channel vectors and interleaves them with one ``shufflevector`` (a ``tir.Shuffle``: byte
``k`` of the chunk is lane ``k // C`` of channel ``k % C``), then stores ``16 * C`` contiguous bytes. Same bytes
(tests/test_rows_shuffle.py compares it with the numpy twin :func:`kernels.layout.nchw_to_rows`). ResNet-18's
224x224 RGB input at batch 8 on a Zen 4 (2 threads): 0.028 ms against the TE kernel's 0.215 ms, about 0.5% of the
network (kernels/README.md, "The row layout as a shuffle").
"""

from __future__ import annotations

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .ops import _pair, rows_layout

CHUNK = 16      # pixels per shuffle (the row layout's left margin and width are multiples of it)


def rows_shuffle_supported(x_shape: tuple[int, ...]) -> bool:
    """Whether :func:`nchw_to_rows_primfunc` takes an (N, C, H, W) input: 1-4 channels and W a multiple of 16 (the
    16-pixel chunks then never straddle the image's edge). Elsewhere the TE kernel does it."""
    return len(x_shape) == 4 and 1 <= int(x_shape[1]) <= 4 and int(x_shape[3]) % CHUNK == 0


def rows_out_shape(x_shape: tuple[int, ...], kernel=(7, 7), stride=(2, 2), padding=(3, 3),
                   left: int = 16) -> tuple[int, int, int]:
    """(N, H + 2ph, Wa * C): the row layout of an (N, C, H, W) input (:func:`kernels.ops.rows_layout`)."""
    n, c, h, w = (int(v) for v in x_shape)
    g = rows_layout(c, h, w, kernel, stride, padding, left)
    return n, g["rows"], g["row_pixels"] * c


def interleave_indices(channels: int, pixels: int = CHUNK) -> list[int]:
    """Shuffle indices over the concatenated channel vectors (channel ``ci``'s lane ``p`` at ``ci * pixels + p``)
    that give the interleaved bytes: output byte ``k`` = channel ``k % channels`` of pixel ``k // channels``."""
    return [(k % channels) * pixels + k // channels for k in range(channels * pixels)]


def nchw_to_rows_primfunc(name: str, x_shape: tuple[int, ...], kernel=(7, 7), stride=(2, 2), padding=(3, 3),
                          pad_value: int = 0, left: int = 16) -> tir.PrimFunc:
    """``name(x, out)``: the bytes of :func:`kernels.ops.nchw_to_rows` (same arguments), x uint8 (N, C, H, W),
    out uint8 (N, H + 2ph, Wa * C) (:func:`kernels.ops.rows_layout`). Parallel over (image, row).

    Raises ValueError where :func:`rows_shuffle_supported` says no (C outside 1-4 or W not a multiple of 16) or for
    a pad value outside [0, 255]."""
    shape = tuple(int(v) for v in x_shape)
    if not rows_shuffle_supported(shape):
        raise ValueError(f"nchw_to_rows_primfunc: input {shape} needs (N, C, H, W) with 1-4 channels and W a multiple "
                         f"of {CHUNK}; use kernels.te_nchw_to_rows")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"nchw_to_rows_primfunc: pad value {pad_value} outside [0, 255]")
    n, c, h, w = shape
    out_shape = rows_out_shape(shape, kernel, stride, padding, left)
    ph = _pair(padding)[0]
    rows, chunks, width = out_shape[1], out_shape[2] // (CHUNK * c), CHUNK * c
    first, end = left // CHUNK, (left + w) // CHUNK          # the chunks that hold image columns
    pad = tir.Broadcast(tir.const(int(pad_value), "uint8"), width)
    order = interleave_indices(c)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            # TVM 0.27's keys (kernels/func_attrs.py): with the older "tir.noalias" on this function (it holds a root
            # SBlock) TVM lowered the whole module without the noalias compute scopes of its kernels (ResNet-18's
            # convs 4-9% slower; tests/test_rows_shuffle.py checks the scopes)
            T.func_attr(hand_kernel_attrs(name))
            x = T.arg("x", T.buffer(shape, "uint8"))
            out = T.arg("out", T.buffer(out_shape, "uint8"))
            with T.sblock("root"):       # Relax's pattern analysis (RewriteDataflowReshape) needs a root block
                T.reads(x[0:n, 0:c, 0:h, 0:w])
                T.writes(out[0:n, 0:rows, 0:out_shape[2]])
                with T.parallel(0, n * rows) as t:
                    b, r = t // rows, t % rows

                    def fill(lo: int, hi: int) -> None:
                        if hi > lo:
                            with T.serial(lo, hi) as q:
                                T.buffer_store(out, pad, [b, r, tir.Ramp(q * width, 1, width)])

                    with T.If(tir.all(r >= ph, r < h + ph)):
                        with T.Then():
                            fill(0, first)
                            with T.serial(first, end) as q:
                                col = (q - first) * CHUNK
                                vectors = [tir.BufferLoad(x, [b, ci, r - ph, tir.Ramp(col, 1, CHUNK)])
                                           for ci in range(c)]
                                value = vectors[0] if c == 1 else tir.Shuffle(vectors, order)
                                T.buffer_store(out, value, [b, r, tir.Ramp(q * width, 1, width)])
                            fill(end, chunks)
                        with T.Else():
                            fill(0, chunks)
    return ib.get()


__all__ = ["CHUNK", "interleave_indices", "nchw_to_rows_primfunc", "rows_out_shape", "rows_shuffle_supported"]
