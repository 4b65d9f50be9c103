"""Run a ptq2tvm .so with numpy, the apache-tvm-ffi wheel and TVM's runtime libraries only: no torch, no ptq2tvm, no
`tvm` Python package and no 250 MB compiler library. `ptq2tvm bundle` copies this file into a bundle as run_model.py:

    pip install -r requirements.txt              # numpy + apache-tvm-ffi (a few MB)
    python run_model.py --input images.npy       # float (N, C, H, W), preprocessed like the training data
    python run_model.py --input data.npz:images  # an array of an .npz (the key may be left out if it holds one)
    python run_model.py --random 8 --bench 50    # random uint8 inputs; median latency of 50 runs
    python run_model.py --check                  # bit-exact against the reference outputs shipped in the bundle
    python run_model.py --random 1 --bench 50 --threads 2   # TVM runtime threads (default: $TVM_NUM_THREADS or
                                                            # the CPU count)
    python run_model.py --input x.npy --output y.npy       # y: float outputs (logits); --output-int: integer codes
    python run_model.py --input x.npy --output y.npz       # a model with several outputs: one array per output

The sidecar model.json gives the compiled batch, the target, the input/output scale and zero point and, for a model
with several outputs, each output (in the integer graph's order; ``output_structure`` holds a dict model's keys).
Inputs are checked before they reach the library, like ptq2tvm's CompiledModel: shape (N, C, H, W) against the
compiled input (with a hint for channels-last or a missing batch axis), dtype, NaN / Inf; a bad input is one line
on stderr and exit status 2.
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

HERE = Path(__file__).resolve().parent

try:
    import numpy as np
    import tvm_ffi
except ModuleNotFoundError as _missing:     # a deployment host without the requirements: one line, not a traceback
    if __name__ != "__main__" or _missing.name not in ("numpy", "tvm_ffi"):
        raise
    _req = HERE / "requirements.txt"
    sys.exit(f"run_model.py: error: the Python package {'apache-tvm-ffi' if _missing.name == 'tvm_ffi' else 'numpy'} "
             f"is not installed: pip install -r {_req if _req.is_file() else 'requirements.txt'}")
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


_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18    # x86-64 Linux
_amx_state_granted = False


def needs_amx_state(meta: dict[str, Any]) -> bool:
    """Whether a build runs AMX tile instructions (its sidecar's ``cpu_features`` name ``amx_tile``)."""
    return "amx_tile" in (meta.get("cpu_features") or [])


def request_amx_state() -> None:
    """Ask Linux for the AMX tile-data state for this process, once (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, Linux >= 5.16, Documentation/arch/x86/xstate.rst): without it the first tile instruction
    kills the process with SIGILL. Raises :class:`CpuFeatureError` naming the errno when Linux refuses."""
    global _amx_state_granted
    if _amx_state_granted:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        err = ctypes.get_errno()
        raise CpuFeatureError(f"Linux refused the AMX tile state this build needs (arch_prctl ARCH_REQ_XCOMP_PERM: "
                              f"errno {err}, {os.strerror(err)}; Linux >= 5.16 required): rebuild without AMX "
                              "(PTQ2TVM_AMX=0 ptq2tvm compile ..., or --target icelake-server)")
    _amx_state_granted = True


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
        self.so_name = so_path.name
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
        if needs_amx_state(self.meta):
            request_amx_state()
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

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """Every output's sidecar entry (name, shape without N, scale, zero_point, bits), in the graph's order."""
        return self.meta.get("outputs") or [self.meta["output"]]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs for people: a dict model's keys, else the integer graph's tensor names."""
        st = self.meta.get("output_structure")
        if st and st[0] == "dict" and len(st[1]) == len(self.outputs):
            return [str(k) for k in st[1]]
        return [str(o["name"]) for o in self.outputs]

    def _single(self, outs: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        return outs[0] if len(self.outputs) == 1 else outs

    def _run_batch(self, q: np.ndarray) -> list[np.ndarray]:
        """One compiled batch -> one integer array per output."""
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
        res = fn(x)
        return [self._to_host(t) for t in ([res] if hasattr(res, "shape") else list(res))]

    def _to_host(self, out: Any) -> np.ndarray:
        if self.cuda:
            host = np.empty(tuple(out.shape), dtype=str(out.dtype))
            self._copy(out, tvm_ffi.from_dlpack(host))
            return host
        return np.from_dlpack(out).copy()

    def run_batch(self, q: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """One compiled batch -> the integer output (a list, one per output, for a model with several): uint8 inputs,
        or float32 ones when the .so quantizes them. Not thread-safe (one VM and one reused input tensor per model):
        use one BundleModel per thread."""
        return self._single(self._run_batch(q))

    def _run_all(self, q: np.ndarray) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = []
        for i in range(0, len(q), self.batch):
            chunk = q[i:i + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append([o[:n] for o in self._run_batch(chunk)])
        return [np.concatenate(parts) for parts in zip(*outs)]

    def run_int(self, q: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Any number of inputs (integer codes in 0..qmax of the input's bits, or float32 for a .so with the float
        entry), chunked into the compiled batch (the last chunk padded): the integer output codes, a list of arrays
        for a model with several outputs. Raises :class:`InputError` for a wrong shape, codes outside the input's
        bits (the kernels' proved int16 / epilogue bounds assume <= qmax: such codes would give wrong integers, not
        saturated ones), float input to a .so without the float entry, NaN / Inf."""
        q = np.asarray(q)
        if q.dtype.kind in "ui":
            return self._single(self._run_all(self.check_input(q, integer=True)))
        if self.main_float is None:
            raise InputError(f"{self.so_name} has no float entry (compiled without it): pass uint8 codes "
                             "(model.quantize(x)) or call the model on float images")
        return self._single(self._run_all(self.check_input(q)))

    def check_outputs(self, directory: str | Path) -> tuple[list[tuple[str, int, int]], int]:
        """Run ``directory``'s check_input.npy and compare with the reference executor's integers written by
        ``ptq2tvm bundle`` (check_output.npy, or check_output.npz with one array per output name for a model with
        several outputs): -> ([(output name, elements that differ, elements)], inputs)."""
        directory = Path(directory)
        got = self._run_all(np.load(directory / "check_input.npy"))
        names = [str(o["name"]) for o in self.outputs]
        if (directory / "check_output.npz").is_file():
            with np.load(directory / "check_output.npz") as z:
                want = {k: z[k] for k in z.files}
        else:
            want = {names[0]: np.load(directory / "check_output.npy")} if len(names) == 1 else {}
        missing = [n for n in names if n not in want]
        if missing:
            raise BundleError(f"the bundle's reference outputs lack {', '.join(missing)} (check_output.npz does not "
                              "belong to this model.so): make the bundle again")
        res = []
        for name, g in zip(names, got):
            w = want[name]
            res.append((name, int((g != w).sum()) if g.shape == w.shape else int(w.size), int(w.size)))
        return res, len(got[0])

    def check(self, directory: str | Path) -> tuple[int, int, int]:
        """:meth:`check_outputs` summed over the outputs: -> (output elements that differ, output elements, inputs)."""
        per, n = self.check_outputs(directory)
        return sum(b for _, b, _ in per), sum(t for _, _, t in per), n

    def dequantize(self, y: np.ndarray, i: int = 0) -> np.ndarray:
        """Integer codes of output ``i`` -> float32 (scale * (q - zero_point)), like ptq2tvm's QTensor.dequantize."""
        out = self.outputs[i]
        return ((np.asarray(y).astype(np.float64) - out["zero_point"]) * out["scale"]).astype(np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> uint8 like ptq2tvm's QTensor.quantize (float32 division, round half to even, clamp)."""
        inp = self.meta["input"]
        q = np.divide(np.asarray(x, dtype=np.float32), np.float32(inp["scale"]), dtype=np.float32)
        q = np.rint(q) + np.float32(inp["zero_point"])
        return np.clip(q, 0, (1 << int(inp["bits"])) - 1).astype(np.uint8)

    def saturation_warning(self, x: np.ndarray, limit: float = 0.10) -> str | None:
        """One line when more than ``limit`` of the float input's values lie outside what the input quantizer
        represents (scale * (0 - zero_point) .. scale * (qmax - zero_point), half a step of margin): they all become
        0 or qmax, as raw 0..255 pixels do for a model calibrated on normalized images; None otherwise."""
        inp = self.meta["input"]
        s, z, qmax = float(inp["scale"]), int(inp["zero_point"]), (1 << int(inp["bits"])) - 1
        lo, hi = s * (0 - z) - s / 2, s * (qmax - z) + s / 2
        outside = float(((x < lo) | (x > hi)).mean())
        if outside <= limit:
            return None
        return (f"{100 * outside:.0f}% of the input values lie outside the input quantizer's range "
                f"[{lo + s / 2:.4g}, {hi - s / 2:.4g}] (input values {float(x.min()):.4g}..{float(x.max()):.4g}) and "
                "are clamped: is the input preprocessed like the calibration data (scaled, mean / std normalized)?")

    def check_input(self, x: np.ndarray, integer: bool = False) -> np.ndarray:
        """The checks of ptq2tvm's CompiledModel, as one-line :class:`InputError`: shape (N, *input shape), a
        non-empty batch, a float (or, ``integer``, integer codes within the input's bits) dtype, no NaN / Inf.
        Returns the input as float32 (``integer``: uint8)."""
        x = np.asarray(x)
        want = tuple(int(d) for d in self.meta["input"]["shape"])
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            hint = ""
            if x.ndim == len(want) + 1 and len(want) == 3 and tuple(x.shape[1:]) == (want[1], want[2], want[0]):
                hint = "; it looks channels-last (N, H, W, C): use x.transpose(0, 3, 1, 2)"
            elif tuple(x.shape) == want:
                hint = "; one image without the batch axis: use x[None]"
            raise InputError(f"{self.so_name} expects input (N, {', '.join(map(str, want))}), got {tuple(x.shape)}"
                             + hint)
        if x.shape[0] == 0:
            raise InputError("empty input batch (N = 0)")
        if integer:
            if x.dtype.kind not in "ui":
                raise InputError(f"--input-int expects integer codes (uint8), got {x.dtype}; float images go to --input")
            qmax = (1 << int(self.meta["input"]["bits"])) - 1
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > qmax:
                raise InputError(f"--input-int codes must lie in 0..{qmax} (the input's {self.meta['input']['bits']} "
                                 f"bits), got {lo}..{hi}")
            return x.astype(np.uint8)
        if x.dtype.kind != "f":
            raise InputError(f"expected float input (N, C, H, W) preprocessed like the training data, got {x.dtype}"
                             + ("; already quantized codes go to --input-int" if x.dtype == np.uint8 else ""))
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            raise InputError(f"input contains NaN or Inf ({int((~finite).sum())} of {len(x)} images, first at index "
                             f"{int(np.argmin(finite))})")
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Float in, float (dequantized) out (a list for several outputs); the input checked by :meth:`check_input`."""
        x = self.check_input(x)
        ys = self._run_all(x if self.main_float is not None else self.quantize(x))
        return self._single([self.dequantize(y, i) for i, y in enumerate(ys)])


class InputError(ValueError):
    """An input array or file the model cannot run: wrong shape, dtype, NaN / Inf, unreadable file."""


def load_input(spec: str) -> np.ndarray:
    """The array of ``spec``: a .npy file, or an .npz file (``FILE.npz:KEY`` names its array; without a key an .npz
    must hold one array, or one named ``images``). Raises :class:`InputError` with one line."""
    path, key = spec, None
    if not Path(spec).is_file() and ":" in spec and (spec.rsplit(":", 1)[0].endswith(".npz")
                                                     or Path(spec.rsplit(":", 1)[0]).is_file()):
        path, key = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise InputError(f"input file {path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path} is not a numpy .npy / .npz array file ({str(e).splitlines()[0] if str(e) else e!r})"
                         ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        if key is not None:
            raise InputError(f"{path} is an .npy file: it has no named arrays (drop ':{key}')")
        return data
    with data:
        files = list(data.files)
        if key is None:
            if len(files) == 1:
                key = files[0]
            elif "images" in files:
                key = "images"
            else:
                raise InputError(f"{path} holds {len(files)} arrays ({', '.join(files)}): name the input, e.g. "
                                 f"--input {path}:{files[0]}")
        elif key not in files:
            raise InputError(f"{path} has no array {key!r}; it holds {', '.join(files) or 'none'}")
        try:
            return data[key]
        except ValueError as e:
            raise InputError(f"{path}:{key}: {e}") from None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(N" + "".join(f", {d}" for d in shape[1:]) + ")"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--so", default=str(HERE / "model.so"), help="the compiled library (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--check", action="store_true", help="run check_input.npy, compare with the reference "
                     "executor's integers shipped in the bundle (every output); exit 1 if any element differs")
    src.add_argument("--input", metavar="FILE", help="float32 .npy (N, C, H, W), preprocessed like the training data; "
                     "FILE.npz:KEY for an array of an .npz")
    src.add_argument("--input-int", metavar="FILE", help="integer codes (uint8) of already quantized inputs (.npy, or "
                     "FILE.npz:KEY)")
    src.add_argument("--random", type=int, metavar="N", help="N random integer inputs (codes of the input's bits)")
    p.add_argument("--output", metavar="FILE", help="write the outputs (float32, dequantized: the logits) to this .npy; "
                   "a model with several outputs needs an .npz (one array per output)")
    p.add_argument("--output-int", action="store_true", help="with --output: write the integer output codes instead")
    p.add_argument("--bench", type=int, default=0, metavar="RUNS", help="time RUNS runs of one compiled batch")
    p.add_argument("--threads", type=int, metavar="N", help="threads of the TVM runtime (default: $TVM_NUM_THREADS "
                   f"if set, else the CPU count, {os.cpu_count() or 1})")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    too_many = threads_limit_error(args.threads)
    if too_many:
        p.error(too_many)
    set_threads(args.threads)
    if args.output_int and not args.output:
        p.error("--output-int needs --output FILE (it selects what --output writes)")
    if args.random is not None and args.random < 1:
        p.error(f"--random needs at least 1 input, got {args.random}")
    try:
        return _run(args)
    except CpuFeatureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (BundleError, OSError, ValueError) as e:
        print(f"run_model.py: error: {e}", file=sys.stderr)
        return 2


# --threads above this many per logical CPU is refused, here and by ptq2tvm's CLI (1000 threads on 2 cores: one
# parity call ran > 8 minutes with 3000 spinning threads)
MAX_THREADS_PER_CPU = 4


def threads_limit_error(threads: int | None) -> str | None:
    """The one-line reason ``--threads`` is refused (more than :data:`MAX_THREADS_PER_CPU` x the logical CPUs), or
    None."""
    cores = os.cpu_count() or 1
    if threads is None or threads <= MAX_THREADS_PER_CPU * cores:
        return None
    return (f"--threads {threads} is more than {MAX_THREADS_PER_CPU}x this machine's {cores} logical CPUs: "
            f"oversubscribed thread pools spin-wait for each other and a run takes many times longer (use at most "
            f"{MAX_THREADS_PER_CPU * cores}; {cores} for latency)")


def set_threads(threads: int | None) -> None:
    """TVM_NUM_THREADS for the runtime's thread pool (read when the pool starts, i.e. before the first run):
    ``threads``, else what is set already, else the CPU count."""
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _run(args: argparse.Namespace) -> int:
    model = BundleModel(args.so)
    names = model.output_names
    if args.output and len(names) > 1 and not args.output.endswith(".npz"):
        raise InputError(f"the model has several outputs ({', '.join(names)}): --output needs an .npz file (one "
                         f"array per output), got {args.output}")
    if args.check:
        per, n = model.check_outputs(Path(args.so).resolve().parent)
        bad, size = sum(b for _, b, _ in per), sum(t for _, _, t in per)
        print(f"check on {'cuda' if model.cuda else 'cpu'}: {'bit-exact' if bad == 0 else 'MISMATCH'} "
              f"({bad} of {size} output elements differ, {n} inputs)")
        if len(per) > 1:
            for name, b, t in per:
                print(f"  {name}: {b} of {t} differ")
        return 0 if bad == 0 else 1
    if args.input:
        x = model.check_input(load_input(args.input))
        note = model.saturation_warning(x)
        if note:
            print(f"run_model.py: warning: {note}", file=sys.stderr)
        q = x if model.main_float is not None else model.quantize(x)
    elif args.input_int:
        q = model.check_input(load_input(args.input_int), integer=True)
    else:
        qmax = (1 << int(model.meta["input"]["bits"])) - 1      # codes the input's bits can hold (255 at 8 bits)
        q = np.random.default_rng(0).integers(0, qmax + 1, (args.random, *model.meta["input"]["shape"]),
                                              dtype=np.uint8)
    ys = model._run_all(q)
    if args.output:
        vals = ys if args.output_int else [model.dequantize(y, i) for i, y in enumerate(ys)]
        if args.output.endswith(".npz"):
            save_npz(args.output, dict(zip(names, vals)))
        else:
            np.save(args.output, vals[0])
    st = model.meta.get("output_structure")
    squashed = (model.meta.get("graph_meta") or {}).get("squashed_outputs") or [False] * len(ys)
    for name, y, sq in zip(names, ys, squashed):
        label = repr(name) if st and st[0] == "dict" else name          # a dict model's keys quoted: '0', 'logits'
        head = "" if len(ys) == 1 else f"{label} {_shape_text(y.shape)} "
        if y.ndim == 2 and not sq:                  # class scores; a sigmoid box / probabilities: their codes
            print(f"{head}top-1:", y.argmax(1).tolist()[:32], "..." if len(y) > 32 else "")
        else:
            written = " (--output holds them dequantized)" if args.output and not args.output_int else ""
            print(f"{head or f'output {_shape_text(y.shape)} '}integer codes {int(y.min())}..{int(y.max())}{written}")
    if args.output:
        kind = "integer codes" if args.output_int else "dequantized float32"
        print(f"wrote {args.output} ({kind}, {len(q)} input(s)"
              + (f"; arrays {', '.join(map(repr, names))})" if args.output.endswith(".npz") else ")"))
    if args.bench:
        batch = np.resize(q, (model.batch, *q.shape[1:]))
        model.run_batch(batch)
        times = []
        for _ in range(args.bench):
            t0 = time.perf_counter()
            model.run_batch(batch)
            times.append((time.perf_counter() - t0) * 1e3)
        where = "cuda" if model.cuda else f"cpu, {os.environ.get('TVM_NUM_THREADS')} thread(s)"
        print(f"latency (batch {model.batch}, {where}): median "
              f"{statistics.median(times):.3f} ms over {args.bench} runs")
    return 0


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz with one array per name, in order (what np.savez writes; any name, ``file`` included)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


if __name__ == "__main__":
    sys.exit(main())
