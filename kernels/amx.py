"""AMX-INT8 conv kernels: ``tdpbusd`` on tiles, for the blocked NCHW16c layout (Intel Sapphire Rapids and later).

What AMX computes: one ``tdpbusd`` multiplies an A tile (up to 16 rows x 64 bytes, uint8) by a B tile (K/4 rows x
64 bytes: 16 int32 columns x 4 int8, the "VNNI" layout) into a C tile (16 rows x 16 int32), u8 x s8 -> s32 with no
saturation: exactly the integer contract's accumulator (Intel SDM, "Intel AMX instruction set", TDPBUSD).

How a conv maps onto it here, without changing the network's NCHW16c layout or the VNNI weight packing
(:func:`kernels.pack_conv_weight`, ``ic_block=16``):

* A row = one output pixel, its K = the ``KW`` horizontal taps x 16 channels of one input block at one tap row: in
  NCHW16c those are ``KW * 16`` consecutive bytes of the padded input (stride 1, dilation 1), and the next output
  pixel starts 16 bytes later. A tile load takes a row stride, so a 16-pixel A tile is one ``tileloadd`` from the
  padded input with stride 16 bytes (rows overlap). ``KW <= 4`` (K <= 64 bytes).
* B = the packed weight ``w[ob, icb, kh, :, :, :, :]`` of one output block, input block and tap row:
  ``KW * 4`` rows of 64 bytes, exactly the layout ``tdpbusd`` wants.
* Pixels are flattened over the *padded* width ``Wp``: row ``m`` of the M space is output pixel
  ``(m // Wp, m % Wp)`` and reads the padded input at ``m + kh * Wp`` (pixels), so a tile may span output rows;
  columns ``m % Wp >= OW`` are computed and dropped (``Wp - OW = KW - 1`` per output row). The last tile of an image
  starts at ``M - 16`` (overlapping the previous one) so that no tile reads past the padded input.
* Register blocking: 2 M tiles x 2 N tiles (32 pixels x 32 output channels) in the four C tiles, A in tiles 4-5, B in
  6-7; per (input block, tap row) 2 + 2 tile loads feed 4 ``tdpbusd``.
* Epilogue: the C tiles are stored to a per-task int32 buffer and requantized (+ residual) with
  :func:`kernels.ops.requant_expr`, vectorized over 16 output channels: the same expression as every other conv
  kernel, so the outputs are the same integers.

Supported (:func:`amx_conv_supported`): dense convs (groups 1), stride 1, dilation 1, ``KW <= 4``, int8 weights,
input block 16. Every other conv keeps the AVX-512 VNNI kernel. Linux requires a per-process permission for the AMX
tile state before the first tile instruction: :func:`request_amx_permission` (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``, :func:`ptq2tvm.bundle_runner.request_amx_state`, which loading a build does); without it the
process dies of SIGILL at the first tile instruction.
"""

from __future__ import annotations

import os

import tvm
import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .layout import BLOCK

AMX_ENV = "PTQ2TVM_AMX"          # "0": never use AMX kernels (A/B timing; the outputs are the same integers)
AMX_ATTR = "ptq2tvm_amx_conv"    # function attribute of the AMX conv PrimFuncs
M_TILES, N_TILES = 2, 2          # register blocking: 2 x 16 pixels x 2 x 16 output channels
_C_TILE = 0                      # tiles 0..3: accumulators; 4, 5: A (pixels x K); 6, 7: B (K/4 x 16 x 4)
_A_TILE = 4
_B_TILE = 6
_MAX_CHUNKS = 16                 # parallel tasks per call (each takes a contiguous run of tiles)


