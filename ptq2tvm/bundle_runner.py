"""Run a ptq2tvm .so with numpy, the apache-tvm-ffi wheel and TVM's runtime libraries only: no torch, no ptq2tvm, no
`tvm` Python package and no 250 MB compiler library. `ptq2tvm bundle` copies this file into a bundle as run_model.py:

    pip install -r requirements.txt              # numpy + apache-tvm-ffi (a few MB)
    python run_model.py --input images.npy       # float (N, C, H, W), preprocessed like the training data
    python run_model.py --random 8 --bench 50    # random uint8 inputs; median latency of 50 runs
    python run_model.py --check                  # bit-exact against the reference outputs shipped in the bundle
    python run_model.py --input x.npy --output y.npy       # y: float outputs (logits); --output-int: integer codes

The sidecar model.json gives the compiled batch, the target and the input/output scale and zero point.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

HERE = Path(__file__).resolve().parent
KDL_CPU, KDL_CUDA = 1, 2
POOLED_ALLOCATOR = 2


CUDA_COMPILE_CALLBACK = "tvm_callback_cuda_compile"
_cuda_binaries: dict[str, bytes] = {}
_cuda_callback_registered = False


def register_cuda_binaries(meta: dict[str, Any]) -> None:
    """Make the CUDA kernels compiled at build time (``meta["cuda_binaries"]``) what TVM's CUDA runtime gets when it
    asks ``tvm_callback_cuda_compile`` to compile a .so's kernel source at load time: no compiler runs on this host.
    A source this process has no binary for goes to the callback registered before (``tvm``'s NVRTC one, when the
    ``tvm`` package is imported), else raises."""
    entries = meta.get("cuda_binaries")
    if not entries:
        raise RuntimeError("this CUDA build carries no compiled kernels in its model.json (built before ptq2tvm "
                           "stored them): rebuild it with `ptq2tvm compile --target cuda`")
    for e in entries:
        data = base64.b64decode(e["data_b64"])
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise RuntimeError(f"CUDA binary for source {e['source_sha256'][:12]} is corrupted (checksum differs)")
        _cuda_binaries[e["source_sha256"]] = data
    global _cuda_callback_registered
    if _cuda_callback_registered:
        return
    fallback = tvm_ffi.get_global_func(CUDA_COMPILE_CALLBACK, allow_missing=True)

    def compile_from_table(code: str) -> bytes:
        key = hashlib.sha256(code.encode()).hexdigest()
        if key in _cuda_binaries:
            return _cuda_binaries[key]
        if fallback is not None:
            return fallback(code)
        raise RuntimeError(f"no compiled CUDA binary for kernel source {key[:12]} (the .so and its model.json do "
                           "not belong together, or the .so was not built by ptq2tvm)")

    tvm_ffi.register_global_func(CUDA_COMPILE_CALLBACK, compile_from_table, override=True)
    _cuda_callback_registered = True


class CpuFeatureError(RuntimeError):
    """The build needs CPU instructions this host does not have."""


def host_cpu_flags() -> set[str] | None:
    """The CPU feature flags of this host from /proc/cpuinfo (Linux names: avx2, avx512_vnni, amx_int8, ...), or None
    where they cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "flags":
            return set(val.split())
    return None


def missing_cpu_features(meta: dict[str, Any], flags: set[str] | None = None) -> list[str]:
    """The CPU features an x86 build needs (``meta["cpu_features"]``, /proc/cpuinfo names) that this host lacks;
    [] when none are recorded or the host's flags cannot be read."""
    need = meta.get("cpu_features") or []
    flags = host_cpu_flags() if flags is None else flags
    if flags is None:
        return []
    return sorted(f for f in need if f not in flags)


def cpu_feature_error(so_path: str | Path, meta: dict[str, Any], missing: list[str]) -> str:
    """The one-line message for a build this CPU cannot run."""
    t = meta.get("target", {})
    return (f"{Path(so_path).name} was built for {t.get('mcpu', 'another CPU')} and needs CPU features this host lacks: "
            f"{', '.join(missing)} (it would crash with an illegal instruction); rebuild it here (--target host) or "
            "build a portable one (--target x86-64-v3: AVX2 kernels that run on every AVX2 CPU)")


