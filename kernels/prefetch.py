"""Software prefetch of a conv kernel's next weights, spread over the reduction of the current parallel task.

In a network every conv reads its weights cold: 11 MB of other layers pass between two calls of one ResNet-18 layer.
A conv's parallel tasks (:mod:`kernels.schedule`) each cover one group of Q output blocks (and a row tile, or a chunk
of rows for int4 weights unpacked per task); the first task of a group pays for the misses on the group's weight
slice, which the hardware prefetchers did not hide. Measured on a Zen 4 (2 threads, standalone 3x3 convs, the weights
rotated over 8 copies as in a network, so that they come from L3 / DRAM): 512 -> 512 at 7x7 0.285 ms against
0.218 ms with the same weights every call, 256 -> 512 at 14x14 stride 2 0.174 ms against 0.128 ms; int4 weights
(unpacked per task) 512 -> 512 at 7x7 0.298 against 0.250 ms. In ResNet-18 its 7x7 convs took 1.1x OpenVINO INT8's
time, the others 0.95-1.05x.

:func:`prefetch_next_weights` makes every task fetch the *next* group's weight slice while it computes: at the top of
each iteration of its outermost reduction loop (an input-channel block) it issues ``k`` cache-line prefetches
(``prefetcht0``), so that the tasks of one group together cover the next group's slice once. Line ``(position *
iterations + i) * k + j`` (clamped to the slice), where ``i`` counts the iterations of the loops from the task down
to the outermost reduction loop (``iterations`` in all) and ``position`` is the task's index within its group. The
weight slices are contiguous in the packed layouts (``[OB, ...]``, Q consecutive blocks of ``group_bytes``), so the
next one starts ``group_bytes`` after the current one (after the last group: group 0, the next image's). Prefetches
never change a value: the kernel stays bit-exact.

The schedule asks for it with :data:`PREFETCH_ATTR` = ``[tasks_per_group, groups, group_bytes]`` on the output
block: the group of task ``t`` is ``(t // tasks_per_group) % groups``. It does so for AVX-512 VNNI kernels whose
register tile spans the whole output row (int8 weights: task = (image, group, row tile), ``tasks_per_group`` = row
tiles; int4 / int2 weights unpacked per task: task = (chunk, group), ``tasks_per_group`` = 1, the packed weights
prefetched). Not elsewhere: with a narrower tile and runtime border tests the inserted calls made LLVM spill the
accumulators (3x3 128 -> 128 at 28x28 2.4x slower), and AVX2 builds (run on the Zen 4) lost up to 13% (3x3 256 ->
512 at 14x14/2). Results with it (same Zen 4, weights rotated / the same every call): 512 -> 512 at 7x7 0.223 /
0.211 ms, 256 -> 512 at 14x14/2 0.130 / 0.125 ms.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import SBlockRealize
from tvm.tirx.analysis import undefined_vars
from tvm_ffi.structural import structural_mutate

PREFETCH_ATTR = "weight_prefetch"     # [tasks_per_group, groups, group_bytes]: set by the schedule
TASK_LOOP_ATTR = "conv_task_loop"     # loop annotation: the loop over the parallel tasks (parallel or not)
ACCUMULATE_BLOCK = "acc_update_o"     # the tensorized accumulation block (decompose_reduction + tensorize)
UNPACK_BLOCK = "w_unpack"             # sub-byte weights unpacked to int8 (kernels.ops): reads the packed parameter
UNPACK_BLOCKS = (UNPACK_BLOCK, UNPACK_BLOCK + "_o")     # ... vectorized, or tensorized (the GFNI int4 unpack)
LINE_BYTES = 64
LOCALITY = 3                          # llvm.prefetch locality 3: prefetcht0 (measured best of t0 / t1 / t2 on Zen 4)
_COMM_REDUCE = 2                      # IterVar.iter_type of a reduction block var


def _uses(expr, var) -> bool:
    """Whether ``expr`` reads the variable ``var``."""
    return any(v.same_as(var) for v in undefined_vars(expr))


def _prefetch(address) -> tirx.Stmt:
    return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                               tirx.const(LOCALITY, "int32"), tirx.const(1, "int32")))


def prefetch_line(position, counter, j, iterations: int, per_iteration: int, group_lines: int, minimum=min):
    """Which line of the next group's weight slice the ``j``-th prefetch of iteration ``counter`` (of
    ``iterations``) of the task at ``position`` within its group fetches: ``(position * iterations + counter) *
    per_iteration + j``, clamped to ``group_lines - 1``. Python ints (``minimum=min``) or TIR expressions
    (``minimum=tirx.min``)."""
    return minimum((position * iterations + counter) * per_iteration + j, group_lines - 1)


def per_iteration_lines(group_lines: int, tasks_per_group: int, iterations: int) -> int:
    """Prefetches per iteration so that the ``tasks_per_group * iterations`` iterations of a group cover the next
    group's ``group_lines`` lines."""
    return -(-group_lines // (tasks_per_group * iterations))


def _find_sites(func: tirx.PrimFunc) -> dict:
    """The weight parameter (read by :data:`UNPACK_BLOCK` if there is one, else by :data:`ACCUMULATE_BLOCK`), the
    task loop (:data:`TASK_LOOP_ATTR`) around the accumulation block and the loops from it down to the outermost
    reduction loop."""
    params = list(func.params)
    stack: list = []
    found: dict = {"accumulate": [], "unpack": []}

    def param_reads(block, dtypes):
        return [r.source for r in block.reads
                if str(r.source.dtype) in dtypes and any(r.source.same_as(p) for p in params)]

    def on_for(loop, mutator):
        stack.append(loop)
        out = mutator.default_mutate(loop)
        stack.pop()
        return out

    def on_realize(realize, mutator):
        block = realize.block
        if block.name_hint in UNPACK_BLOCKS:
            found["unpack"].append(param_reads(block, ("uint8", "int8")))
            return realize
        if block.name_hint != ACCUMULATE_BLOCK:
            return mutator.default_mutate(realize)
        parallel = [i for i, lp in enumerate(stack) if TASK_LOOP_ATTR in lp.annotations]
        reduce_values = [v for iv, v in zip(block.iter_vars, realize.iter_values) if int(iv.iter_type) == _COMM_REDUCE]
        inner = stack[parallel[0] + 1:] if len(parallel) == 1 else []
        first = next((k for k, lp in enumerate(inner) if any(_uses(v, lp.loop_var) for v in reduce_values)), None)
        found["accumulate"].append((param_reads(block, ("int8",)), stack[parallel[0]] if inner else None,
                                    inner[:first + 1] if first is not None else []))
        return realize

    structural_mutate(func, [(tirx.For, on_for), (SBlockRealize, on_realize)])
    return found


def prefetch_next_weights(func: tirx.PrimFunc, annotations: dict) -> tirx.PrimFunc:
    """``func`` (a scheduled dense / grouped conv kernel) with the next group's weights prefetched when
    ``annotations`` (its output block's, :func:`kernels.border.output_annotations`) carry :data:`PREFETCH_ATTR`;
    else ``func``.

    Raises ValueError when a kernel marked for prefetching lacks the expected structure (one accumulation block
    :data:`ACCUMULATE_BLOCK` inside one task loop, under a reduction loop, one weight parameter read by it or by
    the unpack block): the mark would otherwise be lost silently after a TVM or schedule change."""
    if PREFETCH_ATTR not in annotations:
        return func
    tasks_per_group, groups, group_bytes = (int(v) for v in annotations[PREFETCH_ATTR])
    found = _find_sites(func)
    sites = found["accumulate"]
    if len(sites) != 1 or len(found["unpack"]) > 1:
        raise ValueError(f"kernel marked {PREFETCH_ATTR} has {len(sites)} blocks {ACCUMULATE_BLOCK} and "
                         f"{len(found['unpack'])} blocks {UNPACK_BLOCK}, expected one and at most one")
    weights, parallel, loops = sites[0]
    if found["unpack"]:
        weights = found["unpack"][0]
    if len(weights) != 1 or parallel is None or not loops:
        task_loop = "a" if parallel is not None else "no"
        raise ValueError(f"kernel marked {PREFETCH_ATTR}: {len(weights)} weight parameters, {task_loop} task loop "
                         f"({TASK_LOOP_ATTR}) and {len(loops)} loops down to the reduction, expected 1, one and >= 1")
    (weights,) = weights
    ty = parallel.loop_var.ty

    def c(v: int):
        return tirx.const(v, ty)

    iterations, counter = 1, c(0)
    for lp in loops:            # the loops from the task down to the outermost reduction loop, linearized
        counter = counter * c(int(lp.extent)) + lp.loop_var
        iterations *= int(lp.extent)
    group_lines = -(-group_bytes // LINE_BYTES)
    per_iteration = per_iteration_lines(group_lines, tasks_per_group, iterations)
    task = parallel.loop_var
    position = tirx.floormod(task, c(tasks_per_group))
    next_group = tirx.floormod(tirx.floordiv(task, c(tasks_per_group)) + c(1), c(groups))
    start = tirx.address_of(tirx.BufferLoad(weights, [c(0)] * len(weights.shape)))
    stmts = []
    for j in range(per_iteration):
        line = prefetch_line(position, counter, c(j), iterations, per_iteration, group_lines,
                             minimum=lambda a, b: tirx.min(a, c(b)))
        offset = next_group * c(group_bytes) + line * c(LINE_BYTES)
        stmts.append(_prefetch(tirx.handle_add_byte_offset(start, tirx.Cast("int32", offset))))
    outer = loops[-1]
    if not stmts:
        return func

    def on_for_insert(loop, mutator):
        loop = mutator.default_mutate(loop)
        if not loop.loop_var.same_as(outer.loop_var):
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, tirx.SeqStmt([*stmts, loop.body]),
                        loop.thread_binding, loop.annotations)

    return structural_mutate(func, [(tirx.For, on_for_insert)])


__all__ = ["LINE_BYTES", "PREFETCH_ATTR", "TASK_LOOP_ATTR", "per_iteration_lines", "prefetch_line",
           "prefetch_next_weights"]
