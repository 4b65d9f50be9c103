"""kernels/task_stack.py: the per-task int4 unpack buffer lives on the task's stack (no TVMBackendAllocWorkspace /
FreeWorkspace pair per task), only small per-task buffers move, and the kernel stays bit-exact."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels.task_stack import DISABLE_LOWER_BUILTIN, STACK_TASK_BUFFER_MAX_BYTES, stack_task_buffers  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.target import codegen  # noqa: E402

HOST = K.host_target(num_cores=2)
HAS_VNNI = codegen.llvm_cpu_has_features(["avx512vnni"], HOST) and codegen.llvm_cpu_has_features(["avx512bw"], HOST)


def _alloc(name: str, n: int, dtype: str = "int8", scope: str = "global") -> tirx.AllocBuffer:
    return tirx.AllocBuffer(tirx.decl_buffer((n,), dtype, name, scope=scope))


def _annotated(stmt) -> dict[str, bool]:
    """{buffer name: annotated} of every AllocBuffer in ``stmt`` (For / SeqStmt nests)."""
    found: dict[str, bool] = {}

    def walk(s):
        if isinstance(s, tirx.AllocBuffer):
            found[s.buffer.name] = DISABLE_LOWER_BUILTIN in s.annotations
        elif isinstance(s, tirx.SeqStmt):
            for c in s.seq:
                walk(c)
        elif isinstance(s, tirx.For):
            walk(s.body)
    walk(stmt)
    return found


def test_only_small_vector_buffers_inside_a_parallel_loop_move():
    limit = STACK_TASK_BUFFER_MAX_BYTES
    task = tirx.SeqStmt([_alloc("w_unpack", 36, "int8x64"), _alloc("at_limit", limit // 64, "int32x16"),
                         _alloc("over_limit", limit // 64 + 1, "int8x64"), _alloc("scalar", 2304, "int8"),
                         _alloc("local_scratch", 4, "int8x64", scope="local"), tirx.Evaluate(0)])
    inner = tirx.For(tirx.Var("j", "int32"), 0, 2, tirx.ForKind.SERIAL, task)
    body = tirx.SeqStmt([_alloc("function_level", 64, "int8x64"),
                         tirx.For(tirx.Var("i", "int32"), 0, 4, tirx.ForKind.PARALLEL, inner)])
    moved: list[tuple[str, int]] = []
    out = stack_task_buffers(body, moved)
    assert moved == [("w_unpack", 2304), ("at_limit", limit)]
    assert _annotated(out) == {"function_level": False, "w_unpack": True, "at_limit": True, "over_limit": False,
                               "scalar": False, "local_scratch": False}
    serial = tirx.For(tirx.Var("i", "int32"), 0, 4, tirx.ForKind.SERIAL, task)
    assert stack_task_buffers(serial).same_as(serial)          # no parallel loop: the very same object back
    assert stack_task_buffers(out).same_as(out)                # annotated once


def _ir(ex) -> str:
    mods = [ex.mod, *ex.mod.imports] if hasattr(ex, "mod") else [ex]
    return next(m.inspect_source("ll") for m in mods if m.kind == "llvm")


@pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU (the AVX2 kernels' scalar unpack buffers keep "
                    "the workspace)")
def test_int4_conv_unpacks_into_the_tasks_stack_and_stays_exact():
    """resnet_small's layer1 shape (16 -> 16, 3x3 at 28x28, 2.3 KB of unpacked weights per task)."""
    isa = "vnni"
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (1, 16, 28, 28), dtype=np.uint8)
    w = rng.integers(-8, 8, (16, 16, 3, 3), dtype=np.int8)
    bias = rng.integers(-5000, 5000, 16).astype(np.int32)
    m, sh = np.full(16, 1 << 30, np.int32), np.full(16, 39, np.int32)
    target = HOST
    arrays = [K.nchw_to_nchwc(x, 16, 0), K.pack_conv_weight(w, 1, ic_block=16, isa=isa, int4=True),
              *K.pack_channel_params(bias, m, sh)[:3]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, stride=(1, 1), padding=(1, 1),
                              input_zero_point=0, output_zero_point=3, isa=isa)
    ref = R.conv2d_requant(x, w, bias, m, sh, stride=1, padding=1, input_zero_point=0, output_zero_point=3)
    assert len(np.unique(ref)) > 16
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 16), ref)
    mod = tvm.IRModule({"main": kern.func})
    ours, plain = (_task_functions(_ir(ex)) for ex in (K.compile_module(mod, target), tvm.compile(mod, target=target)))
    assert any("@__TVMBackendAllocWorkspace" in f for f in plain)   # TVM 0.27 with a 2.3 KB per-task buffer
    assert ours and not any("Workspace" in f for f in ours), "a parallel task still allocates from the workspace"
    assert any(re.search(r"= alloca \[\d+ x <\d+ x i8>\], align 64", f) for f in ours), \
        "the unpack buffer is not a 64-byte aligned alloca of the parallel task"


def _task_functions(ir: str) -> list[str]:
    """The LLVM IR of the functions a parallel loop runs (one call per task)."""
    return [f for f in re.split(r"\ndefine ", ir) if re.match(r"[^@\n]*@__tvm_parallel_lambda[\w.]*\(", f)]
