"""Load a compiled .so and run it: uint8 in/out, or float in (quantized here) and float out (dequantized)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import ArtifactError, InputShapeError, TargetError
from ..ir.graph import IntegerGraph, QTensor, _tensor_from_json
from ..threads import auto_threads
from .compile import read_sidecar
from .relax_builder import CHECKED_FLOAT_ENTRY, FLOAT_ENTRY


def set_num_threads(threads: int | None) -> None:
    """TVM's runtime thread pool reads TVM_NUM_THREADS when it starts: call before the first run. ``threads`` None
    and no TVM_NUM_THREADS in the environment: TVM's default (every core) on a quiet machine, 1 thread when the load
    average says the cores are taken (:func:`ptq2tvm.threads.auto_threads`; 2 spinning TVM threads on 2 busy cores
    ran a 28x28 ResNet at 100-145 ms per call against 0.85 ms with 1)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    elif "TVM_NUM_THREADS" not in os.environ and auto_threads(os.cpu_count() or 1, what="the .so runs",
                                                                   hint="set TVM_NUM_THREADS=N") == 1:
        os.environ["TVM_NUM_THREADS"] = "1"


_copy_dir: Path | None = None


def _private_copy_dir() -> Path:
    """A temporary directory of this process for the copies of loaded libraries, removed at exit. (Versions before
    this one kept every copy in a shared ``ptq2tvm-so-<uid>`` folder of the temp dir; it may be deleted.)"""
    global _copy_dir
    if _copy_dir is None or not _copy_dir.is_dir():
        _copy_dir = Path(tempfile.mkdtemp(prefix="ptq2tvm-so-"))
        atexit.register(shutil.rmtree, _copy_dir, True)
    return _copy_dir


def _content_addressed_copy(so_path: Path, sha256: str) -> Path:
    """dlopen caches libraries by path: a rebuilt .so at the same path would silently run the old code in this
    process. Loading a copy named by its checksum makes every distinct library a distinct path. The copy lives in a
    per-process temporary directory; the caller deletes it once loaded (:func:`_release_copy`: the mapping stays
    valid), and the directory goes at exit."""
    dst = _private_copy_dir() / f"{sha256}.so"
    if not dst.exists():
        with atomic_path(dst, suffix=".so") as tmp:
            shutil.copyfile(so_path, tmp)
    return dst


def _release_copy(path: Path) -> None:
    path.unlink(missing_ok=True)


def _cuda_device_present() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - TVM's CUDA runtime cannot load without the driver
        return False


def _check_cpu_features(so_path: Path, meta: dict[str, Any]) -> None:
    """Raise TargetError when the build needs CPU features (sidecar ``cpu_features``) this host lacks: running it
    would die of SIGILL inside a kernel."""
    from ..bundle_runner import cpu_feature_error, missing_cpu_features

    missing = missing_cpu_features(meta)
    if missing:
        raise TargetError(cpu_feature_error(so_path, meta, missing))
    from ..bundle_runner import CpuFeatureError, needs_amx_state, request_amx_state

    if needs_amx_state(meta):
        try:
            request_amx_state()
        except CpuFeatureError as e:
            raise TargetError(f"{so_path}: {e}") from None


