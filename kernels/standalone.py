"""Build one kernel on its own (a single scheduled PrimFunc -> .so): used by the tests and the benchmark."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import te

from .schedule import _SCHEDULES, kernel_kind, schedule_primfunc
from .task_stack import compile_module


def host_target(num_cores: int | None = None, mcpu: str | None = None) -> tvm.target.Target:
    """LLVM target for this CPU (or ``mcpu``), with ``num-cores`` threads."""
    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or str(llvm_get_system_cpu()),
                              "num-cores": int(num_cores or os.cpu_count() or 1)})


@dataclass
class StandaloneKernel:
    lib: object                 # tvm Executable
    out_shape: tuple[int, ...]
    out_dtype: str
    func: tvm.tirx.PrimFunc     # the scheduled PrimFunc

    def _args(self, arrays: Sequence[np.ndarray]):
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        args.append(tvm.runtime.tensor(np.zeros(self.out_shape, self.out_dtype), dev))
        return args

    def run(self, *arrays: np.ndarray) -> np.ndarray:
        args = self._args(arrays)
        self.lib.mod["main"](*args)
        return args[-1].numpy()

    def timer(self, *arrays: np.ndarray, number: int = 10):
        """-> a function returning the mean seconds of ``number`` back-to-back runs (inputs bound once)."""
        args = self._args(arrays)
        ev = self.lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
        return lambda: float(ev(*args).mean)

    def rotating_timer(self, arrays: Sequence[np.ndarray], copies: int = 1, rotate: Sequence[int] = (1,),
                       number: int = 10):
        """-> a function returning the mean seconds per call of ``number`` calls that cycle through ``copies``
        argument sets, each with its own copy of the inputs at positions ``rotate`` (default: the weights, input 1)
        and sharing the others. With the copies together larger than the last-level cache, every call meets those
        inputs cold, as a layer does in a network (other layers' weights pass through the caches between two of its
        calls); ``copies=1`` times the same Python-side loop with warm inputs, the fair comparison. The loop's own
        cost (a few microseconds per call) is in both."""
        dev = tvm.cpu()
        shared = self._args(arrays)
        sets = [[tvm.runtime.tensor(np.ascontiguousarray(arrays[i]), dev) if i in rotate and c else a
                 for i, a in enumerate(shared)] for c in range(copies)]
        fn = self.lib.mod["main"]

        def run() -> float:
            t0 = time.perf_counter()
            for k in range(number):
                fn(*sets[k % copies])
            return (time.perf_counter() - t0) / number
        return run

    def export(self, path: str) -> str:
        self.lib.export_library(path)
        return path

    def llvm_ir(self) -> str:
        """The kernel's LLVM IR as TVM generated it (before LLVM's own optimisation pipeline)."""
        return self.lib.mod.inspect_source("ll")

    def parallel_workspace_allocations(self) -> int:
        """How many ``TVMBackendAllocWorkspace`` calls the kernel's parallel-loop bodies (``__tvm_parallel_lambda*``
        in its LLVM IR) make: heap allocations repeated for every parallel iteration (0 for every hand-scheduled x86
        kernel, see :data:`kernels.schedule.ACC_SCOPE`; a per-call buffer such as the padded input is allocated
        once, outside them, and not counted)."""
        count, in_lambda = 0, False
        for line in self.llvm_ir().splitlines():
            if line.startswith("define"):
                in_lambda = "@__tvm_parallel_lambda" in line
            elif in_lambda and "@__TVMBackendAllocWorkspace" in line:
                count += 1
        return count

    def count_instructions(self, mnemonic: str) -> int:
        """How many times ``mnemonic`` (e.g. 'vpdpbusd') occurs in the disassembled .so (objdump -d)."""
        with tempfile.TemporaryDirectory() as d:
            so = self.export(os.path.join(d, "k.so"))
            dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                                 check=True).stdout
        return sum(1 for line in dis.splitlines() if f"\t{mnemonic} " in line or line.rstrip().endswith(mnemonic))


def build_standalone(fn: Callable[..., te.Tensor], arrays: Sequence[np.ndarray], target=None, schedule: bool = True,
                     options: dict | None = None, **attrs) -> StandaloneKernel:
    """TE function ``fn(*placeholders, **attrs)`` over inputs shaped like ``arrays`` -> scheduled, compiled kernel.

    ``options`` are passed to the schedule (e.g. ``{"tile": ConvTile(7, 2)}``); ``schedule=False`` compiles the
    unscheduled PrimFunc (naive loops, for comparison). Indices are int64, as in the PrimFuncs Relax's ``emit_te``
    makes (so the schedules are tested on what the network build schedules).
    """
    target = target or host_target()
    phs = [te.placeholder(tuple(a.shape), str(a.dtype), name=f"in{i}") for i, a in enumerate(arrays)]
    out = fn(*phs, **attrs)
    func = te.create_prim_func([*phs, out], index_dtype_override="int64")
    if schedule:
        if kernel_kind(func) not in _SCHEDULES:
            raise ValueError(f"no schedule for {fn.__name__}")
        func = schedule_primfunc(func, target, **(options or {}))
    lib = compile_module(tvm.IRModule({"main": func}), target)
    return StandaloneKernel(lib, tuple(int(v) for v in out.shape), str(out.dtype), func)


__all__ = ["StandaloneKernel", "build_standalone", "host_target"]