class BundleError(RuntimeError):
    """The bundle cannot run here: a file is missing or corrupted, or the host lacks what the build needs."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BundleModel:
    """A compiled ptq2tvm model loaded through tvm_ffi + libtvm_runtime (see the module docstring).

    The .so is checked against the SHA-256 in its sidecar before it is loaded (a truncated or replaced library
    would otherwise crash the process with a bus error); raises :class:`BundleError` with one clear line."""

    def __init__(self, so_path: str | Path, lib_dir: str | Path | None = None):
        so_path = Path(so_path)
        meta_path = so_path.with_suffix(".json")
        for p in (so_path, meta_path):
            if not p.is_file():
                raise BundleError(f"{p} not found")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except ValueError as e:
            raise BundleError(f"{meta_path} is corrupted: {e}") from None
        want = self.meta.get("so_sha256")
        if want and _sha256(so_path) != want:
            raise BundleError(f"{so_path} does not match the checksum in {meta_path.name} ({so_path.stat().st_size} "
                              "bytes: truncated, corrupted or replaced); copy the bundle again")
        self.cuda = self.meta["target"].get("kind") == "cuda"
        missing = [] if self.cuda else missing_cpu_features(self.meta)
        if missing:
            raise CpuFeatureError(cpu_feature_error(so_path, self.meta, missing))
        lib_dir = Path(lib_dir) if lib_dir is not None else so_path.parent / "lib"
        ffi_lib = Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so"
        ctypes.CDLL(str(ffi_lib), ctypes.RTLD_GLOBAL)        # libtvm_runtime links against it
        for name in ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if self.cuda else []):
            if not (lib_dir / name).is_file():
                raise BundleError(f"{lib_dir / name} not found (the bundle is incomplete)")
        ctypes.CDLL(str(lib_dir / "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)
        if self.cuda:
            try:
                ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise BundleError(f"this bundle is a CUDA build and this host cannot load the CUDA runtime ({e}): run "
                                  "it on a host with an NVIDIA GPU, its driver (libcuda.so.1) and libcudart.so.13, "
                                  "or bundle a CPU build (ptq2tvm compile without --target cuda)") from None
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
        self.dev = tvm_ffi.device("cuda" if self.cuda else "cpu", 0)
        if self.cuda:
            register_cuda_binaries(self.meta)
        self.vm = tvm_ffi.load_module(str(so_path))["vm_load_executable"]()
        if self.cuda:   # device list: the GPU, then the CPU host
            try:
                self.vm["vm_initialization"](KDL_CUDA, 0, POOLED_ALLOCATOR, KDL_CPU, 0, POOLED_ALLOCATOR)
            except Exception as e:  # noqa: BLE001 - no device / driver: say so on one line
                raise BundleError(f"no usable CUDA device on this host ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})") from None
        else:
            self.vm["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
        self.main = self.vm["main"]
        self.main_float = self.vm["main_float"] if "main_float" in self.meta.get("entries", {}) else None
        self.batch = int(self.meta["batch"])
        self._inputs: dict[tuple, tuple[Any, np.ndarray | None]] = {}   # reused input tensors (and CPU views)

    def run_batch(self, q: np.ndarray) -> np.ndarray:
        """One compiled batch -> the integer output: uint8 inputs, or float32 ones when the .so quantizes them. Not
        thread-safe (one VM and one reused input tensor per model): use one BundleModel per thread."""
        fn = self.main if q.dtype == np.uint8 else self.main_float
        q = np.ascontiguousarray(q)
        # always copy into a runtime-allocated tensor: the kernels assume TVM's 64-byte alignment (vector loads), which
        # a numpy buffer wrapped by from_dlpack does not have. One tensor per (shape, dtype), reused: allocating one
        # per call cost ~25 us (a tenth of a 28x28 model's call); on the CPU it is refilled through a numpy view.
        key = (q.shape, q.dtype.str)
        if key not in self._inputs:
            x = self._alloc(tvm_ffi.Shape(q.shape), str(q.dtype), self.dev, None)
            self._inputs[key] = (x, None if self.cuda else np.from_dlpack(x))
        x, view = self._inputs[key]
        if view is not None:
            np.copyto(view, q)
        else:
            self._copy(tvm_ffi.from_dlpack(q), x)
        out = fn(x)
        if self.cuda:
            host = np.empty(tuple(out.shape), dtype=str(out.dtype))
            self._copy(out, tvm_ffi.from_dlpack(host))
            return host
        return np.from_dlpack(out).copy()

    def run_int(self, q: np.ndarray) -> np.ndarray:
        """Any number of inputs (uint8, or float32 for a .so with the float entry), chunked into the compiled batch
        (the last chunk padded)."""
        outs = []
        for i in range(0, len(q), self.batch):
            chunk = q[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append(self.run_batch(chunk)[:n])
        return np.concatenate(outs)

    def check(self, directory: str | Path) -> tuple[int, int, int]:
        """Run ``directory``'s check_input.npy and compare with check_output.npy (the reference executor's integers,
        written by ``ptq2tvm bundle``): -> (output elements that differ, output elements, inputs)."""
        directory = Path(directory)
        want = np.load(directory / "check_output.npy")
        got = self.run_int(np.load(directory / "check_input.npy"))
        bad = int((got != want).sum()) if got.shape == want.shape else want.size
        return bad, int(want.size), len(want)

    def dequantize(self, y: np.ndarray) -> np.ndarray:
        """Integer output codes -> float32 (scale * (q - zero_point)), like ptq2tvm's QTensor.dequantize."""
        out = self.meta["output"]
        return ((np.asarray(y).astype(np.float64) - out["zero_point"]) * out["scale"]).astype(np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> uint8 like ptq2tvm's QTensor.quantize (float32 division, round half to even, clamp)."""
        inp = self.meta["input"]
        q = np.divide(np.asarray(x, dtype=np.float32), np.float32(inp["scale"]), dtype=np.float32)
        q = np.rint(q) + np.float32(inp["zero_point"])
        return np.clip(q, 0, (1 << int(inp["bits"])) - 1).astype(np.uint8)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float in, float (dequantized) out."""
        out = self.meta["output"]
        x = np.asarray(x, dtype=np.float32)
        y = self.run_int(x if self.main_float is not None else self.quantize(x)).astype(np.float64)
        return ((y - out["zero_point"]) * out["scale"]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--so", default=str(HERE / "model.so"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--check", action="store_true", help="run check_input.npy, compare with check_output.npy (the "
                     "reference executor's integers); exit 1 if any element differs")
    src.add_argument("--input", help="float32 .npy (N, C, H, W), preprocessed like the training data")
    src.add_argument("--input-int", help="uint8 .npy of already quantized inputs")
    src.add_argument("--random", type=int, metavar="N", help="N random uint8 inputs")
    p.add_argument("--output", help="write the outputs (float32, dequantized: the logits) to this .npy")
    p.add_argument("--output-int", action="store_true", help="with --output: write the integer output codes instead")
    p.add_argument("--bench", type=int, default=0, metavar="RUNS", help="time RUNS runs of one compiled batch")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except CpuFeatureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (BundleError, OSError, ValueError) as e:
        print(f"run_model.py: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    model = BundleModel(args.so)
    if args.check:
        bad, size, n = model.check(Path(args.so).resolve().parent)
        print(f"check on {'cuda' if model.cuda else 'cpu'}: {'bit-exact' if bad == 0 else 'MISMATCH'} "
              f"({bad} of {size} output elements differ, {n} inputs)")
        return 0 if bad == 0 else 1
    if args.input:
        x = np.load(args.input).astype(np.float32)
        q = x if model.main_float is not None else model.quantize(x)
    elif args.input_int:
        q = np.load(args.input_int).astype(np.uint8)
    else:
        q = np.random.default_rng(0).integers(0, 256, (args.random, *model.meta["input"]["shape"]), dtype=np.uint8)
    y = model.run_int(q)
    if args.output:
        np.save(args.output, y if args.output_int else model.dequantize(y))
    print("top-1:", y.argmax(1).tolist()[:32], "..." if len(y) > 32 else "")
    if args.bench:
        batch = np.resize(q, (model.batch, *q.shape[1:]))
        model.run_batch(batch)
        times = []
        for _ in range(args.bench):
            t0 = time.perf_counter()
            model.run_batch(batch)
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"latency (batch {model.batch}, {'cuda' if model.cuda else 'cpu'}): median "
              f"{statistics.median(times):.3f} ms over {args.bench} runs")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