class CompiledModel:
    """A ptq2tvm .so with its sidecar metadata."""

    def __init__(self, so_path: str | Path, threads: int | None = None):
        import tvm
        from tvm import relax

        set_num_threads(threads)
        self.so_path = Path(so_path)
        self.meta: dict[str, Any] = read_sidecar(self.so_path)
        self.input: QTensor = _tensor_from_json(self.meta["input"])
        self.output: QTensor = _tensor_from_json(self.meta["output"])
        #: every output, in the order of the graph's ``output_names`` (one for most classifiers)
        self.outputs: list[QTensor] = [_tensor_from_json(t) for t in self.meta.get("outputs", [self.meta["output"]])]
        self.batch: int = int(self.meta["batch"])
        kind = self.meta["target"].get("kind", "llvm")
        self.isa: str = str(self.meta.get("isa") or self.meta.get("backend", "unknown"))
        if kind != "cuda":
            _check_cpu_features(self.so_path, self.meta)
        if kind == "cuda" and not _cuda_device_present():
            raise ArtifactError(f"{self.so_path} is a CUDA build and this machine has no usable CUDA device (no NVIDIA "
                                "driver or GPU): run it on a GPU host, e.g. from `ptq2tvm bundle` (runtime only)")
        try:
            if kind == "cuda":
                from ..bundle_runner import register_cuda_binaries

                register_cuda_binaries(self.meta)
            copy = _content_addressed_copy(self.so_path, self.meta["so_sha256"])
            try:
                lib = tvm.runtime.load_module(str(copy))
            finally:
                _release_copy(copy)
            self.device = tvm.cuda(0) if kind == "cuda" else tvm.cpu()
            self._vm = relax.VirtualMachine(lib, self.device)
        except Exception as e:
            raise ArtifactError(f"cannot load {self.so_path}: {type(e).__name__}: {e}") from e
        self._fn = self._vm["main"]
        # builds since the float entry was added quantize the input inside the .so (same arithmetic as numpy's)
        self._fn_float = self._vm[FLOAT_ENTRY] if FLOAT_ENTRY in self.meta.get("entries", {}) else None
        # x86 builds since the checked entry: quantize + NaN / Inf check on the caller's memory (one pass, no copy),
        # then main, in one call
        self._fn_checked = (self._vm[CHECKED_FLOAT_ENTRY]
                            if CHECKED_FLOAT_ENTRY in self.meta.get("entries", {}) and kind != "cuda" else None)
        self._tensor = tvm.runtime.tensor
        self._inputs: dict[tuple, tuple[Any, np.ndarray | None]] = {}
        self._dequant_tables: list[np.ndarray | None] = [None] * len(self.outputs)
        self._host_views = kind != "cuda"    # CPU tensors are read and written through numpy views (DLPack)
        self._lock = threading.Lock()

    def check_graph(self, graph: IntegerGraph) -> None:
        """Raise if ``graph`` is not the integer graph this library was compiled from."""
        if graph.digest() != self.meta["graph_sha256"]:
            raise ArtifactError(f"{self.so_path} was not compiled from this integer graph (digest differs): "
                                "compile it again")

    def _check(self, q: np.ndarray, dtype: Any) -> np.ndarray:
        q = np.asarray(q)
        want = tuple(self.input.shape)
        if q.ndim != len(want) + 1 or tuple(q.shape[1:]) != want:
            hint = ""
            if tuple(q.shape) == want:
                hint = "; add the batch dimension: x[None]"
            elif len(want) == 3 and tuple(q.shape[1:]) == (want[1], want[2], want[0]):
                hint = "; it looks channels-last (N, H, W, C): use x.transpose(0, 3, 1, 2)"
            raise InputShapeError(f"{self.so_path.name} expects input (N, {', '.join(map(str, want))}), "
                                  f"got {tuple(q.shape)}{hint}")
        if q.shape[0] == 0:
            raise InputShapeError("empty input batch")
        if dtype is not None and q.dtype != dtype:
            raise InputShapeError(f"expected {np.dtype(dtype).name} input, got {q.dtype}")
        if dtype == np.uint8 and self.input.qmax < 255 and int(q.max()) > self.input.qmax:
            # codes the input's bits cannot hold: the kernels' proved bounds assume <= qmax (a lifted epilogue or an
            # int16 sum would then be wrong, not merely saturated)
            raise InputShapeError(f"input codes must lie in 0..{self.input.qmax} (the input's {self.input.bits}-bit "
                                  f"grid), got up to {int(q.max())}")
        return q

    def run_batch(self, q: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """One call of the compiled function: uint8 input of exactly (batch, *input_shape)."""
        return self._single(self._call(self._fn, q))

    def _single(self, outs: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        return outs[0] if len(self.outputs) == 1 else outs

    def _call(self, fn: Any, batch: np.ndarray) -> list[np.ndarray]:
        """One call; one array per output (owned by the caller). One Relax VM (and the reused input tensor) per
        CompiledModel: calls from several Python threads are serialized (each call still runs on TVM's own thread
        pool). benchmarks/robustness.py measures it."""
        with self._lock:
            return self._outputs(fn(self._input_tensor(batch)))

    def _outputs(self, res: Any) -> list[np.ndarray]:
        """A VM result (one tensor, or a tuple of them) as numpy copies, one per output."""
        return [self._to_numpy(res)] if hasattr(res, "shape") else [self._to_numpy(r) for r in res]

    def _to_numpy(self, t: Any) -> np.ndarray:
        """A copy of an output tensor. On the CPU through a zero-copy DLPack view (``Tensor.numpy()`` cost ~9 us per
        call here, the view ~0.5 us: a few % of the 28x28 model's call); the copy is needed because an output may
        alias memory the next call overwrites (the reused input tensor, the VM's pooled storage)."""
        if self._host_views:
            return np.from_dlpack(t).copy()
        return t.numpy()

    def _input_tensor(self, batch: np.ndarray) -> Any:
        """The device tensor holding ``batch``: one per (shape, dtype), allocated at the first call and refilled
        afterwards (allocating a fresh TVM tensor per call cost 40-700 us here: most of the per-call overhead of a
        small model). On the CPU it is refilled through a numpy view of its memory (``np.copyto``, ~0.5 us for a
        28x28 input; ``Tensor.copyfrom`` cost ~9 us); on a GPU by ``copyfrom``. Called under the model's lock (see
        ``_call``)."""
        key = (batch.shape, batch.dtype.str)
        entry = self._inputs.get(key)
        if entry is None:
            t = self._tensor(np.ascontiguousarray(batch), self.device)
            self._inputs[key] = (t, np.from_dlpack(t) if self._host_views else None)
            return t
        t, view = entry
        if view is not None:
            np.copyto(view, batch)
        else:
            t.copyfrom(np.ascontiguousarray(batch))
        return t

    def _chunked(self, fn: Any, x: np.ndarray) -> list[np.ndarray]:
        """Run ``fn`` over ``x`` in chunks of the compiled batch (the last chunk padded by repeating its last row);
        one array per output."""
        if x.shape[0] == self.batch:
            return self._call(fn, x)
        outs: list[list[np.ndarray]] = []
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i:i + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append([o[:n] for o in self._call(fn, chunk)])
        return [np.concatenate(parts) for parts in zip(*outs)]

    def run_int(self, q: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """uint8 (N, ...) -> uint8 output (N, ...), any N (chunked into the compiled batch, last chunk padded); a
        list of arrays for a model with several outputs."""
        return self._single(self._chunked(self._fn, self._check(q, np.uint8)))

    def structured(self, x: np.ndarray) -> Any:
        """:meth:`__call__`'s outputs arranged as the traced model returned them (the sidecar's ``output_structure``):
        a dict model's dict (its keys), a tuple or a list, or the one array; a drop-in for the fake-quant model's
        ``qm(x)`` where code indexes ``out["logits"]``."""
        from ..model_outputs import arrange_outputs

        outs = self(x)
        return arrange_outputs(self.meta.get("output_structure"), outs if isinstance(outs, list) else [outs])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float input -> quantize with the model's input scale/zero point (inside the .so when it has the float
        entry, else in numpy; the same arithmetic) -> run -> dequantized float output; one array per output, in graph
        order, for a model with several (:meth:`structured`: as the model returned them)."""
        x = self._check(x, None)
        if x.dtype.kind in "uib":       # codes (or integer pixels) read as float values: every output silently wrong
            raise InputShapeError(f"expected float input (N, C, H, W) preprocessed like the training data, got "
                                  f"{x.dtype}" + ("; already quantized input codes go to run_int(q)"
                                                  if x.dtype == np.uint8 else ""))
        x = x.astype(np.float32, copy=False)                       # both entries quantize float32 values
        if self._fn_checked is not None and x.shape[0] == self.batch and x.flags.c_contiguous:
            outs = self._call_checked(x)
            if outs is not None:
                return self._single([self._dequantize(i, o) for i, o in enumerate(outs)])
        if not self._all_finite(x):
            raise InputShapeError("input contains NaN or Inf")
        if self._fn_float is not None:
            outs = self._chunked(self._fn_float, x)
        else:
            outs = self._chunked(self._fn, self.input.quantize(x))
        return self._single([self._dequantize(i, o) for i, o in enumerate(outs)])

    def _call_checked(self, x: np.ndarray) -> list[np.ndarray] | None:
        """One VM call of the checked float entry on ``x``'s own memory (float32, C-contiguous, one compiled batch):
        the .so quantizes it, flags NaN / Inf in the same pass and runs ``main`` on the codes. None where numpy cannot
        export ``x`` or it is not 4-byte aligned (the caller takes the copying path). Raises InputShapeError on NaN /
        Inf. ResNet-18 W8A8 on the 2-core Xeon: the wrapper's cost over the VM call 0.66 -> ~0.1 ms at batch 8."""
        import tvm_ffi

        if x.ctypes.data % 4:       # the entry declares 4-byte (float32) alignment; a byte-offset view is copied
            return None
        try:
            view = tvm_ffi.from_dlpack(x, require_alignment=0)
        except (BufferError, TypeError, ValueError):
            return None
        with self._lock:
            res, flags = self._fn_checked(view)
            if np.from_dlpack(flags).any():
                raise InputShapeError("input contains NaN or Inf")
            return self._outputs(res)

    def _all_finite(self, x: np.ndarray) -> bool:
        """No NaN / +-Inf in float32 ``x``: one float32 sum (numpy's pairwise SIMD reduction, single-threaded); a NaN
        or infinity makes it non-finite, and only then (or when finite values overflow the sum) the exact
        elementwise test decides. The former dot product with zeros was as fast alone but woke OpenBLAS's threads,
        which then competed with TVM's for the cores: in one process on the 2-core Xeon, ResNet-18 W8A8 through
        ``CompiledModel`` 1.60 -> 1.56 ms at batch 1 and 8.54 -> 8.19 ms at batch 8 (the raw VM call 1.41 / 7.26)."""
        flat = np.ascontiguousarray(x).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(flat, dtype=np.float32)):
                return True
        return bool(np.isfinite(flat).all())

    def _dequantize(self, i: int, q: np.ndarray) -> np.ndarray:
        """Output ``i``'s codes -> float32, ``QTensor.dequantize`` elementwise; uint8 codes through a 256-entry table
        of its values (bit-identical; ~1 us instead of ~3-5 us for the four numpy passes on a small output)."""
        if q.dtype != np.uint8:
            return self.outputs[i].dequantize(q)
        if self._dequant_tables[i] is None:
            self._dequant_tables[i] = self.outputs[i].dequantize(np.arange(256, dtype=np.uint8))
        return self._dequant_tables[i][q]
