"""AMX-INT8 conv kernels: ``tdpbusd`` on tiles, for the blocked NCHW16c layout (Intel Sapphire Rapids and later).

What AMX computes: one ``tdpbusd`` multiplies an A tile (up to 16 rows x 64 bytes, uint8) by a B tile (K/4 rows x
64 bytes: 16 int32 columns x 4 int8, the "VNNI" layout) into a C tile (16 rows x 16 int32), u8 x s8 -> s32 with no
saturation: exactly the integer contract's accumulator (Intel SDM, "Intel AMX instruction set", TDPBUSD). An A row
is one output pixel; A tiles load with any row stride, so the input is never expanded im2col-style.

Schemes (the network keeps NCHW16c between layers; kernels/README.md "AMX-INT8" has the measurements):

* "c64" (:func:`amx_conv_primfunc`, weight packed with ``ic_block=64``): the pad stage regroups the input into
  64-channel blocks; K = 64 channels of one tap; any stride and kernel size.
* "taps" (:func:`amx_conv_primfunc`, the 16-channel VNNI packing): K = the ``KW <= 4`` horizontal taps x 16
  channels, consecutive bytes in NCHW16c (A rows 16 bytes apart, overlapping); stride 1.
* "rows" (:func:`amx_rows_conv_primfunc`): the first conv (1-4 channels) on the row layout of
  :func:`kernels.ops.nchw_to_rows`; K = ``ceil(KW*C/4)*4`` bytes of one kernel row.

Stride 1 flattens pixels over the padded width (a tile may span output rows; junk columns are computed and dropped),
other strides tile along output rows; the last tile is clamped to end at the last pixel instead of reading past the
input. 2 x 2 C tiles (32 pixels x 32 output channels) per task; the C tiles go through a per-task buffer into the
requant epilogue (:func:`kernels.ops.requant_channel_constants` once per task,
:func:`kernels.vector_tir.paired_requant16` per row or four rows: the integers of :func:`kernels.ops.requant_finish`,
like every other kernel).

Supported (:func:`amx_conv_supported`): dense int8 convs, dilation 1. Linux requires a per-process permission for
the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``,
:func:`ptq2tvm.bundle_runner.request_amx_state`, which loading a build does); without it the process dies of SIGILL
at the first tile instruction.
"""

from __future__ import annotations

import os

import numpy as np

import tvm
import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .layout import BLOCK
from .vector_tir import (EPILOGUE_INT64, EPILOGUE_LIFTED, LIFTED_EPILOGUES, LiftedShift, check_epilogue,
                         check_kernel_args, epilogue_attrs, lift_amount, lift_constant, output_args, pack4_clamp,
                         pad_stage, paired_requant16, requant_args, residual16, split_for_threads,
                         store_paired_constants, unpack_nibbles64)

AMX_ENV = "PTQ2TVM_AMX"          # 0 / false / no / off: never use AMX kernels (A/B timing; same integers)
AMX_ATTR = "ptq2tvm_amx_conv"    # function attribute of the AMX conv PrimFuncs: their scheme, "taps" or "c64"
M_TILES, N_TILES = 2, 2          # register blocking: 2 x 16 pixels x 2 x 16 output channels
_C_TILE = 0                      # tiles 0..3: accumulators; 4, 5: A (pixels x K); 6, 7: B (K/4 x 16 x 4)
_A_TILE = 4
_B_TILE = 6
_MAX_CHUNKS = 16                 # parallel tasks per call (each takes a contiguous run of tiles)
_SPATIAL_MAX_WEIGHT_BYTES = 2 << 20     # one image: pixel-order tasks up to this much weight (int8 bytes)
_SPATIAL_MAX_INT4_BYTES = 160 << 10     # the same for int4 weights of convs wider than 1x1 (unpacked whole first)
_SPATIAL_MIN_INT4_IMAGE_BYTES = 64 << 10   # ... whose input image has at least this many bytes


def target_has_amx(target: tvm.target.Target | None, honour_env: bool = True) -> bool:
    """Whether an LLVM x86 ``target`` has AMX-INT8 (``amx-int8`` and ``amx-tile`` in its CPU features, from its
    ``mcpu`` or ``mattr``, with the GFNI and AVX-512 BW every AMX CPU has) and, with ``honour_env``, ``PTQ2TVM_AMX``
    is not ``0`` / ``false`` / ``no`` / ``off``: the builds that use the AMX conv kernels."""
    off = os.environ.get(AMX_ENV, "").strip().lower() in ("0", "false", "no", "off")
    if (honour_env and off) or target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:        # every AMX CPU also has GFNI and AVX-512 BW (the int4 unpack uses vgf2p8affineqb on zmm)
        return all(codegen.llvm_cpu_has_features([f], target) for f in ("amx-int8", "amx-tile", "gfni", "avx512bw"))
    except Exception:   # a target LLVM cannot describe
        return False


def amx_kernel_count(mod: tvm.IRModule) -> int:
    """How many PrimFuncs of ``mod`` are AMX conv kernels (function attribute :data:`AMX_ATTR`)."""
    return sum(1 for _, f in mod.functions.items()
               if isinstance(f, tir.PrimFunc) and f.attrs is not None and AMX_ATTR in f.attrs)


