"""A runtime-only deployment bundle of a compiled model: the .so, its sidecar, TVM's runtime libraries (not the
250 MB compiler library), a standalone runner (numpy + apache-tvm-ffi only) and its requirements.

    DIR/model.so, model.json          the artifact (checksum-verified before copying)
    DIR/lib/libtvm_runtime.so         (+ libtvm_runtime_cuda.so for a CUDA build)
    DIR/run_model.py                  ptq2tvm/bundle_runner.py
    DIR/requirements.txt              numpy, apache-tvm-ffi (pinned to the version that built the .so)
    DIR/check_input.npy, check_output.npy   (with the integer graph) seeded uint8 inputs and the reference
                                      executor's outputs: `python run_model.py --check` proves the .so bit-exact on
                                      the deployment host itself; a model with several outputs gets
                                      check_output.npz instead, one array per output (the graph's tensor names)
    DIR/bundle.json                   the manifest: format "ptq2tvm-bundle" and every file above. ``overwrite``
                                      (CLI --force) replaces only a directory it describes, never another folder
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import _disk_full
from .backend.compile import read_sidecar
from .errors import ArtifactError
from .ir.graph import IntegerGraph

RUNNER = Path(__file__).with_name("bundle_runner.py")
MANIFEST = "bundle.json"
BUNDLE_FORMAT = "ptq2tvm-bundle"
#: the files of bundles written before the manifest existed (recognized by model.json + run_model.py)
_LEGACY_FILES = {"model.so", "model.json", "run_model.py", "requirements.txt", "check_input.npy", "check_output.npy",
                 "lib/libtvm_runtime.so", "lib/libtvm_runtime_cuda.so"}


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
    check_destination(out_dir, overwrite)
    cuda = meta["target"].get("kind") == "cuda"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
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
            ref = run_reference(graph, q)
            if len(graph.output_names) == 1:
                np.save(tmp / "check_output.npy", ref)
            else:   # one array per output, named like the sidecar's outputs (the runner's writer: any name works)
                from .bundle_runner import save_npz

                save_npz(tmp / "check_output.npz", dict(zip(graph.output_names, ref)))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files,
                                                "graph_sha256": meta.get("graph_sha256")}, indent=1) + "\n")
        if out_dir.is_dir():    # a previous bundle (check_destination): moved aside, removed once the new one is in
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not out_dir.exists():     # interrupted between the two renames: the old bundle back
            old.rename(out_dir)
        reason = _disk_full(e, out_dir.parent) if isinstance(e, Exception) else None
        if reason:
            raise ArtifactError(f"cannot write the bundle {out_dir}: {reason}; nothing was written"
                                + (f", the existing {out_dir} is unchanged" if out_dir.exists() else "")) from None
        raise
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return Bundle(out_dir, files, sum((out_dir / f).stat().st_size for f in files))


def bundle_files(path: Path) -> set[str] | None:
    """The files of the bundle at ``path`` as its manifest lists them (bundles older than the manifest: the known
    names, when model.json is a ptq2tvm sidecar and run_model.py is there), or None when ``path`` is no bundle."""
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            m: Any = json.loads(manifest.read_text())
        except (ValueError, OSError):
            return None
        if isinstance(m, dict) and m.get("format") == BUNDLE_FORMAT and isinstance(m.get("files"), list):
            return {str(f) for f in m["files"]} | {MANIFEST}
        return None
    try:
        sidecar = json.loads((path / "model.json").read_text())
    except (ValueError, OSError):
        return None
    if (path / "run_model.py").is_file() and isinstance(sidecar, dict) and "so_sha256" in sidecar:
        return set(_LEGACY_FILES)
    return None


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse, with one :class:`ArtifactError` line naming the path and why, a bundle destination that is a file (or
    below one), or an existing directory that is not empty unless ``overwrite`` and it is a previous bundle holding
    nothing but the bundle's own files. An empty directory is used as it is."""
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ArtifactError(f"cannot write the bundle {out_dir}: {parent} is a file, not a directory")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ArtifactError(f"cannot write the bundle to {out_dir}: it is a {'link' if out_dir.is_symlink() else 'file'}"
                            ", not a directory; choose another --out")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    known = bundle_files(out_dir)
    if known is None:
        raise ArtifactError(f"{out_dir} already exists and is not a ptq2tvm bundle (no {MANIFEST}): choose a new "
                            "directory for the bundle (--force replaces only a previous bundle, never another "
                            "folder)")
    extra = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                   if not p.is_dir() and str(p.relative_to(out_dir)) not in known)
    if extra:
        raise ArtifactError(f"{out_dir} is a previous bundle but also holds files that are not part of it "
                            f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}): move them away or choose "
                            "a new directory; nothing was replaced")
    if not overwrite:
        raise ArtifactError(f"{out_dir} already holds a bundle: pass --force (overwrite=True) to replace it, or choose "
                            "a new directory")


__all__ = ["Bundle", "bundle_files", "check_destination", "make_bundle", "tvm_runtime_libs"]
