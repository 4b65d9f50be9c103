"""The checks ``ptq2tvm`` runs on a command's arguments before any work: every output path can be written and
replaces none of the run's own files or the command's inputs (:func:`check_outputs`), and every integer option is in
range (:func:`int_option_minimums`). Each failure is one :class:`ptq2tvm.errors.Ptq2TvmError` line (exit 2) with
nothing written."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import Ptq2TvmError

# Where each command writes: option dest -> "file" / "dir" (checked before any work by check_output_path).
OUTPUTS: dict[str, dict[str, str]] = {
    "quantize": {"out": "dir"}, "compile": {"out": "file"}, "export": {"out": "file"}, "bench": {"out_dir": "dir"},
    "bundle": {"out": "dir"}, "demo": {"out": "dir"},
}


# Commands that write into their run directory unless the option named here (None: always) points elsewhere.
RUN_DIR_WRITERS: dict[str, str | None] = {"compile": "out", "export": "out", "bench": "out_dir", "bundle": "out",
                                          "sensitivity": None}


RUN_OWN_FILES = ("run.json", "model.qgraph.npz", "fp32.pt", "fakequant.pt")
# The run's compiled library and its sidecar: `compile` writes them (its default --out is RUN/model.so), every other
# output option must leave them alone (`export RUN --out RUN/model.so`, `parity RUN --json RUN/model.json` replaced
# them, and every later command refused the run until it was compiled again).
RUN_LIBRARY_FILES = ("model.so", "model.json")


def _files_an_output_must_not_replace(args: argparse.Namespace) -> dict[Path, str]:
    """Resolved path -> what it is, for the files no output option may replace: the run directory's own files (its
    description, integer graph, models, model source copy) and the inputs of ``quantize`` (model file, checkpoint,
    data file). A breaker helper's `compile RUN --out RUN/model.qgraph.npz`, `parity RUN --json RUN/run.json` and
    `quantize ... --json model.py` all succeeded and destroyed what they named."""
    own: dict[Path, str] = {}
    run = getattr(args, "run", None)
    if run and Path(run).is_dir():
        for name in RUN_OWN_FILES:
            own[(Path(run) / name).resolve()] = f"the run's {name}"
        for name in RUN_LIBRARY_FILES:
            what = "compiled library" if name.endswith(".so") else "library sidecar"
            own[(Path(run) / name).resolve()] = f"the run's {what} {name}"
        for f in (Path(run) / "model_src").glob("*"):
            own[f.resolve()] = f"the run's copy of the model source {f.name}"
    if args.command == "quantize":
        model = str(getattr(args, "model", "") or "")
        for label, value in (("the model file", model.rsplit(":", 1)[0] if ".py:" in model else model),
                             ("the checkpoint", getattr(args, "checkpoint", None)),
                             ("the calibration data", getattr(args, "data", None))):
            if value and Path(str(value)).is_file():
                own[Path(str(value)).resolve()] = label
    return own


def check_outputs(args: argparse.Namespace) -> None:
    """One-line error (exit 2, nothing written) for an output path of this command that cannot be written: an
    existing file where a folder goes, a folder where a file goes, a file among its parent folders, a folder on a
    read-only file system or without write permission (the run directory too, for the commands that write there)."""
    from .outpaths import check_output_path

    protected = _files_an_output_must_not_replace(args)
    for dest, kind in {**OUTPUTS.get(args.command, {}), "json": "file"}.items():
        value = getattr(args, dest, None)
        if value:
            option = "--" + dest.replace("_", "-")
            check_output_path(value, kind, option)
            if kind != "file":
                continue
            written = [Path(value)]
            if args.command == "compile" and dest == "out":     # the library and its sidecar <out>.json
                if Path(value).suffix == ".json":
                    raise Ptq2TvmError(f"{option} {value}: a library path ending in .json (its sidecar is written "
                                       "next to it as <name>.json): use a .so name")
                written.append(Path(value).with_suffix(".json"))
                check_output_path(written[-1], "file", f"{option} {value}: its sidecar")
            for w in written:
                hit = protected.get(w.resolve())
                if hit and args.command == "compile" and dest == "out" and w.name in RUN_LIBRARY_FILES:
                    continue            # compile --out RUN/model.so: the run's default library, rebuilt
                if hit:
                    raise Ptq2TvmError(f"{option} {value} would overwrite {hit} ({w}): choose another path; nothing "
                                       "was written")
    if args.command == "quantize" and getattr(args, "out", None):
        _check_quantize_out_holds_no_foreign_files(Path(args.out))
    if args.command == "compile":
        _check_tune_db(args)
        _check_json_is_not_the_library(args)
    if args.command in RUN_DIR_WRITERS and Path(getattr(args, "run", "") or "").is_dir():
        option = RUN_DIR_WRITERS[args.command]
        if option is None or not getattr(args, option, None):
            check_output_path(args.run, "dir", "run directory")


def _is_ptq2tvm_run_json(path: Path) -> bool:
    """Whether ``path`` is a run.json that ``quantize`` wrote (a JSON object with its graph digest or version)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and ("graph_sha256" in data or "ptq2tvm_version" in data)


