"""Per-task scratch buffers on the stack: the CPU build pipeline of ptq2tvm's kernels.

An int4 / int2 conv unpacks its weights once per parallel task into a scratch buffer (``w_unpack``,
:mod:`kernels.schedule`, ``unpack_at="task"``). TVM 0.27 lowers every allocation of 1 KiB or more to a
``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair (``tirx.transform.LowerTVMBuiltin``; ~0.08 us each on
a Zen 4), one pair per task for a buffer inside a parallel loop: at batch 1 on small models that pair, not the
unpack arithmetic, was most of what int4 weights cost over int8 (kernels/README.md, "Small kernels run serial": an
int8 conv given the same per-task copy cost as much). An allocation annotated ``disable_lower_builtin`` stays an
``alloca`` in the task's own stack frame instead. TVM 0.27's StorageRewrite drops that annotation and its TVMScript
cannot set it on a block's buffer, so :func:`stack_task_buffers` sets it on the lowered function, after the whole
``s_tir`` pipeline and right before the host finalization (LowerTVMBuiltin); :data:`CPU_PIPELINE` is that pipeline,
registered with TVM, and :func:`compile_module` builds with it for CPU targets.

Which buffers: global-scope allocations of constant size at most :data:`STACK_TASK_BUFFER_MAX_BYTES` made inside a
parallel loop (one per task), of vector elements (:data:`STACK_MIN_VECTOR_BYTES`: the AVX-512 unpack buffers).
Larger ones keep the workspace (a task that unpacks 32 KiB of weights does enough work to hide the call, and a deep
alloca could exceed a small thread stack in an embedding application: TVM's own workers get the default 8 MiB,
musl's threads 128 KiB); allocations outside parallel loops are left alone.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx

#: the TVM annotation that keeps an allocation out of ``TVMBackendAllocWorkspace`` (``kDisableLowerTVMBuiltin``)
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"
#: per-task buffers up to this many bytes go on the task's stack
STACK_TASK_BUFFER_MAX_BYTES = 32 * 1024
#: ... and whose element is a vector of at least this many bytes: TVM 0.27 aligns such an ``alloca`` to the vector
#: (an ``int8x64`` buffer to 64 bytes, like the workspace), a scalar one to 16 bytes only, which would split the
#: 32-byte loads of the AVX2 kernels across cache lines (the ``storage_alignment`` attribute does not reach the
#: ``alloca`` there); so the AVX2 unpack buffers (scalar int8) keep the workspace
STACK_MIN_VECTOR_BYTES = 32
#: the name the CPU pipeline is registered under (``tvm.compile(..., tir_pipeline=CPU_PIPELINE)``)
CPU_PIPELINE = "ptq2tvm_cpu"


def _constant_bytes(buf: tirx.Buffer) -> int | None:
    """Bytes of a buffer of constant shape, None when a dimension is symbolic."""
    n = 1
    for dim in buf.shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        n *= int(dim.value)
    dt = tvm.runtime.DataType(str(buf.dtype))
    return n * dt.bits * dt.lanes // 8


def _on_stack(stmt: tirx.AllocBuffer, in_parallel: bool, moved: list[tuple[str, int]]) -> tirx.Stmt:
    buf = stmt.buffer
    size = _constant_bytes(buf)
    dt = tvm.runtime.DataType(str(buf.dtype))
    if not in_parallel or size is None or size > STACK_TASK_BUFFER_MAX_BYTES or buf.scope() != "global" \
            or dt.bits * dt.lanes // 8 < STACK_MIN_VECTOR_BYTES or DISABLE_LOWER_BUILTIN in stmt.annotations:
        return stmt
    moved.append((buf.name, size))
    return tirx.AllocBuffer(buf, {**dict(stmt.annotations), DISABLE_LOWER_BUILTIN: tirx.IntImm("int32", 1)},
                            stmt.span)


def stack_task_buffers(stmt: tirx.Stmt, moved: list[tuple[str, int]] | None = None,
                       in_parallel: bool = False) -> tirx.Stmt:
    """``stmt`` with every per-task buffer (see the module docstring) annotated to stay on the stack; the same
    object when nothing changes. ``moved`` collects ``(buffer name, bytes)`` of each. Rebuilds only the statements
    on the path to a changed allocation (For, SeqStmt, AttrStmt, IfThenElse, While; other statements hold none
    after lowering)."""
    moved = [] if moved is None else moved
    if isinstance(stmt, tirx.AllocBuffer):
        return _on_stack(stmt, in_parallel, moved)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [stack_task_buffers(s, moved, in_parallel) for s in stmt.seq]
        if all(a.same_as(b) for a, b in zip(seq, stmt.seq)):
            return stmt
        return tirx.SeqStmt(seq, stmt.span)
    if isinstance(stmt, tirx.For):
        body = stack_task_buffers(stmt.body, moved, in_parallel or stmt.kind == tirx.ForKind.PARALLEL)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations, stmt.step,
            stmt.span)
    if isinstance(stmt, tirx.AttrStmt):
        body = stack_task_buffers(stmt.body, moved, in_parallel)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body,
                                                                  stmt.span)
    if isinstance(stmt, tirx.IfThenElse):
        then = stack_task_buffers(stmt.then_case, moved, in_parallel)
        other = None if stmt.else_case is None else stack_task_buffers(stmt.else_case, moved, in_parallel)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other, stmt.span)
    if isinstance(stmt, tirx.While):
        body = stack_task_buffers(stmt.body, moved, in_parallel)
        return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body, stmt.span)
    return stmt


@tirx.transform.prim_func_pass(opt_level=0, name="ptq2tvm.StackTaskBuffers")
def StackTaskBuffers(func: tirx.PrimFunc, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
    """The TIR pass of :func:`stack_task_buffers` (run on lowered functions, before LowerTVMBuiltin)."""
    body = stack_task_buffers(func.body)
    return func if body.same_as(func.body) else func.with_body(body)


def _cpu_pipeline() -> tuple[tvm.transform.Pass, Any, Any]:
    from tvm.tirx.compilation_pipeline import get_tir_pipeline

    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")      # what "default" builds a CPU target with
    return tvm.transform.Sequential([lower, StackTaskBuffers]), finalize_host, finalize_device


def register_cpu_pipeline() -> str:
    """Register :data:`CPU_PIPELINE` with TVM (idempotent) -> its name."""
    from tvm.tirx.compilation_pipeline import register_tir_pipeline

    register_tir_pipeline(CPU_PIPELINE, _cpu_pipeline)
    return CPU_PIPELINE


def compile_module(mod: tvm.IRModule, target: Any) -> Any:
    """``tvm.compile(mod, target)`` with :data:`CPU_PIPELINE` for an LLVM (CPU) target, TVM's default pipeline for
    any other (CUDA). ``target``: a ``tvm.target.Target`` or what it accepts (a JSON dict)."""
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target, tir_pipeline=register_cpu_pipeline())


__all__ = ["CPU_PIPELINE", "DISABLE_LOWER_BUILTIN", "STACK_MIN_VECTOR_BYTES", "STACK_TASK_BUFFER_MAX_BYTES", "StackTaskBuffers",
           "compile_module", "register_cpu_pipeline", "stack_task_buffers"]
