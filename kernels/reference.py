"""numpy implementation of the integer contract, plain NCHW layout. It is the truth the kernels are tested against.

Accumulation is done in int64 (exact); the accumulator is then checked to fit int32, as the contract requires.
"""

from __future__ import annotations

import numpy as np


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def requant(terms, shift, zero_point, lo, hi, axis=1):
    """clamp(z + ((sum int64(t) * int64(m) + (1 << (sh-1))) >> sh), lo, hi) -> uint8; m, sh per channel (axis)."""
    nd = np.asarray(terms[0][0]).ndim
    shape = [1] * nd
    shape[axis] = -1
    v = np.zeros(np.asarray(terms[0][0]).shape, np.int64)
    for t, m in terms:
        v += np.asarray(t).astype(np.int64) * np.asarray(m, np.int64).reshape(shape)
    sh = np.asarray(shift, np.int64).reshape(shape)
    r = (v + (np.int64(1) << (sh - 1))) >> sh
    return np.clip(r + int(zero_point), lo, hi).astype(np.uint8)


def conv_acc(x, w, bias, stride=1, padding=0, dilation=1, groups=1, input_zero_point=0):
    """int32 accumulator: bias[o] + sum int32(x_pad) * int32(w), x_pad padded with the input zero point."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=input_zero_point).astype(np.int64)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, o, oh, ow), np.int64)
    w64 = w.astype(np.int64)
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w64[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                acc[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    acc += np.asarray(bias, np.int64).reshape(1, -1, 1, 1)
    if acc.size and (acc.max() >= 2 ** 31 or acc.min() < -2 ** 31):
        raise OverflowError("int32 accumulator overflow")
    return acc


def conv2d_requant(x, w, bias, mult, shift, residual=None, residual_mult=None, *, stride=1, padding=0, dilation=1,
                   groups=1, input_zero_point=0, output_zero_point=0, lo=0, hi=255, residual_zero_point=0):
    acc = conv_acc(x, w, bias, stride, padding, dilation, groups, input_zero_point)
    terms = [(acc, mult)]
    if residual is not None:
        terms.append((residual.astype(np.int64) - residual_zero_point, residual_mult))
    return requant(terms, shift, output_zero_point, lo, hi)


def dense_requant(x, w, bias, mult, shift, residual=None, residual_mult=None, *, output_zero_point=0, lo=0, hi=255,
                  residual_zero_point=0):
    acc = x.astype(np.int64) @ w.astype(np.int64).T + np.asarray(bias, np.int64)[None]
    if acc.size and (acc.max() >= 2 ** 31 or acc.min() < -2 ** 31):
        raise OverflowError("int32 accumulator overflow")
    terms = [(acc, mult)]
    if residual is not None:
        terms.append((residual.astype(np.int64) - residual_zero_point, residual_mult))
    return requant(terms, shift, output_zero_point, lo, hi)


def maxpool2d(x, kernel=3, stride=2, padding=0, dilation=1):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=0)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, c, oh, ow), np.uint8)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw])
    return out


def avgpool2d_requant(x, mult, shift, kernel=2, stride=2, padding=0, input_zero_point=0, output_zero_point=0, lo=0,
                      hi=255):
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=input_zero_point).astype(np.int64)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    acc = np.zeros((n, c, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            acc += xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
    acc -= input_zero_point * kh * kw
    return requant([(acc, mult)], shift, output_zero_point, lo, hi)


def global_avgpool_requant(x, mult, shift, input_zero_point=0, output_zero_point=0, lo=0, hi=255):
    acc = (x.astype(np.int64) - input_zero_point).sum(axis=(2, 3), keepdims=True)
    return requant([(acc, mult)], shift, output_zero_point, lo, hi)


def add_requant(a, b, ma, mb, shift, zero_points=(0, 0), output_zero_point=0, lo=0, hi=255):
    za, zb = zero_points
    return requant([(a.astype(np.int64) - za, ma), (b.astype(np.int64) - zb, mb)], shift, output_zero_point, lo, hi)
