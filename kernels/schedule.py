"""Hand schedules for the kernels of :mod:`kernels.ops` (no tuning needed), and the IRModule walker that applies them.

Convolution (``conv2d_nchwc_vnni`` / ``conv2d_nchwc_avx2``), for an output tile of Q output blocks (16 channels
each) x R rows x P columns (chosen by :func:`choose_conv_tile` from the shape):

    pad (own parallel loop, zero point border, written once)           -- not inlined: tensorize needs plain loads
    parallel for (n, ob/Q, oh/R):                                       -- weights of Q blocks stay in L1/L2
      for ow/P:                                                         -- (whole-row VNNI tiles: the next group's
                                                                        --  weights prefetched, kernels/prefetch.py)
        acc[Q, R, P, 16] = 0                                             -- int32, a stack tile: LLVM keeps it in regs
        for ic_block, kh, kw, ic/4:
          for q, r, p (unrolled): acc[q, r, p, :] = vpdpbusd(acc[q, r, p, :], bcast(x[4 bytes]), w[q][64 bytes])
        for q, r, p (unrolled), 16 lanes (vectorized): requant epilogue (+ residual), uint8 store

int4 weights (two per byte) and int2 weights (four per byte) are unpacked to int8 once per parallel task, which
then covers Q output blocks x a chunk of the rows of all images (``unpack_at="task"``: the same inner loop as int8,
the unpack costs one pass over the packed weights per chunk); ``unpack_at="step"`` unpacks the weight vector inside
the reduction instead (Q = 1, up to 28 accumulators; a tuning option; the default, with the int8 tiles, where the conv
has one output pixel: :func:`default_unpack_at`).

The epilogue is fused: the int32 accumulators never reach memory. Everything else (pools, adds, layout changes) is
parallelized over the outer loops and vectorized over the 16 channels of a block.

Use inside a Relax build::

    mod = bb.get()                                   # PrimFuncs emitted with bb.emit_te(kernels.conv2d_nchwc_requant..)
    mod = kernels.schedule_module(mod, target)       # schedules every PrimFunc with a ptq2tvm_kernel block
    ex = kernels.compile_module(mod, target)         # tvm.compile + per-task buffers on the stack

Scheduled PrimFuncs get ``tirx.is_scheduled = True`` (dlight / MetaSchedule skip them) and ``op_pattern = kOpaque``
so that Relax FuseOps (run by both the default CPU pipeline and ``relax.get_pipeline("zero")``) does not merge
other ops into them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm
from tvm.s_tir import Schedule
from tvm.target import codegen

from .intrin import (register_avx2_intrinsic, register_avx2w_intrinsic, register_avxvnni_intrinsic,
                     register_taps_intrinsic, register_ubsw16_intrinsic, register_ubsw_intrinsic,
                     register_unpack4_intrinsic, register_vnni_intrinsic, register_widen16_intrinsic)
from .border import (BORDER_ATTR, OUTPUT_BLOCKS, SKIP_ATTR, VNNI_SKIP_MIN_FRACTION, border_tap_fraction,
                     output_annotations, skip_zero_border)
from .epilogue_intrin import register_requant16_intrinsic
from .func_attrs import SCHEDULED_ATTR   # TVM 0.27's name (dlight skips these); "tir.is_scheduled" is ignored
from .prefetch import PREFETCH_ATTR, TASK_LOOP_ATTR, prefetch_next_weights
from .ops import CHUNKED_REDUCTION_ATTR, KERNEL_ATTR, LIFTED_ATTR, REQUANT_ATTR

OP_PATTERN_OPAQUE = 8
_MIN_PARALLEL_ELEMS = 1 << 14
#: conv / dense kernels with fewer multiply-adds (padding channels included) run on the calling thread: waking the
#: pool for a parallel loop costs ~0.7 us, more than such a kernel's work (the squeeze-excitation 1x1 convs at batch
#: 1). Zen 4, 2 pool threads. Standalone with warm weights (serial vs parallel build, int8): 1x1 672 -> 32 at 1x1
#: (21.5 K) 0.34 vs 1.01 us, 120 -> 480 (57.6 K) 0.61 vs 1.13, 240 -> 960 (230 K) 2.36 vs 2.12. In a network, with
#: cold weights (two cores fetch them in parallel), the break-even is lower: timed kernel by kernel in network order
#: (benchmarks/commit_ab.py --kernels), MobileNetV3-Large's / EfficientNet-B0's SE convs up to 3.8 K took 1.3-2.1 us
#: serial vs 2.0-3.1 parallel, 15 K-21.5 K about the same, 55 K-118 K 1.2-1.6x longer serial.
MIN_PARALLEL_MACS = 1 << 14
#: ... and so do kernels with fewer than SMALL_KERNEL_MACS multiply-adds whose weights (multiply-adds per output
#: pixel) are under MIN_PARALLEL_MACS: their products are spread over several pixels, so the weights are few and
#: nothing streams from memory; the parallel loop's start and end (and the pad stage's own loop) then cost more than
#: half the work saves. Zen 4, 2 threads, standalone warm kernels, serial / parallel build time: 1x1/2 16 -> 32 at
#: 14x14 (24 K) 0.37, 32 -> 64 (98 K) 0.69, 1x1 96 -> 24 at 7x7 (110 K) 0.69; 294-392 K already 1.06-1.5 (the VM's
#: fast stretches; in its slow ones, where a parallel loop costs ~2 us, serial won up to ~1.7 M). In a network (one
#: process, interleaved, batch 1): the 28x28 MobileNetV2, 6 kernels newly serial, 0.925-0.927x in two runs; the 28x28
#: ResNet, 2, 0.996-1.024x.
SMALL_KERNEL_MACS = 1 << 17


# Storage scope of every accumulator tile (and of the tensor intrinsics' accumulator operand). "global", not
# "local": TVM 0.27's LowerTVMBuiltin keeps a constant-size allocation under 1 KiB on the stack only when its scope is
# "global"; a "local" one becomes a TVMBackendAllocWorkspace / FreeWorkspace pair, placed at the top of the enclosing
# parallel-loop body, i.e. paid once per parallel iteration (~0.3 us each on Zen 3). Compaction shrinks the
# block-level buffer to the tile (Q x R x P x 16 int32), so LLVM promotes it to registers as before. A 16-accumulator
# zmm tile (exactly 1 KiB) still goes to the workspace, as it did with "local" (benchmarks/results/alloc_fix_ab.md;
# tests/test_kernels_x86.py::test_kernels_make_no_workspace_allocations).
ACC_SCOPE = "global"


# ----------------------------------------------------------------------------------------------------------------------
# target helpers


def _as_target(target) -> tvm.target.Target | None:
    if target is None:
        t = tvm.target.Target.current(allow_none=True)
        return t
    if isinstance(target, tvm.target.Target):
        return target
    return tvm.target.Target(target)


def _target_or_host(target=None) -> tvm.target.Target:
    """``target`` as a Target; None: the current target scope, else this machine's CPU (an llvm target)."""
    t = _as_target(target)
    return t if t is not None else tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})


