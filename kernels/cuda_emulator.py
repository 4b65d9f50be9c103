"""Run one generated CUDA kernel on the CPU: the CUDA C++ that TVM emits for a scheduled PrimFunc, compiled with g++
against a small emulation of the CUDA thread model (each thread of a block is a std::thread, ``__shared__`` arrays
are shared by the block's threads, ``__syncthreads()`` is a barrier, blocks run one after another, ``__dp4a`` is
the PTX ``dp4a.u32.s32`` definition, float ops IEEE like nvcc's defaults). It executes exactly the code a GPU would
get, so the tests can check the CUDA schedules bit for bit on a machine without a GPU. What it cannot see: timing,
warp-level behaviour (no shuffles or warp-synchronous code are emitted by kernels/cuda.py), memory-model effects
beyond __syncthreads, and driver/hardware faults (misaligned multi-byte accesses through cast pointers are counted
and raise). A development tool (``ptq2tvm.backend.cuda_emulation`` checks whole builds with it): slow, one kernel
at a time, no streams or atomics, needs g++ (C++20)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <math.h>
#include <thread>
#include <vector>
using std::max; using std::min;
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local emu_dim3 threadIdx;
static emu_dim3 blockIdx;
static std::barrier<>* emu_barrier = nullptr;
static inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
static inline int __dp4a(unsigned int a, int b, int c) {     // PTX dp4a.u32.s32: u8 x s8, 32-bit accumulate
  for (int i = 0; i < 4; ++i)
    c += (int)((a >> (8 * i)) & 0xFFu) * (int)(int8_t)((unsigned)b >> (8 * i));
  return c;
}
static std::atomic<int> emu_misaligned{0};
template <class T> static inline T* emu_aligned(const void* p) {   // a GPU faults on a misaligned vector access
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T)) emu_misaligned++;
  return (T*)p;
}
#define __global__
#define __launch_bounds__(n)
"""

LAUNCHER = r"""
extern "C" int emu_launch(void** args, int grid, int bx, int by, int bz) {
  emu_misaligned = 0;
  for (int b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> bar(bx * by * bz);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (int z = 0; z < bz; ++z) for (int y = 0; y < by; ++y) for (int x = 0; x < bx; ++x)
      threads.emplace_back([=] { threadIdx.x = x; threadIdx.y = y; threadIdx.z = z; KERNEL_CALL; });
    for (auto& t : threads) t.join();
  }
  return emu_misaligned;
}
"""


def available() -> bool:
    return shutil.which("g++") is not None


def _kernel_signature(source: str) -> tuple[str, list[tuple[str, str]]]:
    """-> (kernel name, [(C type, parameter name)]) of the single __global__ definition in ``source``."""
    defs = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)\s*\{', source)
    if len(defs) != 1:
        raise ValueError(f"expected one kernel definition, found {len(defs)}")
    name, params = defs[0]
    out = []
    for p in params.split(","):
        m = re.fullmatch(r"\s*(.+?)\s*\*\s*__restrict__\s+(\w+)\s*", p)
        if m is None:
            raise ValueError(f"cannot parse kernel parameter {p!r}")
        out.append((m.group(1), m.group(2)))
    return name, out


class EmulatedKernel:
    """``EmulatedKernel(cuda_source)(grid, block, **arrays)``: arrays by buffer name (``in0``, ``out``, ...)."""

    def __init__(self, source: str):
        name, self.params = _kernel_signature(source)
        call = f"{name}(" + ", ".join(f"({t}*)args[{i}]" for i, (t, _) in enumerate(self.params)) + ")"
        self._dir = tempfile.TemporaryDirectory(prefix="ptq2tvm-cuda-emu-")
        src, lib = Path(self._dir.name) / "k.cc", Path(self._dir.name) / "k.so"
        src.write_text(PRELUDE + _strip_header(source) + LAUNCHER.replace("KERNEL_CALL", call))
        proc = subprocess.run(["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC",
                               "-w", "-o", str(lib), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed on the emulated kernel {src}:\n{proc.stderr[-3000:]}")
        self._lib = ctypes.CDLL(str(lib))

    def __call__(self, grid: int, block: tuple[int, int, int], **arrays: np.ndarray) -> None:
        ptrs = (ctypes.c_void_p * len(self.params))()
        for i, (_, pname) in enumerate(self.params):
            arr = arrays[pname.removesuffix("_ptr")]
            if not arr.flags["C_CONTIGUOUS"]:
                raise ValueError(f"{pname}: array must be C-contiguous")
            ptrs[i] = arr.ctypes.data
        misaligned = self._lib.emu_launch(ptrs, int(grid), *(int(v) for v in block))
        if misaligned:
            raise RuntimeError(f"{misaligned} misaligned multi-byte accesses (a GPU would fault)")


def _strip_header(source: str) -> str:
    """The kernel part of TVM's CUDA source: from the first ``extern "C"`` on, with TVM's type macros."""
    start = source.index('extern "C"')
    body = re.sub(r"__shared__\s+(alignas\(\d+\))\s+", r"\1 static ", source[start:])   # one copy per block
    body = body.replace("__shared__", "static")
    # every multi-byte access through a cast pointer, e.g. *(uint*)(p + i), is checked for alignment
    body = re.sub(r"\*\((\w+)\*\)\(", r"*emu_aligned<\1>(", body)
    return "#define uint unsigned int\n#define uchar unsigned char\n#define ushort unsigned short\n" + body
