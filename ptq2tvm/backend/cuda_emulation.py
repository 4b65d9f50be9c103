"""Check a CUDA build without a GPU: every kernel of a graph's CUDA build, run in a CPU emulation of the CUDA thread
model (:mod:`kernels.cuda_emulator`), against the same PrimFunc compiled unscheduled for this CPU. Slow (minutes for
a 224x224 network) and needs g++; used by the tests and ``benchmarks/cuda_build.py``."""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

from kernels import cuda_emulator
from kernels.cuda import launch_shape, schedule_module_cuda

from ..errors import ArtifactError
from ..ir.graph import IntegerGraph
from .blocked_builder import build_blocked_module
from .compile import resolve_target
from .cuda_binary import cuda_sources


def _call_args(mod: tvm.IRModule, entry: str = "main") -> dict[str, list]:
    """For each PrimFunc called by the Relax function ``entry``: its call_tir arguments (numpy for constants, the
    (shape, dtype) of activations)."""
    calls: dict[str, list] = {}
    for binding in mod[entry].body.blocks[0].bindings:
        call = binding.value
        if isinstance(call, relax.Call) and call.op.name == "relax.call_tir":
            gv, args = call.args[0], call.args[1]
            calls[gv.name_hint] = [a.value.numpy() if isinstance(a, tvm.ir.expr.Constant)
                                   else ([int(v) for v in a.ty.shape.values], str(a.ty.dtype)) for a in args.fields]
    return calls


def cuda_kernel(func: tvm.tirx.PrimFunc) -> tuple[str, int, tuple[int, int, int]]:
    """A PrimFunc scheduled by :mod:`kernels.cuda` -> (its CUDA C++ source, grid size, (threadIdx x, y, z))."""
    func = func.with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(resolve_target("cuda")))
    (src,) = cuda_sources(ex.mod)
    grid, block = launch_shape(func)
    return src, grid, block


def emulate_every_kernel(graph: IntegerGraph, batch: int, seed: int = 0,
                         only: Callable[[str], bool] | None = None) -> list[str]:
    """Run every kernel of ``graph``'s CUDA build in the CUDA emulation, on the network's own weights and random
    activations, against the same PrimFunc compiled unscheduled for this CPU; return the kernel names checked
    (``only``: a filter on the kernel names, e.g. to check the kernels of some ops).
    Raises ArtifactError at the first kernel whose output differs, RuntimeError on a misaligned access."""
    plain, _ = build_blocked_module(graph, batch, "vnni", cuda=True)
    scheduled = schedule_module_cuda(plain)
    calls = {**_call_args(plain, "main"), **_call_args(plain, "main_float")}
    rng = np.random.default_rng(seed)
    # the CPU reference at -O0: LLVM 22 at -O3 for AVX2/AVX-512 miscompiles the naive int4 unpack loop of larger
    # weights (high nibbles wrong; see kernels/README.md), which the hand schedules never produce
    host = tvm.target.Target({"kind": "llvm", "opt-level": 0})
    checked = []
    for gv, func in plain.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (only is not None and not only(gv.name_hint)):
            continue
        inputs = []
        # a lookup table (a constant 1-D uint8 array) of 2^bits entries is indexed by codes below its length: random
        # codes above it would read outside the table in both builds (undefined, not a kernel fault)
        tables = [len(a) for a in calls[gv.name_hint] if isinstance(a, np.ndarray) and a.ndim == 1
                  and a.dtype == np.uint8]
        codes = min(tables, default=256)
        for a in calls[gv.name_hint]:
            if isinstance(a, np.ndarray):
                inputs.append(a)
            else:
                shape, dtype = a
                inputs.append(rng.standard_normal(shape).astype(dtype) * 3 if dtype == "float32"
                              else rng.integers(0, codes, shape).astype(dtype))
        bufs = list(func.params)           # TVM 0.27: buffer-typed Vars (name, shape, dtype)
        outs = [np.zeros([int(v) for v in b.shape], b.dtype) for b in bufs[len(inputs):]]
        want = [tvm.runtime.tensor(a) for a in (*inputs, *outs)]
        func = func.with_attr("global_symbol", "main")
        tvm.compile(tvm.IRModule({"main": func}), target=host)["main"](*want)
        src, grid, block = cuda_kernel(scheduled[gv])
        cuda_emulator.EmulatedKernel(src)(grid, block, **{b.name: a for b, a in zip(bufs, (*inputs, *outs))})
        for o, w in zip(outs, want[len(inputs):]):
            bad = int((o != w.numpy()).sum())
            if bad:
                raise ArtifactError(f"CUDA kernel {gv.name_hint}: {bad} of {o.size} output elements differ from the "
                                    "CPU build in emulation")
        checked.append(gv.name_hint)
    return checked


__all__ = ["cuda_kernel", "emulate_every_kernel"]
