"""Blocked layouts and compile-time (numpy) weight packing.

Activation layout ``NCHW[c]c`` ("blocked"): a uint8 tensor ``(N, C/c, H, W, c)`` holding channel ``k`` of pixel
``(h, w)`` at ``[n, k // c, h, w, k % c]``. Channels are padded up to a multiple of ``c``; the padding channels hold
the tensor's zero point (or anything: every weight that reads them is zero). The network uses ``c = 16``
(:data:`BLOCK`) everywhere except the network input, which uses ``c = 4`` (:data:`FIRST_BLOCK`, e.g. RGB 3 -> 4).

Conv weights (OIHW int8, groups ``g``) are packed once, at compile time, for the 16-output-channel x 4-input-channel
dot product of :mod:`kernels.intrin`:

* ``isa="vnni"``:  ``(O/16, Cg/icb, KH, KW, icb/4, 16, 4)``  -- ``[ob, icb, kh, kw, cf, oci, ics]`` holds
  ``w[ob*16 + oci, icb*icb_size + cf*4 + ics, kh, kw]``.
* ``isa="avx2"``:  ``(O/16, Cg/icb, KH, KW, icb/4, 2, 16, 2)`` -- ``[..., cf, p, oci, j]`` holds input channel
  ``cf*4 + 2p + j`` (pairs for ``vpmaddwd``).
* ``int4=True`` (values must lie in [-8, 7]): the 64 weights of each ``[16, 4]`` (vnni) or ``[2, 16, 2]`` (avx2)
  block, flattened in that order to ``e[0..63]``, are stored in 32 bytes: ``byte[j] = (e[j] & 15) | (e[j+32] << 4)``,
  shape ``(O/16, Cg/icb, KH, KW, icb/4, 32)`` uint8. The kernel unpacks them (sign-extending each nibble) into a
  small int8 tile right before use.
* ``int2=True`` (values must lie in [-2, 1]): the same 64 weights in 16 bytes, four 2-bit fields per byte:
  ``byte[j] = sum_k (e[j + 16k] & 3) << 2k`` (k = 0..3), shape ``(O/16, Cg/icb, KH, KW, icb/4, 16)`` uint8; the kernel
  sign-extends each field (``(f ^ 2) - 2``). The x86 backend uses it only on AVX2 targets and for CUDA (the paths
  tested bit-exact on an AVX2 host, CUDA in emulation); AVX-512 VNNI / AVX-VNNI targets keep 2-bit weights in int4.
* depthwise (``groups == C == O``): ``(C/16, KH, KW, 16)`` int8, ``[cb, kh, kw, ci]`` = ``w[cb*16 + ci, 0, kh, kw]``.
* grouped convs whose per-group channel counts are multiples of the blocks (``O/g % 16 == 0``, ``C/g % icb == 0``)
  keep the group structure (``Cg/icb`` input blocks per output block, offset by the group); every other grouping
  (e.g. depthwise with a channel multiplier) is expanded to an equivalent dense block-diagonal weight (exact, slower).

Output channels are padded to a multiple of 16 with zero weights; :func:`pack_channel_params` pads the per-channel
int32 arrays to match (bias 0, multiplier 0, shift 1: the padding channels output ``clamp(z_out, lo, hi)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK = 16        # channel block of activations inside the network (= output-channel lanes of the dot product)
FIRST_BLOCK = 4   # channel block of the network input (3 -> 4 channels)
ISAS = ("vnni", "avx2")


def _ceil_to(v: int, m: int) -> int:
    return -(-v // m) * m


def conv_weight_mode(out_channels: int, in_channels: int, groups: int, ic_block: int = BLOCK,
                     oc_block: int = BLOCK) -> str:
    """How a conv with these channel counts is packed: 'dense', 'grouped', 'depthwise' or 'expanded'."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
    if groups == 1:
        return "dense"
    if groups == in_channels == out_channels and ic_block == oc_block:
        return "depthwise"
    if (out_channels // groups) % oc_block == 0 and (in_channels // groups) % ic_block == 0:
        return "grouped"
    return "expanded"


def _check_blocks(ic_block: int, oc_block: int, isa: str) -> None:
    if oc_block != BLOCK:
        raise ValueError(f"oc_block must be {BLOCK} (the 16 int32 lanes of one zmm accumulator), got {oc_block}")
    if ic_block % 4 or ic_block <= 0:
        raise ValueError(f"ic_block must be a positive multiple of 4, got {ic_block}")
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")


#: (lowest, highest) integer weight of each storage: int8, int4 (two per byte), int2 (four per byte)
WEIGHT_RANGES = {8: (-128, 127), 4: (-8, 7), 2: (-2, 1)}


def _storage_bits(int4: bool, int2: bool) -> int:
    if int4 and int2:
        raise ValueError("int4 and int2 packing are exclusive: pass one of them")
    return 2 if int2 else 4 if int4 else 8


def _check_range(w: np.ndarray, bits: int, what: str = "weights") -> None:
    lo, hi = WEIGHT_RANGES[bits]
    if w.size and (w.min() < lo or w.max() > hi):
        bad = int(w.min()) if w.min() < lo else int(w.max())
        raise ValueError(f"{what} hold {bad}, outside [{lo}, {hi}]: they cannot be packed as int{bits}")


def _pack_nibbles(blocks: np.ndarray) -> np.ndarray:
    """(..., 64) int8 in [-8, 7] -> (..., 32) uint8, byte j = e[j] & 15 | e[j+32] << 4."""
    e = blocks.astype(np.int16) & 15
    return (e[..., :32] | (e[..., 32:] << 4)).astype(np.uint8)


def _pack_crumbs(blocks: np.ndarray) -> np.ndarray:
    """(..., 64) int8 in [-2, 1] -> (..., 16) uint8, byte j = sum_k (e[j + 16k] & 3) << 2k."""
    e = blocks.astype(np.int16) & 3
    return (e[..., :16] | (e[..., 16:32] << 2) | (e[..., 32:48] << 4) | (e[..., 48:] << 6)).astype(np.uint8)


def _pack_dense_core(w: np.ndarray, ic_block: int, isa: str, bits: int) -> np.ndarray:
    """w: (Opad, Cpad, KH, KW) int8 with Opad % 16 == 0 and Cpad % ic_block == 0."""
    o, c, kh, kw = w.shape
    ob, cb, cf = o // BLOCK, c // ic_block, ic_block // 4
    t = w.reshape(ob, BLOCK, cb, cf, 4, kh, kw)
    if isa == "vnni":
        p = t.transpose(0, 2, 5, 6, 3, 1, 4)                      # ob, cb, kh, kw, cf, oci, ics
    else:
        p = t.reshape(ob, BLOCK, cb, cf, 2, 2, kh, kw).transpose(0, 2, 6, 7, 3, 4, 1, 5)  # ..., cf, p, oci, j
    p = np.ascontiguousarray(p, dtype=np.int8)
    if bits == 4:
        p = _pack_nibbles(p.reshape(ob, cb, kh, kw, cf, 64))
    elif bits == 2:
        p = _pack_crumbs(p.reshape(ob, cb, kh, kw, cf, 64))
    return np.ascontiguousarray(p)


def pack_conv_weight(w_oihw: np.ndarray, groups: int = 1, ic_block: int = BLOCK, oc_block: int = BLOCK,
                     isa: str = "vnni", int4: bool = False, int2: bool = False) -> np.ndarray:
    """Pack an OIHW int8 conv weight for :func:`kernels.conv2d_nchwc_requant` (see the module docstring).

    ``ic_block`` is the channel block of the conv's *input* activation (16 inside the network, 4 for the first conv);
    the input channels are zero-padded up to a multiple of it. Values must be int8, in [-8, 7] with ``int4=True``
    (two per byte) or in [-2, 1] with ``int2=True`` (four per byte); ValueError names the offending value otherwise.
    """
    _check_blocks(ic_block, oc_block, isa)
    bits = _storage_bits(int4, int2)
    w = np.asarray(w_oihw)
    if w.ndim != 4:
        raise ValueError(f"expected an OIHW weight, got shape {w.shape}")
    _check_range(w, bits, f"conv weights {tuple(w.shape)}")
    o, cg, kh, kw = w.shape
    c = cg * groups
    mode = conv_weight_mode(o, c, groups, ic_block, oc_block)
    if mode == "depthwise":
        if bits < 8:
            raise ValueError(f"int{bits} packing is not supported for depthwise convs (they do not use the dot "
                             "product)")
        cpad = _ceil_to(c, BLOCK)
        full = np.zeros((cpad, kh, kw), np.int8)
        full[:c] = w[:, 0]
        return np.ascontiguousarray(full.reshape(cpad // BLOCK, BLOCK, kh, kw).transpose(0, 2, 3, 1))
    if mode == "expanded":
        og = o // groups
        full = np.zeros((o, c, kh, kw), np.int8)
        for g in range(groups):
            full[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
        w, cg = full, c
    opad, cpad = _ceil_to(o, BLOCK), _ceil_to(cg, ic_block)
    padded = np.zeros((opad, cpad, kh, kw), np.int8)
    padded[:o, :cg] = w
    return _pack_dense_core(padded, ic_block, isa, bits)


def u8s8_pairs_exact(packed: np.ndarray, amax: int = 255) -> bool:
    """True when ``vpmaddubsw`` is exact for a VNNI-layout packed weight (``[..., 16, 4]`` int8, or its int4 /
    int2 forms ``[..., 32]`` / ``[..., 16]`` uint8) and uint8 activations in ``[0, amax]``: for every pair of
    adjacent input channels (the pairs vpmaddubsw sums, ``(0, 1)`` and ``(2, 3)`` of each 4) ``amax * (max(w0,0) + max(w1,0)) <= 32767`` and
    ``amax * (min(w0,0) + min(w1,0)) >= -32768``, so no int16 pair sum saturates. (Intel SDM, PMADDUBSW.)"""
    p = _vnni_int8(packed)
    if p.dtype != np.int8 or p.shape[-1] not in (4, 64):
        raise ValueError(f"expected a VNNI-layout int8 weight [..., 16, 4], int4 [..., 32] or int2 [..., 16], got "
                         f"{p.dtype} {p.shape}")
    return _sums_fit_int16(p.reshape(-1, 2), (1,), amax)


def _vnni_int8(packed: np.ndarray) -> np.ndarray:
    """A VNNI-layout packed weight as int8 values: int4 (``[..., 32]`` uint8) and int2 (``[..., 16]`` uint8)
    storage unpacked to ``[..., 64]``; anything else returned as it is (the callers check the shape)."""
    p = np.asarray(packed)
    if p.dtype == np.uint8:
        p = unpack_int4(p) if p.shape[-1] == 32 else unpack_int2(p) if p.shape[-1] == 16 else p
    return p


def _sums_fit_int16(w: np.ndarray, axes: tuple[int, ...], amax: int) -> bool:
    """True when, for inputs in ``[0, amax]``, every sum of ``w`` over ``axes`` (one per index of the other axes)
    stays inside int16: ``amax * (sum of its positive weights) <= 32767`` and ``amax * (sum of its negative weights)
    >= -32768``; every partial sum of the same terms then does too. True for an empty ``w``."""
    w = np.asarray(w, dtype=np.int64)
    pos = np.maximum(w, 0).sum(axis=axes).max(initial=0)
    neg = np.minimum(w, 0).sum(axis=axes).min(initial=0)
    return int(amax) * int(pos) <= 32767 and int(amax) * int(neg) >= -32768


def u8s8_int16_group(packed: np.ndarray, amax: int = 255) -> int:
    """How many input blocks of a VNNI-packed conv weight an int16 ``vpmaddubsw`` accumulator may sum before it is
    widened to int32 (:func:`kernels.conv2d_nchwc_requant` ``i16_group``), or 0 when not even one block is safe.

    ``packed``: ``[OB, CBG, KH, KW, CF, 16, 4]`` int8 (or its int4 / int2 forms ending in 32 / 16 uint8). For a
    group of ``g`` consecutive input blocks (of ``4*CF`` channels) and every output channel, the accumulated value
    lies in ``[-amax * N, amax * P]`` with ``P`` / ``N`` the sums of the channel's positive / negative weights over
    the group (activations are in ``[0, amax]``), and so does every pair sum ``vpmaddubsw`` forms. When
    ``amax * P <= 32767`` and ``amax * N <= 32768`` nothing saturates and the wrapping int16 adds (``vpaddw``) give
    the exact sum. Returns the largest ``g`` dividing ``CBG`` that holds for every group and channel. (Intel SDM,
    PMADDUBSW / PADDW.)
    Raises ValueError for another shape."""
    p = _vnni_int8(packed)
    if np.asarray(packed).dtype == np.uint8 and p.shape[-1] == 4 * BLOCK:      # unpacked int4 / int2 storage
        p = p.reshape(*p.shape[:-1], BLOCK, 4)
    if p.dtype != np.int8 or p.ndim != 7 or p.shape[-2:] != (BLOCK, 4):
        raise ValueError(f"expected a VNNI-layout conv weight [OB, CBG, KH, KW, CF, 16, 4] int8 (or int4 / int2 "
                         f"packed), got {p.dtype} {p.shape}")
    ob, cbg = p.shape[:2]
    for g in sorted((d for d in range(1, cbg + 1) if cbg % d == 0), reverse=True):
        # [ob, group, (g, kh, kw, cf), lane, 4]: one sum per (ob, group, lane)
        if _sums_fit_int16(p.reshape(ob, cbg // g, -1, BLOCK, 4), (2, 4), amax):
            return g
    return 0


def depthwise_int16_exact(packed: np.ndarray, amax: int = 255) -> bool:
    """True when a depthwise conv (packed ``(CB, KH, KW, 16)`` int8, :func:`pack_conv_weight`) can multiply and sum
    its taps in int16 for uint8 inputs in ``[0, amax]``: every product fits (``|a * w| <= 255 * 128``) and, per
    channel, ``amax * P <= 32767`` and ``amax * N <= 32768`` with ``P`` / ``N`` the sums of its positive / negative
    tap weights (so every partial sum does too). Always true for <= 4-bit inputs with 3x3 int8 weights
    (15 * 9 * 128 < 32767). Raises ValueError for another shape."""
    w = np.asarray(packed)
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[-1] != BLOCK:
        raise ValueError(f"expected a packed depthwise weight (CB, KH, KW, 16) int8, got {w.dtype} {w.shape}")
    return _sums_fit_int16(w, (1, 2), amax)


def shifts_allow_int32_epilogue(shift: np.ndarray) -> bool:
    """True when every requant shift of a layer (int32 per output channel, unpadded) is >= 32, so its kernel may use
    the int32-clamp epilogue (:func:`kernels.ops.requant_expr` ``shift_ge32=True``)."""
    s = np.asarray(shift)
    return s.size > 0 and int(s.min()) >= 32


def lifted_epilogue_exact(shift: np.ndarray, lanes: list[tuple[Any, np.ndarray]], const: Any = 0) -> bool:
    """True when the lifted form of the paired epilogue (:func:`kernels.vector_tir.paired_requant16` with a
    :class:`kernels.vector_tir.LiftedShift`: every int32 lane value and the rounding constant shifted left by
    ``k = max(32 - shift, 0)`` before the products) is exact for a layer: for every output channel c, each lane
    value stays in int32 (``bound_t[c] * 2^k < 2^31``) and the lifted int64 sum cannot overflow
    (``(sum_t bound_t[c] * |mult_t[c]| + const[c] + 2^(shift[c] - 1)) * 2^k < 2^63``).

    ``shift``: int32 (C,) requant shifts in [1, 62]; ``lanes``: one (bound, mult) pair per int32 lane value the
    kernel multiplies (:func:`kernels.ops.requant_expr`'s terms as the kernel forms them), ``bound`` (C,) or scalar
    an upper bound on its magnitude over every input the layer can see (a conv's accumulator without its bias:
    :func:`ptq2tvm.fold.bounds.accumulator_range` of a zero bias; a residual's uint8 code: 255), ``mult`` (C,) its
    dyadic multipliers; ``const`` (C,) or scalar: a bound on the magnitude of the rest of the rounding constant
    (``|bias * mult - z_r * mr|``). Exact integers (Python ints), no rounding."""
    s = [int(v) for v in np.asarray(shift).reshape(-1)]
    if not s:
        return False

    def column(v: Any) -> list[int]:
        return [abs(int(x)) for x in np.broadcast_to(np.asarray(v, dtype=object), (len(s),))]

    cols = [(column(b), column(m)) for b, m in lanes]
    rest = column(const)
    for c, sc in enumerate(s):
        if not 1 <= sc <= 62:
            return False
        k = max(32 - sc, 0)
        if any(b[c] << k >= 1 << 31 for b, _ in cols):
            return False
        if (sum(b[c] * m[c] for b, m in cols) + rest[c] + (1 << (sc - 1))) << k >= 1 << 63:
            return False
    return True


def pack_depthwise_taps(w_oihw: np.ndarray) -> np.ndarray:
    """Depthwise weight (C, 1, KH, KW) int8 -> (ceil(C/16), KH, ceil(KW/4), 16, 4) int8 for
    :func:`kernels.depthwise_taps_requant`: ``[cb, kh, g, i, t]`` = ``w[cb*16 + i, 0, kh, 4g + t]``, zero for
    padding channels and for taps beyond KW."""
    w = np.asarray(w_oihw)
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"depthwise weight must be (C, 1, KH, KW), got {w.shape}")
    _check_range(w, 8, f"depthwise weights {tuple(w.shape)}")
    c, _, kh, kw = w.shape
    cpad, g = _ceil_to(c, BLOCK), -(-kw // 4)
    full = np.zeros((cpad, kh, 4 * g), np.int8)
    full[:c, :, :kw] = w[:, 0]
    return np.ascontiguousarray(full.reshape(cpad // BLOCK, BLOCK, kh, g, 4).transpose(0, 2, 3, 1, 4))


def pack_dense_weight(w_ok: np.ndarray, isa: str = "vnni", int4: bool = False, int2: bool = False) -> np.ndarray:
    """Pack a (O, K) int8 linear weight: ``(O/16, K/4, 16, 4)`` (vnni), ``(O/16, K/4, 2, 16, 2)`` (avx2),
    ``(O/16, K/4, 32)`` uint8 (int4: values in [-8, 7]) or ``(O/16, K/4, 16)`` uint8 (int2: values in [-2, 1]).
    O is zero-padded to a multiple of 16 and K to a multiple of 4."""
    _check_blocks(4, BLOCK, isa)
    bits = _storage_bits(int4, int2)
    w = np.asarray(w_ok)
    if w.ndim != 2:
        raise ValueError(f"expected an (O, K) weight, got shape {w.shape}")
    _check_range(w, bits, f"linear weights {tuple(w.shape)}")
    o, k = w.shape
    padded = np.zeros((_ceil_to(o, BLOCK), _ceil_to(k, 4), 1, 1), np.int8)
    padded[:o, :k, 0, 0] = w
    p = _pack_dense_core(padded, 4, isa, bits)        # (ob, k/4, 1, 1, 1, ...)
    return np.ascontiguousarray(p.reshape(p.shape[0], p.shape[1], *p.shape[5:]))


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of the nibble packing: (..., 32) uint8 -> (..., 64) int8 in [-8, 7] (block element order)."""
    p = np.asarray(packed).astype(np.int16)
    lo, hi = p & 15, p >> 4
    e = np.concatenate([lo, hi], axis=-1)
    return ((e ^ 8) - 8).astype(np.int8)


def unpack_int2(packed: np.ndarray) -> np.ndarray:
    """Inverse of the four-per-byte packing: (..., 16) uint8 -> (..., 64) int8 in [-2, 1] (block element order):
    element ``16k + j`` is bits ``2k..2k+1`` of byte j, sign-extended as ``(f ^ 2) - 2``."""
    p = np.asarray(packed).astype(np.int16)
    e = np.concatenate([(p >> (2 * k)) & 3 for k in range(4)], axis=-1)
    return ((e ^ 2) - 2).astype(np.int8)


def pack_channel_params(*arrays: np.ndarray, channels: int | None = None, kinds: str | None = None,
                        block: int = BLOCK) -> list[np.ndarray]:
    """Pad per-output-channel int32 arrays to a multiple of ``block``.

    ``kinds`` names each array's role, one letter each: 'b' bias (pad 0), 'm' multiplier (pad 0), 's' shift (pad 1).
    Default: "bms" for three arrays, "bmsm" for four (bias, mult, shift, residual mult), else all zeros.
    """
    if kinds is None:
        kinds = {3: "bms", 4: "bmsm"}.get(len(arrays), "b" * len(arrays))
    out = []
    for a, k in zip(arrays, kinds):
        a = np.asarray(a, dtype=np.int32).reshape(-1)
        n = _ceil_to(channels or a.size, block)
        p = np.full(n, 1 if k == "s" else 0, np.int32)
        p[:a.size] = a
        out.append(p)
    return out


def nchw_to_nchwc(x: np.ndarray, block: int = BLOCK, pad_value: int = 0) -> np.ndarray:
    """numpy: (N, C, H, W) -> (N, ceil(C/block), H, W, block), padding channels filled with ``pad_value``."""
    n, c, h, w = x.shape
    cpad = _ceil_to(c, block)
    full = np.full((n, cpad, h, w), pad_value, dtype=x.dtype)
    full[:, :c] = x
    return np.ascontiguousarray(full.reshape(n, cpad // block, block, h, w).transpose(0, 1, 3, 4, 2))


def nchwc_to_nchw(x: np.ndarray, channels: int | None = None) -> np.ndarray:
    """numpy: (N, CB, H, W, c) -> (N, channels, H, W)."""
    n, cb, h, w, c = x.shape
    out = x.transpose(0, 1, 4, 2, 3).reshape(n, cb * c, h, w)
    return np.ascontiguousarray(out[:, :channels] if channels is not None else out)



def rows_weight(w_oihw: np.ndarray) -> np.ndarray:
    """OIHW (O, C, KH, KW) -> the equivalent (O, 4G, KH, 1) weight of the row-layout first conv
    (:func:`kernels.conv2d_rows_requant`): input "channel" ``kw*C + c`` (G = ceil(KW*C/4), zero past KW*C)."""
    w = np.asarray(w_oihw)
    o, c, kh, kw = w.shape
    g = -(-(kw * c) // 4)
    out = np.zeros((o, 4 * g, kh, 1), np.int8)
    out[:, :kw * c, :, 0] = w.transpose(0, 3, 1, 2).reshape(o, kw * c, kh)
    return out


def pack_rows_weight(w_oihw: np.ndarray, isa: str = "vnni", int4: bool = False, int2: bool = False) -> np.ndarray:
    """Pack the first conv's OIHW weight for :func:`kernels.conv2d_rows_requant`: (O/16, 1, KH, 1, G, 16, 4) (vnni),
    the avx2 / int4 / int2 variants as in :func:`pack_conv_weight`."""
    wr = rows_weight(w_oihw)
    return pack_conv_weight(wr, 1, ic_block=wr.shape[1], isa=isa, int4=int4, int2=int2)


def nchw_to_rows(x: np.ndarray, kernel=(7, 7), stride=(2, 2), padding=(3, 3), pad_value: int = 0,
                 left: int = 16) -> np.ndarray:
    """numpy twin of :func:`kernels.ops.nchw_to_rows`."""
    from .ops import rows_layout

    n, c, h, w = x.shape
    g = rows_layout(c, h, w, kernel, stride, padding, left)
    ph = padding[0] if not isinstance(padding, int) else padding
    out = np.full((n, g["rows"], g["row_pixels"], c), pad_value, x.dtype)
    out[:, ph:ph + h, left:left + w, :] = x.transpose(0, 2, 3, 1)
    return out.reshape(n, g["rows"], g["row_pixels"] * c)