def target_has_amx(target: tvm.target.Target | None, honour_env: bool = True) -> bool:
    """Whether an LLVM x86 ``target`` has AMX-INT8 (``amx-int8`` and ``amx-tile`` in its CPU features, from its
    ``mcpu`` or ``mattr``) and, with ``honour_env``, ``PTQ2TVM_AMX`` is not ``0``: the builds that use the AMX
    conv kernels."""
    if (honour_env and os.environ.get(AMX_ENV) == "0") or target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.llvm_cpu_has_features(["amx-int8"], target)
                    and codegen.llvm_cpu_has_features(["amx-tile"], target))
    except Exception:   # a target LLVM cannot describe
        return False


def amx_kernel_count(mod: tvm.IRModule) -> int:
    """How many PrimFuncs of ``mod`` are AMX conv kernels (function attribute :data:`AMX_ATTR`)."""
    return sum(1 for _, f in mod.functions.items()
               if isinstance(f, tir.PrimFunc) and f.attrs is not None and AMX_ATTR in f.attrs)


def amx_conv_supported(weight_shape: tuple[int, ...], input_shape: tuple[int, ...], stride: tuple[int, int],
                       dilation: tuple[int, int], weight_dtype: str) -> bool:
    """Whether a conv with this packed weight (``(OB, CB, KH, KW, 4, 16, 4)`` int8, dense: every input block of the
    blocked input ``(N, CB, H, W, 16)``) runs on AMX tiles."""
    if len(weight_shape) != 7 or weight_dtype != "int8" or len(input_shape) != 5 or int(input_shape[4]) != BLOCK \
            or int(weight_shape[1]) != int(input_shape[1]):
        return False
    kw = int(weight_shape[3])
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and 1 <= kw <= 4


