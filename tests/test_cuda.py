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
from kernels import cuda_emulator  # noqa: E402
from ptq2tvm.backend.blocked_builder import build_blocked_module  # noqa: E402
from ptq2tvm.backend.compile import compile_graph, host_target  # noqa: E402
from ptq2tvm.backend.cuda_binary import find_nvcc  # noqa: E402
from ptq2tvm.bundle import make_bundle, tvm_runtime_libs  # noqa: E402
from ptq2tvm.errors import ArtifactError  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cuda_computes_are_exact_on_the_cpu(bits):
    """The very computes and packed weights the CUDA build schedules (no rows layout, no depthwise taps; the first
    conv through NCHW4c), compiled unscheduled for this CPU: bit-exact with the reference executor. 2-bit weights
    are stored four per byte: the packed layers take half the bytes of the W4 build's."""
    graph = tiny_integer_graph(bits, bits)
    mod, stored = build_blocked_module(graph, 3, "vnni", cuda=True)
    if bits == 2:
        import kernels as K

        stored4 = build_blocked_module(tiny_integer_graph(4, 4), 3, "vnni", cuda=True)[1]
        packed = [n for n in graph.nodes if n.op in ("conv2d", "dense") and int(n.attrs["w_bits"]) == 2
                  and not (n.op == "conv2d" and n.arrays["weight"].shape[1] == 1 and n.attrs["groups"] > 1)]
        int4_bytes = sum(K.pack_conv_weight(n.arrays["weight"], n.attrs["groups"], 16, int4=True).nbytes
                         for n in packed)
        assert len(packed) == 8 and stored4 - stored == int4_bytes // 2, (stored, stored4)
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
    from ptq2tvm.backend.runtime import CompiledModel, _cuda_device_present

    if not _cuda_device_present():                 # here: a clear error instead of TVM's loader message
        with pytest.raises(ArtifactError, match="CUDA build and this machine has no usable CUDA device"):
            CompiledModel(tmp_path / "w8.so")
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


def test_cuda_build_without_nvcc_fails_cleanly(tmp_path, monkeypatch):
    """No CUDA toolkit: a clear error naming nvcc, and no half-written artifact."""
    import ptq2tvm.backend.cuda_binary as cb

    monkeypatch.setattr(cb, "find_nvcc", lambda: None)
    with pytest.raises(ArtifactError, match="nvcc") as err:
        compile_graph(tiny_integer_graph(8, 8), tmp_path / "m.so", batch=1, target="cuda")
    assert "CUDA_HOME" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _cuda_conv_source(arrays: list[np.ndarray], **attrs) -> tuple[str, tuple[int, int, int], int]:
    """The CUDA source of one conv scheduled by kernels.cuda (dp4a, or depthwise), its block shape (threadIdx x, y,
    z) and grid size."""
    import kernels as K
    from kernels.cuda import schedule_conv2d_dp4a, schedule_depthwise_cuda
    from ptq2tvm.backend.cuda_emulation import cuda_kernel
    from tvm import te
    from tvm.s_tir import Schedule

    phs = [te.placeholder(a.shape, str(a.dtype), name=f"in{i}") for i, a in enumerate(arrays)]
    out = K.conv2d_nchwc_requant(*phs, **attrs)
    sch = Schedule(te.create_prim_func([*phs, out], index_dtype_override="int64"))
    depthwise = len(arrays[1].shape) == 4          # depthwise weight (CB, KH, KW, 16)
    scheduled = schedule_depthwise_cuda(sch) if depthwise else schedule_conv2d_dp4a(sch)
    src, grid, block = cuda_kernel(scheduled.mod["main"])
    return src, block, grid


DP4A_CASES = ["3x3_s1", "3x3_s2_odd", "3x3_s1_batch2_clamp", "1x1_s2_downsample", "grouped_blocks", "grouped_expanded",
              "first_3ch_7x7_s2", "dilated_3x3", "residual_3x3", "int4_3x3", "int4_3x3_s2_res", "int4_first_3ch",
              "3x3_16x16_full_tile", "depthwise_3x3_s1", "depthwise_3x3_s2_res"]
# the largest tile choose_cuda_conv_tile makes (2 output blocks x 4 rows x 8 columns, 128 threads, 2 pixels each)
EXTRA_CASES = {"3x3_16x16_full_tile": (1, 32, 16, 16, 64, 3, 1, 1, 1, 1, 16, True, False, {})}


