"""Python API: the same steps as the CLI (quantize, compile, parity, eval, bench) on a run directory.

A run directory holds every artifact of one quantized model::

    run.json            what was quantized (model spec, data, bits, accuracy so far)
    fp32.pt             the FP32 model (zoo name + state_dict; torch.load(weights_only=True) reads it)
    fakequant.pt        the fake-quant model (QuantModel.save)
    model.qgraph.npz    the integer graph (the exact arithmetic)
    model.so, model.json  the compiled library and its sidecar
    model_src/          a copy of the model's .py file (file.py:factory models) or ONNX file (with its external
                        data), used if the original moves

``run.json`` records the integer graph's digest and the SHA-256 of ``fp32.pt`` / ``fakequant.pt``: every command
checks an artifact against them (:meth:`RunDir.check`, :meth:`RunDir.load_compiled`) before using it, and
``quantize`` into an existing run directory first removes what the new graph supersedes (:meth:`RunDir.invalidate`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .backend.compile import CompileResult, compile_graph, file_sha256
from .atomic import copy_file, write_json  # noqa: F401  (write_json re-exported: ptq2tvm.api.write_json)
from .backend.runtime import CompiledModel
from .errors import ArtifactError, DataError, QuantConfigError, first_line, not_found
from .fold.fold import fold_to_integer
from .frontend.calibrate import quantize_rtn
from .frontend.qmodel import QuantConfig, QuantModel, atomic_torch_save, pickled_code
from .ir.graph import IntegerGraph

from .data.checks import check_input_channels, input_scale_notes
from .data.transform import CalibrationData, as_images
from .fidelity_report import FidelityReport, fidelity_report
from .model_outputs import batched_forward, classification_index, flatten_outputs, structure_keys
from .reconstruct import METHODS, ReconReport, ReconSettings, reconstruct


@dataclass
class ModelSpec:
    """How to rebuild the FP32 model: a zoo name (+ kwargs) or 'file.py:factory'."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


#: the folder of a run directory where ``quantize`` keeps its resumable reconstruction checkpoint
RECON_CHECKPOINT = "recon_checkpoint"


