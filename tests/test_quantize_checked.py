"""The float entry's one-pass quantize + NaN / Inf check on the caller's memory (kernels/quantize_checked.py) and
CompiledModel's use of it: the same codes as QTensor.quantize at every alignment, every non-finite value flagged
wherever it sits, and the same outputs as the copying path."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
tvm_ffi = pytest.importorskip("tvm_ffi")

from kernels.quantize_checked import quantize_checked_chunks, quantize_checked_primfunc  # noqa: E402

from ptq2tvm.backend.blocked_builder import x86_isa  # noqa: E402
from ptq2tvm.backend.compile import host_target  # noqa: E402
from ptq2tvm.errors import InputShapeError  # noqa: E402
from ptq2tvm.ir.graph import QTensor  # noqa: E402

HOST = host_target(2)
X86 = x86_isa(HOST)[0] is not None


@pytest.mark.parametrize("shape,threads,bits", [((2, 3, 5, 7), 2, 8),       # 210 values: one chunk, a 2-value tail
                                                ((4, 3, 64, 64), 2, 8),     # 4 chunks, no tail
                                                ((3, 1, 61, 67), 3, 4)])    # 6 uneven chunks, a tail, 4-bit input
def test_codes_and_flags_at_every_alignment(shape, threads, bits):
    """Codes equal QTensor.quantize bit for bit on views starting 0-15 floats into a buffer (4- to 60-byte
    misalignment); NaN, +Inf and -Inf are flagged in the first, a middle and the last chunk and in the tail; the
    largest finite floats are not."""
    qt = QTensor("x", shape[1:], 0.0173 if bits == 8 else 0.41, 114 if bits == 8 else 7, bits)
    f = quantize_checked_primfunc("main", shape, qt.scale, qt.zero_point, qt.qmax, threads=threads)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(HOST))
    n, chunks = int(np.prod(shape)), quantize_checked_chunks(int(np.prod(shape)), threads)
    base = (np.random.default_rng(n).standard_normal(n + 16) * 3).astype(np.float32)
    base[::97] = np.float32(np.finfo(np.float32).max) * np.where(np.arange(base[::97].size) % 2, 1, -1)

    def run(x):
        q = tvm.runtime.tensor(np.zeros(shape, np.uint8))
        flags = tvm.runtime.tensor(np.full(chunks, 7, np.int32))
        lib["main"](tvm_ffi.from_dlpack(x, require_alignment=0), q, flags)
        return q.numpy(), flags.numpy()

    for off in range(16):
        x = base[off:off + n].reshape(shape)
        q, flags = run(x)
        with np.errstate(over="ignore"):           # FLT_MAX / scale overflows to inf: code qmax (or 0) on both
            assert np.array_equal(q, qt.quantize(x)), f"offset {off} floats"
        assert not flags.any(), (off, flags)
    x0 = base[1:1 + n].reshape(shape)
    for pos in sorted({0, n // 2, n - n % 16 - 1, n - 1}):
        for bad in (np.nan, np.inf, -np.inf):
            y = x0.copy()
            y.reshape(-1)[pos] = bad
            assert run(y)[1].any(), (pos, bad)


@pytest.fixture(scope="module")
def tiny_so(tmp_path_factory):
    import torch
    from conftest import TinyNet, randomize_bn

    from ptq2tvm.api import to_integer
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.frontend.calibrate import quantize_rtn
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    data = np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)
    graph = to_integer(quantize_rtn(randomize_bn(TinyNet()), data, QuantConfig(8, 8), progress=False))
    so = tmp_path_factory.mktemp("qc") / "m.so"
    compile_graph(graph, so, batch=4)
    return so


@pytest.mark.skipif(not X86, reason="no x86 kernels on this host (the checked entry is part of x86 builds)")
def test_compiled_model_reads_the_callers_array(tiny_so):
    """An x86 build records the checked entry; CompiledModel's outputs through it equal those of the copying path
    (copy + numpy check + main_float) for aligned, misaligned, read-only and non-contiguous inputs and other batch
    sizes; NaN / Inf anywhere raises InputShapeError."""
    from ptq2tvm.backend.relax_builder import CHECKED_FLOAT_ENTRY
    from ptq2tvm.backend.runtime import CompiledModel

    fast, slow = CompiledModel(tiny_so), CompiledModel(tiny_so)
    assert CHECKED_FLOAT_ENTRY in fast.meta["entries"] and fast._fn_checked is not None
    slow._fn_checked = None
    rng = np.random.default_rng(1)
    buf = rng.standard_normal(4 * 144 + 8).astype(np.float32)
    for off in (0, 1, 3):
        x = buf[off:off + 4 * 144].reshape(4, 1, 12, 12)
        assert np.array_equal(fast(x), slow(x)), off
    assert not fast._inputs            # no copy into the .so's own input tensor was made
    raw = np.zeros(4 * 144 * 4 + 8, np.uint8)        # a float32 view 1 byte off alignment: the copying path
    odd = raw[1:1 + 4 * 144 * 4].view(np.float32).reshape(4, 1, 12, 12)
    odd[...] = buf[:4 * 144].reshape(4, 1, 12, 12)
    assert np.array_equal(fast(odd), slow(odd))
    ro = buf[:4 * 144].reshape(4, 1, 12, 12).copy()
    ro.flags.writeable = False
    assert np.array_equal(fast(ro), slow(ro))
    wide = rng.standard_normal((4, 1, 12, 24)).astype(np.float32)[..., ::2]      # not C-contiguous
    assert np.array_equal(fast(wide), slow(wide))
    assert np.array_equal(fast(buf[:3 * 144].reshape(3, 1, 12, 12)), slow(buf[:3 * 144].reshape(3, 1, 12, 12)))
    for bad in (np.nan, np.inf, -np.inf):
        y = buf[:4 * 144].reshape(4, 1, 12, 12).copy()
        y[3, 0, 11, 11] = bad
        with pytest.raises(InputShapeError, match="NaN or Inf"):
            fast(y)
