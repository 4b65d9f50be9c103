"""Exceptions raised by ptq2tvm. Every message names the layer, file or value at fault."""

from __future__ import annotations

import shlex
from pathlib import Path


class Ptq2TvmError(Exception):
    """Base class of all ptq2tvm errors."""


class UnsupportedModelError(Ptq2TvmError):
    """The model contains layers or operations ptq2tvm cannot quantize."""


class QuantConfigError(Ptq2TvmError):
    """A quantization setting (bit width, method, ...) is out of range."""


class DataError(Ptq2TvmError):
    """Calibration or evaluation data is missing, empty, malformed or non-finite."""


class ArtifactError(Ptq2TvmError):
    """A saved artifact (integer graph, .so, metadata) is missing, corrupted or mismatched."""


class InputShapeError(Ptq2TvmError):
    """Run-time input does not match the compiled shape."""


class ModelMismatchError(Ptq2TvmError, ValueError):
    """Two models that should compute the same thing do not fit together (a fidelity check of a quantized model
    against another FP32 model: other outputs)."""


class TargetError(Ptq2TvmError, ValueError):
    """A ``--target`` that names no known CPU/GPU target, or a build whose CPU features this host lacks."""


class CompileError(Ptq2TvmError):
    """TVM failed to build a graph that ptq2tvm accepted: a ptq2tvm bug (a kernel schedule TVM cannot lower), not
    the user's; the message names the schedule and the way around it."""


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception (torch's and fx's messages run over many lines)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


#: the files of a run directory (:class:`ptq2tvm.api.RunDir`) an error can name, and the command that writes each
RUN_FILES = {"run.json": "quantize", "model.qgraph.npz": "quantize", "model.so": "compile"}


def not_found(path: str | Path, what: str) -> ArtifactError:
    """The error for a missing artifact ``path`` (``what``: "integer graph file", "compiled library", ...). For a run
    directory's own files (:data:`RUN_FILES`) it says whether the folder is a run directory at all (a file, or a
    folder without run.json / model.qgraph.npz) and which command creates what is missing; the paths in the commands
    it suggests are shell-quoted (:func:`shlex.quote`)."""
    path = Path(path)
    run = path.parent
    if path.name not in RUN_FILES:
        return ArtifactError(f"{what} not found: {path}")
    arg = shlex.quote(str(run))     # the suggested commands run as printed, a path with spaces included
    quantize = f"`ptq2tvm quantize ... --out {arg}`"
    then = f" (then `ptq2tvm compile {arg}`)" if RUN_FILES[path.name] == "compile" else ""
    if run.is_file():
        return ArtifactError(f"{run} is a file, not a run directory: pass the folder `ptq2tvm quantize --out DIR` "
                             "wrote")
    if not (run / "run.json").is_file() and not (run / "model.qgraph.npz").is_file():
        key = "run.json" if path.name == "run.json" else "model.qgraph.npz"
        return ArtifactError(f"{run} is not a run directory (no {key}): create one with {quantize}{then}")
    fix = f"`ptq2tvm compile {arg}`" if RUN_FILES[path.name] == "compile" else quantize
    return ArtifactError(f"{what} {path} not found: run {fix} first")