class RunDir:
    """Paths of the artifacts of one run (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.superseded: list[str] = []   # what the last save_run removed (RunDir.invalidate)

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def fp32(self) -> Path:
        return self.path / "fp32.pt"

    @property
    def fakequant(self) -> Path:
        return self.path / "fakequant.pt"

    @property
    def qgraph(self) -> Path:
        return self.path / "model.qgraph.npz"

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a run (run.json, or the integer graph of a save that has not finished)."""
        return self.info_path.is_file() or self.qgraph.is_file()

    @property
    def so(self) -> Path:
        return self.path / "model.so"

    @property
    def recon_checkpoint(self) -> Path:
        """Where ``quantize`` keeps its resumable reconstruction checkpoint until the run is saved."""
        return self.path / RECON_CHECKPOINT

    @property
    def pending_marker(self) -> Path:
        """The file ``quantize`` writes before its long steps and removes with the checkpoint once the run is saved:
        a Ctrl-C before the first reconstruction unit finishes (or during an RTN / mixed-precision quantize) leaves
        no checkpoint state, but this."""
        return self.recon_checkpoint / "pending.json"

    def mark_pending(self, what: str) -> None:
        """Record that a ``quantize`` of ``what`` ("W2A4 qdrop") into this folder has started (:attr:`pending_marker`)."""
        write_json(self.pending_marker, {"quantize": what})

    def pending_quantize(self) -> str | None:
        """A sentence on an interrupted ``quantize`` into this folder ("W4A4 qdrop, 3/7 units done"), from its
        reconstruction checkpoint (:func:`ptq2tvm.reconstruct.checkpoint.describe_state`) or its
        :attr:`pending_marker` ("W2A4 qdrop, stopped before any reconstruction unit was saved"); None when there is
        none."""
        from .reconstruct.checkpoint import STATE, describe_state

        state_path = self.recon_checkpoint / STATE
        if not state_path.is_file():
            what = _json_field(self.pending_marker, "quantize")
            if what is None:
                return None
            return f"{what}, stopped before any reconstruction unit was saved"
        try:
            return describe_state(json.loads(state_path.read_text()))
        except ValueError:
            return "its checkpoint state is unreadable"

    def check_not_interrupted(self) -> None:
        """Raise :class:`ArtifactError` when a ``quantize`` into this folder was interrupted (its reconstruction
        checkpoint is there): run.json and the artifacts then still describe the previous run (or there is none),
        which a user would otherwise compile and ship believing it the new one."""
        pending = self.pending_quantize()
        if pending is None:
            return
        previous = _json_field(self.info_path, "bits") if self.info_path.is_file() else None
        held = (f"its run.json and artifacts still describe the previous run{f' ({previous})' if previous else ''}"
                if self.info_path.is_file() else "it holds no run yet")
        drop = (f"delete {shlex.quote(str(self.recon_checkpoint))} to keep the previous run"
                if self.info_path.is_file() else f"`rm -r {shlex.quote(str(self.path))}` to drop it")
        raise ArtifactError(f"{self.path}: a `ptq2tvm quantize` into this folder was interrupted ({pending}; "
                            f"checkpoint {self.recon_checkpoint}), so {held}: re-run that quantize command to "
                            f"finish it (it resumes from the last saved unit), or {drop}")

    def info(self) -> dict[str, Any]:
        """run.json. Raises :class:`ArtifactError` when it is missing or corrupted, or when a later ``quantize``
        into this folder was interrupted (:meth:`check_not_interrupted`)."""
        self.check_not_interrupted()
        if not self.info_path.is_file():
            raise not_found(self.info_path, "run description")
        try:
            return json.loads(self.info_path.read_text())
        except ValueError as e:
            raise ArtifactError(f"{self.info_path}: corrupted: {e}") from e

    def update_info(self, **kv: Any) -> dict[str, Any]:
        info = self.info() if self.info_path.is_file() else {}
        info.update(kv)
        write_json(self.info_path, info)
        return info

    # ---- artifact integrity --------------------------------------------------------------------------------
    def graph_digest(self, info: dict[str, Any] | None = None) -> str:
        """The digest of this run's integer graph (recorded in run.json; older runs: computed from the file)."""
        info = self.info() if info is None else info
        digest = info.get("graph_sha256")
        if digest:
            return str(digest)
        return IntegerGraph.load(self.qgraph).digest()

    def check(self, path: str | Path, info: dict[str, Any] | None = None) -> Path:
        """Raise :class:`ArtifactError` unless ``path`` (fp32.pt / fakequant.pt) is the file ``quantize`` wrote for
        this run's integer graph (SHA-256 recorded in run.json; runs without the record pass)."""
        path = Path(path)
        info = self.info() if info is None else info
        want = (info.get("artifacts") or {}).get(path.name)
        if not path.is_file():
            raise ArtifactError(f"{path} not found: re-run `ptq2tvm quantize --out {shlex.quote(str(self.path))}`")
        if want and path.parent.resolve() == self.path.resolve() and file_sha256(path) != want:
            raise ArtifactError(f"{path} is not the file `quantize` wrote with this run's integer graph (checksum "
                                f"differs: replaced or corrupted); re-run `ptq2tvm quantize --out "
                                f"{shlex.quote(str(self.path))}`")
        return path

    def _compile_command(self, so: Path) -> str:
        """`ptq2tvm compile RUN [--out SO]` for messages, its paths shell-quoted (pasted as printed)."""
        out = f" --out {shlex.quote(str(so))}" if so != self.so else ""
        return f"`ptq2tvm compile {shlex.quote(str(self.path))}{out}`"

    def load_compiled(self, so: str | Path | None = None, threads: int | None = None) -> CompiledModel:
        """The run's .so (default ``model.so``), loaded only if it was compiled from this run's integer graph."""
        if so is not None and not str(so).strip():
            raise ArtifactError("the .so path is empty (leave the option out for the run's model.so)")
        self.check_not_interrupted()          # before loading a library the folder may not describe
        so = Path(so) if so else self.so
        if not so.exists():
            raise ArtifactError(f"{so} not found: compile it with {self._compile_command(so)}")
        cm = CompiledModel(so, threads=threads)
        if cm.meta.get("graph_sha256") != self.graph_digest():
            raise ArtifactError(f"{so} was compiled from another integer graph than {self.qgraph} (from another run, "
                                f"or this run was quantized again after compiling): compile it from this run with "
                                f"{self._compile_command(so)}")
        return cm

    def invalidate(self, new_digest: str, is_run: bool | None = None) -> list[str]:
        """Remove what a new integer graph (``new_digest``) supersedes: compiled libraries (+ sidecars) and bundles
        built from another graph, benchmark and parity results, ONNX exports of another graph and bench's ONNX
        baselines (:func:`ptq2tvm.onnx_export.remove_stale_exports`). Each library goes before its sidecar, a bundle is
        renamed away before it is deleted, so no half-removed artifact can be mistaken for a current one.

        Only what ptq2tvm wrote goes: a library whose sidecar names another graph (``model.so`` without a sidecar
        too, in a run directory), a bundle whose model.json names another graph, ONNX files carrying another graph's
        digest; ``parity.json`` / ``latency.*`` only in a run directory. ``is_run``: whether the folder is one
        (default :attr:`is_run` now; :func:`save_run` looks before it removes run.json). A
        user's folder given as ``--out`` keeps their ``libfoo.so``, ``parity.json`` or a folder with a
        run_model.py. Returns the names removed."""
        removed: list[str] = []
        if not self.path.is_dir():
            return removed
        if is_run is None:
            is_run = self.is_run
        for so in sorted(self.path.glob("*.so")):
            meta = so.with_suffix(".json")
            digest = _json_field(meta, "graph_sha256")
            if digest is None and not (is_run and so.name == self.so.name and not meta.exists()):
                continue                                  # not a library ptq2tvm compiled (or not provably)
            if digest != new_digest:
                so.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                shutil.rmtree(so.with_name(so.name + ".tuning"), ignore_errors=True)
                removed.append(so.name)
        for d in sorted(p for p in self.path.iterdir() if p.is_dir() and (p / "run_model.py").is_file()):
            digest = _json_field(d / "model.json", "graph_sha256")
            if digest is not None and digest != new_digest:
                trash = d.with_name(f".{d.name}.removed")
                shutil.rmtree(trash, ignore_errors=True)
                d.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(d.name + "/")
        stale = ["parity.json", "latency.json", "latency.md", "latency.png"] if is_run else []
        if is_run:       # bench of another .so: latency_<its name>.{json,md,png} (ptq2tvm.bench.runner.bench_run)
            stale += sorted(p.name for p in self.path.glob("latency_*") if p.suffix in (".json", ".md", ".png"))
        for name in stale:
            if (self.path / name).is_file():
                (self.path / name).unlink()
                removed.append(name)
        from .onnx_export import remove_stale_exports     # ONNX exports of another graph, bench's ONNX baselines

        removed += remove_stale_exports(self.path, new_digest)
        return removed


