"""Skip the taps of a conv that read its zero-point border, where that border is 0.

A conv's padded input holds the input zero point ``z_x`` on its border, and a tap that reads the border adds
``z_x * w`` to the accumulator. When ``z_x = 0`` (every conv whose input comes from a ReLU / ReLU6 / clamp at 0) that
term is exactly 0, so the tap can be skipped without changing a single integer. At 7x7 a 3x3 conv has 18% of its
products on the border (9% at 14x14); oneDNN's int8 convs skip them, which is most of why OpenVINO's 7x7 layers ran
faster than the dot-product loop's throughput allows (kernels/README.md, ``layer_gap``).

How: :func:`kernels.ops.conv2d_nchwc_requant` records the geometry on its output block (:data:`BORDER_ATTR`: input
height and width, padding, stride, dilation) when ``z_x = 0`` and the conv pads; the hand schedule marks the kernels
where skipping pays (:data:`SKIP_ATTR`: every kernel whose register tile spans the output row, and AVX-512 VNNI
kernels with narrower tiles where :func:`border_tap_fraction` >= :data:`VNNI_SKIP_MIN_FRACTION`); after scheduling,
:func:`skip_zero_border` gives the tensorized accumulation block (dense convs: one output pixel x 16 output channels
x 4 input channels of one tap; depthwise: one channel of one tap, vectorized over 16) the predicate "this tap reads
inside the image". TVM lowers a block predicate to a branch around the dot product; with the register tile spanning
the whole output row the column tests are compile-time constants for all but the first and last pixel (the tile loops
are unrolled), and the row test is the same for the whole tile. With a narrower tile the column tests are runtime
branches around each ``vpdpbusd``; on AVX-512 VNNI they cost less than the skipped products once those are a few %
of the conv (Zen 4, standalone 3x3 convs, interleaved, bit-identical: 256 -> 256 at 14x14 1.06-1.09x, 128 -> 128 at
28x28 1.02-1.04x, 64 -> 64 at 56x56 1.01-1.02x, 64 -> 64 at 112x112 0.98x), while on AVX2 (4-pixel tiles,
``vpmaddwd`` / ``vpmaddubsw``) they lost up to 14% at 14x14, so AVX2 keeps the whole-row rule.

With every border tap skipped nothing reads the border any more, so the kernel does not need the padded copy either
(:func:`read_through_border`): the dense conv's accumulation block reads the input itself at the shifted coordinates
and the pad stage, a separate parallel pass over the whole input, is dropped (Zen 4, standalone 3x3 convs,
interleaved, bit-identical: 1.02-1.06x from 7x7 to 56x56; on AVX2 vpmaddubsw kernels 1.01-1.40x, the most on small
layers where the extra parallel pass weighs most; whole networks 0.98-1.03x,
benchmarks/results/read_through_border_ab.md).
"""

from __future__ import annotations

from tvm import ir, tirx
from tvm.s_tir import MatchBufferRegion, SBlock, SBlockRealize, Schedule
from tvm_ffi.structural import structural_mutate

BORDER_ATTR = "zero_border"       # [H, W, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w] (z_x = 0 only)
SKIP_ATTR = "zero_border_skip"    # set by the schedule: 1 = skip the border taps in this kernel
OUTPUT_BLOCKS = ("out", "out_o")  # a kernel's output block: as written, and with its epilogue tensorized
# the accumulation block as decompose_reduction (+ tensorize: "_o") names it and its block vars of the output row /
# column and the tap row / column
VNNI_SKIP_MIN_FRACTION = 0.02     # a VNNI kernel with a tile narrower than the row skips from 2% of border products
UPDATE_BLOCKS = {"acc_update_o": ("v_i_o", "v_j_o", "v_rkh_o", "v_rkw_o"),     # dense / grouped convs (tensorized)
                 "acc_update": ("v_i", "v_j", "v_rkh", "v_rkw")}               # depthwise (vectorized)
DENSE_UPDATE_BLOCK = "acc_update_o"
PAD_BLOCK = "pad"                 # the zero-point-padded copy of the input (kernels.ops._pad_nchwc)