def amx_conv_out_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...],
                       padding: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(N, OB, OH, OW, 16) of the AMX conv (stride 1, dilation 1) of a blocked input and a packed weight."""
    n, _, h, w, _ = (int(v) for v in x_shape)
    return (n, int(w_shape[0]), h + 2 * int(padding[0]) - int(w_shape[2]) + 1,
            w + 2 * int(padding[1]) - int(w_shape[3]) + 1, BLOCK)


def _llvm(name: str, *args) -> None:
    T.evaluate(tir.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _u8(v: int) -> tir.PrimExpr:
    return tir.const(v, "uint8")


def amx_conv_primfunc(name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], padding: tuple[int, int],
                      input_zero_point: int, output_zero_point: int, lo: int, hi: int, residual_zero_point: int,
                      residual: bool, shift_ge32: bool = False) -> tir.PrimFunc:
    """The AMX conv + requant (+ residual) PrimFunc ``name(x, w, bias, mult, shift, [r, mr], out)``: the same
    buffers and integers as :func:`kernels.conv2d_nchwc_requant` (stride 1, dilation 1, dense, int8 weights).

    ``x_shape`` (N, CB, H, W, 16) uint8, ``w_shape`` (OB, CB, KH, KW, 4, 16, 4) int8 from
    :func:`kernels.pack_conv_weight` (``ic_block=16``, ``isa="vnni"``); bias / mult / shift (and the residual's
    multiplier) int32 (OB*16,); out (N, OB, OH, OW, 16) uint8. The padded input (when ``padding`` is not 0) and the
    per-task accumulator tiles are allocated once per call. Raises ValueError for any other weight layout or a
    kernel larger than the padded input."""
    from .ops import requant_expr

    n, cb, h, w, icb = (int(v) for v in x_shape)
    ob, cbw, kh, kw, cf, lanes, four = (int(v) for v in w_shape)
    if icb != BLOCK or cf * 4 != icb or lanes != BLOCK or four != 4 or cbw != cb or not 1 <= kw <= 4:
        raise ValueError(f"AMX conv needs a dense int8 weight packed (OB, {cb}, KH, KW<=4, 4, 16, 4) for a 16-channel "
                         f"input block, got weight {w_shape} for input {x_shape}")
    ph, pw = (int(v) for v in padding)
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = hp - kh + 1, wp - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kh}x{kw} larger than the padded input {hp}x{wp}")
    m_valid = (oh - 1) * wp + ow                   # flattened rows up to the last valid output pixel
    rows = min(16, m_valid)                        # tile rows (a tiny image: fewer than 16)
    m_tiles = -(-m_valid // rows)                  # 16-row tiles per image (the last one overlaps)
    mt = M_TILES if m_tiles >= M_TILES else 1
    groups_m = -(-m_tiles // mt)                   # M groups per image
    nt = N_TILES if ob % N_TILES == 0 else 1
    tasks = n * (ob // nt) * groups_m
    chunks = min(tasks, _MAX_CHUNKS)
    per = -(-tasks // chunks)
    z_x = int(input_zero_point)
    kbytes = kw * BLOCK

    def tile_start(mg, i):
        """First flattened row of M tile ``i`` of M group ``mg``: 16 * tile, the last tile clamped to end at M."""
        return tir.min((mg * mt + i) * rows, m_valid - rows)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True, "tirx.is_scheduled": True, AMX_ATTR: 1})
            x = T.arg("x", T.buffer((n, cb, h, w, BLOCK), "uint8"))
            wt = T.arg("w", T.buffer(tuple(int(v) for v in w_shape), "int8"))
            bias = T.arg("bias", T.buffer((ob * BLOCK,), "int32"))
            mult = T.arg("mult", T.buffer((ob * BLOCK,), "int32"))
            shift = T.arg("shift", T.buffer((ob * BLOCK,), "int32"))
            if residual:
                r = T.arg("r", T.buffer((n, ob, oh, ow, BLOCK), "uint8"))
                mr = T.arg("mr", T.buffer((ob * BLOCK,), "int32"))
            out = T.arg("out", T.buffer((n, ob, oh, ow, BLOCK), "uint8"))
            padded = ph or pw
            xp = T.alloc_buffer((n, cb, hp, wp, BLOCK), "uint8") if padded else x
            acc = T.alloc_buffer((chunks, mt * rows, nt * BLOCK), "int32")
            cfg = T.alloc_buffer((64,), "uint8")
            # tile configuration (palette 1): C tiles rows x 64 B, A rows x KW*16 B, B KW*4 x 64 B
            with T.serial(0, 64) as i:
                T.buffer_store(cfg, _u8(0), [i])
            T.buffer_store(cfg, _u8(1), [0])
            colsb = {**{_C_TILE + t: 64 for t in range(4)}, _A_TILE: kbytes, _A_TILE + 1: kbytes,
                     _B_TILE: 64, _B_TILE + 1: 64}
            nrows = {**{_C_TILE + t: rows for t in range(4)}, _A_TILE: rows, _A_TILE + 1: rows,
                     _B_TILE: kw * 4, _B_TILE + 1: kw * 4}
            for t in range(8):
                T.buffer_store(cfg, _u8(colsb[t] & 255), [16 + 2 * t])
                T.buffer_store(cfg, _u8(colsb[t] >> 8), [17 + 2 * t])
                T.buffer_store(cfg, _u8(nrows[t]), [48 + t])
            if padded:
                _pad_stage(x, xp, n, cb, h, w, ph, pw, z_x)
            with T.parallel(0, chunks) as c:
                _llvm("ldtilecfg", tir.address_of(cfg[0]))
                with T.serial(0, tir.min(per, tasks - c * per)) as k:
                    task = c * per + k
                    mg = task % groups_m
                    obp = task // groups_m % (ob // nt)
                    b = task // (groups_m * (ob // nt))
                    for t in range(mt * nt):
                        _llvm("tilezero", _u8(_C_TILE + t))
                    with T.serial(0, cb) as ic:
                        with T.serial(0, kh) as r_:
                            _tap_row_products(xp, wt, b, ic, r_, obp, mg, mt, nt, wp, tile_start)
                    for i in range(mt):
                        for j in range(nt):
                            _llvm("tilestored64", _u8(_C_TILE + i * nt + j),
                                  tir.address_of(acc[c, i * rows, j * BLOCK]),
                                  tir.const(nt * BLOCK * 4, "int64"))
                    # epilogue: requantize the valid rows of each M tile
                    for i in range(mt):
                        with T.serial(0, rows) as p:
                            m = tile_start(mg, i) + p
                            with T.If(m % wp < ow):
                                with T.Then():
                                    _epilogue_row(acc, out, bias, mult, shift,
                                                  (r, mr) if residual else None, c, i * rows + p, b,
                                                  obp, nt, m // wp, m % wp, output_zero_point, lo, hi,
                                                  residual_zero_point, shift_ge32, requant_expr)
                _llvm("tilerelease")
    return ib.get()


def _tap_row_products(xp, wt, b, ic, kh, obp, mg, mt, nt, wp, tile_start) -> None:
    """C[i, j] += A_i x B_j for one input block ``ic`` and tap row ``kh``: ``mt`` A tiles (16 pixels x KW*16 bytes
    of the padded input), ``nt`` B tiles (the packed weight of output block obp*nt + j)."""
    def load_a(i):
        m0 = tile_start(mg, i) + kh * wp
        _llvm("tileloadd64", _u8(_A_TILE + i), tir.address_of(xp[b, ic, m0 // wp, m0 % wp, 0]),
              tir.const(BLOCK, "int64"))

    def load_b(j):
        _llvm("tileloadd64", _u8(_B_TILE + j), tir.address_of(wt[obp * nt + j, ic, kh, 0, 0, 0, 0]),
              tir.const(64, "int64"))

    def dot(i, j):
        _llvm("tdpbusd", _u8(_C_TILE + i * nt + j), _u8(_A_TILE + i), _u8(_B_TILE + j))

    # each product right after the loads it needs (tiles are not renamed: a load waits for the products of the
    # previous step that read the same tile); the order "all loads, then all products" measured the same
    for i in range(mt):
        load_a(i)
        for j in range(nt):
            if i == 0:
                load_b(j)
            dot(i, j)


def _pad_stage(x, xp, n, cb, h, w, ph, pw, z_x) -> None:
    """xp = x padded with the input zero point (parallel over images x input blocks, 16 bytes per pixel)."""
    hp, wp = h + 2 * ph, w + 2 * pw
    with T.parallel(0, n * cb) as t:
        b, ic = t // cb, t % cb
        with T.serial(0, hp) as i:
            with T.serial(0, wp) as j:
                inside = tir.all(i >= ph, i < h + ph, j >= pw, j < w + pw)
                with T.vectorized(0, BLOCK) as ci:
                    T.buffer_store(xp, tir.if_then_else(inside, x[b, ic, tir.min(tir.max(i - ph, 0), h - 1),
                                                                  tir.min(tir.max(j - pw, 0), w - 1), ci],
                                                        tir.const(z_x, "uint8")), [b, ic, i, j, ci])


def _epilogue_row(acc, out, bias, mult, shift, residual, c, row, b, obp, nt, oy, ox, z_out, lo, hi, z_r, shift_ge32,
                  requant_expr) -> None:
    for j in range(nt):
        o = obp * nt + j
        with T.vectorized(0, BLOCK) as oc:
            ch = o * BLOCK + oc
            terms = [(acc[c, row, j * BLOCK + oc], mult[ch])]
            consts = [(bias[ch], mult[ch])]
            if residual is not None:
                r, mr = residual
                terms.append((r[b, o, oy, ox, oc].astype("int32"), mr[ch]))
                consts.append((tir.const(-int(z_r), "int32"), mr[ch]))
            T.buffer_store(out, requant_expr(terms, shift[ch], z_out, lo, hi, const_terms=consts,
                                             shift_ge32=shift_ge32), [b, o, oy, ox, oc])


__all__ = ["AMX_ATTR", "AMX_ENV", "amx_conv_out_shape", "amx_conv_primfunc", "amx_conv_supported", "amx_kernel_count", "target_has_amx"]