def _json_field(path: Path, key: str) -> Any:
    """``json.load(path)[key]``, or None when the file is missing, unreadable, not a JSON object or lacks ``key``."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return None
    return data.get(key) if isinstance(data, dict) else None


# ---- models -------------------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, fallback_dir: str | Path | None = None) -> nn.Module:
    """Instantiate the FP32 model of ``spec`` and load its checkpoint (strict). A ``file.py:factory`` model whose
    file is gone is looked up in ``fallback_dir`` (a run directory's ``model_src/``). Raises :class:`ArtifactError`
    for a missing file / attribute or an unknown zoo name."""
    if spec.name.lower().endswith(".onnx"):  # an FP32 ONNX file, through onnx2torch (ptq2tvm/onnx_import.py)
        from .onnx_import import onnx_to_torch

        if spec.checkpoint:
            raise ArtifactError(f"--checkpoint does not apply to an ONNX model ({spec.name} holds its weights)")
        return onnx_to_torch(model_file_that_runs(spec.name, fallback_dir))
    if ":" in spec.name and spec.name.split(":")[0].endswith(".py"):
        file, attr = spec.name.rsplit(":", 1)
        file = model_file_that_runs(file, fallback_dir)
        if not Path(file).is_file():
            raise ArtifactError(f"model file not found: {file}")
        mod_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        module = importlib.util.module_from_spec(mod_spec)
        folder = str(Path(file).resolve().parent)       # the file's own imports (from layers import Block) resolve
        sys.path.insert(0, folder)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise ArtifactError(f"cannot import {file}: {first_line(e)}") from e
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
        if not hasattr(module, attr):
            raise ArtifactError(f"{file} has no attribute {attr!r}")
        model = _call_factory(getattr(module, attr), spec.name, spec.kwargs)
    else:
        from .models import create_model, list_models

        if spec.name not in list_models():
            import difflib

            hint = _model_path_hint(spec.name)
            if hint:
                raise ArtifactError(hint)

            close = difflib.get_close_matches(spec.name, list_models(), n=1)
            raise ArtifactError(f"unknown model {spec.name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; available: {', '.join(list_models())}, or path/to/file.py:factory, or an FP32 "
                                "model.onnx")
        model = _call_factory(lambda **kw: create_model(spec.name, **kw), f"model {spec.name!r}", spec.kwargs)
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    return as_float32(model, spec.name).eval()


def as_float32(model: nn.Module, name: str = "the model") -> nn.Module:
    """``model`` with float32 parameters and buffers: a float64 / float16 / bfloat16 model (``.double()`` /
    ``.half()`` in its factory) is converted, with a note on stderr (calibration images and every runtime are
    float32; such a model used to quantize and then fail in the fidelity step on 'Input type (float) and bias type
    (double)')."""
    kinds = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    other = sorted(str(k).removeprefix("torch.") for k in kinds - {torch.float32})
    if other:
        print(f"note: {name} has {', '.join(other)} parameters: converted to float32 (the calibration data and every "
              "runtime are float32)", file=sys.stderr)
        model = model.float()
    return model


def model_file_that_runs(file: str, fallback_dir: str | Path | None = None) -> str:
    """The file a ``file.py:factory`` or ``.onnx`` model is built from: ``file`` itself, or when it is gone, the
    run's copy ``fallback_dir/<name>`` (a run directory's ``model_src/``) if that exists."""
    if not Path(file).is_file() and fallback_dir is not None and (Path(fallback_dir) / Path(file).name).is_file():
        return str(Path(fallback_dir) / Path(file).name)
    return file


def _model_path_hint(name: str) -> str | None:
    """One line for a ``--model`` that is a file but not a form :func:`build_model` takes: a .py file without its
    factory (lists the file's top-level functions and classes, read with ``ast``, nothing run) or a saved PyTorch
    file (.pt / .pth / .pkl / .bin); None otherwise."""
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            return f"model file not found: {name} (give it as path/to/file.py:factory)"
        import ast

        try:
            tree = ast.parse(path.read_text(errors="replace"))
            names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and not n.name.startswith("_")]
        except (SyntaxError, ValueError, OSError):
            names = []
        listed = f" (top-level names in it: {', '.join(names)})" if names else ""
        example = f"{name}:{names[0]}" if names else f"{name}:build"
        return (f"--model {name}: name the function or class that builds the model too, e.g. --model {example}"
                f"{listed}")
    if path.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt") and path.is_file():
        return (f"--model {name} is a saved PyTorch file: --model takes a zoo name, path/to/file.py:factory or an "
                f"FP32 .onnx file; give the weights (a state_dict) as --checkpoint {name}")
    return None


def _call_factory(factory: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``factory(**kwargs)``, which must return an ``nn.Module``; :class:`ArtifactError` naming ``name`` (and the
    kwargs) when it raises or returns something else."""
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise ArtifactError(f"{name} raised {first_line(e)} (with --model-kwargs '{json.dumps(kwargs)}')") from e
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _pickled_module(path: Path, e: BaseException) -> str | None:
    """When ``torch.load(weights_only=True)`` of ``path`` failed with ``e`` because the file holds pickled code: one
    line saying so (a whole module saved with ``torch.save(model)``, or other Python objects); else None. The globals
    are read from the pickle without running it."""
    code = pickled_code(e)
    if code is None:
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the global the error names
        names = [code.removeprefix("global ")]
    if any(n.startswith("torch.nn.modules.") for n in names):
        return (f"{path} holds a pickled module, not a state_dict: save model.state_dict() "
                "(torch.save(model.state_dict(), path))")
    return (f"{path} holds pickled Python objects ({code}), which run code when loaded: give a state_dict of tensors "
            "(torch.save(model.state_dict(), path))")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds ``code/`` and ``constants.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) and any(n.endswith("constants.pkl")
                                                                              for n in names)


#: keys of a training checkpoint dict that hold the model's state_dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, Any]:
    """The state_dict in what ``torch.load`` returned from ``path``: ``obj`` itself when it is a dict holding tensors,
    else the dict under its first key of :data:`STATE_DICT_KEYS` (a training checkpoint: ``{"state_dict": ...,
    "epoch": ...}``). Raises :class:`ArtifactError` naming ``path`` and what it holds for anything else: a list,
    tuple, tensor or other type, or a dict without tensors and without one of those keys."""
    accepted = (f"a state_dict (torch.save(model.state_dict(), path)) or a dict holding one under "
                f"{' / '.join(repr(k) for k in STATE_DICT_KEYS)}")
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if not obj or any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        nested = [repr(k) for k, v in obj.items() if isinstance(v, dict)]
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        raise ArtifactError(f"checkpoint {path} holds a dict without tensors (keys {keys}): expected {accepted}"
                            + (f"; {' / '.join(nested)} holds a dict: save that one" if nested else ""))
    what = type(obj).__name__
    if isinstance(obj, (list, tuple)):
        what = f"{what} of {len(obj)} item(s)"
    elif isinstance(obj, torch.Tensor):
        what = f"single tensor of shape {tuple(obj.shape)}"
    raise ArtifactError(f"checkpoint {path} holds a {what}, not a state_dict: expected {accepted}")


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the state_dict at ``path`` into ``model`` (strict; tensors only: ``weights_only=True``): a state_dict, or
    a dict holding one under 'state_dict' / 'model_state_dict' / 'model' (:func:`unwrap_state_dict`). Raises
    :class:`ArtifactError` with one line for a missing or unreadable file, a pickled module, a file holding something
    else (a list, a tensor, a dict without tensors: named with its type), or keys / shapes that do not fit the
    model."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):   # torch.save: zip archive, or legacy pickle
        raise ArtifactError(f"checkpoint {path} is not a PyTorch file written by torch.save (it starts with "
                            f"{head!r}); give the model's state_dict saved with torch.save(model.state_dict(), path)")
    if _is_torchscript(path):
        raise ArtifactError(f"{path} is a TorchScript archive (torch.jit.save), not a state_dict: save "
                            "model.state_dict() (torch.save(model.state_dict(), path))")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(_pickled_module(path, e) or f"cannot read checkpoint {path}: {first_line(e)}") from e
    sd = unwrap_state_dict(sd, path)
    if isinstance(sd, dict):
        problem = state_dict_mismatch(model, sd)
        if problem:
            raise ArtifactError(f"checkpoint {path} does not fit the model: {problem}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from e
    return model


def state_dict_mismatch(model: nn.Module, sd: dict[str, Any], show: int = 3) -> str:
    """'' when ``sd``'s keys and tensor shapes are those of ``model.state_dict()``; else one line: the counts of
    missing keys, unexpected keys and shape mismatches with the first ``show`` of each (a model has hundreds), and a
    hint when every key carries an extra or missing prefix (``module.`` of DataParallel, ``model.``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(getattr(sd[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]

    def first(names: list[str]) -> str:
        return ", ".join(names[:show]) + (f", ... ({len(names) - show} more)" if len(names) > show else "")

    parts = [f"{len(v)} {what} ({first(v)})" for what, v in (("missing key(s)", missing),
                                                             ("unexpected key(s)", unexpected),
                                                             ("shape mismatch(es), checkpoint vs model", shapes)) if v]
    if not parts:
        return ""
    text = "; ".join(parts)
    if missing and unexpected:
        pre = os.path.commonprefix(unexpected)
        pre = pre[:pre.rfind(".") + 1]
        if pre and {k[len(pre):] for k in unexpected} >= set(missing):
            text += f"; every checkpoint key starts with {pre!r}: strip it ({{k.removeprefix({pre!r}): v ...}})"
        else:
            pre = os.path.commonprefix(missing)
            pre = pre[:pre.rfind(".") + 1]
            if pre and {k[len(pre):] for k in missing} <= set(unexpected):
                text += f"; the model's keys start with {pre!r} and the checkpoint's do not"
    return text


FP32_FORMAT = "ptq2tvm-fp32"


def _names_code_file(spec: dict[str, Any]) -> bool:
    name = str(spec.get("name", ""))
    return ":" in name and name.split(":")[0].endswith(".py")


def save_fp32(path: Path, model: nn.Module, spec: ModelSpec | None, trust_code: bool = False) -> None:
    """Write ``fp32.pt``: tensors + JSON only (the model spec and its state_dict), readable with
    ``torch.load(weights_only=True)``. Without a spec the module itself can only be stored as a pickle, which is code
    when loaded: that needs ``trust_code=True`` (else only the state_dict is stored and :func:`load_fp32` says so)."""
    if spec is not None:
        atomic_torch_save({"format": FP32_FORMAT, "spec": json.loads(json.dumps(spec.__dict__)),
                           "state_dict": model.state_dict()}, path)
    elif trust_code:
        atomic_torch_save({"format": FP32_FORMAT, "spec": None, "module": model}, path)
    else:
        atomic_torch_save({"format": FP32_FORMAT, "spec": None, "state_dict": model.state_dict()}, path)


def safe_torch_load(path: Path, what: str, trust_code: bool = False) -> Any:
    """``torch.load`` of a ptq2tvm artifact: tensors and plain containers only (``weights_only=True``), so a crafted
    file cannot run code. A file that needs more (a pickled module) is refused with :class:`ArtifactError` unless
    ``trust_code`` (only for files you made yourself)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_code)
    except Exception as e:
        code = None if trust_code else pickled_code(e)
        if code:
            raise ArtifactError(f"{path}: refusing to load the {what}: the file contains pickled Python objects, "
                                f"which run code when loaded ({code}). Load it with trust_code=True "
                                "(CLI: --trust-code) only if you made it yourself") from None
        raise ArtifactError(f"cannot read the {what} {path}: {first_line(e)}") from e


def load_fp32(path: str | Path, trust_code: bool = False) -> nn.Module:
    """Rebuild the FP32 model of a run directory. Safe by default: tensors + JSON only; a model whose code is a
    pickled module or a ``file.py:factory`` (code executed on load) needs ``trust_code=True``.

    Raises :class:`ArtifactError` (missing or unreadable file, code refused, state_dict mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"FP32 model not found: {path}")
    blob = safe_torch_load(path, "FP32 model", trust_code)
    if not isinstance(blob, dict) or ("spec" not in blob):
        raise ArtifactError(f"{path} is not a ptq2tvm FP32 model file")
    if blob["spec"] is None:
        if "module" in blob:
            return blob["module"].eval()
        raise ArtifactError(f"{path} holds only a state_dict (the model was quantized from Python without a "
                            "ModelSpec): build the model yourself and load_state_dict(torch.load(path, "
                            "weights_only=True)['state_dict'])")
    if _names_code_file(blob["spec"]) and not trust_code:
        file, attr = str(blob["spec"]["name"]).rsplit(":", 1)
        runs = model_file_that_runs(file, path.parent / "model_src")
        copy = f" (the run's copy of {file}, which is gone)" if runs != file else ""
        raise ArtifactError(f"{path}: the model is built by {attr}() of the Python file {runs}{copy}, which would run "
                            "as code; pass trust_code=True (CLI: --trust-code) if you trust it")
    spec = ModelSpec(**{**blob["spec"], "checkpoint": None})
    model = build_model(spec, fallback_dir=path.parent / "model_src")
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: the state_dict does not fit the model {spec.name!r}: {first_line(e)}") from e
    return model.eval()


# ---- pipeline steps -----------------------------------------------------------------------------------------
def quantize(model: nn.Module, calib_images: np.ndarray | CalibrationData, config: QuantConfig | None = None,
             method: str = "rtn", progress: bool = True, settings: ReconSettings | None = None,
             checkpoint_dir: str | Path | None = None) -> QuantModel:
    """Post-training quantization of ``model`` on unlabeled ``calib_images`` -> fake-quant model.

    ``calib_images``: float32 (N, C, H, W) numpy array or tensor, preprocessed like the training data, or a
    :class:`ptq2tvm.data.CalibrationData` (any iterable + ``transform_fn``), or an iterable of images / batches /
    (image, label) pairs. Raises :class:`DataError` when the channels differ from the model's first conv.

    ``method``: rtn (calibration only) or a reconstruction method (adaround, brecq, qdrop, network; see
    :class:`ReconSettings` for granularity / MRECG / AdaQTransform). Use :func:`quantize_with_report` for the per-unit
    reconstruction losses."""
    return quantize_with_report(model, calib_images, config, method, progress, settings, checkpoint_dir)[0]


def quantize_with_report(model: nn.Module, calib_images: np.ndarray, config: QuantConfig | None = None,
                         method: str = "rtn", progress: bool = True, settings: ReconSettings | None = None,
                         checkpoint_dir: str | Path | None = None) -> tuple[QuantModel, ReconReport | None]:
    """:func:`quantize`, also returning the reconstruction report (None for rtn). A reconstruction with a
    ``checkpoint_dir`` resumes from the units already finished there.

    Runs outside inference mode even when called inside ``torch.inference_mode()``: tensors made there have no
    version counter and cannot enter autograd, so the QuantModel built there raised a raw RuntimeError when called
    (its quantizers read their zero point's version), in ``to_integer`` and in reconstruction."""
    with torch.inference_mode(False):
        return _quantize_with_report(model, calib_images, config, method, progress, settings, checkpoint_dir)


def _quantize_with_report(model: nn.Module, calib_images: np.ndarray, config: QuantConfig | None,
                          method: str, progress: bool, settings: ReconSettings | None,
                          checkpoint_dir: str | Path | None) -> tuple[QuantModel, ReconReport | None]:
    if method not in METHODS:
        raise QuantConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    config = (config or QuantConfig()).validate()
    calib_images = as_images(calib_images)
    check_input_channels(model, calib_images)
    if method == "rtn" and settings is None:
        return quantize_rtn(model, calib_images, config, progress=progress), None
    settings = settings or ReconSettings(method=method)
    settings.method = method
    return reconstruct(model, calib_images, config, settings.validate(), progress=progress,
                       checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None)


def to_integer(qm: QuantModel) -> IntegerGraph:
    """Fold the fake-quant model into the integer graph; ``meta['layer_bits']`` lists every conv/linear layer's
    weight bits and input/output tensor bits (copied into the .so's sidecar as ``graph_meta``). A model with
    per-layer bits (a mixed-precision plan, ``--layer-bits``) gets ``meta['subbyte_storage'] = 'packed'``: its
    bits were chosen by (or for) the size and latency of packed sub-byte weights, so x86 builds store them packed
    (:func:`ptq2tvm.backend.storage.graph_subbyte_storage`)."""
    from .mixed.layerbits import graph_layer_bits
    from .model_outputs import squashed_outputs

    if not isinstance(qm, QuantModel):
        raise TypeError(f"to_integer needs the fake-quant model that quantize returns (a QuantModel), got "
                        f"{type(qm).__name__}: qm = ptq2tvm.api.quantize(model, images, config)")
    graph = fold_to_integer(qm)
    graph.meta["layer_bits"] = graph_layer_bits(graph)
    graph.meta["squashed_outputs"] = squashed_outputs(qm.graph)   # not class scores (the bundle's top-1 line)
    if qm.config.layer_w_bits or qm.config.layer_a_bits:
        graph.meta["subbyte_storage"] = "packed"
    return graph


def compile_so(graph: IntegerGraph, so_path: str | Path, batch: int = 1,
               target: str | dict[str, Any] | None = None, schedule: str = "auto", tune_trials: int = 0,
               tune_db: str | Path | None = None, progress: bool = False,
               subbyte_storage: str | None = None) -> CompileResult:
    """Compile the integer graph to ``so_path`` (+ sidecar). ``schedule``: auto | x86 | plain; ``tune_trials`` /
    ``tune_db``: measured kernel schedules; ``subbyte_storage``: auto | packed | None (the graph's choice; how x86
    builds store <= 4-bit weights); see :func:`ptq2tvm.backend.compile.compile_graph`."""
    return compile_graph(graph, so_path, batch=batch, target=target, schedule=schedule, tune_trials=tune_trials,
                         tune_db=tune_db, progress=progress, subbyte_storage=subbyte_storage)


def export_onnx(graph: IntegerGraph, path: str | Path, **kwargs: Any) -> Any:
    """The integer graph as an ONNX QDQ model at ``path`` (atomic; onnx.checker). Keyword arguments (``weights``,
    ``int4``, ``per_layer_outputs``, ...) and the returned report: :func:`ptq2tvm.onnx_export.export_onnx`."""
    from .onnx_export import export_onnx as _export

    return _export(graph, path, **kwargs)


#: fewer calibration images than this get a warning (:func:`check_calibration`), which starts with FEW_IMAGES_NOTE
FEW_CALIBRATION_IMAGES = 128
FEW_IMAGES_NOTE = "only {n} calibration image(s)"


def check_calibration(model: nn.Module, images: np.ndarray, source: str | None = None) -> list[str]:
    """Before quantizing: raise :class:`UnsupportedModelError` for a model whose forward takes several inputs and
    :class:`DataError` if the channels (or an ONNX model's fixed input shape) do not fit the model (the hint fits
    ``source``: folder / preprocess / builtin / array, :func:`ptq2tvm.data.checks.check_input_channels`); return
    warnings when the data's scale is far from what the model saw in training (see :mod:`ptq2tvm.data.checks`) or
    when there are fewer than :data:`FEW_CALIBRATION_IMAGES` images."""
    from .frontend.trace import check_single_input

    check_single_input(model)
    check_input_channels(model, images, source=source)
    notes = input_scale_notes(model, images)
    if len(images) < FEW_CALIBRATION_IMAGES:
        notes.append(FEW_IMAGES_NOTE.format(n=len(images)) + ": reconstruction and activation ranges need a few "
                     f"hundred (at least {FEW_CALIBRATION_IMAGES}, ideally 512: --calib-size and enough data)")
    return notes


def fidelity(model: nn.Module, qm: QuantModel, images: np.ndarray, held_out: bool | None = None,
             per_layer: bool = False, model_name: str = "the FP32 model", image_notes: bool = True) -> FidelityReport:
    """Label-free fidelity of the fake-quant model against FP32 on ``images`` (ideally held-out calibration
    images): output SQNR, top-1 agreement, per-layer SQNR on request (:mod:`ptq2tvm.fidelity_report`). A model
    with several outputs (tuple / list / dict) gets them per output (``report.outputs``); one that only runs at
    batch 1 is run one image at a time, with a warning naming ``model_name``. ``held_out``: whether ``images``
    were left out of calibration (True / False is said in the summary; None, the default: not said);
    ``image_notes``: warnings about images that look unprocessed (raw 0..255 pixels) in the report."""
    return fidelity_report(model, qm, images, held_out=held_out, per_layer=per_layer, model_name=model_name,
                           image_notes=image_notes)


def stored_weight_bytes(graph: IntegerGraph, target: str | dict[str, Any] | None = None, batch: int = 1,
                        subbyte_storage: str | None = None) -> int:
    """Bytes the compiled kernels for ``target`` (:func:`ptq2tvm.backend.compile.resolve_target`; default this CPU)
    store the weights in, before channel padding: one byte per weight at 5..8 bits, two weights per byte at <= 4 bits
    (values in [-8, 7]), four per byte at <= 2 bits (values in [-2, 1]) on targets whose kernels unpack them
    (every x86 kernel ISA and CUDA, :func:`ptq2tvm.backend.blocked_builder.packs_int2`); depthwise convs keep one
    byte per weight, and so does the plain backend (targets without the hand-written kernels), and so do small x86
    layers whose weights meet few output pixels per call at ``batch`` unless ``subbyte_storage`` (default: the
    graph's, :func:`ptq2tvm.backend.storage.graph_subbyte_storage`) is "packed"
    (:func:`ptq2tvm.backend.storage.keeps_int8_storage`). The same rules as the blocked builder, which
    counts the padded bytes it stores."""
    from .backend.blocked_builder import packs_int2, x86_isa
    from .backend.storage import graph_subbyte_storage, int4_weights, is_depthwise, keeps_int8_storage
    from .backend.compile import resolve_target

    tdict = resolve_target(target)
    storage = subbyte_storage or graph_subbyte_storage(graph)
    cuda = tdict.get("kind") == "cuda"
    isa = None if cuda else x86_isa(tdict)[0]
    if not cuda and isa is None:
        return int(graph.weight_bytes())
    int2 = packs_int2(isa, cuda)
    total = 0
    for n in graph.nodes:
        w = n.arrays.get("weight")
        if w is None:
            continue
        if is_depthwise(n) or not int4_weights(n) or keeps_int8_storage(n, batch, cuda, storage):
            total += w.size
        elif int2 and int(n.attrs.get("w_bits", 8)) <= 2 and int(w.min(initial=0)) >= -2 and int(w.max(initial=0)) <= 1:
            total += (w.size + 3) // 4
        else:
            total += (w.size + 1) // 2
    return int(total)


def built_weight_bytes(graph: IntegerGraph, target: str | dict[str, Any] | None = None, batch: int = 1,
                       subbyte_storage: str | None = None) -> int:
    """Bytes of the weight constants a ``compile`` of ``graph`` for ``target`` (default this CPU) at ``batch`` stores,
    channel padding included: what ``compile --json`` reports as ``weight_bytes`` (the sidecar's
    ``stored_weight_bytes``), to the byte. It builds the blocked Relax module without compiling it (~0.5 s for
    ResNet-18); the plain backend (targets without the hand-written kernels) stores one byte per weight.
    :func:`stored_weight_bytes` is the same count before channel padding, without building anything."""
    from .backend.blocked_builder import build_blocked_module, x86_build_options, x86_isa
    from .backend.compile import resolve_target
    from .backend.storage import graph_subbyte_storage

    tdict = resolve_target(target)
    storage = subbyte_storage or graph_subbyte_storage(graph)
    if tdict.get("kind") == "cuda":
        return int(build_blocked_module(graph, batch, "vnni", cuda=True)[1])
    if x86_isa(tdict)[0] is None:
        return int(graph.weight_bytes())
    isa, options = x86_build_options(tdict)
    return int(build_blocked_module(graph, batch, isa, subbyte_storage=storage, **options)[1])


def save_run(run: RunDir, model: nn.Module, spec: ModelSpec | None, qm: QuantModel, graph: IntegerGraph,
             trust_code: bool = False, **info: Any) -> RunDir:
    """Write the run's artifacts (see the module docstring). An existing run directory is first cleared of what
    the new graph supersedes (:meth:`RunDir.invalidate`); run.json is written anew and last (no accuracy of an
    older graph survives; until then the directory is not a run, so an interrupted save never leaves a run.json
    describing a mix of old and new files), with the graph digest and the checksums of fp32.pt / fakequant.pt."""
    created = not run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    digest = graph.digest()
    is_run = run.is_run
    run.info_path.unlink(missing_ok=True)
    run.superseded = run.invalidate(digest, is_run)
    try:
        if spec is not None and ":" in spec.name and spec.name.split(":")[0].endswith(".py"):
            src = Path(spec.name.rsplit(":", 1)[0])
            if src.is_file():
                copy_file(src, run.path / "model_src" / src.name)
        if spec is not None and spec.name.lower().endswith(".onnx") and Path(spec.name).is_file():
            from .onnx_import import onnx_files

            for src in onnx_files(Path(spec.name)):       # the graph and its external weight files
                copy_file(src, run.path / "model_src" / src.name)
        save_fp32(run.fp32, model, spec, trust_code=trust_code)
        qm.save(run.fakequant)
        graph.save(run.qgraph)
        run.update_info(ptq2tvm_version=__version__, model=spec.__dict__ if spec else None,
                        input_shape=list(graph.input.shape), w_bits=qm.config.w_bits, a_bits=qm.config.a_bits,
                        first_last_8bit=qm.config.first_last_8bit, layer_bits=graph.meta.get("layer_bits"),
                        graph_sha256=digest,
                        artifacts={run.fp32.name: file_sha256(run.fp32),
                                   run.fakequant.name: file_sha256(run.fakequant)},
                        **info)
    except BaseException:
        if created:      # a failed save (a full disk) leaves no directory behind; an existing one has no run.json
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run


@torch.no_grad()
def top1_torch(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) of a torch model on float32 ``images`` (N, C, H, W) against int ``labels`` (N,).
    A model with several outputs (tuple / list / dict) is scored on its first 2-D (N, classes) output (said once on
    stderr); :class:`DataError` when it has none (:func:`ptq2tvm.model_outputs.classification_index`). A model that
    only runs at batch 1 is run one image at a time, with a warning (:func:`ptq2tvm.model_outputs.batched_forward`)."""
    model.eval()
    correct = 0
    idx = None
    for i, j, out in batched_forward(model, images, batch_size):      # one image at a time if only batch 1 runs
        outs, keys = flatten_outputs(out)
        if idx is None:
            idx = classification_index([tuple(o.shape) for o in outs], keys)
        correct += int((outs[idx].argmax(1).numpy() == labels[i:j]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def scored_output(model: nn.Module, images: np.ndarray) -> dict[str, Any]:
    """Which output :func:`top1_torch` / :func:`top1_so` score (one forward of ``model`` on ``images[:1]``):
    ``{"index": i, "name": dict key or None, "n_outputs": n}`` in the integer graph's output order
    (:func:`ptq2tvm.model_outputs.classification_index`; :class:`DataError` when no output is (N, classes))."""
    outs, keys = flatten_outputs(model.eval()(torch.from_numpy(np.ascontiguousarray(images[:1]))))
    idx = classification_index([tuple(o.shape) for o in outs], keys, note=False)
    return dict(index=idx, name=keys[idx] if keys else None, n_outputs=len(outs))


def top1_so(compiled: CompiledModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the compiled model (uint8 path: ``images`` quantized with its input scale). Several
    outputs: the first 2-D (N, classes) one, as :func:`top1_torch`."""
    shapes = [(len(images), *t.shape) for t in compiled.outputs]
    idx = classification_index(shapes, structure_keys(compiled.meta.get("output_structure")))
    out = compiled.run_int(compiled.input.quantize(images))
    out = out[idx] if isinstance(out, list) else out
    return float((out.argmax(1) == labels).mean())
