"""CUDA schedules for every kernel of a blocked int8 build; convolutions use ``dp4a`` (u8 x s8 -> s32, sm_61+).

The convs use the same TE computes and the same packed weights as the x86 VNNI kernels (:mod:`kernels.ops`,
``isa="vnni"`` packing ``[ob, icb, kh, kw, cf, 16 oc, 4 ic]``): the 4 input channels of one dot product are 4
consecutive bytes of both the NCHW16c activation and the weight, i.e. one 32-bit ``dp4a.u32.s32`` operand each. The
computes are the tested x86 ones; the schedules decide loop order, thread binding and staging (the tests run the
generated CUDA C++ in a CPU emulation of the CUDA thread model, bit-exact):

    grid:   one block per (image, Q output blocks, R rows, P columns) tile
    block:  threads (Q*4 channel groups) x R rows x P/W columns; each thread owns 4 channels x W pixels
    for each 16-channel input block:
        stage the input window (zero-point padding inlined) and the Q blocks' weights in shared memory
        for kh, kw, 4-channel group:  acc[4][W] += dp4a(x[4 bytes], w[4 bytes])   (kernels.intrin dp4a)
    requant (+ residual) epilogue from registers, uint8 store

int4 (two per byte) and int2 (four per byte) weights stay packed in global memory and are unpacked while staging them
in shared memory.
Depthwise convs: one thread per output element (channel lanes adjacent, so a warp's loads and stores coalesce), the
KHxKW taps in registers (TVM's default schedule made one thread block per output element there, 9 of its threads
busy). Every other kernel (pools, adds, the classifier, layout changes, input quantization): one thread per output
element, element-wise producers inlined, reductions run in the thread (:func:`schedule_simple_cuda`). So every
kernel of a CUDA build is scheduled here, with launch shapes the tests know, and can be run in emulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.s_tir import Schedule

from .intrin import register_dp4a_intrinsic
from .ops import CHUNKED_REDUCTION_ATTR, KERNEL_ATTR
from .schedule import _split, _try_block, finish_scheduled, kernel_kind

THREADS_PER_BLOCK = 256      # the one-thread-per-output kernels (depthwise and the rest)


@dataclass(frozen=True)
class CudaConvTile:
    """Q output blocks x R rows x P columns per thread block; each thread computes 4 channels x W columns."""

    Q: int
    R: int
    P: int
    W: int


def _largest_divisor(v: int, options: tuple[int, ...]) -> int:
    return next((d for d in options if v % d == 0), 1)


def choose_cuda_conv_tile(ob: int, oh: int, ow: int) -> CudaConvTile:
    """A tile whose factors divide the output (no predicated tails) with 32-256 threads."""
    q = 2 if ob % 2 == 0 else 1
    p = _largest_divisor(ow, (8, 7, 4, 2))
    w = 2 if p % 2 == 0 else 1
    r = _largest_divisor(oh, (4, 2))
    return CudaConvTile(q, r, p, w)


def _bind_copy(sch: Schedule, block, tile: CudaConvTile, vector: int) -> None:
    """Spread a shared-memory staging copy over the block's threads (``vector`` bytes per thread and step)."""
    loops = sch.get_loops(block)[5:]          # below blockIdx.x, threadIdx.z/y/x and the input-block loop
    fused = sch.fuse(*loops)
    fused, vec = _split(sch, fused, [None, vector])
    _, tz, ty, tx = _split(sch, fused, [None, tile.Q * 4, tile.R, tile.P // tile.W])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def schedule_conv2d_dp4a(sch: Schedule, tile: CudaConvTile | None = None) -> Schedule:
    """Schedule a :func:`kernels.conv2d_nchwc_requant` PrimFunc (vnni packing, int8, int4 or int2) for CUDA dp4a."""
    intrin = register_dp4a_intrinsic("local")
    out = sch.get_sblock("out")
    kind = str(sch.get(out).annotations[KERNEL_ATTR])
    if kind != "conv2d_nchwc_vnni":
        raise ValueError(f"no CUDA dp4a schedule for kernel {kind!r} (only conv2d_nchwc_vnni)")
    if CHUNKED_REDUCTION_ATTR in sch.get(out).annotations:
        raise ValueError("no CUDA dp4a schedule for a conv built with in_channels (its chunked reduction): build it "
                         "without in_channels")
    acc = sch.get_sblock("acc")
    pad = _try_block(sch, "pad")
    unpack = _try_block(sch, "w_unpack")
    n, ob, oh, ow, oc = sch.get_loops(out)
    ext = [int(sch.get(lp).extent) for lp in (ob, oh, ow)]
    tile = tile or choose_cuda_conv_tile(*ext)
    if ext[0] % tile.Q or ext[1] % tile.R or ext[2] % tile.P or tile.P % tile.W:
        raise ValueError(f"tile {tile} does not divide the output ({ext[0]} blocks, {ext[1]}x{ext[2]})")
    obo, obi = _split(sch, ob, [None, tile.Q])
    oho, ohi = _split(sch, oh, [None, tile.R])
    owo, owt, owr = _split(sch, ow, [None, tile.P // tile.W, tile.W])
    oct_, ocr = _split(sch, oc, [None, 4])
    sch.reorder(n, obo, oho, owo, obi, oct_, ohi, owt, ocr, owr)
    bx = sch.fuse(n, obo, oho, owo)
    tz = sch.fuse(obi, oct_)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tz, "threadIdx.z")
    sch.bind(ohi, "threadIdx.y")
    sch.bind(owt, "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    sch.compute_at(acc, owt, preserve_unit_loops=True)
    *_, an, aob, aoh, aow, aoc, ric, rkh, rkw, rcf, rcs = sch.get_loops(acc)
    sch.reorder(ric, rkh, rkw, rcf, an, aob, aoh, aoc, aow, rcs)
    x_shared = sch.cache_read(acc, 0, "shared")
    w_shared = sch.cache_read(acc, 1, "shared")
    sch.compute_at(x_shared, ric)
    sch.compute_at(w_shared, ric)
    if pad is not None:
        sch.compute_inline(pad)
    if unpack is not None:
        sch.compute_inline(unpack)
    _bind_copy(sch, x_shared, tile, 4)
    _bind_copy(sch, w_shared, tile, 1 if unpack is not None else 4)
    sch.decompose_reduction(acc, ric)
    sch.tensorize(rcs, intrin)
    for lp in (an, aob, aoh, aoc, aow):
        sch.unroll(lp)
    return sch


def schedule_depthwise_cuda(sch: Schedule, threads: int = THREADS_PER_BLOCK) -> Schedule:
    """Schedule a depthwise :func:`kernels.conv2d_nchwc_requant` PrimFunc: one output element per thread
    (:func:`schedule_simple_cuda`), its KHxKW taps unrolled."""
    if str(sch.get(sch.get_sblock("out")).annotations[KERNEL_ATTR]) != "conv2d_nchwc_depthwise":
        raise ValueError("not a depthwise conv kernel")
    schedule_simple_cuda(sch, threads)
    for lp in sch.get_loops(sch.get_sblock("acc"))[2:]:      # below blockIdx.x, threadIdx.x
        sch.unroll(lp)
    return sch


def schedule_simple_cuda(sch: Schedule, threads: int = THREADS_PER_BLOCK) -> Schedule:
    """Any PrimFunc with one output block: one thread per output element (``threads`` per block), element-wise
    producers inlined, reduction producers computed per thread in registers, the output's own reduction (max pool)
    in the thread."""
    *producers, out = sch.get_child_blocks(sch.get_sblock("root"))
    kept = []
    for b in reversed(producers):
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - a reduction (or a block read twice with a reduction in between)
            kept.append(b)
    n_spatial = sum(1 for iv in sch.get(out).iter_vars if int(iv.iter_type) == 0)
    loops = sch.get_loops(out)
    bx, tx = _split(sch, sch.fuse(*loops[:n_spatial]), [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for b in kept:                # consumers first: each producer lands inside the loops of what reads it
        sch.set_scope(b, 0, "local")
        sch.compute_at(b, tx, preserve_unit_loops=True)
    return sch


def launch_shape(func: tvm.tirx.PrimFunc) -> tuple[int, tuple[int, int, int]]:
    """(grid size, (threadIdx x, y, z)) of a PrimFunc scheduled by this module (one kernel, 1-D grid)."""
    ext = {"blockIdx.x": 1, "threadIdx.x": 1, "threadIdx.y": 1, "threadIdx.z": 1}
    sch = Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        for lp in sch.get_loops(block):
            loop = sch.get(lp)
            if loop.thread_binding is not None:
                ext[str(loop.thread_binding.thread_tag)] = int(loop.extent)
    return ext["blockIdx.x"], (ext["threadIdx.x"], ext["threadIdx.y"], ext["threadIdx.z"])


def schedule_module_cuda(mod: tvm.IRModule) -> tvm.IRModule:
    """Return ``mod`` with every PrimFunc scheduled for CUDA (dp4a convs, depthwise convs, everything else one thread
    per output) and marked so that dlight leaves it alone."""
    new = mod.clone()
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        kind = kernel_kind(func)
        sch = Schedule(func)
        if kind == "conv2d_nchwc_vnni":
            schedule_conv2d_dp4a(sch)
        elif kind == "conv2d_nchwc_depthwise":
            schedule_depthwise_cuda(sch)
        else:
            schedule_simple_cuda(sch)
        new.update_func(gv, finish_scheduled(sch.mod["main"]))
    return new


__all__ = ["THREADS_PER_BLOCK", "CudaConvTile", "choose_cuda_conv_tile", "launch_shape", "schedule_conv2d_dp4a",
           "schedule_depthwise_cuda", "schedule_module_cuda", "schedule_simple_cuda"]
