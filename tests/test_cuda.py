"""CUDA build on this GPU-less machine: dp4a kernels, exact computes, kernels compiled ahead of time, and a bundle
that loads with TVM's runtime libraries only (no compiler, no `tvm` package). Running and timing need a GPU."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from conftest import tiny_integer_graph  # noqa: E402
from ptq2tvm.backend.blocked_builder import build_blocked_module  # noqa: E402
from ptq2tvm.backend.compile import compile_graph, host_target  # noqa: E402
from ptq2tvm.backend.cuda_binary import find_nvcc  # noqa: E402
from ptq2tvm.bundle import make_bundle, tvm_runtime_libs  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")


@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_computes_are_exact_on_the_cpu(bits):
    """The very computes and packed weights the CUDA build schedules (no rows layout, no depthwise taps; the first
    conv through NCHW4c), compiled unscheduled for this CPU: bit-exact with the reference executor."""
    graph = tiny_integer_graph(bits, bits)
    mod, _ = build_blocked_module(graph, 3, "vnni", cuda=True)
    ex = tvm.compile(mod, target=tvm.target.Target(host_target()))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    q = np.random.default_rng(bits).integers(0, graph.input.qmax + 1, (3, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(vm["main"](tvm.runtime.tensor(q)).numpy(), run_reference(graph, q))


@needs_nvcc
def test_cuda_build_uses_dp4a_and_carries_its_binaries(tmp_path):
    sizes = {}
    for bits in (8, 4):
        res = compile_graph(tiny_integer_graph(bits, bits), tmp_path / f"w{bits}.so", batch=2, target="cuda")
        meta = res.meta
        assert meta["backend"] == "cuda-nchw16c-dp4a" and meta["target"]["arch"] == "sm_80"
        # every dense/grouped conv of TinyNet (6 of them) runs dp4a.u32.s32 in its inner loop
        assert meta["cuda_dp4a_count"] >= 6
        (b,) = meta["cuda_binaries"]
        data = base64.b64decode(b["data_b64"])
        assert b["format"] == "fatbin" and hashlib.sha256(data).hexdigest() == b["sha256"] and len(data) > 10_000
        sizes[bits] = meta["stored_weight_bytes"]
    assert sizes[4] <= 0.6 * sizes[8], sizes       # int4 weights stay packed two per byte on the GPU too
    with pytest.raises(ValueError, match="sm_80"):
        compile_graph(tiny_integer_graph(8, 8), tmp_path / "bad.so", target="cuda:80")
    assert not (tmp_path / "bad.so").exists()


def _stub_libcuda(tmp: Path) -> Path | None:
    """A libcuda.so.1 whose functions all fail: lets libtvm_runtime_cuda load (and its module loader run) on a
    machine without an NVIDIA driver. None if there is no C compiler."""
    cc, nm = shutil.which("cc") or shutil.which("gcc"), shutil.which("nm")
    if cc is None or nm is None:
        return None
    (runtime_cuda,) = [p for p in tvm_runtime_libs(cuda=True) if p.name == "libtvm_runtime_cuda.so"]
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(runtime_cuda)], capture_output=True, text=True,
                               check=True).stdout.split()
    names = sorted({s for s in undefined if s.startswith("cu") and "@" not in s})
    src = tmp / "stub.c"
    src.write_text("".join(f"int {n}(void) {{ return 999; }}\n" for n in names))
    out = tmp / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)], check=True)
    return out


LOAD_BUNDLE = """
import ctypes, json, runpy, sys
sys.modules["tvm"] = None                   # what a GPU host has: no tvm package, no compiler
stub, bundle, mode = sys.argv[1:4]
ctypes.CDLL(stub, ctypes.RTLD_GLOBAL)       # stands in for the NVIDIA driver
runner = runpy.run_path(bundle + "/run_model.py")
import pathlib, tvm_ffi
ctypes.CDLL(str(pathlib.Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so"), ctypes.RTLD_GLOBAL)
ctypes.CDLL(bundle + "/lib/libtvm_runtime.so", ctypes.RTLD_GLOBAL)
ctypes.CDLL(bundle + "/lib/libtvm_runtime_cuda.so", ctypes.RTLD_GLOBAL)
meta = json.load(open(bundle + "/model.json"))
if mode == "foreign":
    meta["cuda_binaries"][0]["source_sha256"] = "0" * 64
runner["register_cuda_binaries"](meta)
tvm_ffi.load_module(bundle + "/model.so")   # the runtime asks for the kernels' binary here
print("LOADED")
"""


@needs_nvcc
def test_cuda_bundle_loads_with_the_runtime_only(tmp_path):
    """TVM 0.27's runtime compiles a CUDA module's source when it loads it, through a callback only the `tvm`
    package provides; the bundle's runner answers it with the binary compiled at build time."""
    stub = _stub_libcuda(tmp_path)
    if stub is None:
        pytest.skip("no C compiler / nm to build a stand-in libcuda")
    graph = tiny_integer_graph(8, 8)
    compile_graph(graph, tmp_path / "m.so", batch=1, target="cuda")
    b = make_bundle(tmp_path / "m.so", tmp_path / "bundle", graph=graph)     # + the on-GPU `--check` data
    assert {"lib/libtvm_runtime_cuda.so", "check_input.npy", "check_output.npy"} <= set(b.files)
    assert b.bytes < 64e6

    def load(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LOAD_BUNDLE, str(stub), str(b.path), mode], capture_output=True,
                              text=True, cwd=tmp_path)

    r = load("ok")
    if "libcudart" in r.stderr:
        pytest.skip(f"CUDA runtime library not loadable here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "LOADED" in r.stdout, r.stderr[-3000:]
    r = load("foreign")      # a .so whose kernels have no stored binary: a clear error, not a silent JIT
    assert r.returncode != 0 and "no compiled CUDA binary" in r.stderr, r.stderr[-3000:]
    meta = json.loads((b.path / "model.json").read_text())
    assert meta["cuda_binaries"][0]["arch"] == "sm_80"
