"""Table lookup ``out = table[x]`` on uint8 codes with AVX-512 VBMI: 64 lookups per three vector instructions.

The integer graph's nonlinearities (SiLU, Hardswish, Sigmoid, ... :mod:`ptq2tvm.ops.lut`) are 256-entry uint8 tables.
As a TE compute the lookup is a scalar gather per byte (LLVM does not vectorize a byte-table gather): EfficientNet-B0
spent more time in its SiLU tables than in its convolutions. Here the table sits in four zmm registers and each 64
input bytes take two ``vpermi2b`` (``VPERMI2B``, Intel SDM: each selects 64 bytes out of a 128-byte two-register
table by the low 7 bits of the index) and one byte blend on the index's top bit (``vpmovb2m`` + ``vpblendmb``).

Ice Lake and later and Zen 4 and later have VBMI; Cascade Lake has AVX-512 VNNI without it, so the builder takes
this kernel only where :func:`target_has_vbmi` holds (LLVM aborts the process compiling ``vpermi2b`` for a target
without VBMI). Same bytes as :func:`kernels.lut_nchwc` (tests/test_eltwise_vnni.py).
"""

from __future__ import annotations

import numpy as np

import tvm.tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .func_attrs import hand_kernel_attrs
from .vector_tir import check_kernel_args

LUT_VBMI_KIND = "lut_vbmi"          # function attribute ``ptq2tvm_kernel`` of these PrimFuncs
VECTOR = 64                         # bytes per lookup vector
_CHUNK_VECTORS = 256                # vectors per parallel iteration (16 KiB)
_TABLE = 256


def pad_lut_table(table: np.ndarray) -> np.ndarray:
    """The 256-byte table :func:`lut_vbmi_primfunc` reads: ``table`` (uint8, 1..256 entries) with its last entry
    repeated, which is :func:`kernels.lut_nchwc`'s clamp of codes past the table. Raises ValueError for an empty or
    longer table or another dtype."""
    t = np.asarray(table)
    if t.dtype != np.uint8 or t.ndim != 1 or not 1 <= t.size <= _TABLE:
        raise ValueError(f"lookup table must be uint8 with 1..{_TABLE} entries, got {t.dtype} shape {t.shape}")
    return np.concatenate([t, np.full(_TABLE - t.size, t[-1], np.uint8)])


def target_has_vbmi(target) -> bool:
    """Whether an LLVM ``target`` has AVX-512 VBMI (``vpermi2b``): Ice Lake and later, Zen 4 and later; not Cascade
    Lake, whose AVX-512 VNNI comes without it (LLVM aborts the process compiling the intrinsic there)."""
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and bool(codegen.llvm_cpu_has_features(["avx512vbmi"], target))
    except Exception:   # a target LLVM cannot describe
        return False


def lut_vbmi_supported(shape: tuple[int, ...]) -> bool:
    """Whether :func:`lut_vbmi_primfunc` takes a tensor of ``shape``: at least one 64-byte vector."""
    return int(np.prod([int(v) for v in shape])) >= VECTOR


def lut_vbmi_primfunc(name: str, shape: tuple[int, ...]) -> tir.PrimFunc:
    """The PrimFunc ``name(x, table, out)``: x and out uint8 of ``shape`` (any layout: the lookup is per byte),
    table uint8 (256,) (:func:`pad_lut_table`). 64-byte vectors; the last one ends at the last byte (it may overlap
    the one before and rewrite the same values); 16 KiB per parallel iteration, serial below that. Raises ValueError
    for tensors of fewer than 64 bytes or a dimension below 1."""
    check_kernel_args("lut_vbmi", {"tensor": shape})
    size = int(np.prod([int(v) for v in shape]))
    if size < VECTOR:
        raise ValueError(f"lut_vbmi needs >= {VECTOR} bytes, got shape {tuple(shape)}")
    vectors = -(-size // VECTOR)
    chunks = -(-vectors // _CHUNK_VECTORS)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr(hand_kernel_attrs(name, LUT_VBMI_KIND))
            x = T.arg("x", T.buffer(tuple(int(v) for v in shape), "uint8"))
            table = T.arg("table", T.buffer((_TABLE,), "uint8"))
            out = T.arg("out", T.buffer(tuple(int(v) for v in shape), "uint8"))
            xf = T.decl_buffer((size,), "uint8", data=x.data)
            of = T.decl_buffer((size,), "uint8", data=out.data)
            loop = T.parallel if chunks > 1 else T.serial
            with loop(0, chunks) as c:
                tabs = [tir.reinterpret("int8x64", tir.BufferLoad(table, [tir.Ramp(VECTOR * q, 1, VECTOR)]))
                        for q in range(4)]
                first = c * _CHUNK_VECTORS
                with T.serial(0, tir.min(_CHUNK_VECTORS, vectors - first)) as v:
                    off = tir.min((first + v) * VECTOR, size - VECTOR)
                    idx = tir.reinterpret("int8x64", tir.BufferLoad(xf, [tir.Ramp(off, 1, VECTOR)]))
                    low, high = (tir.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.vpermi2var.qi.512", a, idx, b)
                                 for a, b in ((tabs[0], tabs[1]), (tabs[2], tabs[3])))
                    top = tir.LT(idx, tir.Broadcast(tir.const(0, "int8"), VECTOR))     # codes 128..255
                    T.buffer_store(of, tir.reinterpret("uint8x64", tir.Select(top, high, low)),
                                   [tir.Ramp(off, 1, VECTOR)])
    return ib.get()


__all__ = ["LUT_VBMI_KIND", "lut_vbmi_primfunc", "lut_vbmi_supported", "pad_lut_table", "target_has_vbmi"]