def border_geometry(height: int, width: int, padding: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int], input_zero_point: int) -> list[int] | None:
    """The :data:`BORDER_ATTR` annotation for a conv (None when nothing can be skipped: no padding, or a border
    value ``input_zero_point`` != 0, whose taps add ``z_x * w``)."""
    if int(input_zero_point) != 0 or not any(padding):
        return None
    return [int(v) for v in (height, width, *padding, *stride, *dilation)]


def border_tap_fraction(geometry: list[int], kernel: tuple[int, int]) -> float:
    """The share of a conv's (output pixel, tap) pairs whose tap reads the padding border, in [0, 1).

    ``geometry``: a :data:`BORDER_ATTR` value ``[H, W, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w]``;
    ``kernel``: (KH, KW). Counted exactly per axis (rows and columns are independent):
    ``1 - (1 - rows_on_border) * (1 - columns_on_border)``. E.g. a 3x3 conv, stride 1, padding 1: 18% at 7x7, 9.3% at
    14x14, 4.7% at 28x28, 2.4% at 56x56."""
    h, w, ph, pw, sh, sw, dh, dw = (int(v) for v in geometry)

    def axis(size: int, pad: int, stride: int, dil: int, k: int) -> float:
        out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if out <= 0 or k <= 0:
            return 0.0
        outside = sum(1 for o in range(out) for t in range(k) if not 0 <= o * stride + t * dil - pad < size)
        return outside / (out * k)

    rows, cols = axis(h, ph, sh, dh, int(kernel[0])), axis(w, pw, sw, dw, int(kernel[1]))
    return 1.0 - (1.0 - rows) * (1.0 - cols)


def output_annotations(func: tirx.PrimFunc) -> dict:
    """The annotations of a ptq2tvm kernel's output block, scheduled or not ({} for another PrimFunc): the block
    ``out``, or ``out_o`` once the schedule tensorized its epilogue (kernels/epilogue_intrin.py; the schedule copies
    the annotations onto it)."""
    try:
        sch = Schedule(func)
    except Exception:  # noqa: BLE001 - not a schedulable PrimFunc: not one of ours
        return {}
    for name in OUTPUT_BLOCKS:
        try:
            return dict(sch.get(sch.get_sblock(name)).annotations)
        except Exception:  # noqa: BLE001 - no such block
            continue
    return {}