def _check_quantize_out_holds_no_foreign_files(out: Path) -> None:
    """``quantize --out DIR`` into an existing folder that is not a ptq2tvm run (no run.json of ours, no interrupted
    quantize's checkpoint) but holds files of the names a run writes there (run.json, fp32.pt, fakequant.pt,
    model.qgraph.npz, model.so, model.json): one line, nothing written. They were replaced or deleted without a word: a
    user's own checkpoint ``proj/fp32.pt`` given as ``--checkpoint proj/fp32.pt --out proj`` was overwritten by the
    run's FP32 model, a ``model.so`` of theirs deleted ("removed what the new integer graph supersedes") and their
    ``run.json`` replaced, although the README promises that a folder of yours given as ``--out`` keeps its files."""
    from .api import RunDir

    if not out.is_dir():
        return
    run = RunDir(out)
    if run.recon_checkpoint.exists() or _is_ptq2tvm_run_json(run.info_path):
        return                                  # a run (or an interrupted quantize's folder): its files are ours
    names = [n for n in RUN_OWN_FILES + RUN_LIBRARY_FILES if (out / n).exists()]
    if names:
        raise Ptq2TvmError(f"--out {out} is not a ptq2tvm run directory but holds {', '.join(names)}, which quantize "
                           f"would replace or delete (a run writes files of these names): choose another --out (e.g. "
                           f"{out / 'run'}) or move them; nothing was written")


def _check_json_is_not_the_library(args: argparse.Namespace) -> None:
    """``compile --json`` naming the library or its sidecar (``--out x.so --json x.json``; without --out,
    RUN/model.json): one line, nothing built. The summary overwrote the sidecar, which the .so needs to load."""
    if not getattr(args, "json", None):
        return
    so = Path(args.out) if args.out else Path(args.run) / "model.so"
    for path, what in ((so, "the library"), (so.with_suffix(".json"), "the library's sidecar (needed to load it)")):
        if Path(args.json).resolve() == path.resolve():
            raise Ptq2TvmError(f"--json {args.json} is {what} this compile writes ({path}): choose another path; "
                               "nothing was written")


def _check_tune_db(args: argparse.Namespace) -> None:
    """The tuning records folder of ``compile`` (``--tune-db``, or ``<out>.tuning/`` with ``--tune-trials``): one
    line (exit 2, nothing built) when it is an existing file (was a FileExistsError traceback) or cannot be created;
    a folder that is only read (``--tune-db`` without ``--tune-trials``) need not be writable."""
    from .outpaths import check_output_path

    if args.tune_db:
        records, option = Path(args.tune_db), "--tune-db"
    elif args.tune_trials:
        from .backend.tune import default_db_dir     # the records' default folder, <out>.tuning/ next to the .so

        records = default_db_dir(args.out or Path(args.run) / "model.so")
        option = "the tuning records folder of --tune-trials (default of --tune-db)"
    else:
        return
    if records.is_dir() and not args.tune_trials:
        return
    check_output_path(records, "dir", option)


# Integer options where 0 means something (none / skip / the default recipe); every other integer option counts
# something and must be >= 1 (OWN_CHECK: options checked later with their own messages)
ZERO_ALLOWED = {"per_layer_inputs", "tune_trials", "warmup", "resize"}
OWN_CHECK = {"w_bits", "a_bits", "seed", "fidelity_images"}


def int_option_minimums(actions: list[argparse.Action]) -> dict[str, int]:
    """dest -> least value of every integer option among one command's ``actions`` (a breaker helper found
    ``--latency-batch 0``, ``--samples -1``, ``--images 0``, ``--recon-threads -1``, ``--n -3`` ... ending in
    tracebacks, some after minutes of work and with files left behind)."""
    return {a.dest: (0 if a.dest in ZERO_ALLOWED else 1) for a in actions
            if a.option_strings and a.type is int and a.dest not in OWN_CHECK}


def check_int_options(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Raise Ptq2TvmError for the first integer option below its least value (:func:`int_option_minimums`)."""
    for option, least in minimums.items():
        value = getattr(args, option, None)
        if value is not None and value < least:
            raise Ptq2TvmError(f"--{option.replace('_', '-')} must be >= {least}, got {value}")