@pytest.mark.skipif(not cuda_emulator.available(), reason="no g++ to run the CUDA emulation")
@pytest.mark.parametrize("name", DP4A_CASES)
def test_cuda_conv_kernels_bit_exact_in_emulation(name):
    """The CUDA C++ of the conv schedules (dp4a; depthwise), run by a CPU emulation of the CUDA thread model
    (threads, shared memory, barriers; dp4a.u32.s32 by its definition), equals the numpy integer contract bit for
    bit."""
    import kernels as K
    from test_kernels_x86 import CONV_CASES, _conv_case

    n, c, h, w, o, k, s, p, d, g, icb, res, int4, extra = {**CONV_CASES, **EXTRA_CASES}[name]
    cs = _conv_case(np.random.default_rng(sum(map(ord, name))), n, c, h, w, o, k, s, p, d, g, res, int4, **extra)
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], icb, zx), K.pack_conv_weight(cs["w"], g, ic_block=icb, isa="vnni", int4=int4),
              *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    src, block, grid = _cuda_conv_source(arrays, stride=s, padding=p, dilation=d, groups=g, input_zero_point=zx,
                                           output_zero_point=extra.get("zo", 5), lo=extra.get("lo", 0),
                                           hi=extra.get("hi", 255), residual_zero_point=extra.get("zr", 7))
    assert ("__dp4a(" in src) == (g != c)
    if name in EXTRA_CASES:
        assert block == (4, 4, 8) and grid == 16
    oh, ow = cs["ref"].shape[2:]
    out = np.zeros((n, -(-o // 16), oh, ow, 16), np.uint8)
    cuda_emulator.EmulatedKernel(src)(grid, block, out=out, **{f"in{i}": a for i, a in enumerate(arrays)})
    got = K.nchwc_to_nchw(out, o)
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {got.size}"


@pytest.mark.skipif(not cuda_emulator.available(), reason="no g++ to run the CUDA emulation")
@pytest.mark.parametrize("name", ["int2_3x3_s2_res_odd_out", "int2_grouped_blocks", "int2_first_3ch"])
def test_cuda_int2_conv_kernels_bit_exact_in_emulation(name):
    """2-bit weights stay packed four per byte in global memory and are unpacked (2-bit sign extension) while the
    dp4a conv stages them in shared memory: bit-exact in the CUDA emulation."""
    import kernels as K
    from test_kernels_x86 import INT2_CONV_CASES, _conv_case

    n, c, h, w, o, k, s, p, d, g, icb, res, extra = INT2_CONV_CASES[name]
    cs = _conv_case(np.random.default_rng(sum(map(ord, name))), n, c, h, w, o, k, s, p, d, g, res, w_bits=2, **extra)
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], icb, zx), K.pack_conv_weight(cs["w"], g, ic_block=icb, isa="vnni", int2=True),
              *params[:3]]
    assert arrays[1].shape[-1] == 16
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    src, block, grid = _cuda_conv_source(arrays, stride=s, padding=p, dilation=d, groups=g, input_zero_point=zx,
                                           output_zero_point=extra.get("zo", 5), residual_zero_point=extra.get("zr", 7))
    assert "__dp4a(" in src
    oh, ow = cs["ref"].shape[2:]
    out = np.zeros((n, -(-o // 16), oh, ow, 16), np.uint8)
    cuda_emulator.EmulatedKernel(src)(grid, block, out=out, **{f"in{i}": a for i, a in enumerate(arrays)})
    got = K.nchwc_to_nchw(out, o)
    assert len(np.unique(cs["ref"])) > 16
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {got.size}"


@pytest.mark.skipif(not cuda_emulator.available(), reason="no g++ to run the CUDA emulation")
@pytest.mark.parametrize("bits", [8, 4])
def test_every_kernel_of_a_cuda_build_bit_exact_in_emulation(bits):
    """Every kernel of TinyNet's CUDA build (dp4a, grouped and depthwise convs, pools, the classifier, layout
    changes, input quantization) run in the CUDA emulation on the network's own weights and random activations
    equals the same PrimFunc compiled unscheduled for this CPU."""
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel

    checked = emulate_every_kernel(tiny_integer_graph(bits, bits), batch=2, seed=bits)
    assert len(checked) == 17 and {"k_stem", "k_ir_conv_3", "k_fc", "k_gap", "quantize_input"} <= set(checked)


@pytest.mark.skipif(not cuda_emulator.available(), reason="no g++ to run the CUDA emulation")
def test_cuda_emulator_faults_on_misaligned_access_and_shares_memory():
    """The emulation is strict where a GPU is (a misaligned 4-byte access raises) and shares __shared__ memory
    between the threads of a block across __syncthreads (emptying __syncthreads made every kernel test above fail)."""
    head = 'extern "C" __global__ void __launch_bounds__(64) main_kernel(int* __restrict__ out_ptr, ' \
           'uchar* __restrict__ x_ptr) {\n'
    misaligned = head + "  out_ptr[threadIdx.x] = *(int*)(x_ptr + 4 * threadIdx.x + 1);\n}\n"
    x, out = np.arange(512, dtype=np.uint8), np.zeros(64, np.int32)
    with pytest.raises(RuntimeError, match="misaligned"):
        cuda_emulator.EmulatedKernel(misaligned)(1, (64, 1, 1), out=out, x=x)
    handoff = head + ("  __shared__ alignas(64) int buf_ptr[64];\n  buf_ptr[threadIdx.x] = (int)x_ptr[threadIdx.x];\n"
                      "  __syncthreads();\n  out_ptr[threadIdx.x] = buf_ptr[63 - threadIdx.x];\n}\n")
    cuda_emulator.EmulatedKernel(handoff)(1, (64, 1, 1), out=out, x=x)
    assert np.array_equal(out, np.arange(63, -1, -1))
