"""TE compute definitions of the integer ops in the blocked ``NCHW[c]c`` layout (see :mod:`kernels.layout`).

Every function takes ``te.Tensor`` arguments plus python-int attributes, so it can be passed to
``relax.BlockBuilder.emit_te`` as is. The final compute of each op carries the block annotation
``ptq2tvm_kernel = <kind>``; :func:`kernels.schedule_module` finds the PrimFuncs by it and applies the hand schedule.

Arithmetic (exactly the project's integer contract; all ints):

    x_pad  = pad(x, padding, value=z_x)                                             uint8
    acc    = bias[o] + sum_{c in group(o), kh, kw} int32(x_pad[..]) * int32(w[o, c, kh, kw])   int32
    v      = int64(acc) * int64(m[o])  [+ (int64(r) - z_r) * int64(mr[o])]          int64
    out    = clamp(z_out + ((v + (1 << (sh[o] - 1))) >> sh[o]), lo, hi)              uint8 (arithmetic shift)

Intermediate names used by the schedules: ``pad`` (zero-point padded input), ``w_unpack`` (int4 / int2 -> int8 tile),
``acc`` (int32 reduction, bias not included) and the annotated output block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tvm.tirx as tir
from tvm import te

from .border import BORDER_ATTR, border_geometry
from .layout import BLOCK

KERNEL_ATTR = "ptq2tvm_kernel"
#: the output block's requant parameters [zero point, lo, hi, has residual, residual zero point] (the schedule's
#: tensorized epilogue, kernels/epilogue_intrin.py, is registered for them)
REQUANT_ATTR = "requant"
#: output-block annotation of a TE conv whose caller proved the lifted paired epilogue exact: "lifted" | "lifted+shift"
LIFTED_ATTR = "lifted_epilogue"
#: the vpmaddwd (avx2-packed weights) conv kernels widen their input to uint16 in the pad stage, so that the inner
#: loop broadcasts ready int16 pairs (benchmarks/results/avx2_dot_throughput.md). False: the uint8 input is widened
#: in the inner loop (broadcast + vpshufb per pair), as before.
WIDEN_AVX2_INPUT = True


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _shape(t: te.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in t.shape)


def _i64(v: tir.PrimExpr) -> tir.PrimExpr:
    return v.astype("int64")


def requant_expr(terms: Sequence[tuple[tir.PrimExpr, tir.PrimExpr]], shift: tir.PrimExpr, zero_point: int, lo: int,
                 hi: int, const_terms: Sequence[tuple[tir.PrimExpr, tir.PrimExpr]] = (),
                 shift_ge32: bool = False) -> tir.PrimExpr:
    """clamp(zero_point + ((sum_k int64(t_k) * int64(m_k)) + 2^(shift-1)) >> shift, lo, hi) as uint8.

    ``const_terms`` are more (t, m) pairs of the same sum whose values do not depend on the pixel (the bias, a
    residual's zero point): they are summed with the rounding constant into one per-channel int64 that LLVM hoists
    out of the pixel loops, and ``int64(t) * int64(m)`` of the remaining terms stays a 32 x 32 -> 64-bit multiply
    (``vpmuldq``; with the bias added first in int32 it was a full 64 x 64 multiply, 3 ``vpmuludq`` + 5 ops on AVX2).
    The multipliers of ``const_terms`` must be >= 0 (every requant multiplier is: a dyadic mantissa in [0, 2^31)):
    they are widened by zero extension, a different value for LLVM than the sign extension of the other terms, so
    that its reassociation does not factor ``t*m + bias*m`` back into the 64 x 64 multiply ``(t + bias) * m``.

    The arithmetic right shift is written as a logical one: ``w >> n == ((w ^ 2^63) >>> n) - 2^(63-n)`` for any
    int64 ``w`` and 1 <= n <= 62 (w ^ 2^63 read as uint64 is w + 2^63, and 2^n divides 2^63), with ``2^(63-n)`` and
    the zero point one per-channel constant; AVX2 has no 64-bit arithmetic shift (LLVM emulated it with 2 shifts,
    a xor and a subtract). Bit-identical to :func:`ptq2tvm.ir.reference.requantize`.

    ``shift_ge32=True`` (the caller proved every channel's shift >= 32,
    :func:`kernels.layout.shifts_allow_int32_epilogue`): the sum ``v`` (|v| < 2^63) is shifted as
    ``floor(v / 2^n) = floor(floor(v / 2^32) / 2^(n-32))``: the high 32-bit half of every int64 lane (a shuffle)
    then an int32 arithmetic shift (``vpsravd``), so the clamp runs on int32 lanes
    (``vpminsd`` / ``vpmaxsd``, eight per ymm) instead of the emulated int64 compares: the same value, about half the
    epilogue's instructions. The result is in [-2^31, 2^31) for n >= 32, and it is clamped to [lo - z, hi - z] before
    the zero point is added, so nothing overflows. (Padded channels, whose shift is 1, give garbage that is never
    read; the shift amount is kept >= 0.)
    """
    k = requant_channel_constants(shift, zero_point, const_terms, shift_ge32)
    v = _i64(terms[0][0]) * _i64(terms[0][1])
    for t, m in terms[1:]:
        v = v + _i64(t) * _i64(m)
    return requant_finish(v, k, zero_point, lo, hi, shift_ge32)


def requant_channel_constants(shift: tir.PrimExpr, zero_point: int,
                              const_terms: Sequence[tuple[tir.PrimExpr, tir.PrimExpr]] = (),
                              shift_ge32: bool = False) -> dict[str, tir.PrimExpr]:
    """The per-channel part of :func:`requant_expr`: ``c`` (int64: the rounding constant plus every const term),
    ``n`` (uint64 shift; int32 ``shift - 32`` with ``shift_ge32``) and ``off`` (int64 ``2^(63-n) - zero_point``; unused
    with ``shift_ge32``). A kernel may compute them once per output channel and pass them (or loads of them) to
    :func:`requant_finish`; the result is the same integer."""
    n = _i64(shift)
    one = tir.const(1, "int64")
    c = tir.shift_left(one, n - one)
    for t, m in const_terms:     # multipliers are >= 0 (dyadic mantissas): zext == sext, see requant_expr
        c = _i64(t) * m.astype("uint32").astype("int64") + c
    if shift_ge32:
        return {"c": c, "n": tir.max(shift.astype("int32") - tir.const(32, "int32"), tir.const(0, "int32")),
                "off": tir.const(0, "int64")}
    return {"c": c, "n": n.astype("uint64"),
            "off": tir.shift_left(one, tir.const(63, "int64") - n) - tir.const(int(zero_point), "int64")}


def requant_finish(v: tir.PrimExpr, k: dict[str, tir.PrimExpr], zero_point: int, lo: int, hi: int,
                   shift_ge32: bool = False) -> tir.PrimExpr:
    """The per-element part of :func:`requant_expr`: ``v`` = sum of int64 products, ``k`` from
    :func:`requant_channel_constants` -> uint8."""
    if shift_ge32:
        high = tir.shift_right(v + k["c"], tir.const(32, "int64")).astype("int32")
        q = tir.shift_right(high, k["n"])
        z = int(zero_point)
        q = tir.max(tir.min(q, tir.const(int(hi) - z, "int32")), tir.const(int(lo) - z, "int32"))
        return (q + tir.const(z, "int32")).astype("uint8")
    w = tir.bitwise_xor(v + k["c"], tir.const(-(1 << 63), "int64"))
    u = tir.shift_right(tir.reinterpret("uint64", w), k["n"])
    r = tir.reinterpret("int64", u) - k["off"]
    r = tir.max(tir.min(r, tir.const(int(hi), "int64")), tir.const(int(lo), "int64"))
    return r.astype("uint8")


def _pad_nchwc(x: te.Tensor, ph: int, pw: int, value: int, name: str = "pad", width: int | None = None,
               dtype: str | None = None) -> te.Tensor:
    """Pad H by ``ph`` and W by ``pw`` on both sides with ``value``; ``width`` (>= W + 2pw) widens the right border
    further (the depthwise tap kernel reads past the last kernel column); ``dtype`` (e.g. "uint16"): the padded copy
    is converted to it (a stage is then made even without padding)."""
    n, cb, h, w, c = _shape(x)
    width = w + 2 * pw if width is None else width
    dtype = dtype or x.dtype
    if ph == 0 and pw == 0 and width == w and dtype == x.dtype:
        return x

    def f(b, k, i, j, ci):
        inside = tir.all(i >= ph, i < h + ph, j >= pw, j < w + pw)
        return tir.if_then_else(inside, x[b, k, i - ph, j - pw, ci].astype(dtype), tir.const(int(value), dtype))

    return te.compute((n, cb, h + 2 * ph, width, c), f, name=name)


def _out_hw(h, w, k, s, p, d):
    return ((h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


def _weight_format(w: te.Tensor, isa: str) -> tuple[str, int]:
    """-> (layout, storage bits) of a packed conv/dense weight: 8 (int8), 4 (uint8 ``[..., 32]``, two per byte) or
    2 (uint8 ``[..., 16]``, four per byte); the packed layouts take their layout from ``isa``."""
    nd = len(w.shape)
    if w.dtype == "uint8":
        last = int(w.shape[-1])
        if last not in (32, 16):
            raise ValueError(f"packed sub-byte weights end in 32 (int4) or 16 (int2) bytes per block, got {last}")
        return isa, 4 if last == 32 else 2
    if w.dtype != "int8":
        raise ValueError(f"packed weights must be int8 (or uint8 for int4 / int2), got {w.dtype}")
    return ("avx2" if nd in (5, 8) else "vnni"), 8


def _unpack_weight(wp: te.Tensor, isa: str, lead: tuple[int, ...], bits: int) -> te.Tensor:
    """uint8 sub-byte weights -> int8 weight tile (*lead, 16, 4) [vnni] or (*lead, 2, 16, 2) [avx2].

    int4, wp (*lead, 32): element e of the flattened 64-weight block is nibble ``e // 32`` of byte ``e % 32``,
    sign-extended as ``int8(nibble ^ 8) - 8`` (no overflow anywhere: 0..15 -> -8..7).
    int2, wp (*lead, 16): element e is the 2-bit field ``e // 16`` (bits 2k..2k+1) of byte ``e % 16``, sign-extended
    as ``int8(field ^ 2) - 2`` (0..3 -> 0, 1, -2, -1). uint8 shifts and masks only (TVM 0.27's int4 dtype is broken
    on CPU). The int2 block is annotated ``weight_bits = 2`` for the schedules (the int4 block has no annotation, so
    its structural hash, the key of tuning records and latency caches, is what it was before int2 existed).
    """
    per_byte = 8 // bits                 # fields per byte: 2 (int4) or 4 (int2)
    nbytes = 64 // per_byte
    mask, sign = (1 << bits) - 1, 1 << (bits - 1)

    def field(byte, k):
        v = tir.bitwise_and(tir.shift_right(byte, (k * bits).astype("uint8")), tir.const(mask, "uint8"))
        return tir.bitwise_xor(v, tir.const(sign, "uint8")).astype("int8") - tir.const(sign, "int8")

    if isa == "vnni":
        def f(*idx):
            *lo, oci, ics = idx                 # e = oci*4 + ics
            per = nbytes // 4                   # output lanes per field: 8 (int4), 4 (int2)
            return field(wp[(*lo, (oci % per) * 4 + ics)], oci // per)
        shape = (*lead, BLOCK, 4)
    else:
        def f(*idx):
            *lo, p, oci, j = idx                # e = p*32 + oci*2 + j
            if bits == 4:
                return field(wp[(*lo, oci * 2 + j)], p)
            return field(wp[(*lo, (oci % 8) * 2 + j)], p * 2 + oci // 8)
        shape = (*lead, 2, BLOCK, 2)
    return te.compute(shape, f, name="w_unpack", attrs={"weight_bits": 2} if bits == 2 else None)


def _packed_weight(wt: te.Tensor, layout: str, ric, rkh, rkw, rcf, rcs):
    """``wv(o, oc)``: the int32 weight of output block ``o``, lane ``oc`` at the reduction point (ric, rkh, rkw,
    rcf, rcs) of a packed weight: 'vnni' ``[..., 16, 4]`` or 'avx2' ``[..., 2, 16, 2]`` (see layout.pack_conv_weight)."""
    if layout == "vnni":
        return lambda o, oc: wt[o, ric, rkh, rkw, rcf, oc, rcs].astype("int32")
    return lambda o, oc: wt[o, ric, rkh, rkw, rcf, rcs // 2, oc, rcs % 2].astype("int32")


#: output-block annotation of a conv that reduces over its real four-channel steps (value: how many)
CHUNKED_REDUCTION_ATTR = "chunked_reduction"


def _real_chunks(in_channels: int | None, cb: int, cf: int, ngroups: int, kh: int, kw: int) -> int | None:
    """How many four-channel reduction steps a dense 1x1 conv over ``cb`` blocks of ``4 * cf`` channels needs for
    ``in_channels`` real ones, when that skips at least one all-padding step; else None (the block reduction)."""
    if in_channels is None or ngroups != 1 or (kh, kw) != (1, 1) or cf != BLOCK // 4:
        return None
    chunks = -(-int(in_channels) // 4)
    if not 0 < chunks <= cb * cf or -(-chunks // cf) != cb:     # fewer channels than blocks: a caller's mistake
        raise ValueError(f"in_channels={in_channels} does not fit the input's {cb} blocks of {4 * cf} channels")
    return chunks if chunks < cb * cf else None


def conv2d_nchwc_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                         *residual: te.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                         input_zero_point: int = 0, output_zero_point: int = 0, lo: int = 0, hi: int = 255,
                         residual_zero_point: int = 0, isa: str = "vnni", ubsw_exact: bool = False,
                         i16_group: int = 0, shift_ge32: bool = False, in_channels: int | None = None,
                         lifted: str | None = None) -> te.Tensor:
    """Fused conv + bias + requant (+ residual) in the blocked layout.

    x        uint8 (N, CB, H, W, icb)            blocked input (icb = 16 inside the net, 4 for the first conv)
    w        packed weight from :func:`kernels.pack_conv_weight` (its shape selects dense/grouped/depthwise,
             int8 vs int4 / int2; for int4 / int2 pass the same ``isa`` it was packed for)
    bias, mult, shift   int32 (OB*16,)           per output channel, padded with :func:`kernels.pack_channel_params`
    residual (optional) r uint8 (N, OB, OH, OW, 16) and mr int32 (OB*16,)
    returns  uint8 (N, OB, OH, OW, 16)

    ``groups`` is only used to validate depthwise weights; grouping is read from the packed weight.
    ``ubsw_exact``: the caller proved (:func:`kernels.layout.u8s8_pairs_exact`) that AVX2's saturating
    ``vpmaddubsw`` is exact for these VNNI-packed weights and this input's range; the AVX2 schedule may then use it
    (recorded as the output block's ``ubsw_exact`` annotation).
    ``i16_group`` (> 0, with ``ubsw_exact`` and VNNI-packed weights; for a depthwise weight: any value > 0, proved by
    :func:`kernels.layout.depthwise_int16_exact`, sums the taps in int16): the caller proved
    (:func:`kernels.layout.u8s8_int16_group`) that the sum over any ``i16_group`` consecutive input blocks fits int16;
    the reduction is then written as int16 partial sums per group of input blocks (``acc16``, ``[.., 16 x 2]``: lane
    x vpmaddubsw pair) widened into the int32 ``acc``, which the AVX2 schedule runs as ``vpmaddubsw`` + ``vpaddw``
    per step and one ``vpmaddwd`` flush per group.
    ``shift_ge32``: the caller proved every channel's shift >= 32
    (:func:`kernels.layout.shifts_allow_int32_epilogue`): the cheaper exact epilogue of :func:`requant_expr`.
    ``lifted`` ("lifted" or "lifted+shift", :data:`kernels.vector_tir.LIFTED_EPILOGUES`; not with ``shift_ge32``,
    not for depthwise weights):
    the caller proved the lifted form of the paired epilogue exact for the layer
    (:func:`kernels.layout.lifted_epilogue_exact`); recorded on the output block (:data:`LIFTED_ATTR`), the AVX-512
    tensorized epilogue then runs it (kernels/epilogue_intrin.py); the block's integers are those of
    :func:`requant_expr` either way.
    ``in_channels``: the layer's real input channels, the first ones of the blocks (None: all of them). A dense
    1x1 conv without ``i16_group`` whose channels end inside the last block by at least 4 (MobileNetV2's 24,
    EfficientNet's 40) reduces over ``ceil(in_channels / 4)`` four-channel steps (one flat ``rq`` axis,
    :data:`CHUNKED_REDUCTION_ATTR` on the output) instead of whole blocks: the padded channels' products (zero
    weights) are skipped, same integers. The int16-accumulator form (``i16_group``) still reduces whole blocks.
    Raises ValueError for inconsistent shapes, dtypes or an ``i16_group`` the weights do not allow.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, cb, h, wd, icb = _shape(x)
    if x.dtype != "uint8":
        raise ValueError(f"activations must be uint8, got {x.dtype}")
    if len(residual) not in (0, 2):
        raise ValueError("residual must be given as (r, mr)")
    z_x = int(input_zero_point)
    if lifted is not None and (lifted not in ("lifted", "lifted+shift") or shift_ge32 or len(w.shape) == 4):
        raise ValueError(f"lifted must be 'lifted' or 'lifted+shift', not given with shift_ge32 and only for dense or "
                         f"grouped weights, got {lifted!r} (shift_ge32={shift_ge32}, weight {tuple(w.shape)})")
    if len(w.shape) == 4:                           # depthwise (CB, KH, KW, 16)
        return _depthwise(x, w, bias, mult, shift, residual, stride, padding, dilation, z_x, output_zero_point, lo,
                          hi, residual_zero_point, int16=bool(i16_group), shift_ge32=shift_ge32)
    layout, bits = _weight_format(w, isa)
    ws = _shape(w)
    ob, cbg, kh, kw, cf = ws[:5]
    if cf * 4 != icb:
        raise ValueError(f"weight packed for input block {cf * 4}, activation block is {icb}")
    if cb % cbg:
        raise ValueError(f"weight has {cbg} input blocks per group, input has {cb}")
    ngroups = cb // cbg
    if ob % ngroups:
        raise ValueError(f"{ob} output blocks not divisible into {ngroups} groups")
    obg = ob // ngroups
    oh, ow = _out_hw(h, wd, (kh, kw), stride, padding, dilation)
    (sh_, sw_), (dh, dw) = stride, dilation
    # the vpmaddwd (avx2-packed) kernel reads its activations as int16 pairs: the pad stage writes them widened
    # (not for a strided 1x1 conv, which reads a quarter of its input: widening all of it costs more than it saves)
    widen = layout == "avx2" and WIDEN_AVX2_INPUT and not (kh == kw == 1 and (sh_, sw_) != (1, 1))
    xp = _pad_nchwc(x, padding[0], padding[1], z_x, dtype="uint16" if widen else None)
    wt = _unpack_weight(w, layout, ws[:5], bits) if bits < 8 else w
    ric = te.reduce_axis((0, cbg), "ric")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    rcf = te.reduce_axis((0, cf), "rcf")
    rcs = te.reduce_axis((0, 4), "rcs")

    def x_at(b, o, i, j, icb_in_group, kh_, kw_, ch):
        """The padded input under output pixel (i, j) of block o at tap (kh_, kw_), input block icb_in_group of o's
        group, channel ch of the block (uint8)."""
        ic = icb_in_group if ngroups == 1 else (o // obg) * cbg + icb_in_group
        return xp[b, ic, i * sh_ + kh_ * dh, j * sw_ + kw_ * dw, ch]

    def xin(b, o, i, j):
        return x_at(b, o, i, j, ric, rkh, rkw, rcf * 4 + rcs).astype("int32")

    wv = _packed_weight(wt, layout, ric, rkh, rkw, rcf, rcs)

    extra = _packed_attrs(bits, ubsw_exact, layout)
    border = border_geometry(h, wd, padding, stride, dilation, z_x)
    if border is not None:
        extra[BORDER_ATTR] = border
    if i16_group:
        if layout != "vnni" or not ubsw_exact or cbg % int(i16_group):
            raise ValueError(f"i16_group={i16_group} needs VNNI-packed weights proved exact (ubsw_exact) and a divisor "
                             f"of the {cbg} input blocks per group")
        acc = _acc_int16_groups(x_at, wt, (n, ob, oh, ow), cbg, int(i16_group), (kh, kw, cf))
        extra["i16_group"] = int(i16_group)
    elif (chunks := _real_chunks(in_channels, cb, cf, ngroups, kh, kw)) is not None:
        rq = te.reduce_axis((0, chunks), "rq")
        wq = _packed_weight(wt, layout, rq // cf, rkh, rkw, rq % cf, rcs)
        acc = te.compute((n, ob, oh, ow, BLOCK),
                         lambda b, o, i, j, oc: te.sum(
                             x_at(b, o, i, j, rq // cf, rkh, rkw, (rq % cf) * 4 + rcs).astype("int32") * wq(o, oc),
                             axis=[rq, rkh, rkw, rcs]),
                         name="acc")
        extra[CHUNKED_REDUCTION_ATTR] = chunks
    else:
        acc = te.compute((n, ob, oh, ow, BLOCK),
                         lambda b, o, i, j, oc: te.sum(xin(b, o, i, j) * wv(o, oc), axis=[ric, rkh, rkw, rcf, rcs]),
                         name="acc")
    if lifted is not None:
        extra[LIFTED_ATTR] = lifted
    kind = f"conv2d_nchwc_{layout}"
    return _requant_out(acc, bias, mult, shift, residual, output_zero_point, lo, hi, residual_zero_point, kind,
                        extra, shift_ge32=shift_ge32)


def _acc_int16_groups(x_at, wt, out_shape, cbg, g, taps) -> te.Tensor:
    """The int32 accumulator of a conv as int16 partial sums over ``g`` input blocks (``acc16``, element
    ``2*lane + pair`` = one ``vpmaddubsw`` output lane) widened and summed (``acc``). ``x_at`` reads the padded input
    as in :func:`conv2d_nchwc_requant`. Exact when the weights pass :func:`kernels.layout.u8s8_int16_group` for the
    input range (no int16 sum leaves its range)."""
    n, ob, oh, ow = out_shape
    kh, kw, cf = taps
    rici = te.reduce_axis((0, g), "rici")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    rcf = te.reduce_axis((0, cf), "rcf")
    rj = te.reduce_axis((0, 2), "rj")

    def term(b, o, gg, i, j, e):
        icr = gg * g + rici
        k = e % 2 * 2 + rj
        return (x_at(b, o, i, j, icr, rkh, rkw, rcf * 4 + k).astype("int16")
                * wt[o, icr, rkh, rkw, rcf, e // 2, k].astype("int16"))

    acc16 = te.compute((n, ob, cbg // g, oh, ow, 2 * BLOCK),
                       lambda b, o, gg, i, j, e: te.sum(term(b, o, gg, i, j, e), axis=[rici, rkh, rkw, rcf, rj]),
                       name="acc16")
    rg = te.reduce_axis((0, cbg // g), "rg")
    rp = te.reduce_axis((0, 2), "rp")
    return te.compute((n, ob, oh, ow, BLOCK),
                      lambda b, o, i, j, oc: te.sum(acc16[b, o, rg, i, j, oc * 2 + rp].astype("int32"), axis=[rg, rp]),
                      name="acc")


def _packed_attrs(bits: int, ubsw_exact: bool, layout: str) -> dict:
    """Output-block annotations of a conv/dense kernel: ``int4`` = sub-byte packed weights (int4 or int2; the
    storage is the weight buffer's dtype and shape), ``ubsw_exact`` (see :func:`conv2d_nchwc_requant`)."""
    return {"int4": int(bits < 8), "ubsw_exact": int(bool(ubsw_exact) and layout == "vnni")}


def requant_channel(acc: tir.PrimExpr, mult: tir.PrimExpr, bias: tir.PrimExpr, shift: tir.PrimExpr, zero_point: int,
                    lo: int, hi: int, residual: tuple[tir.PrimExpr, tir.PrimExpr] | None = None,
                    residual_zero_point: int = 0, shift_ge32: bool = False) -> tir.PrimExpr:
    """One output channel's requant as the conv / depthwise TE kernels write it (:func:`requant_expr` of the int32
    accumulator ``acc`` with multiplier ``mult``, the bias as a constant term, and a residual ``(r uint8, rm int32)``
    with its zero point as a term and a constant term) -> uint8. The tensorized epilogue
    (kernels/epilogue_intrin.py) describes its block with this same function, so that tensorize matches."""
    terms, consts = [(acc, mult)], [(bias, mult)]
    if residual is not None:
        r, rm = residual
        terms.append((r.astype("int32"), rm))
        consts.append((tir.const(-int(residual_zero_point), "int32"), rm))
    return requant_expr(terms, shift, zero_point, lo, hi, const_terms=consts, shift_ge32=shift_ge32)


def _requant_out(acc, bias, mult, shift, residual, z_out, lo, hi, z_r, kind, extra=None,
                 shift_ge32: bool = False) -> te.Tensor:
    def out(b, o, i, j, oc):
        c = o * BLOCK + oc
        res = (residual[0][b, o, i, j, oc], residual[1][c]) if residual else None
        return requant_channel(acc[b, o, i, j, oc], mult[c], bias[c], shift[c], z_out, lo, hi, res, z_r, shift_ge32)

    attrs = {KERNEL_ATTR: kind, **(extra or {}), **({"int32_epilogue": 1} if shift_ge32 else {}),
             REQUANT_ATTR: [int(z_out), int(lo), int(hi), int(bool(residual)), int(z_r)]}
    return te.compute(_shape(acc), out, name="out", attrs=attrs)


def _depthwise(x, w, bias, mult, shift, residual, stride, padding, dilation, z_x, z_out, lo, hi, z_r,
               int16: bool = False, shift_ge32: bool = False) -> te.Tensor:
    """Depthwise conv with int32 multiply-adds vectorized over the 16 channels of a block; ``int16``: the products and
    their sum in int16 (``vpmullw`` + ``vpaddw``, 16 lanes per ymm instead of 8 and no ``vpmulld``), valid when
    :func:`kernels.layout.depthwise_int16_exact` proved that no channel's sum can leave int16."""
    n, cb, h, wd, c = _shape(x)
    wcb, kh, kw, wc = _shape(w)
    if c != BLOCK or wc != BLOCK or wcb != cb:
        raise ValueError(f"depthwise weight {_shape(w)} does not match input {_shape(x)}")
    oh, ow = _out_hw(h, wd, (kh, kw), stride, padding, dilation)
    (sh_, sw_), (dh, dw) = stride, dilation
    xp = _pad_nchwc(x, padding[0], padding[1], z_x)
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    dt = "int16" if int16 else "int32"
    acc = te.compute(
        (n, cb, oh, ow, c),
        lambda b, o, i, j, ci: te.sum(xp[b, o, i * sh_ + rkh * dh, j * sw_ + rkw * dw, ci].astype(dt)
                                      * w[o, rkh, rkw, ci].astype(dt), axis=[rkh, rkw]), name="acc")
    extra = {"i16_group": 1} if int16 else {}
    border = border_geometry(h, wd, padding, stride, dilation, z_x)
    if border is not None:
        extra[BORDER_ATTR] = border
    return _requant_out(acc, bias, mult, shift, residual, z_out, lo, hi, z_r, "conv2d_nchwc_depthwise", extra,
                        shift_ge32=shift_ge32)


def depthwise_taps_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                           *residual: te.Tensor, kernel_width: int, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                           input_zero_point: int = 0, output_zero_point: int = 0, lo: int = 0, hi: int = 255,
                           residual_zero_point: int = 0) -> te.Tensor:
    """Depthwise conv on AVX-512 VNNI: per output pixel, kernel row and group of 4 horizontal taps one
    ``vpdpbusd`` over 16 channels (intrinsic ``vnni_taps`` in :mod:`kernels.intrin`), then requant (+ residual).

    x   uint8 (N, CB, H, W, 16); w int8 (CB, KH, G, 16, 4) from :func:`kernels.pack_depthwise_taps` (tap
    ``4g + t`` of channel ``cb*16 + i`` at ``[cb, kh, g, i, t]``, zero beyond ``kernel_width``). The 4th tap reads
    one pixel past the kernel; the padded input gets that column on the right (zero point; weight 0). Horizontal
    dilation must be 1 (the 4 taps are 4 consecutive pixels).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, cb, h, wd, c = _shape(x)
    wcb, kh, g, wc, four = _shape(w)
    kw = int(kernel_width)
    if c != BLOCK or wc != BLOCK or four != 4 or wcb != cb or not 4 * (g - 1) < kw <= 4 * g:
        raise ValueError(f"depthwise tap weight {_shape(w)} (kernel width {kw}) does not match input {_shape(x)}")
    if dilation[1] != 1:
        raise ValueError(f"depthwise taps need horizontal dilation 1, got {dilation[1]}")
    if len(residual) not in (0, 2):
        raise ValueError("residual must be given as (r, mr)")
    oh, ow = _out_hw(h, wd, (kh, kw), stride, padding, dilation)
    (sh_, sw_), dh = stride, dilation[0]
    width = max(wd + 2 * padding[1], (ow - 1) * sw_ + 4 * g)     # room for the 4th tap of the last group
    xp = _pad_nchwc(x, padding[0], padding[1], int(input_zero_point), width=width)
    rkh = te.reduce_axis((0, kh), "rkh")
    rg = te.reduce_axis((0, g), "rg")
    rt = te.reduce_axis((0, 4), "rt")
    acc = te.compute(
        (n, cb, oh, ow, c),
        lambda b, o, i, j, ci: te.sum(xp[b, o, i * sh_ + rkh * dh, j * sw_ + rg * 4 + rt, ci].astype("int32")
                                      * w[o, rkh, rg, ci, rt].astype("int32"), axis=[rkh, rg, rt]), name="acc")
    return _requant_out(acc, bias, mult, shift, residual, output_zero_point, lo, hi, residual_zero_point,
                        "depthwise_taps_vnni")


def dense_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                  *residual: te.Tensor, out_features: int | None = None, input_zero_point: int = 0,
                  output_zero_point: int = 0, lo: int = 0, hi: int = 255, residual_zero_point: int = 0,
                  isa: str = "vnni", ubsw_exact: bool = False) -> te.Tensor:
    """uint8 (N, K) x packed weight (:func:`kernels.pack_dense_weight`) -> requant -> uint8 (N, out_features).

    ``input_zero_point`` is only informational: it must already be folded into ``bias`` (-z_x * sum_k w[o, k]).
    K is zero-extended to the packed multiple of 4 (those weights are zero). residual: (r uint8 (N, O), mr).
    ``ubsw_exact`` as in :func:`conv2d_nchwc_requant`.
    """
    del input_zero_point
    n, k = _shape(x)
    layout, bits = _weight_format(w, isa)
    ws = _shape(w)
    ob, kf = ws[:2]
    o_out = int(out_features) if out_features is not None else ob * BLOCK
    if kf * 4 < k:
        raise ValueError(f"weight packed for K={kf * 4}, input has K={k}")
    xk = x
    if kf * 4 != k:
        xk = te.compute((n, kf * 4), lambda b, i: tir.if_then_else(i < k, x[b, i], tir.const(0, "uint8")),
                        name="pad")
    wt = _unpack_weight(w, layout, ws[:2], bits) if bits < 8 else w
    rkf = te.reduce_axis((0, kf), "rkf")
    rks = te.reduce_axis((0, 4), "rks")
    if layout == "vnni":
        def wv(o, oc):
            return wt[o, rkf, oc, rks].astype("int32")
    else:
        def wv(o, oc):
            return wt[o, rkf, rks // 2, oc, rks % 2].astype("int32")
    acc = te.compute((n, ob, BLOCK), lambda b, o, oc: te.sum(xk[b, rkf * 4 + rks].astype("int32") * wv(o, oc),
                                                             axis=[rkf, rks]), name="acc")

    def out(b, c):
        terms, consts = [(acc[b, c // BLOCK, c % BLOCK], mult[c])], [(bias[c], mult[c])]
        if residual:
            r, rm = residual
            terms.append((r[b, c].astype("int32"), rm[c]))
            consts.append((tir.const(-int(residual_zero_point), "int32"), rm[c]))
        return requant_expr(terms, shift[c], output_zero_point, lo, hi, const_terms=consts)

    return te.compute((n, o_out), out, name="out",
                      attrs={KERNEL_ATTR: f"dense_{layout}", **_packed_attrs(bits, ubsw_exact, layout)})


# ----------------------------------------------------------------------------------------------------------------------
# ops between convs, same blocked layout


def maxpool2d_nchwc(x: te.Tensor, kernel=(3, 3), stride=(2, 2), padding=(0, 0), dilation=(1, 1),
                    padding_end=(0, 0)) -> te.Tensor:
    """Max pool over uint8 blocked activations; padding value 0 (below every uint8 value); ``padding_end`` extra
    rows/columns at the bottom/right (PyTorch's ceil_mode)."""
    kernel, stride, padding, dilation = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    n, cb, h, wd, c = _shape(x)
    eh, ew = _pair(padding_end)
    oh, ow = _out_hw(h + eh, wd + ew, kernel, stride, padding, dilation)
    ph, pw = padding
    rkh = te.reduce_axis((0, kernel[0]), "rkh")
    rkw = te.reduce_axis((0, kernel[1]), "rkw")

    def f(b, k, i, j, ci):
        y = i * stride[0] + rkh * dilation[0] - ph
        xx = j * stride[1] + rkw * dilation[1] - pw
        inside = tir.all(y >= 0, y < h, xx >= 0, xx < wd)
        return te.max(tir.if_then_else(inside, x[b, k, y, xx, ci], tir.const(0, "uint8")), axis=[rkh, rkw])

    return te.compute((n, cb, oh, ow, c), f, name="out", attrs={KERNEL_ATTR: "pool_nchwc"})


def avgpool2d_nchwc_requant(x: te.Tensor, mult: te.Tensor, shift: te.Tensor, kernel=(2, 2), stride=(2, 2),
                            padding=(0, 0), input_zero_point: int = 0, output_zero_point: int = 0, lo: int = 0,
                            hi: int = 255) -> te.Tensor:
    """Average pool: acc = sum_window(x_pad) - z_in*KH*KW (x_pad padded with z_in, int32), then requant with the
    per-channel (mult, shift) (1/(KH*KW) folded into mult)."""
    kernel, stride, padding = _pair(kernel), _pair(stride), _pair(padding)
    n, cb, h, wd, c = _shape(x)
    oh, ow = _out_hw(h, wd, kernel, stride, padding, (1, 1))
    ph, pw = padding
    z = int(input_zero_point)
    rkh = te.reduce_axis((0, kernel[0]), "rkh")
    rkw = te.reduce_axis((0, kernel[1]), "rkw")

    def f(b, k, i, j, ci):
        y, xx = i * stride[0] + rkh - ph, j * stride[1] + rkw - pw
        inside = tir.all(y >= 0, y < h, xx >= 0, xx < wd)
        return te.sum(tir.if_then_else(inside, x[b, k, y, xx, ci], tir.const(z, "uint8")).astype("int32"),
                      axis=[rkh, rkw])

    acc = te.compute((n, cb, oh, ow, c), f, name="acc")
    kk = z * kernel[0] * kernel[1]
    return te.compute(
        (n, cb, oh, ow, c),
        lambda b, k, i, j, ci: requant_expr([(acc[b, k, i, j, ci] - kk, mult[k * c + ci])], shift[k * c + ci],
                                            output_zero_point, lo, hi),
        name="out", attrs={KERNEL_ATTR: "pool_nchwc"})


def global_avgpool_nchwc_requant(x: te.Tensor, mult: te.Tensor, shift: te.Tensor, input_zero_point: int = 0,
                                 output_zero_point: int = 0, lo: int = 0, hi: int = 255) -> te.Tensor:
    """(N, CB, H, W, c) -> (N, CB, 1, 1, c): acc = sum_{h,w} (x - z_in) (int32), then requant per channel."""
    n, cb, h, wd, c = _shape(x)
    z = int(input_zero_point)
    rh = te.reduce_axis((0, h), "rh")
    rw = te.reduce_axis((0, wd), "rw")
    acc = te.compute((n, cb, c), lambda b, k, ci: te.sum(x[b, k, rh, rw, ci].astype("int32"), axis=[rh, rw]),
                     name="acc")
    return te.compute(
        (n, cb, 1, 1, c),
        lambda b, k, i, j, ci: requant_expr([(acc[b, k, ci] - z * h * wd, mult[k * c + ci])], shift[k * c + ci],
                                            output_zero_point, lo, hi),
        name="out", attrs={KERNEL_ATTR: "gap_nchwc"})


def add_requant_nchwc(a: te.Tensor, b: te.Tensor, ma: te.Tensor, mb: te.Tensor, shift: te.Tensor,
                      zero_points=(0, 0), output_zero_point: int = 0, lo: int = 0, hi: int = 255) -> te.Tensor:
    """out = clamp(z + ((int64(a-za)*ma + int64(b-zb)*mb + (1 << (sh-1))) >> sh), lo, hi), per channel."""
    za, zb = (int(v) for v in zero_points)
    c = _shape(a)[-1]

    def f(bb, k, i, j, ci):
        ch = k * c + ci
        return requant_expr([(a[bb, k, i, j, ci].astype("int32") - za, ma[ch]),
                             (b[bb, k, i, j, ci].astype("int32") - zb, mb[ch])], shift[ch], output_zero_point, lo, hi)

    return te.compute(_shape(a), f, name="out", attrs={KERNEL_ATTR: "eltwise_nchwc"})


def clamp_nchwc(x: te.Tensor, lo: int = 0, hi: int = 255) -> te.Tensor:
    return te.compute(_shape(x), lambda *i: tir.max(tir.min(x[i], tir.const(int(hi), "uint8")),
                                                    tir.const(int(lo), "uint8")),
                      name="out", attrs={KERNEL_ATTR: "eltwise_nchwc"})


def mul_requant_nchwc(a: te.Tensor, b: te.Tensor, mult: te.Tensor, shift: te.Tensor, zero_points=(0, 0),
                      output_zero_point: int = 0, lo: int = 0, hi: int = 255,
                      one_channel: tuple[bool, bool] = (False, False)) -> te.Tensor:
    """out = clamp(z + RHU((a - za) * (b - zb) * m, sh), lo, hi) per channel; a size-1 H or W broadcasts
    (squeeze-excitation: (N, CB, 1, 1, c) x (N, CB, H, W, c)). ``one_channel[i]``: input i holds one real channel
    (its other lanes are padding) that broadcasts over every channel (a spatial gate: (N, 1, H, W) x (N, C, H, W));
    its blocked shape alone cannot say so when C <= c."""
    za, zb = (int(v) for v in zero_points)
    sa, sb = _shape(a), _shape(b)
    shape = tuple(max(u, v) for u, v in zip(sa, sb))
    c = shape[-1]

    def at(t, st, i):
        lane_broadcast = one_channel[0] if t is a else one_channel[1]
        return t[tuple(0 if (st[d] == 1 and shape[d] != 1) or (lane_broadcast and d in (1, 4)) else i[d]
                       for d in range(5))]

    def f(*i):
        ch = i[1] * c + i[4]
        prod = (at(a, sa, i).astype("int32") - za) * (at(b, sb, i).astype("int32") - zb)
        return requant_expr([(prod, mult[ch])], shift[ch], output_zero_point, lo, hi)

    return te.compute(shape, f, name="out", attrs={KERNEL_ATTR: "eltwise_nchwc"})


def lut_nchwc(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    """out = table[x] (uint8 table of 2^bits entries; codes of padding channels are clamped into it)."""
    size = int(table.shape[0])
    return te.compute(_shape(x), lambda *i: table[tir.min(x[i].astype("int32"), size - 1)], name="out",
                      attrs={KERNEL_ATTR: "eltwise_nchwc"})


def concat_requant_nchwc(xs, channels, multipliers, shifts, zero_points, output_zero_point: int = 0, lo: int = 0,
                         hi: int = 255) -> te.Tensor:
    """Channel concatenation of blocked tensors holding ``channels[i]`` real channels each; input i requantized by
    (multipliers[i], shifts[i]) onto the output grid. Output padding channels repeat the last input's last
    channel."""
    n, _, h, wd, c = _shape(xs[0])
    total = sum(int(v) for v in channels)
    cb = -(-total // c)

    def f(b, k, i, j, ci):
        ch = k * c + ci
        val = None
        off = 0
        for idx in range(len(xs)):    # nested selects: the last input whose first channel <= ch wins
            ck = int(channels[idx])
            cc = tir.min(tir.max(ch - off, 0), ck - 1)
            term = requant_expr([(xs[idx][b, cc // c, i, j, cc % c].astype("int32") - int(zero_points[idx]),
                                  tir.const(int(multipliers[idx]), "int32"))], tir.const(int(shifts[idx]), "int32"),
                                output_zero_point, lo, hi)
            val = term if val is None else tir.if_then_else(ch >= off, term, val)
            off += ck
        return val

    return te.compute((n, cb, h, wd, c), f, name="out", attrs={KERNEL_ATTR: "eltwise_nchwc"})


def upsample_nearest_nchwc(x: te.Tensor, scale=(2, 2)) -> te.Tensor:
    """Nearest upsampling by integer factors in the blocked layout."""
    sh, sw = _pair(scale)
    n, cb, h, wd, c = _shape(x)
    return te.compute((n, cb, h * sh, wd * sw, c), lambda b, k, i, j, ci: x[b, k, i // sh, j // sw, ci], name="out",
                      attrs={KERNEL_ATTR: "eltwise_nchwc"})


def quantize_expr(v: tir.PrimExpr, scale: float, zero_point: int, qmax: int = 255, lanes: int = 1) -> tir.PrimExpr:
    """uint8 (or uint8 x ``lanes``) of float32 ``v`` exactly as ``QTensor.quantize`` in numpy: ``clip(rint(v / scale)
    + zero_point, 0, qmax)``, IEEE float32 division (not a reciprocal multiply) and round half to even
    (``nearbyint``). Used by :func:`quantize_input` and :func:`kernels.quantize_checked.quantize_checked_primfunc`."""
    consts = (tir.const(float(np.float32(scale)), "float32"), tir.const(float(zero_point), "float32"),
              tir.const(0.0, "float32"), tir.const(float(qmax), "float32"))
    s, z, lo, hi = (c if lanes == 1 else tir.Broadcast(c, lanes) for c in consts)
    return tir.max(tir.min(tir.nearbyint(v / s) + z, hi), lo).astype("uint8" if lanes == 1 else f"uint8x{lanes}")


def quantize_input(x: te.Tensor, scale: float, zero_point: int, qmax: int = 255) -> te.Tensor:
    """float32 -> uint8 exactly as ``QTensor.quantize`` (:func:`quantize_expr`)."""
    return te.compute(_shape(x), lambda *i: quantize_expr(x[i], scale, zero_point, qmax), name="out",
                      attrs={KERNEL_ATTR: "eltwise_nchwc"})


def nchw_to_nchwc(x: te.Tensor, block: int = BLOCK, pad_value: int = 0) -> te.Tensor:
    """(N, C, H, W) -> (N, ceil(C/block), H, W, block); padding channels = ``pad_value``."""
    n, c, h, w = _shape(x)
    cb = -(-c // block)

    def f(b, k, i, j, ci):
        ch = k * block + ci
        if cb * block == c:
            return x[b, ch, i, j]
        return tir.if_then_else(ch < c, x[b, tir.min(ch, c - 1), i, j], tir.const(int(pad_value), x.dtype))

    return te.compute((n, cb, h, w, block), f, name="out", attrs={KERNEL_ATTR: "to_nchwc"})


def nchwc_to_nchw(x: te.Tensor, channels: int | None = None) -> te.Tensor:
    """(N, CB, H, W, c) -> (N, channels, H, W)."""
    n, cb, h, w, c = _shape(x)
    ch = channels or cb * c
    return te.compute((n, ch, h, w), lambda b, k, i, j: x[b, k // c, i, j, k % c], name="out",
                      attrs={KERNEL_ATTR: "to_nchw"})


def nchwc_flatten(x: te.Tensor, channels: int | None = None) -> te.Tensor:
    """(N, CB, 1, 1, c) -> (N, channels): the dense input after global pooling (channels default CB*c)."""
    n, cb, h, w, c = _shape(x)
    if h != 1 or w != 1:
        raise ValueError(f"nchwc_flatten needs H = W = 1, got {h}x{w}")
    ch = channels or cb * c
    return te.compute((n, ch), lambda b, k: x[b, k // c, 0, 0, k % c], name="out",
                      attrs={KERNEL_ATTR: "to_nchw"})



# ----------------------------------------------------------------------------------------------------------------------
# first conv on few-channel input: "rows" layout


def rows_layout(in_channels: int, height: int, width: int, kernel=(7, 7), stride=(2, 2), padding=(3, 3),
                left: int = 16) -> dict:
    """Geometry of the row layout used by the first conv (see :func:`nchw_to_rows`)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    c = int(in_channels)
    if left < pw or left % 16:
        raise ValueError(f"left margin must be a multiple of 16 >= padding ({pw}), got {left}")
    groups = -(-(kw * c) // 4)
    ow = (width + 2 * pw - kw) // sw + 1
    last = (ow - 1) * sw + left - pw + -(-(groups * 4) // c)       # one past the last pixel column read
    wa = -(-max(left + width + pw, last) // 16) * 16
    return dict(channels=c, height=height, width=width, rows=height + 2 * ph, row_pixels=wa, left=left,
                groups=groups, out_width=ow)


def nchw_to_rows(x: te.Tensor, kernel=(7, 7), stride=(2, 2), padding=(3, 3), pad_value: int = 0,
                 left: int = 16) -> te.Tensor:
    """Network input NCHW uint8 (N, C, H, W) with few channels (1-4) -> padded interleaved rows
    (N, H + 2ph, Wa * C): row ``r``, byte ``k`` holds channel ``k % C`` of pixel column ``k // C - left`` of input row
    ``r - ph`` (``pad_value`` outside the image). The interior starts at pixel column ``left`` (a multiple of 16), so
    with W % 16 == 0 every 16-pixel chunk is all image or all padding and the copy vectorizes.

    In this layout the ``KW * C`` input bytes under one kernel row are contiguous, so the first conv reduces over
    ceil(KW*C/4) groups of 4 bytes per kernel row (:func:`conv2d_rows_requant`): 7 x 6 = 42 vpdpbusd per 16 outputs
    for ResNet's 7x7 RGB stem instead of 7 x 7 = 49 in NCHW4c (3 channels padded to 4).
    """
    n, c, h, w = _shape(x)
    g = rows_layout(c, h, w, kernel, stride, padding, left)
    ph = _pair(padding)[0]
    zero = tir.const(int(pad_value), x.dtype)
    if w % 16 == 0:
        # per-16-pixel-chunk column mask in a buffer: the test stays uniform over a vectorized chunk (a closed-form
        # test on the byte index would be simplified into a per-lane comparison and scalarize the copy)
        nch = g["row_pixels"] // 16
        mask = te.compute((nch,), lambda q: tir.if_then_else(tir.all(q >= left // 16, q < (left + w) // 16),
                                                              tir.const(1, "uint8"), tir.const(0, "uint8")),
                          name="colmask")

        def cols(j):
            return mask[j // 16] != tir.const(0, "uint8")
    else:
        def cols(j):
            return tir.all(j >= left, j < left + w)

    def f(b, r, k):
        j = k // c
        inside = tir.all(r >= ph, r < h + ph, cols(j))
        return tir.if_then_else(inside, x[b, k % c, r - ph, j - left], zero)

    return te.compute((n, g["rows"], g["row_pixels"] * c), f, name="out",
                      attrs={KERNEL_ATTR: "to_rows", "channels": c})


def conv2d_rows_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor,
                        *residual: te.Tensor, in_channels: int, in_width: int, kernel=(7, 7), stride=(2, 2),
                        padding=(3, 3), dilation=(1, 1), input_zero_point: int = 0, output_zero_point: int = 0,
                        lo: int = 0, hi: int = 255, residual_zero_point: int = 0, left: int = 16,
                        isa: str = "vnni", ubsw_exact: bool = False, shift_ge32: bool = False) -> te.Tensor:
    """First conv, reading the row layout of :func:`nchw_to_rows` (padding already applied there). ``shift_ge32``
    as in :func:`conv2d_nchwc_requant`.

    x      uint8 (N, H + 2ph, Wa * C)
    w      :func:`kernels.pack_rows_weight` output, i.e. (O/16, 1, KH, 1, G, 16, 4) int8 with G = ceil(KW*C/4)
    returns uint8 (N, O/16, OH, OW, 16), same epilogue as :func:`conv2d_nchwc_requant`.

    acc[n, o, oh, ow] = sum_{kh, g, e} x[n, oh*sh + kh*dh, (ow*sw + left - pw)*C + 4g + e] * w_rows[o, kh, 4g + e]
    where byte ``4g + e`` of the kernel row is (kw, c) = divmod(4g + e, C) (zero weight past KW*C).
    ``input_zero_point`` is informational here (the row layout carries the padding). ``ubsw_exact`` as in
    :func:`conv2d_nchwc_requant`.
    """
    del input_zero_point
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    if dw != 1:
        raise ValueError("conv2d_rows_requant does not support width dilation")
    n, rows, rowbytes = _shape(x)
    c = int(in_channels)
    g = rows_layout(c, rows - 2 * ph, in_width, kernel, stride, padding, left)
    if rowbytes != g["row_pixels"] * c or rows != g["rows"]:
        raise ValueError(f"row tensor {_shape(x)} does not match the layout {g}")
    layout, bits = _weight_format(w, isa)
    ws = _shape(w)
    ob = ws[0]
    if ws[1:5] != (1, kh, 1, g["groups"]):
        raise ValueError(f"weight {ws} is not packed for rows (expect (O/16, 1, {kh}, 1, {g['groups']}, ...))")
    oh = (rows - dh * (kh - 1) - 1) // sh + 1
    ow = g["out_width"]
    wt = _unpack_weight(w, layout, ws[:5], bits) if bits < 8 else w
    ric = te.reduce_axis((0, 1), "ric")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, 1), "rkw")
    rcf = te.reduce_axis((0, g["groups"]), "rcf")
    rcs = te.reduce_axis((0, 4), "rcs")
    off = (left - pw) * c

    def xin(b, i, j):
        return x[b, i * sh + rkh * dh + ric, (j * sw) * c + off + (rkw + rcf) * 4 + rcs].astype("int32")

    wv = _packed_weight(wt, layout, ric, rkh, rkw, rcf, rcs)

    acc = te.compute((n, ob, oh, ow, BLOCK),
                     lambda b, o, i, j, oc: te.sum(xin(b, i, j) * wv(o, oc), axis=[ric, rkh, rkw, rcf, rcs]),
                     name="acc")
    return _requant_out(acc, bias, mult, shift, residual, output_zero_point, lo, hi, residual_zero_point,
                        f"conv2d_nchwc_{layout}",
                        _packed_attrs(bits, ubsw_exact, layout), shift_ge32=shift_ge32)