def target_isa(target=None) -> str:
    """The int8 dot product of an LLVM x86 target: 'vnni' (AVX-512 VNNI + BW), 'avxvnni' (256-bit AVX-VNNI, no
    AVX-512 VNNI), 'avx2'; raises ValueError otherwise.

    ``target=None``: the current target scope, else this machine's CPU.
    """
    t = _target_or_host(target)
    if t.kind.name != "llvm":
        raise ValueError(f"x86 int8 kernels need an llvm target, got {t.kind.name}")
    if codegen.llvm_cpu_has_features(["avx512vnni"], t) and codegen.llvm_cpu_has_features(["avx512bw"], t):
        return "vnni"
    if codegen.llvm_cpu_has_features(["avxvnni"], t) and codegen.llvm_cpu_has_features(["avx2"], t):
        return "avxvnni"
    if codegen.llvm_cpu_has_features(["avx2"], t):
        return "avx2"
    raise ValueError(f"target {t} has neither AVX-512 VNNI nor AVX2 (set mcpu, e.g. 'znver4' or 'haswell')")


def target_has_gfni512(target=None) -> bool:
    """Whether an LLVM x86 target has GFNI and AVX-512 BW: the int4 weight unpack then runs one ``vgf2p8affineqb``
    on a zmm per 64 weights (:func:`kernels.intrin.register_unpack4_intrinsic`); Ice Lake and later Xeons, Zen 4+,
    not Cascade Lake. ``target=None``: the current target scope, else this machine's CPU."""
    t = _target_or_host(target)
    return t.kind.name == "llvm" and all(codegen.llvm_cpu_has_features([f], t) for f in ("gfni", "avx512bw"))


def pack_isa(isa: str) -> str:
    """The weight layout (:func:`kernels.pack_conv_weight` ``isa``) of a target ISA: 'vnni' for both VNNI flavours,
    'avx2' for the int16 path (an AVX2 layer proven exact for vpmaddubsw is packed 'vnni' instead)."""
    return "vnni" if isa in ("vnni", "avxvnni") else "avx2"


def dot_product(layout: str, isa: str, ubsw_exact: bool = False, input_dtype: str = "uint8") -> tuple[str, str]:
    """(intrinsic name, tile class) for a kernel whose weights are packed ``layout`` on a target of ISA ``isa``
    (:func:`target_isa`) and whose reduction reads activations of ``input_dtype`` (uint16: widened by the pad
    stage, avx2 layout only). Tile classes: 'vnni' (zmm), 'ymm' (AVX-VNNI / vpmaddubsw), 'avx2' (vpmaddwd).

    Raises ValueError for VNNI-packed weights on an AVX2 target unless the kernel is marked ``ubsw_exact``."""
    if layout == "avx2":
        if input_dtype == "uint16":
            return register_avx2w_intrinsic(ACC_SCOPE), "avx2"
        return register_avx2_intrinsic(ACC_SCOPE), "avx2"
    if isa == "vnni":
        return register_vnni_intrinsic(ACC_SCOPE), "vnni"
    if isa == "avxvnni":
        return register_avxvnni_intrinsic(ACC_SCOPE), "ymm"
    if ubsw_exact:
        return register_ubsw_intrinsic(ACC_SCOPE), "ymm"
    raise ValueError("VNNI-packed weights on an AVX2 target need a u8 x s8 dot product: this kernel is not marked "
                     "ubsw_exact (vpmaddubsw could saturate); pack the weights with isa='avx2'")


#: the most accumulators of a conv tile narrower than its output row with runtime border tests (kernels/border.py)
#: whose requantize epilogue is still tensorized (kernels/epilogue_intrin.py). Zen 4, 2 threads, ResNet-18 W8A8 at
#: batch 8, each kernel of the network timed with the network's arguments, interleaved: the 3x3 convs at 56x56 and
#: 28x28 with (7, 2) tiles 0.93-0.97x the time of their vectorized epilogue; 16 accumulators had been 2x slower.
TENSORIZED_NARROW_MAX_ACC = 14


def _num_threads(target) -> int:
    t = _as_target(target)
    if t is not None and "num-cores" in t.attrs:
        return int(t.attrs["num-cores"])
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------------
# tile choice


@dataclass(frozen=True)
class ConvTile:
    """Register tile of one conv kernel invocation: Q output blocks (x16 channels) x R rows x P columns."""
    P: int
    Q: int
    R: int = 1

    def as_list(self) -> list[int]:
        return [self.P, self.Q, self.R]


def _divisors(v: int) -> list[int]:
    return [d for d in range(1, v + 1) if v % d == 0]


