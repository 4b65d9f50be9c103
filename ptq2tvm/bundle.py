"""A runtime-only deployment bundle of a compiled model: the .so, its sidecar, TVM's runtime libraries (not the
250 MB compiler library), a standalone runner (numpy + apache-tvm-ffi only) and its requirements.

    DIR/model.so, model.json          the artifact (checksum-verified before copying)
    DIR/lib/libtvm_runtime.so         (+ libtvm_runtime_cuda.so for a CUDA build)
    DIR/run_model.py                  ptq2tvm/bundle_runner.py
    DIR/requirements.txt              numpy, apache-tvm-ffi (pinned to the version that built the .so)
    DIR/check_input.npy, check_output.npy   (with the integer graph) seeded uint8 inputs and the reference
                                      executor's outputs: `python run_model.py --check` proves the .so bit-exact on
                                      the deployment host itself
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import _disk_full
from .backend.compile import read_sidecar
from .errors import ArtifactError
from .ir.graph import IntegerGraph

RUNNER = Path(__file__).with_name("bundle_runner.py")


@dataclass
class Bundle:
    path: Path
    files: list[str]
    bytes: int


def tvm_runtime_libs(cuda: bool) -> list[Path]:
    """The TVM runtime libraries a .so needs at run time (found next to the installed apache-tvm package)."""
    import tvm

    lib_dir = Path(tvm.__file__).parent / "lib"
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    missing = [n for n in names if not (lib_dir / n).is_file()]
    if missing:
        raise ArtifactError(f"TVM runtime libraries {missing} not found in {lib_dir}")
    return [lib_dir / n for n in names]


def make_bundle(so_path: str | Path, out_dir: str | Path, overwrite: bool = False, graph: IntegerGraph | None = None,
                check_inputs: int = 8, seed: int = 0) -> Bundle:
    """Write the bundle of ``so_path`` into ``out_dir`` (built in a temporary directory, then renamed into place).
    With ``graph`` (the integer graph the .so was compiled from) it also carries ``check_inputs`` seeded inputs and
    the reference executor's outputs for ``run_model.py --check``."""
    import tvm_ffi

    so_path, out_dir = Path(so_path), Path(out_dir)
    meta = read_sidecar(so_path)
    if graph is not None and graph.digest() != meta["graph_sha256"]:
        raise ArtifactError(f"{so_path} was not compiled from this integer graph (digest differs: the run was "
                            "quantized again after compiling): compile it again")
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"bundle directory {out_dir} already exists (pass overwrite=True / --force)")
    cuda = meta["target"].get("kind") == "cuda"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "lib").mkdir(parents=True)
        shutil.copy2(so_path, tmp / "model.so")
        shutil.copy2(so_path.with_suffix(".json"), tmp / "model.json")
        for lib in tvm_runtime_libs(cuda):
            shutil.copy2(lib, tmp / "lib" / lib.name)
        shutil.copy2(RUNNER, tmp / "run_model.py")
        (tmp / "requirements.txt").write_text(f"numpy\napache-tvm-ffi=={tvm_ffi.__version__}\n")
        if graph is not None:
            from .ir.reference import run_reference

            q = np.random.default_rng(seed).integers(0, graph.input.qmax + 1, (check_inputs, *graph.input.shape))
            q = q.astype(np.uint8)
            np.save(tmp / "check_input.npy", q)
            np.save(tmp / "check_output.npy", run_reference(graph, q))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _disk_full(e, out_dir.parent) if isinstance(e, Exception) else None
        if reason:
            raise ArtifactError(f"cannot write the bundle {out_dir}: {reason}; nothing was written"
                                + (f", the existing {out_dir} is unchanged" if out_dir.exists() else "")) from None
        raise
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return Bundle(out_dir, files, sum((out_dir / f).stat().st_size for f in files))


__all__ = ["Bundle", "make_bundle", "tvm_runtime_libs"]