def amx_conv_supported(weight_shape: tuple[int, ...], input_shape: tuple[int, ...], stride: tuple[int, int],
                       dilation: tuple[int, int], weight_dtype: str) -> bool:
    """Whether a conv with this packed int8 weight runs on AMX tiles (:func:`amx_conv_primfunc`): the input is the
    blocked ``(N, CB, H, W, 16)``, dilation 1, and the weight is dense (every input block) and either
    ``(OB, CB, KH, KW <= 4, 4, 16, 4)`` at stride 1 ("taps") or ``(OB, ceil(CB/4), KH, KW, 16, 16, 4)`` ("c64")."""
    if len(weight_shape) != 7 or weight_dtype != "int8" or len(input_shape) != 5 or int(input_shape[4]) != BLOCK \
            or tuple(dilation) != (1, 1):
        return False
    cb, (cbw, kw, cf) = int(input_shape[1]), (int(weight_shape[i]) for i in (1, 3, 4))
    if cf == 16:
        return cbw == -(-cb // 4)
    return cf == 4 and cbw == cb and tuple(stride) == (1, 1) and 1 <= kw <= 4


def amx_conv_out_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], padding: tuple[int, int],
                       stride: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int, int]:
    """(N, OB, OH, OW, 16) of the AMX conv (dilation 1) of a blocked input and a packed weight."""
    n, _, h, w, _ = (int(v) for v in x_shape)
    return (n, int(w_shape[0]), (h + 2 * int(padding[0]) - int(w_shape[2])) // int(stride[0]) + 1,
            (w + 2 * int(padding[1]) - int(w_shape[3])) // int(stride[1]) + 1, BLOCK)


def amx_rows_out_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], in_channels: int, in_width: int,
                       kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                       left: int = 16) -> tuple[int, int, int, int, int]:
    """(N, OB, OH, OW, 16) of the AMX first conv (:func:`amx_rows_conv_primfunc`) on a row-layout input."""
    from .ops import rows_layout

    n, nrows = int(x_shape[0]), int(x_shape[1])
    g = rows_layout(int(in_channels), nrows - 2 * int(padding[0]), in_width, kernel, stride, padding, left)
    return (n, int(w_shape[0]), (nrows - int(kernel[0])) // int(stride[0]) + 1, g["out_width"], BLOCK)


def _llvm(name: str, *args) -> None:
    T.evaluate(tir.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _u8(v: int) -> tir.PrimExpr:
    return tir.const(v, "uint8")


class _TileGeometry:
    """Which output pixels each 16-row A tile covers and where it reads the padded input.

    Stride 1: pixels flattened over the padded width ``Wp`` (row ``m`` = output pixel ``(m // Wp, m % Wp)``, valid
    when ``m % Wp < OW``; tap ``(kh, kw)`` reads padded pixel ``m + kh * Wp + kw``), so one tile may span output
    rows. Other strides: tiles along one output row (``rows = min(16, OW)`` pixels, ``stride`` pixels apart in the
    input). The last tile (of the image, resp. the row) is clamped to end at the last pixel (it overlaps the
    previous one) instead of reading past the padded input; tile indices past the last repeat it."""

    def __init__(self, oh: int, ow: int, wp: int, stride: tuple[int, int], per_row: bool = False):
        self.stride = stride
        self.flat = stride == (1, 1) and not per_row
        self.wp = wp
        self.oh, self.ow = oh, ow
        if self.flat:
            self.m_valid = (oh - 1) * wp + ow
            self.rows = min(16, self.m_valid)
            self.tiles = -(-self.m_valid // self.rows)
        else:
            self.rows = min(16, ow)
            self.per_row = -(-ow // self.rows)
            self.tiles = oh * self.per_row

    def tap(self, t, kh, kw) -> tuple[tir.PrimExpr, tir.PrimExpr]:
        """(row, column) of the padded input that row 0 of tile ``t`` reads at tap (kh, kw)."""
        if self.flat:
            q = tir.min(t * self.rows, self.m_valid - self.rows) + kh * self.wp + kw
            return q // self.wp, q % self.wp
        y, x0 = self.row_tile(t)
        return y * self.stride[0] + kh, x0 * self.stride[1] + kw

    def row_tile(self, t) -> tuple[tir.PrimExpr, tir.PrimExpr]:
        """(output row, first output column) of tile ``t`` (tiles along output rows)."""
        t = tir.min(t, self.tiles - 1)        # the second tile of an odd count's last group: a repeat
        return t // self.per_row, tir.min(t % self.per_row * self.rows, self.ow - self.rows)

    def pixel(self, t, p) -> tuple[tir.PrimExpr | None, tir.PrimExpr, tir.PrimExpr]:
        """(valid or None when always valid, output row, output column) of row ``p`` of tile ``t``."""
        if self.flat:
            m = tir.min(t * self.rows, self.m_valid - self.rows) + p
            return m % self.wp < self.ow, m // self.wp, m % self.wp
        y, x0 = self.row_tile(t)
        return None, y, x0 + p


def amx_conv_primfunc(name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], padding: tuple[int, int],
                      input_zero_point: int, output_zero_point: int, lo: int, hi: int, residual_zero_point: int,
                      residual: bool, epilogue: str = EPILOGUE_INT64, stride: tuple[int, int] = (1, 1),
                      int4: bool = False, threads: int | None = None) -> tir.PrimFunc:
    """The AMX conv + requant (+ residual) PrimFunc ``name(x, w, bias, mult, shift, [r, mr], out)``: the same
    buffers and integers as :func:`kernels.conv2d_nchwc_requant` (dilation 1, dense weights in [-128, 127]; with
    ``int4`` in [-8, 7], stored two per byte as :func:`pack_amx_int4` and unpacked in the kernel).

    ``x_shape`` (N, CB, H, W, 16) uint8 (the network's NCHW16c); ``w_shape`` selects the scheme:

    * ``(OB, CB, KH, KW, 4, 16, 4)`` (:func:`kernels.pack_conv_weight` ``ic_block=16``): "taps", K = the KW
      horizontal taps x 16 channels of one input block (stride 1, KW <= 4); the pad stage copies NCHW16c.
    * ``(OB, ceil(CB/4), KH, KW, 16, 16, 4)`` (``ic_block=64``): "c64", K = 64 channels of one tap; the pad stage
      also regroups the input into 64-channel blocks (channels past C read as the zero point, their weights are 0);
      any stride.

    ``w_shape`` is the int8 layout; with ``int4`` the ``w`` buffer is its :func:`pack_amx_int4` form
    ``(OB, prod(w_shape[1:]) / 2)`` uint8, unpacked once per output-block pair per parallel chunk (``threads``:
    the threads the build runs on, default this machine's cores; there are >= 2 chunks per thread).

    bias / mult / shift (and the residual's multiplier) int32 (OB*16,); out (N, OB, OH, OW, 16) uint8; ``epilogue``:
    the form of :func:`kernels.vector_tir.paired_requant16` the caller proved for the layer
    (:data:`kernels.vector_tir.EPILOGUES`; "int64" takes any shift). The padded input and the per-task accumulator
    tiles are allocated once per call. Raises ValueError for any other weight layout, a kernel larger than the padded
    input, negative padding, a dimension below 1, a zero point outside [0, 255], a clamp outside
    0 <= lo <= hi <= 255 or an unknown ``epilogue``."""
    _check_amx_args(x_shape, w_shape, padding, input_zero_point, output_zero_point, residual_zero_point, lo, hi)
    n, cb, h, w, icb = (int(v) for v in x_shape)
    ob, cbw, kh, kw, cf, lanes, four = (int(v) for v in w_shape)
    sh, sw = (int(v) for v in stride)
    c64 = cf == 16
    ok = icb == BLOCK and lanes == BLOCK and four == 4 and sh >= 1 and sw >= 1
    ok = ok and ((c64 and cbw == -(-cb // 4)) or (cf == 4 and cbw == cb and 1 <= kw <= 4 and (sh, sw) == (1, 1)))
    if not ok:
        raise ValueError(f"AMX conv needs a dense int8 weight packed (OB, {cb}, KH, KW<=4, 4, 16, 4) (stride 1) or "
                         f"(OB, {-(-cb // 4)}, KH, KW, 16, 16, 4) for a 16-channel input block, got weight {w_shape} "
                         f"for input {x_shape}, stride {stride}")
    ph, pw = (int(v) for v in padding)
    hp, wp = h + 2 * ph, w + 2 * pw
    if hp < kh or wp < kw:
        raise ValueError(f"kernel {kh}x{kw} larger than the padded input {hp}x{wp}")
    _, _, oh, ow, _ = amx_conv_out_shape(x_shape, w_shape, (ph, pw), (sh, sw))
    kblock = 64 if c64 else BLOCK                  # bytes per pixel of the padded copy
    # a strided 1x1 conv without padding: the regrouping copy keeps only the pixels read (every sh-th row, sw-th
    # column), and the conv runs at stride 1 on it
    subsample = c64 and (kh, kw) == (1, 1) and (sh, sw) != (1, 1) and (ph, pw) == (0, 0)
    if subsample:
        hp, wp, (sh, sw), sub = oh, ow, (1, 1), (sh, sw)
    geo = _TileGeometry(oh, ow, wp, (sh, sw))

    def prepare(x):
        if not (c64 or ph or pw):
            return x
        xp = T.alloc_buffer((n, cbw, hp, wp, kblock), "uint8")
        pad_stage(x, xp, n, cb, cbw, h, w, ph, pw, int(input_zero_point), kblock,
                  subsample=sub if subsample else (1, 1))
        return xp

    def reduce(xp, b_ptr, b, first_tile, mt, nt, hook):
        def products(ic, r_, s_, a_stride, step):
            def a_ptr(i):
                row, col = geo.tap(first_tile + i, r_, s_)
                return tir.address_of(xp[b, ic, row, col, 0])

            _tile_products(a_ptr, a_stride, lambda j: b_ptr(j, ic, r_, s_), mt, nt)
            hook(step)

        with T.serial(0, cbw) as ic:
            with T.serial(0, kh) as r_:
                if c64:
                    with T.serial(0, kw) as s_:
                        products(ic, r_, s_, kblock * sw, (ic * kh + r_) * kw + s_)
                else:
                    products(ic, r_, 0, BLOCK, ic * kh + r_)

    return _amx_kernel(name, "c64" if c64 else "taps", (n, cb, h, w, BLOCK), w_shape, geo, 64 if c64 else kw * BLOCK,
                       16 if c64 else kw * 4, prepare, reduce, cbw * kh * (kw if c64 else 1), output_zero_point, lo,
                       hi, residual_zero_point, residual, epilogue, int4, threads)


def amx_rows_conv_primfunc(name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], in_channels: int,
                           in_width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                           output_zero_point: int, lo: int, hi: int, residual_zero_point: int, residual: bool,
                           epilogue: str = EPILOGUE_INT64, left: int = 16, int4: bool = False,
                           threads: int | None = None) -> tir.PrimFunc:
    """The first conv on AMX tiles, reading the row layout (:func:`kernels.ops.nchw_to_rows`; padding already
    there): the same buffers and integers as :func:`kernels.conv2d_rows_requant` (int8 weights, dilation 1).

    An A row is one output pixel's ``G*4`` bytes of one kernel row (``G = ceil(KW*C/4)``: 24 bytes for a 7x7 RGB
    stem), consecutive pixels ``stride * C`` bytes apart (``tileloadd`` takes any row stride); B is the rows-packed
    weight ``w[ob, 0, kh, 0]`` (``G`` rows of 64 bytes): one ``tdpbusd`` per kernel row and 16 x 16 outputs where
    the VNNI kernel issues G ``vpdpbusd`` per pixel; ``int4``, ``threads`` as in :func:`amx_conv_primfunc`. Raises
    ValueError for another weight layout."""
    from .ops import rows_layout

    n, nrows, rowbytes = (int(v) for v in x_shape)
    ob, one, kh, one2, groups, lanes, four = (int(v) for v in w_shape)
    (sh, sw), (ph, pw) = (int(v) for v in stride), (int(v) for v in padding)
    c = int(in_channels)
    g = rows_layout(c, nrows - 2 * ph, in_width, kernel, (sh, sw), (ph, pw), left)
    if (one, one2, lanes, four) != (1, 1, BLOCK, 4) or groups != g["groups"] or kh != int(kernel[0]) \
            or rowbytes != g["row_pixels"] * c or nrows != g["rows"]:
        raise ValueError(f"AMX rows conv needs an int8 weight packed (OB, 1, {kernel[0]}, 1, {g['groups']}, 16, 4) "
                         f"for rows {x_shape} of layout {g}, got weight {w_shape}")
    _, _, oh, ow, _ = amx_rows_out_shape(x_shape, w_shape, c, in_width, kernel, (sh, sw), (ph, pw), left)
    geo = _TileGeometry(oh, ow, 0, (sh, sw), per_row=True)
    off = (left - pw) * c

    def reduce(x, b_ptr, b, first_tile, mt, nt, hook):
        with T.serial(0, kh) as r_:
            def a_ptr(i):
                y, x0 = geo.row_tile(first_tile + i)
                return tir.address_of(x[b, y * sh + r_, x0 * sw * c + off])

            _tile_products(a_ptr, sw * c, lambda j: b_ptr(j, 0, r_, 0), mt, nt)
            hook(r_)

    return _amx_kernel(name, "rows", (n, nrows, rowbytes), w_shape, geo, groups * 4, groups, lambda x: x, reduce, kh,
                       output_zero_point, lo, hi, residual_zero_point, residual, epilogue, int4, threads)


def _check_amx_args(x_shape, w_shape, padding, z_in: int, z_out: int, z_r: int, lo: int, hi: int) -> None:
    """The AMX convs' common preconditions (:func:`kernels.vector_tir.check_kernel_args`), a 7-D packed weight and
    padding >= 0: ValueError naming the argument."""
    check_kernel_args("amx conv", {"input": x_shape, "weight": w_shape},
                      {"input zero point": z_in, "output zero point": z_out, "residual zero point": z_r},
                      {"out": (lo, hi)})
    if len(tuple(w_shape)) != 7:
        raise ValueError(f"amx conv: weight shape {tuple(w_shape)} is not a packed 7-D layout (OB, CB, KH, KW, ..)")
    if min(int(v) for v in padding) < 0:
        raise ValueError(f"amx conv: padding {tuple(padding)} must be >= 0")


def _amx_kernel(name, scheme, x_shape, w_shape, geo, a_bytes, b_rows, prepare, reduce, steps, z_out, lo, hi, z_r,
                residual, epilogue, int4=False, threads=None) -> tir.PrimFunc:
    """The PrimFunc every AMX conv shares: arguments, tile configuration, ``prepare(x)`` (the buffer A tiles read),
    tasks of ``mt`` M tiles x ``nt`` output blocks split over parallel chunks, ``reduce(src, b_ptr, image,
    first_tile, mt, nt, hook)`` (the ``steps`` tile-product steps into C tiles 0-3, ``hook(step)`` after each;
    ``b_ptr(j, ic, kh, kw)`` the address of output block ``j``'s B rows), tile stores and the requant epilogue.

    The epilogue is software-pipelined: task k's C tiles and requant constants go to slot k % 2 of the chunk, and
    the epilogue of task k - 1 runs a few accumulator rows after each of task k's product steps, so the vector units
    requantize while the tile unit multiplies (the last task's epilogue runs after the loop). Xeon, 2 threads,
    batch 8, interleaved medians against the epilogue after each task: 3x3 convs 56x56x64 0.84x (0.91x with a
    residual, whose epilogue outlasts the products), 28x28x128 0.77-0.84x, 14x14x256 0.73-0.77x, 7x7x512 0.97x;
    ResNet-18 0.97x, MobileNetV2 0.96x end to end.

    ``int4``: the weight argument is :func:`pack_amx_int4`'s, unpacked (nibble -> int8) in one of two ways:

    * one image in pair order, or images inside output-block pairs: each chunk holds tasks of one pair and unpacks
      that pair into its own buffer first; a pair is split into as few chunks as give 2 per thread (an unpack costs
      about what the products of a few tasks do: Xeon, 2 threads, 3x3 convs at 14x14 batch 1: 16 chunks 1.24x the
      int8 kernel, 8 chunks 1.08x, 4 chunks 1.03x);
    * images outside, or one image in pixel order: the whole weight is unpacked into one buffer (parallel over
      pairs) before the tasks run as for int8 (ResNet-18 W4A4 at batch 8: 1.01x the unpack-on-pair-change
      alternative, 1.13x images inside everywhere)."""
    check_epilogue(name, epilogue)
    from .ops import requant_channel_constants

    n, ob = int(x_shape[0]), int(w_shape[0])
    oh, ow, rows = geo.oh, geo.ow, geo.rows
    mt = M_TILES if geo.tiles >= M_TILES else 1
    groups_m = -(-geo.tiles // mt)                 # M groups per image
    nt = N_TILES if ob % N_TILES == 0 else 1
    pairs, per_pair = ob // nt, n * groups_m         # output-block pairs; tasks of one pair
    tasks = pairs * per_pair
    # task order: images inside output blocks where an output-block pair's weights outweigh an image's input
    # (consecutive tasks then reuse the weights: 7x7x512 at batch 8 1.30x), else output blocks inside images (the
    # image's input stays in cache: ResNet-18 at batch 8 was 10% slower with images inside everywhere)
    per_block = int(np.prod([int(v) for v in w_shape[1:]]))     # int8 weights of one output block
    weight_bytes = nt * per_block
    image_bytes = int(np.prod([int(v) for v in x_shape[1:]]))
    images_inner = n > 1 and weight_bytes > 2 * image_bytes
    # one image, convs wider than 1x1: tasks in pixel order (M groups outer, output-block pairs inner), so that each
    # thread reads and writes its own band of rows (the pad stage splits rows the same way) instead of every thread
    # reading the whole input the other core just wrote. Xeon, 2 threads, batch 1, standalone: 56x56x64 3x3
    # 0.70-0.74x, 28x28x128 0.76x, 14x14x256 0.88-0.91x, 3x3/2 0.60-0.87x; ResNet-18 0.93-0.94x end to end
    # (MobileNetV2, whose AMX convs are 1x1, within +-3% either way). Weights over 2 MiB (ResNet's 7x7x512 3x3
    # convs, 2.4 MB: 1.45x in pixel order) keep pair order, each thread streaming half of them; int4 weights over
    # 160 KiB too (in pixel order every chunk needs every pair, so the weight is unpacked whole first: all of
    # ResNet-18's layers up to 2 MiB that way made W4A4 1.15x, MobileNetV2's 1x1 layers 1.18x) and inputs from
    # 64 KiB (the extra parallel unpack made the 28x28 demo model's W4A4 1.4x)
    wide = int(w_shape[2]) * int(w_shape[3]) > 1
    if int4:
        spatial = n == 1 and wide and ob * per_block <= _SPATIAL_MAX_INT4_BYTES \
            and image_bytes >= _SPATIAL_MIN_INT4_IMAGE_BYTES
    else:
        spatial = n == 1 and wide and ob * per_block <= _SPATIAL_MAX_WEIGHT_BYTES
    pair_chunks = int4 and (images_inner or (n == 1 and not spatial))  # int4: each chunk unpacks its pair
    parts = range_parts(pairs, n, ob * per_block, image_bytes, threads) if int4 and n > 1 and not images_inner \
        else None
    ranges = parts is not None          # int4, images outside: chunks of (pair range, image range)
    whole = int4 and not pair_chunks and not ranges      # int4: the whole weight unpacked before the tasks
    if pair_chunks:     # chunks inside one pair each (it unpacks that pair once): >= 2 per thread, equal sizes
        split, per = split_for_threads(per_pair, pairs, threads)
        chunks = pairs * split
    elif ranges:
        pair_parts, image_parts = parts
        pairs_per, images_per = -(-pairs // pair_parts), -(-n // image_parts)
        chunks = pair_parts * image_parts
    else:
        chunks = min(tasks, _MAX_CHUNKS)
        per = -(-tasks // chunks)
    kh, kw, cf = (int(w_shape[i]) for i in (2, 3, 4))
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, extra={AMX_ATTR: scheme, **epilogue_attrs(epilogue)}))
            x = T.arg("x", T.buffer(tuple(int(v) for v in x_shape), "uint8"))
            if int4:
                wt = T.arg("w", T.buffer((ob, per_block // 2), "uint8"))
            else:
                wt = T.arg("w", T.buffer(tuple(int(v) for v in w_shape), "int8"))
            bias, mult, shift = requant_args(ob)
            r, mr, out = output_args((n, ob, oh, ow, BLOCK), residual)
            # two accumulator / constant slots per chunk: task k's tiles and constants go to slot k % 2 while the
            # epilogue of task k - 1 (slot (k - 1) % 2) runs between task k's tile products
            acc = T.alloc_buffer((2 * chunks, mt * rows, nt * BLOCK), "int32")
            cfg = T.alloc_buffer((64,), "uint8")
            # the requant constants per slot: "c" (int64; lifted in the lifted forms), "n" (int32 max(shift - 32,
            # 0); the int64 shift in the int64 form; none in the lifted form without a right shift), in the lifted
            # forms "k" (int32 max(32 - shift, 0)); "c2" and "n2" (int64 form) in the even-then-odd channel order
            # paired_requant16 loads
            int64_form, lifted = epilogue == EPILOGUE_INT64, epilogue in LIFTED_EPILOGUES
            kbuf = {"c": T.alloc_buffer((2 * chunks, nt * BLOCK), "int64"),
                    "c2": T.alloc_buffer((2 * chunks, nt * BLOCK), "int64")}
            if epilogue != EPILOGUE_LIFTED:
                kbuf["n"] = T.alloc_buffer((2 * chunks, nt * BLOCK), "int64" if int64_form else "int32")
            if int64_form:
                kbuf["n2"] = T.alloc_buffer((2 * chunks, nt * BLOCK), "int64")
            if lifted:
                kbuf["k"] = T.alloc_buffer((2 * chunks, nt * BLOCK), "int32")
            _tile_config(cfg, rows, a_bytes, b_rows)
            src = prepare(x)
            if whole:
                wfull = T.alloc_buffer((ob, per_block // 64, 64), "int8")
                with T.parallel(0, pairs) as pp:
                    _unpack_pair(wt, wfull, pp, nt, per_block, pp * nt)

            def coords(task):
                """(image, output-block pair, M group) of a task."""
                if ranges:      # the chunk's k-th task: images outer, pairs, M groups inner
                    p0, b0, np_c = chunk_ctx["p0"], chunk_ctx["b0"], chunk_ctx["np"]
                    return b0 + task // (groups_m * np_c), p0 + task // groups_m % np_c, task % groups_m
                mg = task % groups_m
                if images_inner:        # consecutive tasks reuse one output-block pair's weights (7x7x512 at
                    return task // groups_m % n, task // (groups_m * n), mg     # batch 8: 1.30x)
                if spatial:
                    return task // (groups_m * pairs), task % pairs, task // pairs % groups_m
                return task // (groups_m * (ob // nt)), task // groups_m % (ob // nt), mg

            # four accumulator rows = four consecutive output pixels (64 contiguous bytes of a block) where tiles
            # run along output rows of a multiple of 4 pixels or over rows without junk columns: those are clamped
            # and narrowed four at a time (vector_tir.pack4_clamp). Xeon, 2 threads, 1x1 convs at batch 8 / 1:
            # 0.75-0.82x, and a [0, 15] clamp now costs what [0, 255] does; ResNet-18 0.96x, MobileNetV2 0.97x at
            # batch 8, W4A4 0.95-0.96x
            pack4 = rows % 4 == 0 and (not geo.flat or geo.wp == geo.ow)
            if pack4:
                total_pix = n * ob * oh * ow
                outf = T.decl_buffer((total_pix * BLOCK,), "uint8", data=out.data)
                rf = T.decl_buffer((total_pix * BLOCK,), "uint8", data=r.data) if residual else None

            def epilogue_rows(slot, task, first_row, count_rows):
                """Requantize accumulator rows [first_row, first_row + count_rows) of ``task`` (from ``slot``)."""
                b, obp, mg = coords(task)
                if pack4:
                    with T.serial(0, count_rows // 4) as g:
                        q0 = first_row + 4 * g
                        _, oy, ox = geo.pixel(mg * mt + q0 // rows, q0 % rows)
                        _epilogue_rows4(acc, outf, mult, kbuf, (rf, mr) if residual else None, slot, q0, b, obp, nt,
                                        ob, oh * ow, oy * ow + ox, z_out, lo, hi)
                    return
                with T.serial(0, count_rows) as u:
                    q = first_row + u
                    i, p = q // rows, q % rows
                    valid, oy, ox = geo.pixel(mg * mt + i, p)
                    args = (acc, out, mult, kbuf, (r, mr) if residual else None, slot, q, b, obp, nt, oy, ox,
                            z_out, lo, hi)
                    if valid is None:
                        _epilogue_row(*args)
                    else:
                        with T.If(valid):
                            with T.Then():
                                _epilogue_row(*args)

            total_rows = mt * rows
            per_step = -(-total_rows // steps)      # epilogue rows of the previous task after each product step
            if pack4:
                per_step = -(-per_step // 4) * 4
            chunk_ctx = {}      # ranges: the chunk's first pair, first image and pair count (set in the chunk loop)
            with T.parallel(0, chunks) as c:
                _llvm("ldtilecfg", tir.address_of(cfg[0]))
                if pair_chunks:
                    wbuf = T.alloc_buffer((nt, per_block // 64, 64), "int8")    # this chunk's pair, unpacked
                    _unpack_pair(wt, wbuf, c // split, nt, per_block)
                    first, count = (c // split) * per_pair + c % split * per, per_pair - c % split * per
                elif ranges:
                    p0, b0 = c // image_parts * pairs_per, c % image_parts * images_per
                    np_c = tir.min(pairs_per, pairs - p0)
                    chunk_ctx.update(p0=p0, b0=b0, np=np_c)
                    wbuf = T.alloc_buffer((pairs_per * nt, per_block // 64, 64), "int8")   # its pairs, unpacked
                    with T.serial(0, np_c) as pq:
                        _unpack_pair(wt, wbuf, p0 + pq, nt, per_block, pq * nt)
                    first, per = 0, groups_m * np_c * tir.min(images_per, n - b0)
                    count = per
                else:
                    first, count = c * per, tasks - c * per
                local = tir.min(per, count)
                with T.serial(0, local) as k:
                    task = first + k
                    b, obp, mg = coords(task)
                    slot = 2 * c + k % 2
                    for t in range(mt * nt):
                        _llvm("tilezero", _u8(_C_TILE + t))
                    if ranges:
                        def b_ptr(j, ic, r_, s_):
                            return tir.address_of(wbuf[(obp - p0) * nt + j, ((ic * kh + r_) * kw + s_) * cf, 0])
                    elif whole:
                        def b_ptr(j, ic, r_, s_):
                            return tir.address_of(wfull[obp * nt + j, ((ic * kh + r_) * kw + s_) * cf, 0])
                    elif pair_chunks:
                        def b_ptr(j, ic, r_, s_):
                            return tir.address_of(wbuf[j, ((ic * kh + r_) * kw + s_) * cf, 0])
                    else:
                        def b_ptr(j, ic, r_, s_):
                            return tir.address_of(wt[obp * nt + j, ic, r_, s_, 0, 0, 0])

                    def hook(step):
                        """The previous task's epilogue, a few rows after each product step: the vector units
                        requantize while the tile unit multiplies (56x56x64 3x3 at batch 8: the epilogue had taken
                        a third of the kernel)."""
                        with T.If(k > 0):
                            with T.Then():
                                epilogue_rows(2 * c + (k + 1) % 2, task - 1, step * per_step,
                                              tir.min(per_step, tir.max(total_rows - step * per_step, 0)))

                    reduce(src, b_ptr, b, mg * mt, mt, nt, hook)
                    for i in range(mt):
                        for j in range(nt):
                            _llvm("tilestored64", _u8(_C_TILE + i * nt + j),
                                  tir.address_of(acc[slot, i * rows, j * BLOCK]),
                                  tir.const(nt * BLOCK * 4, "int64"))
                    # the per-channel requant constants once per task (LLVM did not hoist them out of the row loop:
                    # they were ~half of its instructions)
                    for j in range(nt):
                        with T.vectorized(0, BLOCK) as oc:
                            ch = (obp * nt + j) * BLOCK + oc
                            consts = [(bias[ch], mult[ch])]
                            if residual:
                                consts.append((tir.const(-int(z_r), "int32"), mr[ch]))
                            kv = requant_channel_constants(shift[ch], z_out, consts, True)
                            T.buffer_store(kbuf["c"], lift_constant(kv["c"], shift[ch]) if lifted else kv["c"],
                                           [slot, j * BLOCK + oc])
                            if "n" in kbuf:
                                T.buffer_store(kbuf["n"], shift[ch].astype("int64") if int64_form else kv["n"],
                                               [slot, j * BLOCK + oc])
                            if lifted:
                                T.buffer_store(kbuf["k"], lift_amount(shift[ch]), [slot, j * BLOCK + oc])
                        for key in ("c", "n") if int64_form else ("c",):     # even channels, then odd
                            store_paired_constants(kbuf[key + "2"], kbuf[key], j * BLOCK, lead=(slot,))
                with T.If(local > 0):       # the last task's epilogue
                    with T.Then():
                        epilogue_rows(2 * c + (local - 1) % 2, first + local - 1, 0, total_rows)
                _llvm("tilerelease")
    return ib.get()


def range_parts(pairs: int, images: int, weight_bytes: int, image_bytes: int,
                threads: int | None) -> tuple[int, int] | None:
    """(pair parts, image parts) of an int4 AMX conv over ``images`` images (images outside the output-block
    pairs) whose weight is unpacked per parallel chunk, each chunk taking a range of the ``pairs`` output-block
    pairs and a range of the images and unpacking its own pairs; None where the weight is better unpacked whole
    before the tasks.

    Unpacked whole (one parallel loop before the tasks), every thread reads the pairs the other threads unpacked,
    ``weight_bytes`` (int8) less its own share, from their caches; in ranges, every thread reads every image
    instead (``images * image_bytes``). Ranges where the weight is the larger of the two; 2 chunks per thread
    (``threads``, default this machine's cores: one chunk per thread made MobileNetV2 1.14x at batch 8)."""
    t = int(threads or os.cpu_count() or 1)
    if weight_bytes < images * image_bytes:
        return None
    pair_parts = min(pairs, 2 * t)
    pair_parts = -(-pairs // -(-pairs // pair_parts))
    image_parts = min(images, -(-2 * t // pair_parts))
    return pair_parts, -(-images // -(-images // image_parts))


def _unpack_pair(wt, wbuf, obp, nt: int, per_block: int, first=0) -> None:
    """wbuf[first + j] = the int8 weights of output block ``obp * nt + j`` from the nibbles of :func:`pack_amx_int4`
    (:func:`kernels.vector_tir.unpack_nibbles64` per 64-weight row, one 64-byte store; every AMX CPU has GFNI and
    AVX-512: :func:`target_has_amx` requires them)."""
    for j in range(nt):
        with T.serial(0, per_block // 64) as q:
            T.buffer_store(wbuf, unpack_nibbles64(tir.BufferLoad(wt, [obp * nt + j, tir.Ramp(q * 32, 1, 32)])),
                           [first + j, q, tir.Ramp(0, 1, 64)])


def pack_amx_int4(packed: np.ndarray) -> np.ndarray:
    """The int4 storage of an AMX weight: ``packed`` (OB, ..., 16, 4) int8 in [-8, 7] (the layouts of
    :func:`amx_conv_primfunc` / :func:`amx_rows_conv_primfunc`) -> (OB, prod(shape[1:]) / 2) uint8, each 64-weight B
    row in 32 bytes (:func:`kernels.layout.pack_conv_weight`'s nibble order). Raises ValueError naming a weight
    outside [-8, 7]."""
    from .layout import _check_range, _pack_nibbles

    p = np.asarray(packed)
    if p.ndim < 3 or p.shape[-2:] != (BLOCK, 4):
        raise ValueError(f"an AMX weight ends in (16, 4), got shape {p.shape}")
    _check_range(p, 4, "AMX conv weights")
    return np.ascontiguousarray(_pack_nibbles(p.reshape(p.shape[0], -1, 64)).reshape(p.shape[0], -1))


def _tile_config(cfg, rows: int, a_bytes: int, b_rows: int) -> None:
    """The 64-byte tile configuration (palette 1): C tiles 0-3 ``rows`` x 64 B, A tiles 4-5 ``rows`` x ``a_bytes``,
    B tiles 6-7 ``b_rows`` x 64 B (Intel SDM, LDTILECFG)."""
    with T.serial(0, 64) as i:
        T.buffer_store(cfg, _u8(0), [i])
    T.buffer_store(cfg, _u8(1), [0])
    colsb = {**{_C_TILE + t: 64 for t in range(4)}, _A_TILE: a_bytes, _A_TILE + 1: a_bytes, _B_TILE: 64,
             _B_TILE + 1: 64}
    nrows = {**{_C_TILE + t: rows for t in range(4)}, _A_TILE: rows, _A_TILE + 1: rows, _B_TILE: b_rows,
             _B_TILE + 1: b_rows}
    for t in range(8):
        T.buffer_store(cfg, _u8(colsb[t] & 255), [16 + 2 * t])
        T.buffer_store(cfg, _u8(colsb[t] >> 8), [17 + 2 * t])
        T.buffer_store(cfg, _u8(nrows[t]), [48 + t])


def _tile_products(a_ptr, a_stride: int, b_ptr, mt: int, nt: int) -> None:
    """C[i, j] += A_i x B_j: ``mt`` A tiles loaded from ``a_ptr(i)`` (row stride ``a_stride`` bytes), ``nt`` B
    tiles from ``b_ptr(j)`` (64-byte rows)."""
    def load_a(i):
        _llvm("tileloadd64", _u8(_A_TILE + i), a_ptr(i), tir.const(a_stride, "int64"))

    def load_b(j):
        _llvm("tileloadd64", _u8(_B_TILE + j), b_ptr(j), tir.const(64, "int64"))

    # each product right after the loads it needs (tiles are not renamed: a load waits for the products of the
    # previous step that read the same tile); the order "all loads, then all products" measured the same
    for i in range(mt):
        load_a(i)
        for j in range(nt):
            if i == 0:
                load_b(j)
            _llvm("tdpbusd", _u8(_C_TILE + i * nt + j), _u8(_A_TILE + i), _u8(_B_TILE + j))


def _paired_row(acc, mult, kbuf, c, row, j, o, z_out, lo, hi, res, unclamped=False) -> tir.PrimExpr:
    """:func:`kernels.vector_tir.paired_requant16` of accumulator row ``row`` of block ``j`` (output block ``o``)
    with the task's constants in slot ``c`` (``kbuf``: "c2" the rounding constants of the even, then the odd
    channels; "n" the int32 max(shift - 32, 0), "k" the lifted forms' max(32 - shift, 0), or "n2" the int64
    shifts in the order of "c2": which are there gives the form); ``res`` the residual's (values, multipliers) or
    None."""
    half = BLOCK // 2

    def pair(key):
        return tuple(tir.BufferLoad(kbuf[key], [c, tir.Ramp(j * BLOCK + h * half, 1, half)]) for h in range(2))

    def load(key):
        return tir.BufferLoad(kbuf[key], [c, tir.Ramp(j * BLOCK, 1, BLOCK)]) if key in kbuf else None

    shift = pair("n2") if "n2" in kbuf else load("n")
    if "k" in kbuf:
        shift = LiftedShift(shift, load("k"))
    return paired_requant16(tir.BufferLoad(acc, [c, row, tir.Ramp(j * BLOCK, 1, BLOCK)]),
                            tir.BufferLoad(mult, [tir.Ramp(o * BLOCK, 1, BLOCK)]), *pair("c2"), shift, z_out, lo,
                            hi, res, unclamped=unclamped)


def _epilogue_row(acc, out, mult, kbuf, residual, c, row, b, obp, nt, oy, ox, z_out, lo, hi) -> None:
    """out[b, :, oy, ox, :] of the task's ``nt`` output blocks = requant of accumulator row ``row`` (+ residual):
    :func:`_paired_row` (int64 products formed in place on lane pairs) and one 16-byte store per block. With the
    int32-clamp epilogue (every shift >= 32) ResNet-18 W8A8 on the Xeon was 1.02x faster at batch 1, 1.03x at
    batch 8 than with int64 lanes."""
    for j in range(nt):
        o = obp * nt + j
        res = None if residual is None else residual16(*residual, [b, o, oy, ox], o)
        T.buffer_store(out, _paired_row(acc, mult, kbuf, c, row, j, o, z_out, lo, hi, res),
                       [b, o, oy, ox, tir.Ramp(0, 1, BLOCK)])


def _epilogue_rows4(acc, outf, mult, kbuf, residual, c, q0, b, obp, nt, ob, plane, lin0, z_out, lo, hi) -> None:
    """Accumulator rows q0..q0+3 (four consecutive output pixels from linear pixel ``lin0`` of the ``plane``-pixel
    output planes) of the task's ``nt`` output blocks: :func:`_paired_row` unclamped per row, then
    :func:`kernels.vector_tir.pack4_clamp` and one 64-byte store per block. ``outf`` / ``residual[0]`` are flat
    views of the NCHW16c output / residual."""
    for j in range(nt):
        o = obp * nt + j
        base = (b * ob + o) * plane + lin0
        rows = []
        for k in range(4):
            res = None
            if residual is not None:
                rf, mr = residual
                res = (tir.BufferLoad(rf, [tir.Ramp((base + k) * BLOCK, 1, BLOCK)]).astype(f"int32x{BLOCK}"),
                       tir.BufferLoad(mr, [tir.Ramp(o * BLOCK, 1, BLOCK)]))
            rows.append(_paired_row(acc, mult, kbuf, c, q0 + k, j, o, z_out, lo, hi, res, unclamped=True))
        T.buffer_store(outf, pack4_clamp(rows, lo, hi), [tir.Ramp(base * BLOCK, 1, 4 * BLOCK)])


__all__ = ["AMX_ATTR", "AMX_ENV", "amx_conv_out_shape", "amx_conv_primfunc", "amx_rows_conv_primfunc",
           "amx_rows_out_shape", "amx_conv_supported", "amx_kernel_count", "pack_amx_int4", "target_has_amx"]