def conv_tile_candidates(n: int, ob: int, oh: int, ow: int, isa: str = "vnni", threads: int = 2,
                         int4: bool = False) -> list[ConvTile]:
    """Every valid register tile for the output shape (N, OB blocks of 16, OH, OW), best first by the heuristic of
    :func:`choose_conv_tile` (the tuning space of the conv kernels).

    VNNI: tiles of up to 14 zmm accumulators, Q <= 4 output blocks; among those the fewest loads per vpdpbusd
    ((P*R + Q) / (P*Q*R)), keeping >= 2 parallel iterations per thread when the shape allows it. 14, not 16: on a
    Zen 4 (2 threads, standalone kernels interleaved, batch 1 and 8) the 16-accumulator tiles the rule picked before,
    (4, 4) and (8, 2), lost to (7, 2) on every shape tried: 3x3 64 -> 64 at 56x56 0.90-0.96x the time, 3x3
    128 -> 128 at 28x28 0.96-1.0x, 3x3/2 64 -> 128 0.96x, ResNet's row-layout 7x7/2 stem 0.90-0.91x, 1x1 32 -> 192
    at 28x28 0.80x. In the 3x3 64 -> 64 kernel LLVM emits 72 zmm moves to or from the stack with (4, 4), 30 with
    (8, 2), 22 with (7, 2) (the unrolled broadcasts stay live next to the accumulators); 28 + Q spills.
    ``int4=True``: tiles for int4 weights unpacked inside the reduction (``unpack_at="step"``): Q = 1 and up to 28
    accumulators, so that each unpacked weight vector serves many vpdpbusd. (The default int4 schedule
    unpacks a task's weights once, ``unpack_at="task"``, and uses the int8 tiles.)
    AVX2 (vpmaddwd): 16 ymm registers, an accumulator takes 2 and one weight step 4 (sign-extended pairs) -> P <= 4,
    Q = 1, or the whole row when it has <= 7 pixels (LLVM spills some of the 14 accumulators, and still: 3x3 512->512
    at 7x7 (7,1) 1.65x faster than (1,1), interleaved on the loaded Zen 3 with uint16 inputs).
    'ymm' (AVX-VNNI, vpmaddubsw): an accumulator takes 2 ymm, a weight block 2, the broadcast 1 (+ the ones vector
    and 2 products for vpmaddubsw): Q = 1 and up to 4 columns, or the whole row when it has <= 7 pixels (measured on
    Zen 3, 3x3 convs interleaved: 56x56 (4,1) 1.1x faster than (2,2), 14x14 (2,1) 3x faster than (2,2) or (7,1),
    7x7 (7,1) 2.2x faster than (1,2); loaded host).
    """
    if isa == "vnni":
        max_acc, max_q = (28, 1) if int4 else (14, 4)
    else:       # 'ymm' and 'avx2': a whole row of <= 7 pixels, else <= 4 (measured on Zen 3, see the docstring)
        max_acc, max_q = (ow if ow <= 7 else 4), 1
    scored = []
    for q in _divisors(ob):
        if q > max_q:
            continue
        for r in _divisors(oh):
            for p in _divisors(ow):
                t = p * q * r
                if t > max_acc or (r > 1 and p != ow):      # multi-row tiles only when a row fits entirely
                    continue
                par = n * (ob // q) * (oh // r)
                loads = (p * r + q) / t
                key = (par >= min(2 * threads, n * ob * oh), t >= 12 or t == max_acc, -loads, t, -r)
                scored.append((key, ConvTile(p, q, r)))
    assert scored
    scored.sort(key=lambda kt: kt[0], reverse=True)
    return [t for _, t in scored]


def choose_conv_tile(n: int, ob: int, oh: int, ow: int, isa: str = "vnni", threads: int = 2,
                     int4: bool = False) -> ConvTile:
    """The register tile the hand schedule uses: the first of :func:`conv_tile_candidates`."""
    return conv_tile_candidates(n, ob, oh, ow, isa, threads, int4)[0]


# ----------------------------------------------------------------------------------------------------------------------
# per-kernel schedules


def _try_block(sch: Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - no such block
        return None


def _vectorize_inner(sch: Schedule, loops, width_max: int = 64) -> None:
    """Vectorize the innermost loop, unroll the rest of ``loops`` (all small, constant extents)."""
    if not loops:
        return
    sch.vectorize(loops[-1])
    for lp in loops[:-1]:
        sch.unroll(lp)


def _schedule_pad(sch: Schedule, block, threads: int) -> None:
    loops = sch.get_loops(block)
    *outer, w, c = loops
    fused = sch.fuse(*outer)
    if threads > 1:
        sch.parallel(fused)
    sch.vectorize(c)


def schedule_conv2d_nchwc(sch: Schedule, tile: ConvTile | None = None, threads: int = 2,
                          p_max: int = 8, unpack_at: str | None = None, isa: str | None = None,
                          gfni: bool = False) -> Schedule:
    """Schedule a PrimFunc made by :func:`kernels.conv2d_nchwc_requant` / :func:`kernels.conv2d_rows_requant`
    (the weight layout, vnni or avx2, is read from the kernel annotation, the dot product from it and the target's
    ``isa`` (:func:`target_isa`; None: the layout's own ISA), see :func:`dot_product`; ``p_max`` is for depthwise;
    ``unpack_at`` ("task", "step" or None: :func:`default_unpack_at`) only matters for int4 / int2 weights; ``gfni``:
    the target has GFNI + AVX-512 BW, int4 weights are unpacked by one ``vgf2p8affineqb`` per vector, see
    :func:`_schedule_unpack`)."""
    if unpack_at not in (None, "task", "step"):
        raise ValueError(f"unpack_at must be 'task', 'step' or None, got {unpack_at!r}")
    out = sch.get_sblock("out")
    kind = str(sch.get(out).annotations[KERNEL_ATTR])
    if kind.endswith("depthwise"):
        return schedule_depthwise(sch, threads=threads, p_max=p_max)
    layout = kind.rsplit("_", 1)[1]
    pad = _try_block(sch, "pad")
    input_dtype = str(sch.get(pad).writes[0].source.dtype) if pad is not None else "uint8"
    intrin, tiles = dot_product(layout, isa or layout, _ubsw_exact(sch, out), input_dtype)
    acc = sch.get_sblock("acc")
    n0, _, oh0, ow0 = (int(sch.get(lp).extent) for lp in sch.get_loops(acc)[:4])
    threads = parallel_threads(sch, acc, threads, n0 * oh0 * ow0)
    unpack = _try_block(sch, "w_unpack")
    acc16 = _try_block(sch, "acc16")
    if acc16 is not None:
        if tiles != "ymm" or intrin != register_ubsw_intrinsic(ACC_SCOPE):
            raise ValueError(f"int16-accumulator conv kernels (i16_group) run only on AVX2 (vpmaddubsw); target ISA "
                             f"{isa or layout}")
        return _schedule_conv_int16(sch, out, acc, acc16, pad, unpack, tile, threads)
    if CHUNKED_REDUCTION_ATTR in sch.get(out).annotations:    # one flat axis of real 4-channel steps (1x1)
        n, ob, oh, ow, oc, rq, rkh, rkw, rcs = sch.get_loops(acc)
        reduction, reduction_head, unpack_loop = [rq, rkh, rkw], rq, rq
    else:
        n, ob, oh, ow, oc, ric, rkh, rkw, rcf, rcs = sch.get_loops(acc)
        reduction, reduction_head, unpack_loop = [ric, rkh, rkw, rcf], ric, rcf
    ext = [int(sch.get(lp).extent) for lp in (n, ob, oh, ow)]
    auto_unpack = unpack_at is None
    if auto_unpack:
        unpack_at = default_unpack_at(*ext, tiles)
    per_task = unpack is not None and unpack_at == "task"
    if tile is None and per_task:
        tile = balanced_task_tile(*ext, isa=tiles, threads=threads)
    elif tile is None:      # the step tiles (Q = 1, many pixels) unless each weight vector meets one pixel anyway
        tile = choose_conv_tile(*ext, isa=tiles, threads=threads,
                                int4=unpack is not None and unpack_at == "step" and tiles == "vnni"
                                and not auto_unpack)
    skip = _skip_border(sch, out, tile, ext[3], (int(sch.get(rkh).extent), int(sch.get(rkw).extent)), tiles)
    if skip:
        sch.annotate(out, SKIP_ATTR, 1)
    par, (obi, ohi, owi) = _tile_conv(sch, out, (n, ob, oh, ow), tile, reduction, [oc, rcs], per_task, threads)
    whole_rows = tile.P == ext[3] and ext[2] % tile.R == 0 and ext[1] % tile.Q == 0
    if tiles == "vnni" and whole_rows and (per_task or unpack is None):      # kernels/prefetch.py
        weights = sch.get(unpack if per_task else acc).reads
        sch.annotate(out, PREFETCH_ATTR, [1 if per_task else ext[2] // tile.R, ext[1] // tile.Q,
                                          tile.Q * _block_bytes(weights, "uint8" if per_task else "int8")])
        sch.annotate(par, TASK_LOOP_ATTR, 1)
    ndim = 7 if layout == "vnni" else 8
    if per_task:
        sch.compute_at(unpack, par, preserve_unit_loops=True)
        _schedule_unpack(sch, unpack, layout, ndim, unroll_outer=False, gfni=gfni)
    elif unpack is not None:
        sch.compute_at(unpack, unpack_loop, preserve_unit_loops=True)
        _schedule_unpack(sch, unpack, layout, ndim, gfni=gfni)
    if threads > 1:
        sch.parallel(par)
    sch.set_scope(acc, 0, ACC_SCOPE)
    init = sch.decompose_reduction(acc, reduction_head)
    iloops = sch.get_loops(init)
    _vectorize_inner(sch, iloops[-4:])
    sch.tensorize(oc, intrin)
    for lp in (obi, ohi, owi):
        sch.unroll(lp)
    oloops = sch.get_loops(out)
    # the tensorized epilogue, except with runtime border tests (a tile narrower than the row) around more than
    # TENSORIZED_NARROW_MAX_ACC accumulators: LLVM then kept a 16-accumulator tile in memory, 2x slower (Zen 4, 3x3
    # 64 -> 64 at 56x56); with the 14 of (7, 2) it stays in registers
    runtime_tests = skip and tile.P != ext[3]
    if not (tiles == "vnni" and (not runtime_tests or tile.P * tile.Q * tile.R <= TENSORIZED_NARROW_MAX_ACC)
            and _tensorize_epilogue(sch, out, oloops[-5:])):
        _vectorize_inner(sch, oloops[-5:])
    if pad is not None:
        _schedule_pad(sch, pad, threads)
    return sch


def default_unpack_at(n: int, ob: int, oh: int, ow: int, tiles: str) -> str:
    """Where a conv with int4 / int2 weights unpacks them by default: ``"step"`` (each weight vector inside the
    reduction, right before its ``vpdpbusd``) for an AVX-512 VNNI conv with one output pixel in all (``n * oh * ow ==
    1``: the squeeze-excitation 1x1 convs and 1x1 classifiers at batch 1), where every weight vector serves one
    ``vpdpbusd`` and a per-task unpack would write and read it back once for that one use; else ``"task"``.
    Zen 4, 2 threads, standalone, warm, interleaved (scratch s27/i4c.py), int4 vs int8 time: 1x1 960 -> 240 at 1x1
    1.73x per task, 0.85x per step with the int8 tile (Q = 3); 240 -> 960 1.47x / 1.04x; 1280 -> 1008 0.74x per step
    (the step unpack with the int4 tiles, Q = 1, 1.07-1.25x: one accumulator chain)."""
    return "step" if tiles == "vnni" and n * oh * ow == 1 else "task"


def _block_bytes(reads, dtype: str) -> int:
    """Bytes of one output block of the packed weights: the one buffer of ``dtype`` among a block's ``reads``
    (``[OB, ...]``, blocks contiguous; int8 weights as the accumulation block reads them, or the uint8 packed int4 /
    int2 weights the unpack block reads)."""
    (weights,) = [r.source for r in reads if str(r.source.dtype) == dtype]
    size = 1
    for dim in weights.shape[1:]:
        size *= int(dim)
    return size


def _tensorize_epilogue(sch: Schedule, out, loops) -> bool:
    """The requant epilogue of each output block as :func:`kernels.epilogue_intrin.register_requant16_intrinsic`
    (AVX-512: int64 lane pairs; in the lifted form where the block carries :data:`kernels.ops.LIFTED_ATTR`), the
    tile loops around it unrolled; -> False (``sch`` unchanged) where the block does
    not match the intrinsic: a clamp with ``lo >= hi`` (TVM folds it to a constant) or any other form tensorize
    rejects, which then keeps the vectorized epilogue."""
    ann = sch.get(out).annotations
    z, lo, hi, has_res, z_r = (int(v) for v in ann[REQUANT_ATTR])
    if lo >= hi:
        return False
    ge32 = "int32_epilogue" in ann and int(ann["int32_epilogue"]) == 1
    lifted = str(ann[LIFTED_ATTR]) if LIFTED_ATTR in ann else None
    intrin = register_requant16_intrinsic(z, lo, hi, ge32, z_r if has_res else None, ACC_SCOPE, lifted)
    try:        # TVM compares the block with the description before it changes the schedule
        sch.tensorize(loops[-1], intrin)
    except tvm.s_tir.ScheduleError:
        return False
    for lp in loops[:-1]:
        sch.unroll(lp)
    tensorized = sch.get_sblock(OUTPUT_BLOCKS[1])
    for key, value in ann.items():      # tensorize drops them: the border skip and arithmetic_shortcuts read them
        sch.annotate(tensorized, key, list(value) if isinstance(value, tvm.ir.Array) else value)
    return True


def _skip_border(sch: Schedule, out, tile: ConvTile, out_width: int, kernel: tuple[int, int], tiles: str) -> bool:
    """Whether a dense / grouped conv kernel skips its zero-border taps (:mod:`kernels.border`): it has a zero
    border, and either the register tile spans the output row (the column tests are compile-time constants) or it
    is a VNNI (zmm) kernel whose border products reach :data:`kernels.border.VNNI_SKIP_MIN_FRACTION` (the runtime
    column tests cost less than the products they skip there; not on AVX2, measured in kernels/border.py)."""
    ann = sch.get(out).annotations
    if BORDER_ATTR not in ann:
        return False
    if tile.P == out_width:
        return True
    geometry = [int(v) for v in ann[BORDER_ATTR]]
    return tiles == "vnni" and border_tap_fraction(geometry, kernel) >= VNNI_SKIP_MIN_FRACTION


def _schedule_conv_int16(sch: Schedule, out, acc, acc16, pad, unpack, tile: ConvTile | None,
                         threads: int) -> Schedule:
    """AVX2 conv with int16 accumulation (:func:`kernels.conv2d_nchwc_requant` ``i16_group``): the int32 register
    tile ``acc`` (Q x R x P pixels x 16 lanes) is zeroed per task; for each group of input blocks ``rg`` the int16
    tile ``acc16`` is zeroed, accumulated with ``vpmaddubsw`` + ``vpaddw`` over the group's (block, kh, kw, 4-channel)
    steps, and flushed into ``acc`` with one ``vpmaddwd`` per 8 lanes. Tiles as the 'ymm' class (an int16 tile takes
    2 ymm per pixel, like the int32 one it replaces in the inner loop). Sub-byte weights are unpacked once per task
    (``unpack_at="task"``)."""
    n, ob, oh, ow, oc, rg, rp = sch.get_loops(acc)
    if tile is None:
        tile = choose_conv_tile(*[int(sch.get(lp).extent) for lp in (n, ob, oh, ow)], isa="ymm", threads=threads)
    par, (obi, ohi, owi) = _tile_conv(sch, out, (n, ob, oh, ow), tile, [rg], [oc, rp], unpack is not None, threads)
    sch.compute_at(acc16, rg, preserve_unit_loops=True)
    if unpack is not None:
        sch.compute_at(unpack, par, preserve_unit_loops=True)
        _schedule_unpack(sch, unpack, "vnni", 7, unroll_outer=False)
    if threads > 1:
        sch.parallel(par)
    # acc16 under rg: spatial (b, o, gg, i, j, e) then reduction (rici, rkh, rkw, rcf, rj)
    b16, o16, g16, i16, j16, e16, rici, rkh, rkw, rcf, rj = sch.get_loops(acc16)[-11:]
    sch.reorder(rici, rkh, rkw, rcf, b16, g16, i16, j16, o16, e16, rj)
    sch.set_scope(acc16, 0, ACC_SCOPE)
    sch.set_scope(acc, 0, ACC_SCOPE)
    init16 = sch.decompose_reduction(acc16, rici)
    _vectorize_inner(sch, sch.get_loops(init16)[-6:])
    sch.tensorize(e16, register_ubsw16_intrinsic(ACC_SCOPE))
    for lp in (b16, g16, i16, j16, o16):
        sch.unroll(lp)
    init = sch.decompose_reduction(acc, rg)
    _vectorize_inner(sch, sch.get_loops(init)[-4:])
    sch.tensorize(oc, register_widen16_intrinsic(ACC_SCOPE))
    for lp in (obi, ohi, owi):
        sch.unroll(lp)
    _vectorize_inner(sch, sch.get_loops(out)[-5:])
    if pad is not None:
        _schedule_pad(sch, pad, threads)
    return sch


def _tile_conv(sch: Schedule, out, spatial, tile: ConvTile, reduction: list, inner: list, per_task: bool,
               threads: int):
    """The register tiling shared by the conv schedules: split (N, OB, OH, OW) into tiles of Q blocks x R rows x P
    columns, order ``outer tiles, reduction, tile pixels, inner`` (the tensorized loops last), compute the output
    block at each tile, and fuse the parallel loop; -> (parallel loop, (Q, R, P tile loops)).

    ``per_task`` (sub-byte weights unpacked once per parallel task): parallel over (images chunk, rows chunk, output
    block group), so each task unpacks its Q blocks' weights once and reuses them for every row of every image in
    its chunk; the groups of one chunk run back to back on one thread (static partition), so the chunk's input stays
    in cache across them. Otherwise parallel over (image, output block group, row tile)."""
    n, ob, oh, ow = spatial
    ext = [int(sch.get(lp).extent) for lp in spatial]
    obo, obi = _split(sch, ob, [None, tile.Q])
    oho, ohi = _split(sch, oh, [None, tile.R])
    owo, owi = _split(sch, ow, [None, tile.P])
    tile_loops = [ohi, owi, obi]
    if per_task:
        nc, rc = _task_chunks(ext[1] // tile.Q, ext[0], ext[2] // tile.R, threads, ext[0] * ext[2] * ext[3])
        nco, n = _split(sch, n, [nc, None])
        rco, oho = _split(sch, oho, [rc, None])
        sch.reorder(nco, rco, obo, n, oho, owo, *reduction, *tile_loops, *inner)
        sch.reverse_compute_at(out, owo, preserve_unit_loops=True)
        par = sch.fuse(nco, rco, obo)
    else:
        sch.reorder(n, obo, oho, owo, *reduction, *tile_loops, *inner)
        sch.reverse_compute_at(out, owo, preserve_unit_loops=True)
        par = sch.fuse(n, obo, oho)
    return par, (obi, ohi, owi)


def _ubsw_exact(sch: Schedule, out) -> bool:
    ann = sch.get(out).annotations
    return "ubsw_exact" in ann and int(ann["ubsw_exact"]) == 1



def _split(sch: Schedule, loop, factors: list[int | None]):
    """``sch.split`` with the factors typed like the loop (Relax gives int64 loops; int32 factors then break
    tensorize after a fuse)."""
    ty = str(sch.get(loop).extent.ty)
    return sch.split(loop, [None if f is None else tvm.tirx.const(int(f), ty) for f in factors])


def balanced_task_tile(n: int, ob: int, oh: int, ow: int, isa: str = "vnni", threads: int = 2,
                       min_balance: float = 0.9) -> ConvTile:
    """The register tile of a conv whose sub-byte weights are unpacked once per parallel task (``unpack_at="task"``):
    the first of :func:`conv_tile_candidates` whose task count (output-block groups x :func:`_task_chunks`) keeps
    the threads' static shares within ``min_balance`` of even (tasks / (threads * ceil(tasks / threads))), else the
    first candidate. A task here is a whole group of output blocks, so there are few: MobileNetV2's 576 -> 160 1x1
    conv at 7x7 has 5 groups of Q = 2 blocks, 3 + 2 on 2 threads (5/6 of even), while Q = 1 gives 5 + 5 (int4
    weights on a Zen 4, interleaved standalone kernels: 14.5 vs 15.3 us)."""
    cands = conv_tile_candidates(n, ob, oh, ow, isa, threads)
    if threads <= 1:
        return cands[0]
    for tile in cands:
        if tile.P * tile.Q * tile.R < 4:
            continue
        nc, rc = _task_chunks(ob // tile.Q, n, oh // tile.R, threads, n * oh * ow)
        tasks = ob // tile.Q * nc * rc
        if tasks / (threads * -(-tasks // threads)) >= min_balance:
            return tile
    return cands[0]


# What unpacking one 64-byte weight vector (nibbles -> int8, stored in the task's buffer) costs in vpdpbusd steps of
# the int8 loop that follows: int4 3x3 64 -> 64 at 7x7 (Zen 4, 2 threads, interleaved with its int8 build): 7 pixels
# per unpack 1.32-1.55x the int8 time, 49 pixels 1.05-1.08x.
UNPACK_STEPS = 2.2


def per_task_time(groups: int, chunks: int, pixels: int, threads: int) -> float:
    """Estimated time of an int4 conv that unpacks its weights once per parallel task, in vpdpbusd steps per
    weight vector of one output block: the busiest thread's tasks (TVM splits a parallel loop statically:
    ``ceil(tasks / threads)``) x (the task's pixels + :data:`UNPACK_STEPS`). ``groups``: output-block groups,
    ``chunks``: (images x rows) chunks per group, ``pixels``: output pixels of all images."""
    tasks = groups * chunks
    return -(-tasks // threads) * (pixels / chunks + UNPACK_STEPS)


def _task_chunks(groups: int, n: int, row_tiles: int, threads: int, pixels: int) -> tuple[int, int]:
    """Into how many chunks (images, rows) to cut one output-block group of an int4 conv for its parallel tasks.

    Each task unpacks the group's weights once: per output pixel that costs chunks / pixels unpack steps per
    vpdpbusd step, so the chunks stay <= pixels / 64 (a few % of the work); within that budget aim at >= 8 tasks
    per thread, else >= 2 per thread, and among those splits take the one of least :func:`per_task_time` (TVM
    splits a parallel loop statically, so a task count that the threads do not divide leaves one idle at the end:
    MobileNetV2's 24 -> 144 expand at 56x56, 3 groups, took 7 row chunks, 21 tasks, 11 + 10, and ran 1.045-1.063x its
    int8 kernel; 8 chunks give 12 + 12); where the budget allows neither, the split of least :func:`per_task_time`
    overall (more chunks repeat the unpack, fewer leave a thread idle).
    """
    options = sorted(((nc * rc, nc, rc) for nc in _divisors(n) for rc in _divisors(row_tiles)), reverse=True)
    budget = max(1, pixels // 64)
    for want in (8 * threads, 2 * threads):
        fit = [o for o in options if groups * o[0] >= want and o[0] <= budget]
        if fit:
            return min(reversed(fit), key=lambda o: (per_task_time(groups, o[0], pixels, threads), o[0]))[1:]
    # no split within the budget gives every thread 2 tasks: the least estimated time (a 3x3 64 -> 64 conv at 7x7
    # with Q = 2 has 2 groups; 7 one-row chunks each made 2 tasks per thread, each unpacking its weights for 7
    # pixels: 1.55x the int8 kernel, one chunk 1.08x; Zen 4, 2 threads, standalone, interleaved)
    return min(options, key=lambda o: (per_task_time(groups, o[0], pixels, threads), -o[0]))[1:]


def _unpack_fields(sch: Schedule, block) -> int:
    """Weights per packed byte read by a ``w_unpack`` block: 4 when it is annotated ``weight_bits = 2`` (int2), else
    2 (int4)."""
    ann = sch.get(block).annotations
    return 4 if "weight_bits" in ann and int(ann["weight_bits"]) == 2 else 2


def _try_tensorize(sch: Schedule, loop, intrin: str) -> bool:
    """Tensorize ``loop`` with ``intrin`` if TVM can, tried on a copy of the schedule first (TVM 0.27's blockize
    fails inside the 1x1 convs that reduce over a flat axis of real 4-channel steps, ``CHUNKED_REDUCTION_ATTR``,
    with the unpack inside the reduction: an int32 extent for an int64 iterator); False leaves ``sch`` as it was."""
    try:
        sch.copy().tensorize(loop, intrin)
    except RuntimeError:             # tvm.error.InternalError; a ScheduleError is one too
        return False
    sch.tensorize(loop, intrin)
    return True


def _schedule_unpack(sch: Schedule, block, layout: str, ndim: int, unroll_outer: bool = True,
                     gfni: bool = False) -> None:
    """int4 / int2 -> int8 weights: vectorize over the bytes of one field position (32 bytes for int4, 16 for int2)
    and unroll the field index, so every shift amount is a constant (LLVM 22 at -O3 miscompiles the int4 unpack with
    a variable shift, kernels/README.md); unroll the outer block loops when the unpack sits inside the reduction
    (one register tile step), else leave them as loops (a whole task's weights).

    ``gfni`` (the target has GFNI + AVX-512 BW, :func:`target_has_gfni512`), int4 in the VNNI layout: each 64-weight
    vector is one tensorized ``vbroadcasti64x4`` + ``vgf2p8affineqb`` + 64-byte store
    (:func:`kernels.intrin.register_unpack4_intrinsic`) instead of LLVM's three 256-bit ``vgf2p8affineqb`` and two
    32-byte stores for the vectorized shifts; inside the reduction (``unpack_at="step"``) the one store also lets
    the ``vpdpbusd`` that reads the vector take it by store forwarding (a 64-byte load of two 32-byte stores
    cannot)."""
    fields = _unpack_fields(sch, block)
    loops = sch.get_loops(block)[-ndim:]
    if layout == "vnni" and fields == 2 and gfni and _try_tensorize(sch, loops[-2], register_unpack4_intrinsic(
            sch.get(block).writes[0].source.scope())):
        if unroll_outer:
            for lp in loops[:-2]:
                sch.unroll(lp)
        return
    if layout == "vnni":
        *outer, oci, ics = loops
        hi_, lo_ = sch.split(oci, [fields, 16 // fields])
        v = sch.fuse(lo_, ics)
        unroll = [hi_]
    else:
        *outer, p, oci, j = loops
        if fields == 2:
            v, unroll = sch.fuse(oci, j), [p]
        else:
            hi_, lo_ = sch.split(oci, [2, 8])
            v, unroll = sch.fuse(lo_, j), [p, hi_]
    sch.vectorize(v)
    for lp in unroll:
        sch.unroll(lp)
    if unroll_outer:
        for lp in outer:
            sch.unroll(lp)


def schedule_depthwise(sch: Schedule, threads: int = 2, p_max: int = 8, isa: str | None = None) -> Schedule:
    """Depthwise conv, parallel over (n, channel block, row), a tile of P output columns (P accumulators).

    ``conv2d_nchwc_depthwise``: int32 multiply-adds vectorized over the 16 channels of a block (no dot product).
    ``depthwise_taps_vnni``: per column, kernel row and group of 4 taps one shuffled 64-byte load + vpdpbusd
    (:func:`kernels.intrin.register_taps_intrinsic`).
    """
    out = sch.get_sblock("out")
    acc = sch.get_sblock("acc")
    pad = _try_block(sch, "pad")
    taps = str(sch.get(out).annotations[KERNEL_ATTR]) == "depthwise_taps_vnni"
    n, cb, oh, ow, ci, rkh, rkw, *tap = sch.get_loops(acc)      # taps: rkw = tap group, tap = [tap in group]
    owx = int(sch.get(ow).extent)
    p = max(d for d in _divisors(owx) if d <= p_max)
    owo, owi = _split(sch, ow, [None, p])
    sch.reorder(n, cb, oh, owo, rkh, rkw, owi, ci, *tap)
    sch.reverse_compute_at(out, owo, preserve_unit_loops=True)
    par = sch.fuse(n, cb, oh)
    if threads > 1:
        sch.parallel(par)
    sch.set_scope(acc, 0, ACC_SCOPE)
    if not taps and p == owx and BORDER_ATTR in sch.get(out).annotations:
        sch.annotate(out, SKIP_ATTR, 1)     # zero border, tile = the whole row: skip the border taps (kernels.border)
    if taps:
        init = sch.decompose_reduction(acc, rkh)
        sch.tensorize(ci, register_taps_intrinsic(ACC_SCOPE))
    else:
        sch.vectorize(ci)
        init = sch.decompose_reduction(acc, rkh)
    sch.unroll(owi)
    _vectorize_inner(sch, sch.get_loops(init)[-2:])
    _vectorize_inner(sch, sch.get_loops(out)[-5:])
    if pad is not None:
        _schedule_pad(sch, pad, threads)
    return sch


def schedule_dense(sch: Schedule, q: int | None = None, threads: int = 2, isa: str | None = None,
                   gfni: bool = False) -> Schedule:
    """Dense: Q output blocks per parallel task, batch rows unrolled, vpdpbusd (or vpmaddubsw / vpmaddwd, see
    :func:`dot_product`) over K/4 steps."""
    out = sch.get_sblock("out")
    layout = str(sch.get(out).annotations[KERNEL_ATTR]).rsplit("_", 1)[1]
    intrin, tiles = dot_product(layout, isa or layout, _ubsw_exact(sch, out))
    acc = sch.get_sblock("acc")
    n, ob, oc, rkf, rks = sch.get_loops(acc)
    threads = parallel_threads(sch, acc, threads, int(sch.get(n).extent))
    pad = _try_block(sch, "pad")
    unpack = _try_block(sch, "w_unpack")
    nx, obx = int(sch.get(n).extent), int(sch.get(ob).extent)
    max_acc = {"vnni": 24, "ymm": 6}.get(tiles, 4)
    pn = max(d for d in _divisors(nx) if d <= max(1, max_acc // 2))
    if q is None:
        cands = [d for d in _divisors(obx) if d * pn <= max_acc]
        good = [d for d in cands if (nx // pn) * (obx // d) >= 2 * threads]
        q = max(good) if good else max(cands)
    no, ni = sch.split(n, [None, pn])
    obo, obi = sch.split(ob, [None, q])
    sch.reorder(no, obo, rkf, obi, ni, oc, rks)
    sch.reverse_compute_at(out, obo, preserve_unit_loops=True)
    par = sch.fuse(no, obo)
    if threads > 1:
        sch.parallel(par)
    sch.set_scope(acc, 0, ACC_SCOPE)
    if unpack is not None:
        sch.compute_at(unpack, rkf, preserve_unit_loops=True)
        _schedule_unpack(sch, unpack, layout, 4 if layout == "vnni" else 5, gfni=gfni)
    init = sch.decompose_reduction(acc, rkf)
    _vectorize_inner(sch, sch.get_loops(init)[-3:])
    sch.tensorize(oc, intrin)
    sch.unroll(obi)
    sch.unroll(ni)
    oloops = sch.get_loops(out)
    c = oloops[-1]
    co, ci = sch.split(c, [None, 16])
    sch.vectorize(ci)
    if pad is not None:
        ploops = sch.get_loops(pad)
        sch.vectorize(ploops[-1])
    return sch


def runs_serial(macs: int, pixels: int) -> bool:
    """Whether a conv / dense kernel of ``macs`` multiply-adds (padding included) over ``pixels`` output pixels
    (images x rows x columns; a dense kernel's rows) runs on the calling thread: under :data:`MIN_PARALLEL_MACS`, or
    under :data:`SMALL_KERNEL_MACS` with weights (``macs / pixels``) under :data:`MIN_PARALLEL_MACS`."""
    return macs < MIN_PARALLEL_MACS or (macs < SMALL_KERNEL_MACS and macs < MIN_PARALLEL_MACS * pixels)


def parallel_threads(sch: Schedule, acc, threads: int, pixels: int) -> int:
    """``threads``, or 1 for a conv / dense kernel whose accumulation block ``acc`` (its iterations: the
    multiply-adds) over ``pixels`` output pixels :func:`runs_serial`: it then runs on the calling thread, with the
    tile and task choices of a 1-thread build."""
    return 1 if runs_serial(_elems(sch, acc), pixels) else threads


def _elems(sch: Schedule, block) -> int:
    total = 1
    for lp in sch.get_loops(block):
        total *= int(sch.get(lp).extent)
    return total


def schedule_pool(sch: Schedule, threads: int = 2) -> Schedule:
    """maxpool / avgpool in the blocked layout: parallel over (n, cb, oh), vectorized over the 16 channels."""
    out = sch.get_sblock("out")
    acc = _try_block(sch, "acc")
    red = acc if acc is not None else out
    n, cb, oh, ow, c, rkh, rkw = sch.get_loops(red)
    sch.reorder(n, cb, oh, ow, rkh, rkw, c)
    if acc is not None:
        sch.reverse_compute_at(out, ow, preserve_unit_loops=True)
        sch.set_scope(acc, 0, ACC_SCOPE)
    par = sch.fuse(n, cb, oh)
    if threads > 1 and _elems(sch, out) >= _MIN_PARALLEL_ELEMS:
        sch.parallel(par)
    sch.vectorize(c)
    init = sch.decompose_reduction(red, rkh)
    sch.vectorize(sch.get_loops(init)[-1])
    if acc is not None:
        sch.vectorize(sch.get_loops(out)[-1])
    return sch


def schedule_gap(sch: Schedule, threads: int = 2) -> Schedule:
    """Global average pool: per (n, cb), sum H*W pixel vectors of 16 channels into int32 lanes, then requant."""
    out = sch.get_sblock("out")
    acc = sch.get_sblock("acc")
    n, cb, c, rh, rw = sch.get_loops(acc)
    sch.reorder(n, cb, rh, rw, c)
    sch.reverse_compute_at(out, cb, preserve_unit_loops=True)
    sch.set_scope(acc, 0, ACC_SCOPE)
    par = sch.fuse(n, cb)
    if threads > 1 and _elems(sch, acc) >= _MIN_PARALLEL_ELEMS:
        sch.parallel(par)
    sch.vectorize(c)
    init = sch.decompose_reduction(acc, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out)[-1])
    return sch


def schedule_elementwise(sch: Schedule, threads: int = 2) -> Schedule:
    """Elementwise / layout ops: vectors of 16-64 elements inside the trailing dimensions (a vector never crosses a
    row, so its loads and stores stay contiguous: a 64-wide vector over a fused index that wraps a 224-pixel row
    becomes a gather and 16 single-byte stores), the outer dimensions fused and parallelized."""
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    extents = [int(sch.get(lp).extent) for lp in loops]
    total = _elems(sch, out)
    k, row = len(loops), 1
    while k > 0 and row < 64:
        k -= 1
        row *= extents[k]
    inner = next(c for c in (64, 32, 16, 8, 4, 2, 1) if row % c == 0)
    row_loop = sch.fuse(*loops[k:]) if len(loops) - k > 1 else loops[k]
    chunk, vec = sch.split(row_loop, [None, inner])
    outer = sch.fuse(*loops[:k], chunk) if k > 0 else chunk
    if threads > 1 and total >= _MIN_PARALLEL_ELEMS:
        sch.parallel(outer)
    if inner > 1:
        sch.vectorize(vec)
    return sch


def schedule_to_nchwc(sch: Schedule, threads: int = 2) -> Schedule:
    """NCHW -> NCHW[c]c: per row, for each channel of the block (unrolled) copy 16-pixel vectors (a 3x faster
    interleave than vectorizing over the channel block)."""
    out = sch.get_sblock("out")
    n, cb, h, w, ci = sch.get_loops(out)
    wx = int(sch.get(w).extent)
    wv = max(d for d in _divisors(wx) if d <= 16)
    wo, wi = sch.split(w, [None, wv])
    sch.reorder(n, cb, h, wo, ci, wi)
    par = sch.fuse(n, cb, h)
    if threads > 1 and _elems(sch, out) >= _MIN_PARALLEL_ELEMS:
        sch.parallel(par)
    sch.unroll(ci)
    sch.vectorize(wi)
    return sch


def schedule_to_rows(sch: Schedule, threads: int = 2, vec: int = 16) -> Schedule:
    """NCHW -> padded interleaved rows: rows in parallel, per 16-pixel chunk one vector per channel, stored
    interleaved (stride C)."""
    out = sch.get_sblock("out")
    c = int(sch.get(out).annotations["channels"])
    n, r, k = sch.get_loops(out)
    par = sch.fuse(n, r)
    if threads > 1 and _elems(sch, out) >= _MIN_PARALLEL_ELEMS:
        sch.parallel(par)
    j, ci = sch.split(k, [None, c])
    jo, ji = sch.split(j, [None, vec])
    sch.reorder(jo, ci, ji)
    sch.unroll(ci)
    sch.vectorize(ji)
    return sch


_SCHEDULES = {
    "conv2d_nchwc_vnni": schedule_conv2d_nchwc,
    "conv2d_nchwc_avx2": schedule_conv2d_nchwc,
    "conv2d_nchwc_depthwise": schedule_conv2d_nchwc,
    "depthwise_taps_vnni": schedule_depthwise,
    "dense_vnni": schedule_dense,
    "dense_avx2": schedule_dense,
    "pool_nchwc": schedule_pool,
    "gap_nchwc": schedule_gap,
    "eltwise_nchwc": schedule_elementwise,
    "to_nchwc": schedule_to_nchwc,
    "to_nchw": schedule_elementwise,
    "to_rows": schedule_to_rows,
}


# ----------------------------------------------------------------------------------------------------------------------
# PrimFunc / IRModule entry points


def kernel_kind(func: tvm.tirx.PrimFunc) -> str | None:
    """The ``ptq2tvm_kernel`` annotation of a PrimFunc's output block, or None if it is not one of ours."""
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    if func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR]):
        return None
    try:
        sch = Schedule(func)
        blk = sch.get_sblock("out")
    except Exception:  # noqa: BLE001
        return None
    ann = sch.get(blk).annotations
    return str(ann[KERNEL_ATTR]) if KERNEL_ATTR in ann else None


def arithmetic_shortcuts(mod: tvm.IRModule) -> dict[str, int]:
    """How many kernels (PrimFuncs; Relax shares one between layers of identical shape) of a blocked module use each
    proved arithmetic shortcut: ``int16_accumulator`` (vpmaddubsw convs, ``i16_group``), ``int16_depthwise`` and
    ``int32_epilogue`` (:func:`kernels.ops.requant_expr` ``shift_ge32``), and ``lifted_epilogue`` (TE convs proved
    for the lifted form, :data:`kernels.ops.LIFTED_ATTR`: it runs where the schedule tensorizes the epilogue; a 3x3
    conv with runtime border tests keeps the exact TE epilogue), read from the output blocks' annotations (scheduled
    or not)."""
    counts = {"int16_accumulator": 0, "int16_depthwise": 0, "int32_epilogue": 0, "lifted_epilogue": 0}
    for func in mod.functions.values():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and "int32_epilogue" in func.attrs:     # amx.py / depthwise_vnni.py kernels
            counts["int32_epilogue"] += int(func.attrs["int32_epilogue"])
            continue
        ann = output_annotations(func)
        if KERNEL_ATTR not in ann:
            continue
        if "i16_group" in ann and int(ann["i16_group"]) > 0:
            counts["int16_depthwise" if "depthwise" in str(ann[KERNEL_ATTR]) else "int16_accumulator"] += 1
        if "int32_epilogue" in ann and int(ann["int32_epilogue"]) == 1:
            counts["int32_epilogue"] += 1
        if LIFTED_ATTR in ann:
            counts["lifted_epilogue"] += 1
    return counts


def apply_schedule(sch: Schedule, target=None, **options) -> Schedule:
    """Apply the hand schedule matching the kernel annotation of ``sch``'s PrimFunc to ``sch`` (in place; the
    schedule's trace then records it, which is what MetaSchedule's database stores). ``options`` as in
    :func:`schedule_primfunc`."""
    func = sch.mod["main"]
    kind = kernel_kind(func)
    if kind is None:
        raise ValueError("not an unscheduled ptq2tvm kernel (no 'ptq2tvm_kernel' block annotation)")
    if kind.startswith(("conv2d_nchwc", "dense")):
        t = _as_target(target)
        isa = target_isa(t) if t is not None else None
        if kind.endswith("_vnni") and isa is not None and isa not in ("vnni", "avxvnni") and \
                not _ubsw_exact(sch, sch.get_sblock("out")):
            raise ValueError(f"kernel {kind} needs AVX-512 VNNI or AVX-VNNI (or weights proven exact for vpmaddubsw, "
                             f"ubsw_exact), target {t} lacks them; pack with isa='avx2'")
        options.setdefault("isa", isa)
        options.setdefault("gfni", target_has_gfni512(t))
    elif kind == "depthwise_taps_vnni":
        t = _as_target(target)
        if t is not None and target_isa(t) != "vnni":
            raise ValueError(f"kernel {kind} needs AVX-512 VNNI and VBMI, target {t} lacks them")
    return _SCHEDULES[kind](sch, threads=_num_threads(target), **options)


def finish_scheduled(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Finish a scheduled kernel: skip the zero-point border taps and prefetch the next weights where its schedule
    asked for it (:func:`kernels.border.skip_zero_border`, :func:`kernels.prefetch.prefetch_next_weights`), and
    mark it so dlight/MetaSchedule skip it and FuseOps leaves it alone (kOpaque)."""
    func = prefetch_next_weights(skip_zero_border(func), output_annotations(func))
    return func.with_attr(SCHEDULED_ATTR, True).with_attr("op_pattern", OP_PATTERN_OPAQUE)


def schedule_primfunc(func: tvm.tirx.PrimFunc, target=None, **options) -> tvm.tirx.PrimFunc:
    """Apply the hand schedule matching ``func``'s kernel annotation; return the scheduled PrimFunc.

    ``options`` go to the schedule (e.g. ``tile=ConvTile(P, Q, R)`` for convs, ``p_max`` for depthwise, ``q`` for
    dense; :func:`tuning_space` lists them). Raises ValueError for a VNNI kernel on a target without VNNI (pack the
    weights with ``isa=target_isa(target)`` instead).
    """
    sch = apply_schedule(Schedule(func), target, **options)
    return finish_scheduled(sch.mod["main"])


def tuning_space(func: tvm.tirx.PrimFunc, target=None, limit: int | None = None) -> list[dict]:
    """The schedule options worth measuring for one kernel PrimFunc, the hand schedule's choice first (``{}``).

    Convs: the register tiles of :func:`conv_tile_candidates` (int4 weights: also unpacked per reduction step with
    their own tiles), ranked for the threads the schedule will use (:func:`parallel_threads`); depthwise: the column
    tile ``p_max``; dense: the output blocks per task ``q``. Other kernels (layout changes, pools, element-wise) have
    one schedule: ``[{}]``.
    """
    kind = kernel_kind(func)
    if kind is None:
        raise ValueError("not an unscheduled ptq2tvm kernel (no 'ptq2tvm_kernel' block annotation)")
    threads = _num_threads(target)
    sch = Schedule(func)
    space: list[dict] = [{}]
    if kind.endswith("depthwise") or kind == "depthwise_taps_vnni":
        ow = int(sch.get(sch.get_loops(sch.get_sblock("acc"))[3]).extent)
        default = max(d for d in _divisors(ow) if d <= 8)
        space += [{"p_max": d} for d in sorted(_divisors(ow), key=lambda d: abs(d - default))
                  if d <= 16 and d != default]
    elif kind.startswith("conv2d"):
        acc = sch.get_sblock("acc")
        n, ob, oh, ow = (int(sch.get(lp).extent) for lp in sch.get_loops(acc)[:4])
        threads = parallel_threads(sch, acc, threads, n * oh * ow)     # a small conv is built serial
        layout = kind.rsplit("_", 1)[1]
        t = _as_target(target)
        isa = dot_product(layout, target_isa(t) if t is not None else layout,
                          _ubsw_exact(sch, sch.get_sblock("out")))[1]
        tiles = conv_tile_candidates(n, ob, oh, ow, isa=isa, threads=threads)
        space += [{"tile": t} for t in tiles[1:]]
        if _try_block(sch, "w_unpack") is not None:     # int4: also unpack inside the reduction, with its own tiles
            step = conv_tile_candidates(n, ob, oh, ow, isa=isa, threads=threads, int4=True)
            space += [{"unpack_at": "step", "tile": t} for t in step[:3]]
            if default_unpack_at(n, ob, oh, ow, isa) == "step":
                space.append({"unpack_at": "task"})
    elif kind.startswith("dense"):
        obx = int(sch.get(sch.get_loops(sch.get_sblock("acc"))[1]).extent)
        space += [{"q": d} for d in _divisors(obx) if d <= 24]
    return space[:limit] if limit else space


def schedule_module(mod: tvm.IRModule, target=None) -> tvm.IRModule:
    """Return ``mod`` with every ptq2tvm kernel PrimFunc replaced by its hand-scheduled version.

    Call it on the Relax IRModule right after building it with ``emit_te`` (before ``tvm.compile``); other functions
    are left untouched.
    """
    updates = {}
    for gv, func in mod.functions.items():
        if kernel_kind(func) is not None:
            updates[gv] = schedule_primfunc(func, target)
    if not updates:
        return mod
    new = mod.clone()
    for gv, f in updates.items():
        new.update_func(gv, f)
    return new
