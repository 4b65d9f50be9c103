"""TE compute definitions of the integer ops, NCHW layout, one fused function per integer-graph node.

Each function is the TVM twin of :mod:`ptq2tvm.ir.reference`: same integers, same rounding (half up by an arithmetic
right shift in int64, :func:`kernels.ops.requant_expr`).
"""

from __future__ import annotations

from typing import Sequence

import tvm.tirx as tir
from tvm import te, topi

from kernels.ops import requant_expr  # the one TE definition of requantization, shared with the x86 kernels


def _pad(x: te.Tensor, padding: Sequence[int], value: int) -> te.Tensor:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return topi.nn.pad(x, [0, 0, ph, pw], [0, 0, ph, pw], pad_value=tir.const(value, "uint8"), name="pad")


def conv2d_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                   *residual: te.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   groups: int, input_zero_point: int, output_zero_point: int, lo: int, hi: int,
                   residual_zero_point: int = 0) -> te.Tensor:
    """uint8 NCHW x int8 OIHW (grouped) -> int32 acc + bias -> requant (+ fused residual) -> uint8."""
    n_, _, h, w_ = (int(v) for v in x.shape)
    o, cg, kh, kw = (int(v) for v in w.shape)
    sh, sw = stride
    dh, dw = dilation
    oh = (h + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1
    ow = (w_ + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    xp = _pad(x, padding, input_zero_point)
    rc = te.reduce_axis((0, cg), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    acc = te.compute(
        (n_, o, oh, ow),
        lambda b, c, i, j: te.sum(
            xp[b, (c // og) * cg + rc, i * sh + ry * dh, j * sw + rx * dw].astype("int32")
            * w[c, rc, ry, rx].astype("int32"), axis=[rc, ry, rx]),
        name="conv_acc")

    def out(b, c, i, j):
        terms = [(acc[b, c, i, j] + bias[c], mult[c])]
        if residual:
            r, rm = residual
            terms.append((r[b, c, i, j].astype("int32") - residual_zero_point, rm[c]))
        return requant_expr(terms, shift[c], output_zero_point, lo, hi)

    return te.compute((n_, o, oh, ow), out, name="conv_requant")


def dense_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                  *residual: te.Tensor, input_zero_point: int, output_zero_point: int, lo: int, hi: int,
                  residual_zero_point: int = 0) -> te.Tensor:
    """uint8 (N, K) x int8 (O, K) -> requant -> uint8 (N, O). ``input_zero_point`` is folded into ``bias``."""
    n_, k = (int(v) for v in x.shape)
    o = int(w.shape[0])
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute((n_, o), lambda b, c: te.sum(x[b, rk].astype("int32") * w[c, rk].astype("int32"), axis=rk),
                     name="dense_acc")

    def out(b, c):
        terms = [(acc[b, c] + bias[c], mult[c])]
        if residual:
            r, rm = residual
            terms.append((r[b, c].astype("int32") - residual_zero_point, rm[c]))
        return requant_expr(terms, shift[c], output_zero_point, lo, hi)

    return te.compute((n_, o), out, name="dense_requant")


def add_requant(a: te.Tensor, b: te.Tensor, ma: te.Tensor, mb: te.Tensor, shift: te.Tensor, *, zero_points:
                Sequence[int], output_zero_point: int, lo: int, hi: int) -> te.Tensor:
    za, zb = zero_points
    return te.compute(
        a.shape,
        lambda *i: requant_expr([(a[i].astype("int32") - za, ma[i[1]]), (b[i].astype("int32") - zb, mb[i[1]])],
                                shift[i[1]], output_zero_point, lo, hi),
        name="add_requant")


def avgpool_requant(x: te.Tensor, mult: te.Tensor, shift: te.Tensor, *, kernel: Sequence[int], stride:
                    Sequence[int], padding: Sequence[int], input_zero_point: int, output_zero_point: int, lo: int,
                    hi: int) -> te.Tensor:
    n_, c, h, w_ = (int(v) for v in x.shape)
    kh, kw = kernel
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w_ + 2 * padding[1] - kw) // stride[1] + 1
    xp = _pad(x, padding, input_zero_point)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    acc = te.compute((n_, c, oh, ow), lambda b, ch, i, j: te.sum(
        xp[b, ch, i * stride[0] + ry, j * stride[1] + rx].astype("int32"), axis=[ry, rx]), name="pool_sum")
    return te.compute((n_, c, oh, ow), lambda b, ch, i, j: requant_expr(
        [(acc[b, ch, i, j] - input_zero_point * kh * kw, mult[ch])], shift[ch], output_zero_point, lo, hi),
        name="avgpool_requant")


def maxpool(x: te.Tensor, *, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], padding_end: Sequence[int] = (0, 0)) -> te.Tensor:
    n_, c, h, w_ = (int(v) for v in x.shape)
    kh, kw = kernel
    dh, dw = dilation
    eh, ew = padding_end
    oh = (h + 2 * padding[0] + eh - dh * (kh - 1) - 1) // stride[0] + 1
    ow = (w_ + 2 * padding[1] + ew - dw * (kw - 1) - 1) // stride[1] + 1
    if eh or ew:
        xp = topi.nn.pad(x, [0, 0, padding[0], padding[1]], [0, 0, padding[0] + eh, padding[1] + ew],
                         pad_value=tir.const(0, "uint8"), name="pad")
    else:
        xp = _pad(x, padding, 0)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    return te.compute((n_, c, oh, ow), lambda b, ch, i, j: te.max(
        xp[b, ch, i * stride[0] + ry * dh, j * stride[1] + rx * dw], axis=[ry, rx]), name="maxpool")


def flatten(x: te.Tensor) -> te.Tensor:
    n_ = int(x.shape[0])
    k = 1
    for v in x.shape[1:]:
        k *= int(v)
    return topi.reshape(x, (n_, k))


def clamp(x: te.Tensor, *, lo: int, hi: int) -> te.Tensor:
    return te.compute(x.shape, lambda *i: tir.max(tir.min(x[i], tir.const(hi, "uint8")), tir.const(lo, "uint8")),
                      name="clamp")


def mul_requant(a: te.Tensor, b: te.Tensor, mult: te.Tensor, shift: te.Tensor, *, zero_points: Sequence[int],
                output_zero_point: int, lo: int, hi: int) -> te.Tensor:
    """(q_a - z_a) * (q_b - z_b), numpy broadcasting of size-1 dims, requantized per channel (axis 1)."""
    za, zb = zero_points
    shape = [max(int(u), int(v)) for u, v in zip(a.shape, b.shape)]

    def at(t: te.Tensor, i: tuple) -> tir.PrimExpr:
        return t[tuple(0 if int(t.shape[d]) == 1 else i[d] for d in range(len(i)))]

    return te.compute(shape, lambda *i: requant_expr(
        [((at(a, i).astype("int32") - za) * (at(b, i).astype("int32") - zb), mult[i[1]])], shift[i[1]],
        output_zero_point, lo, hi), name="mul_requant")


def lut(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    """q_out = table[q_in] (uint8 table of 2^bits entries)."""
    return te.compute(x.shape, lambda *i: table[x[i].astype("int32")], name="lut")


def concat_requant(xs: Sequence[te.Tensor], *, multipliers: Sequence[int], shifts: Sequence[int],
                   zero_points: Sequence[int], output_zero_point: int, lo: int, hi: int) -> te.Tensor:
    """Channel concatenation, input i requantized by (multipliers[i], shifts[i]) onto the output grid."""
    chans = [int(x.shape[1]) for x in xs]
    shape = [int(v) for v in xs[0].shape]
    shape[1] = sum(chans)

    def f(*i):
        c = i[1]
        val = None
        off = 0
        for k in range(len(xs)):      # nested selects: the last input whose first channel <= c wins
            idx = (i[0], tir.min(tir.max(c - off, 0), chans[k] - 1)) + tuple(i[2:])
            term = requant_expr([(xs[k][idx].astype("int32") - int(zero_points[k]),
                                  tir.const(int(multipliers[k]), "int32"))], tir.const(int(shifts[k]), "int32"),
                                output_zero_point, lo, hi)
            val = term if val is None else tir.if_then_else(c >= off, term, val)
            off += chans[k]
        return val

    return te.compute(shape, f, name="concat_requant")


def upsample_nearest(x: te.Tensor, *, scale: Sequence[int]) -> te.Tensor:
    n_, c, h, w_ = (int(v) for v in x.shape)
    sh, sw = scale
    return te.compute((n_, c, h * sh, w_ * sw), lambda b, k, i, j: x[b, k, i // sh, j // sw], name="upsample")


def pixel_shuffle(x: te.Tensor, *, factor: int) -> te.Tensor:
    n_, c, h, w_ = (int(v) for v in x.shape)
    r = int(factor)
    return te.compute((n_, c // (r * r), h * r, w_ * r),
                      lambda b, k, i, j: x[b, k * r * r + (i % r) * r + j % r, i // r, j // r], name="pixel_shuffle")


def pixel_unshuffle(x: te.Tensor, *, factor: int) -> te.Tensor:
    n_, c, h, w_ = (int(v) for v in x.shape)
    r = int(factor)
    return te.compute((n_, c * r * r, h // r, w_ // r),
                      lambda b, k, i, j: x[b, k // (r * r), i * r + (k % (r * r)) // r, j * r + k % r],
                      name="pixel_unshuffle")


def channel_shuffle(x: te.Tensor, *, groups: int) -> te.Tensor:
    """out channel k = in channel (k % g) * (C / g) + k // g  (view(N, g, C/g, H, W).transpose(1, 2))."""
    n_, c, h, w_ = (int(v) for v in x.shape)
    g = int(groups)
    cg = c // g
    return te.compute((n_, c, h, w_), lambda b, k, i, j: x[b, (k % g) * cg + k // g, i, j], name="channel_shuffle")


def slice_channels(x: te.Tensor, *, start: int, stop: int) -> te.Tensor:
    shape = [int(v) for v in x.shape]
    shape[1] = int(stop) - int(start)
    return te.compute(shape, lambda b, k, *r: x[(b, k + int(start)) + tuple(r)], name="slice")
