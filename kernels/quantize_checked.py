"""The float input's quantization and its NaN / Inf check in one pass over the caller's memory (x86 builds).

``CompiledModel`` (ptq2tvm/backend/runtime.py) used to copy a user's float32 array into the .so's 64-byte aligned
input tensor (numpy arrays are 16-byte aligned, and TVM's DLPack import refuses less than 64 by default), sum it in
numpy to reject NaN / Inf, and then let the .so quantize it: three passes over 4.8 MB for ResNet-18 at batch 8
(copy 0.33 ms, check 0.25 ms on the 2-core Xeon, 8% of the call). This kernel reads the array where it is (its input
buffer is declared 4-byte aligned, so nothing assumes more) and writes the uint8 codes and one non-finite flag per
parallel chunk: one pass, and the check costs a compare per 16 values.

Arithmetic: :func:`kernels.ops.quantize_expr`, exactly ``QTensor.quantize``: ``clip(rint(x / scale) + zero_point,
0, qmax)`` in float32, IEEE division and round half to even.
"""

from __future__ import annotations

import os

import numpy as np

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .ops import quantize_expr

_LANES = 16
_MIN_CHUNK = 16384          # values per parallel chunk at least (below, one chunk: no thread-pool launch)


def quantize_checked_chunks(total: int, threads: int | None = None) -> int:
    """How many parallel chunks (and non-finite flags) :func:`quantize_checked_primfunc` uses for ``total`` values:
    two per thread (``threads``, default this machine's cores) where each gets >= 16384 values, else fewer, >= 1."""
    want = 2 * int(threads or os.cpu_count() or 1)
    return max(1, min(want, int(total) // _MIN_CHUNK))


def quantize_checked_primfunc(name: str, shape: tuple[int, ...], scale: float, zero_point: int, qmax: int = 255,
                              threads: int | None = None) -> tir.PrimFunc:
    """``name(x, q, nonfinite)``: ``x`` float32 of ``shape`` (any alignment of 4 bytes or more), ``q`` uint8 of
    ``shape`` = the quantized input (the integers of :func:`kernels.ops.quantize_input`), ``nonfinite`` int32
    ``(chunks,)`` (:func:`quantize_checked_chunks`): 1 where that chunk of ``x`` holds a NaN or an infinity, else 0
    (``q`` is then meaningless). Parallel over contiguous chunks, 16 values per vector; the tail past the last
    multiple of 16 is done after the parallel loop."""
    total = int(np.prod([int(v) for v in shape]))
    chunks = quantize_checked_chunks(total, threads)
    full = total // _LANES                                  # whole vectors
    per = -(-full // chunks)                                # vectors per chunk
    def quantize(v: tir.PrimExpr, lanes: int) -> tir.PrimExpr:
        return quantize_expr(v, scale, zero_point, qmax, lanes)

    def bad(v: tir.PrimExpr, lanes: int) -> tir.PrimExpr:
        """1 where ``v`` is NaN or +-Inf: ``|v| <= FLT_MAX`` is an ordered compare, false for NaN (TVM's
        ``isfinite`` takes scalars only)."""
        one, zero = tir.const(1, "int32"), tir.const(0, "int32")
        big = tir.const(float(np.finfo(np.float32).max), "float32")
        if lanes > 1:
            one, zero, big = tir.Broadcast(one, lanes), tir.Broadcast(zero, lanes), tir.Broadcast(big, lanes)
        return tir.Select(tir.abs(v) <= big, zero, one)

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name))
            x = T.arg("x", T.buffer(tuple(int(v) for v in shape), "float32", align=4))
            q = T.arg("q", T.buffer(tuple(int(v) for v in shape), "uint8"))
            flags = T.arg("nonfinite", T.buffer((chunks,), "int32"))
            xf = T.decl_buffer((total,), "float32", data=x.data, align=4)
            qf = T.decl_buffer((total,), "uint8", data=q.data)

            def chunk_body(c):
                acc = T.alloc_buffer((_LANES,), "int32")
                T.buffer_store(acc, tir.Broadcast(tir.const(0, "int32"), _LANES), [tir.Ramp(0, 1, _LANES)])
                with T.serial(0, tir.max(tir.min(per, full - c * per), 0)) as i:
                    base = (c * per + i) * _LANES
                    v = tir.BufferLoad(xf, [tir.Ramp(base, 1, _LANES)])
                    T.buffer_store(qf, quantize(v, _LANES), [tir.Ramp(base, 1, _LANES)])
                    T.buffer_store(acc, tir.bitwise_or(tir.BufferLoad(acc, [tir.Ramp(0, 1, _LANES)]),
                                                       bad(v, _LANES)), [tir.Ramp(0, 1, _LANES)])
                T.buffer_store(flags, tir.const(0, "int32"), [c])
                with T.serial(0, _LANES) as e:
                    T.buffer_store(flags, tir.bitwise_or(flags[c], acc[e]), [c])

            if chunks > 1:
                with T.parallel(0, chunks) as c:
                    chunk_body(c)
            else:
                chunk_body(tir.const(0, "int32"))
            if total % _LANES:
                with T.serial(full * _LANES, total) as t:
                    T.buffer_store(qf, quantize(xf[t], 1), [t])
                    T.buffer_store(flags, tir.bitwise_or(flags[chunks - 1], bad(xf[t], 1)), [chunks - 1])
    return ib.get()


__all__ = ["quantize_checked_chunks", "quantize_checked_primfunc"]
