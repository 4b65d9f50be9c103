"""Compile an integer graph to a shared library (.so) plus a JSON sidecar describing its interface."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from kernels.task_stack import compile_module

from .. import __version__
from ..atomic import atomic_path, write_json
from ..errors import ArtifactError, CompileError, TargetError, first_line, not_found
from ..ir.graph import IntegerGraph, _tensor_json
from .cuda_binary import build_cuda_binaries, is_cuda_arch
from .isa import required_cpu_features
from .relax_builder import CHECKED_FLOAT_ENTRY, FLOAT_ENTRY, add_float_entry, build_relax_module

ARTIFACT_FORMAT = "ptq2tvm-so"
ARTIFACT_VERSION = 1


def host_target(num_cores: int | None = None) -> dict[str, Any]:
    """LLVM target dict for this CPU (mcpu detected by LLVM, e.g. znver4), plus ``mattr`` ``+amx-tile,+amx-int8``
    where /proc/cpuinfo has AMX-INT8 and LLVM's CPU name does not imply it (a virtualized Xeon may be detected as
    'rocketlake'): the AMX conv kernels (kernels/amx.py) are then built."""
    from tvm.target.codegen import llvm_get_system_cpu

    from .isa import host_isa

    target: dict[str, Any] = {"kind": "llvm", "mcpu": str(llvm_get_system_cpu()),
                              "num-cores": int(num_cores or os.cpu_count() or 1)}
    if host_isa() == "amx":
        import kernels as K

        if not K.target_has_amx(tvm.target.Target(target), honour_env=False):
            target["mattr"] = ["+amx-tile", "+amx-int8"]
    return target


def resolve_target(target: str | dict[str, Any] | None) -> dict[str, Any]:
    """The TVM JSON target dict of a ``--target`` value:

    * None / 'host' / 'cpu' / 'llvm': this CPU (mcpu detected by LLVM: its best kernels, e.g. AVX-512 VNNI);
    * 'x86-64-v3' (AVX2) / 'x86-64-v4' (AVX-512): portable artifacts for any CPU of that level (AVX2 kernels);
    * an LLVM CPU name ('znver4', 'sapphirerapids', 'alderlake', ...): that CPU's kernels (cross-compiling);
    * 'cuda' or 'cuda:sm_XX': a CUDA target (sm_80 by default) with this CPU as host;
    * a TVM target string ('llvm -mcpu=znver4 -num-cores=2'), JSON text ('{"kind": "llvm", ...}') or a dict.

    Raises TargetError naming the value when it is none of these.
    """
    from .isa import PORTABLE_TARGETS, check_llvm_cpu, llvm_cpu_target, parse_target_string

    if target is None or target in ("host", "cpu", "llvm"):
        return host_target()
    if isinstance(target, dict):
        return check_llvm_cpu(target)
    if not isinstance(target, str):
        raise TargetError(f"unknown target {target!r}: use 'host', 'x86-64-v3', 'cuda', a TVM target string or dict")
    text = target.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise TargetError(f"target {text!r} is not valid JSON: {e}") from e
        if not isinstance(parsed, dict) or "kind" not in parsed:
            raise TargetError(f"JSON target {text!r} must be an object with a 'kind'")
        return check_llvm_cpu(parsed, text)
    if text.startswith("cuda"):
        arch = text.split(":", 1)[1] if ":" in text else "sm_80"
        if text.split(":", 1)[0] != "cuda" or not is_cuda_arch(arch):
            raise TargetError(f"unknown CUDA target {text!r}: use 'cuda' (sm_80) or 'cuda:sm_XX', e.g. 'cuda:sm_90'")
        # limits every sm_6x+ GPU has (48 KB static shared memory per block): stated, so that no schedule guesses
        return {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                "thread_warp_size": 32, "registers_per_block": 65536, "host": host_target()}
    if " " in text or text.startswith("llvm"):
        t = check_llvm_cpu(parse_target_string(text), text)
        if t["kind"] == "llvm":
            t.setdefault("num-cores", int(os.cpu_count() or 1))
        return t
    if text in PORTABLE_TARGETS:
        return llvm_cpu_target(text)
    return llvm_cpu_target(text)


def backend_isa(backend: str) -> str:
    """The kernels' ISA from a backend name ('x86-nchw16c-avx2' -> 'avx2', 'cuda-nchw16c-dp4a' -> 'dp4a',
    'plain-nchw' -> 'generic')."""
    parts = backend.split("-")
    return parts[2] if len(parts) > 2 and parts[0] in ("x86", "cuda") else "generic"


def sidecar_path(so_path: str | Path) -> Path:
    return Path(so_path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CompileResult:
    so_path: Path
    meta_path: Path
    seconds: float
    meta: dict[str, Any]


SCHEDULES = ("auto", "x86", "cuda", "plain")


def build_module(graph: IntegerGraph, batch: int, target: dict[str, Any], schedule: str = "auto",
                 tuner: Any = None, subbyte_storage: str | None = None) -> tuple[tvm.IRModule, str, int]:
    """The Relax module, the name of the backend that made it, and the bytes of the weights stored in it.

    ``auto``: the hand-scheduled x86 kernels (kernels/, VNNI or exact AVX2) when the target is an x86 CPU that has
    them, the dp4a kernels (``cuda``) for a CUDA target, else ``plain`` (our NCHW TE definitions through TVM's default
    lowering; portable). ``tuner`` (a :class:`~ptq2tvm.backend.tune.KernelTuner`) schedules the x86 kernels from
    tuning records. ``subbyte_storage`` ("auto" | "packed"; None: the graph's,
    :func:`ptq2tvm.backend.storage.graph_subbyte_storage`): how the x86 kernels store <= 4-bit weights
    (:func:`ptq2tvm.backend.storage.keeps_int8_storage`).
    """
    from .blocked_builder import build_cuda_module, build_x86_module, x86_isa
    from .storage import graph_subbyte_storage

    subbyte_storage = subbyte_storage or graph_subbyte_storage(graph)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    is_cuda = target.get("kind") == "cuda"
    if schedule == "cuda" and not is_cuda:
        raise ValueError(f"schedule 'cuda' needs a CUDA target, got kind {target.get('kind')!r}")
    isa, why = x86_isa(target)
    if schedule == "x86" and isa is None:
        raise ValueError(f"schedule 'x86' needs an x86 target with AVX2 or AVX-512 VNNI: {why}")
    if tuner is not None and (isa is None or schedule not in ("auto", "x86")):
        raise ValueError(f"tuning applies to the hand-scheduled x86 kernels, which target {target} does not use "
                         f"({why or 'schedule ' + repr(schedule)})")
    if schedule in ("auto", "x86") and isa is not None:
        import kernels as K

        mod, weight_bytes = build_x86_module(graph, batch, target, scheduler=tuner, subbyte_storage=subbyte_storage)
        isa = "amx" if K.amx_kernel_count(mod) else isa      # AMX convs, AVX-512 VNNI for the rest
        return mod, f"x86-nchw16c-{isa}" + ("-tuned" if tuner is not None else ""), weight_bytes
    if schedule in ("auto", "cuda") and is_cuda:
        mod, weight_bytes = build_cuda_module(graph, batch)
        return mod, "cuda-nchw16c-dp4a", weight_bytes
    if schedule == "auto" and target.get("kind") == "llvm":
        warnings.warn(f"hand-scheduled x86 kernels unavailable ({why}); using the plain (slow) schedule",
                      stacklevel=3)
    return add_float_entry(build_relax_module(graph, batch), graph, batch), "plain-nchw", graph.weight_bytes()


def compile_graph(graph: IntegerGraph, so_path: str | Path, batch: int = 1,
                  target: str | dict[str, Any] | None = None, schedule: str = "auto", tune_trials: int = 0,
                  tune_db: str | Path | None = None, progress: bool = False,
                  subbyte_storage: str | None = None) -> CompileResult:
    """Build ``graph`` for ``target`` (default: this CPU) at a fixed ``batch`` and export ``so_path`` + sidecar.

    ``tune_trials`` > 0 measures up to that many schedules per kernel (MetaSchedule runner, records in ``tune_db``,
    default ``<so>.tuning/``; already measured ones are reused); ``tune_db`` alone rebuilds from existing records
    without measuring. A tuned build is checked bit-exact against the reference executor before it is written.
    Nothing is left at ``so_path`` if any step fails. ``subbyte_storage``: "auto" (x86 builds keep small <= 4-bit
    layers whose weights meet few output pixels per call one weight per byte, faster; the sidecar's
    ``int8_storage_layers`` names them) or "packed" (every <= 4-bit layer packed: the smallest file; what a
    mixed-precision plan's size and latency model assumes); None: the graph's ``meta["subbyte_storage"]`` (quantize
    sets "packed" for a mixed-precision plan), else "auto"; see
    :func:`ptq2tvm.backend.storage.keeps_int8_storage`.
    """
    from ..fold.bounds import check_graph_bounds
    from ..outpaths import check_output_path
    from .storage import check_subbyte_storage, graph_subbyte_storage

    if not isinstance(graph, IntegerGraph):
        hint = ("; fold the fake-quant model first: to_integer(qm)" if hasattr(graph, "graph")
                and hasattr(graph, "act_quant") else "")
        raise TypeError(f"compile needs an IntegerGraph (ptq2tvm.api.to_integer), got {type(graph).__name__}{hint}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise TypeError(f"batch must be an int >= 1, got {batch!r} ({type(batch).__name__})")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    batch = int(batch)
    for path, what in ((so_path, "the library path"), (Path(so_path).with_suffix(".json"), "its sidecar")):
        check_output_path(path, "file", what)        # before minutes of building, not at the rename

    subbyte_storage = check_subbyte_storage(subbyte_storage or graph_subbyte_storage(graph))

    check_graph_bounds(graph)      # a graph read from a file: no kernel may overflow or index outside its table
    so_path = Path(so_path)
    so_path.parent.mkdir(parents=True, exist_ok=True)
    target = resolve_target(target)
    t0 = time.perf_counter()
    tuner = None
    if tune_trials or tune_db is not None:
        from .tune import KernelTuner, default_db_dir

        tuner = KernelTuner(target, Path(tune_db) if tune_db is not None else default_db_dir(so_path), tune_trials,
                            progress=progress)
    try:
        mod, backend, stored_weight_bytes = build_module(graph, batch, target, schedule, tuner=tuner,
                                                         subbyte_storage=subbyte_storage)
        ex = compile_module(mod, tvm.target.Target(target))      # per-task buffers on the stack
    except (tvm.error.InternalError, tvm.error.DiagnosticError, tvm.error.OpError) as e:
        raise CompileError(tvm_build_failure(e, schedule, target)) from e
    cuda_binaries = None
    if target.get("kind") == "cuda":      # kernels compiled now, not by the runtime at every load (cuda_binary.py)
        cuda_binaries = build_cuda_binaries(ex.mod, str(target.get("arch", "sm_80")))
    with atomic_path(so_path, suffix=".tmp.so") as tmp:
        ex.export_library(str(tmp))
        if tuner is not None:     # the exported file itself (running ``ex`` in place would alter what it exports)
            _check_exact(tvm.runtime.load_module(str(tmp)), graph, batch, amx=backend.startswith("x86-nchw16c-amx"))
        seconds = time.perf_counter() - t0
        meta = {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "ptq2tvm_version": __version__,
            "tvm_version": tvm.__version__,
            "target": target,
            "backend": backend,
            "isa": backend_isa(backend),
            "cpu_features": required_cpu_features(target if target.get("kind") == "llvm" else target.get("host", {})),
            "batch": batch,
            "input": _tensor_json(graph.input),
            "entries": {"main": "uint8", FLOAT_ENTRY: "float32",
                        **({CHECKED_FLOAT_ENTRY: "float32 -> (outputs, int32 non-finite flags)"}
                           if CHECKED_FLOAT_ENTRY in {gv.name_hint for gv in mod.get_global_vars()} else {})},
            "output": _tensor_json(graph.outputs[0]),
            "outputs": [_tensor_json(t) for t in graph.outputs],
            "output_structure": graph.meta.get("output_structure"),
            "graph_sha256": graph.digest(),
            "so_sha256": file_sha256(tmp),
            "weight_count": graph.weight_bytes(),           # values (conv / dense weights), whatever their storage
            "weight_bytes": graph.weight_bytes(),           # the same number (bytes at one per weight): older readers
            "stored_weight_bytes": stored_weight_bytes,     # what this .so stores (packed sub-byte, channel padding)
            "graph_meta": graph.meta,
            "build_seconds": round(seconds, 3),
        }
        if backend.startswith("x86-nchw16c"):
            import kernels as K

            from .storage import keeps_int8_storage

            meta["arithmetic_shortcuts"] = K.arithmetic_shortcuts(mod)
            meta["subbyte_storage"] = subbyte_storage
            meta["int8_storage_layers"] = [n.name for n in graph.nodes
                                           if keeps_int8_storage(n, batch, subbyte_storage=subbyte_storage)]
        if tuner is not None:
            meta["tuning"] = tuner.report.to_dict()
        if cuda_binaries is not None:
            meta["cuda_dp4a_count"] = sum(b["dp4a_count"] for b in cuda_binaries)
            meta["cuda_binaries"] = cuda_binaries
    try:
        write_json(sidecar_path(so_path), meta)
    except BaseException:
        so_path.unlink(missing_ok=True)
        raise
    return CompileResult(so_path, sidecar_path(so_path), seconds, meta)


def tvm_build_failure(e: BaseException, schedule: str, target: dict[str, Any]) -> str:
    """One message for TVM failing to lower a module ptq2tvm built (its kernels' fault, not the model's): TVM's
    first line, where to report it, and the build that avoids the hand-scheduled kernels."""
    where = f"--schedule {schedule}" + (f", target {target.get('mcpu') or target.get('kind')}" if target else "")
    plain = (" `ptq2tvm compile RUN --schedule plain` (compile_so(..., schedule='plain')) builds without the "
             "hand-scheduled kernels (slower, the same integers)" if schedule != "plain" else "")
    return (f"TVM could not build this graph ({where}): {first_line(e)}. This is a ptq2tvm bug, not your model's: "
            f"please report it with the run's model.qgraph.npz.{plain}")


def _check_exact(ex: Any, graph: IntegerGraph, batch: int, seed: int = 0, amx: bool = False) -> None:
    """Run a freshly built (tuned) module on random inputs; raise unless it equals the reference executor
    (``amx``: the build has AMX kernels, whose tile state this process must request first)."""
    import numpy as np

    from ..bundle_runner import request_amx_state
    from ..ir.reference import run_reference

    if amx:
        request_amx_state()
    rng = np.random.default_rng(seed)
    q = rng.integers(0, graph.input.qmax + 1, size=(batch, *graph.input.shape)).astype(np.uint8)
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    res = vm["main"](tvm.runtime.tensor(q))
    outs = [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]
    refs = run_reference(graph, q)
    refs = refs if isinstance(refs, list) else [refs]
    bad = sum(int((o != r).sum()) for o, r in zip(outs, refs))
    if bad:
        raise ArtifactError(f"the tuned build differs from the reference executor on {bad} of "
                            f"{sum(o.size for o in outs)} output elements; rebuild without tuning records and report "
                            "this")


def read_sidecar(so_path: str | Path) -> dict[str, Any]:
    """Read and validate the sidecar of ``so_path`` (format, version, checksum of the .so)."""
    so_path = Path(so_path)
    meta_path = sidecar_path(so_path)
    if so_path.is_dir():
        raise ArtifactError(f"{so_path} is a directory, not a compiled library (the .so file inside it, e.g. "
                            f"{so_path / 'model.so'})")
    if not so_path.is_file():
        raise not_found(so_path, "compiled library")
    if meta_path == so_path:
        raise ArtifactError(f"{so_path} is a metadata sidecar, not a compiled library: pass its .so "
                            f"({so_path.with_suffix('.so')})")
    if not meta_path.is_file():
        raise ArtifactError(f"metadata sidecar not found: {meta_path} (compile with `ptq2tvm compile`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_path}: corrupted metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{meta_path} is not ptq2tvm metadata")
    if meta.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{meta_path}: artifact version {meta.get('version')} not supported "
                            f"(expected {ARTIFACT_VERSION})")
    if file_sha256(so_path) != meta.get("so_sha256"):
        raise ArtifactError(f"{so_path} does not match its metadata {meta_path} (checksum differs: the library was "
                            "rebuilt, replaced or corrupted)")
    return meta