def skip_zero_border(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its border taps skipped when its schedule asked for it (:data:`SKIP_ATTR`); else ``func``.

    Adds to the tensorized accumulation block the predicate ``pad_h <= i*stride_h + kh*dilation_h < pad_h + H`` and
    the same for the columns (coordinates in the padded input). Exact because every skipped tap reads a 0.
    Raises ValueError when a kernel marked for skipping has no accumulation block of the expected form (a TVM change
    in the block names that tensorize produces): the marked kernel would otherwise silently lose the optimisation.
    """
    ann = output_annotations(func)
    if SKIP_ATTR not in ann or int(ann[SKIP_ATTR]) != 1 or BORDER_ATTR not in ann:
        return func
    h, w, ph, pw, sh, sw, dh, dw = (int(v) for v in ann[BORDER_ATTR])
    found = []

    def predicate(realize, mutator):
        block = realize.block
        names = UPDATE_BLOCKS.get(block.name_hint)
        if names is None:
            return mutator.default_mutate(realize)
        bound = {iv.var.name: value for iv, value in zip(block.iter_vars, realize.iter_values)}
        if any(name not in bound for name in names):
            raise ValueError(f"{block.name_hint} has block vars {sorted(bound)}, expected {names}")
        i, j, kh, kw = (bound[name] for name in names)
        dtype = str(i.ty)
        row, col = i * sh + kh * dh, j * sw + kw * dw

        def inside(v, lo, n):
            return tirx.And(v >= tirx.const(lo, dtype), v < tirx.const(lo + n, dtype))

        cond = tirx.And(inside(row, ph, h), inside(col, pw, w))
        found.append(block.name_hint)
        return SBlockRealize(realize.iter_values, tirx.And(realize.predicate, cond), block)

    out = structural_mutate(func, [(SBlockRealize, predicate)])
    if len(found) != 1:
        raise ValueError(f"kernel marked {SKIP_ATTR} has {len(found)} accumulation blocks named "
                         f"{sorted(UPDATE_BLOCKS)}, expected one")
    return read_through_border(out, ph, pw) if found[0] == DENSE_UPDATE_BLOCK else out


def _shifted(region, buffer, ph: int, pw: int):
    """A (N, C-block, H, W, c) region of the padded copy as the same region of the unpadded ``buffer``."""
    ranges = list(region.region)
    for axis, shift in ((2, ph), (3, pw)):
        r = ranges[axis]
        ranges[axis] = ir.Range.from_min_extent(r.min - tirx.const(shift, r.min.ty), r.extent)
    return tirx.BufferRegion(buffer, ranges)


def read_through_border(func: tirx.PrimFunc, ph: int, pw: int) -> tirx.PrimFunc:
    """``func`` (a dense conv kernel whose border taps are skipped) reading its input directly instead of the
    zero-point-padded copy ``pad``: the accumulation block's input region moves by (-ph, -pw), and the pad stage
    (a parallel pass over the whole input, 3-4.5% of a 3x3 conv at 7x7-56x56 on a Zen 4) is dropped. Exact: with
    every border tap skipped, the block reads only the interior, where the copy equals the input. Unchanged when the
    padded copy is not a plain copy of one input (another dtype, a wider right border)."""
    pads = [b for b in _blocks(func) if b.name_hint == PAD_BLOCK]
    if len(pads) != 1 or len(pads[0].reads) != 1:
        return func
    padded, source = pads[0].writes[0].source, pads[0].reads[0].source
    shape = [int(v) for v in padded.shape]
    if (str(padded.dtype) != str(source.dtype) or len(shape) != 5
            or shape[2:4] != [int(source.shape[2]) + 2 * ph, int(source.shape[3]) + 2 * pw]):
        return func

    def reads_source(realize, mutator):
        block = realize.block
        if block.name_hint != DENSE_UPDATE_BLOCK:
            return mutator.default_mutate(realize)
        reads = [_shifted(r, source, ph, pw) if r.source.same_as(padded) else r for r in block.reads]
        matches = [MatchBufferRegion(m.buffer, _shifted(m.source, source, ph, pw)) if m.source.source.same_as(padded)
                   else m for m in block.match_buffers]
        new = SBlock(block.iter_vars, reads, block.writes, block.name_hint, block.body, block.init,
                     block.alloc_buffers, matches, block.annotations)
        return SBlockRealize(realize.iter_values, realize.predicate, new)

    def drop_pad_stage(stmt, mutator):
        stmt = mutator.default_mutate(stmt)
        kept = [s for s in stmt.seq if {b.name_hint for b in _blocks(s)} != {PAD_BLOCK}]
        return stmt if len(kept) == len(stmt.seq) else tirx.SeqStmt(kept) if len(kept) > 1 else kept[0]

    def drop_pad_buffer(block, mutator):
        block = mutator.default_mutate(block)
        if not any(b.same_as(padded) for b in block.alloc_buffers):
            return block
        return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, block.body, block.init,
                      [b for b in block.alloc_buffers if not b.same_as(padded)], block.match_buffers,
                      block.annotations)

    out = structural_mutate(func, [(SBlockRealize, reads_source)])
    if any(r.source.same_as(padded) for b in _blocks(out) for r in b.reads):
        return func             # another block still reads the copy: keep it
    out = structural_mutate(out, [(tirx.SeqStmt, drop_pad_stage)])
    if any(b.name_hint == PAD_BLOCK for b in _blocks(out)):
        return func             # the pad stage was not a loop nest of its own: keep the copy
    return structural_mutate(out, [(SBlock, drop_pad_buffer)])


def _blocks(node) -> list:
    """Every block (SBlock) inside ``node`` (a PrimFunc or statement), outer before inner."""
    blocks = []

    def visit(realize, mutator):
        blocks.append(realize.block)
        return mutator.default_mutate(realize)

    structural_mutate(node, [(SBlockRealize, visit)])
    return blocks


__all__ = ["BORDER_ATTR", "OUTPUT_BLOCKS", "SKIP_ATTR", "VNNI_SKIP_MIN_FRACTION", "border_geometry",
           "border_tap_fraction", "output_annotations", "read_through_border", "skip_zero_border"]
