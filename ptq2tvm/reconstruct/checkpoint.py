"""Checkpoints for interruptible, resumable reconstruction.

After every finished unit the directory holds ``model-<n>.pt`` (the QuantModel with every finished unit hardened,
learned activation steps and AdaQTransform parameters) and ``state.json`` (the fingerprint of the run, the finished
"stage/unit" keys, the loss curves so far, the MRECG plan, the model file name). ``state.json`` is written last and
atomically, so a run killed at any moment resumes from a consistent pair. A resumed run recomputes the cached unit
inputs by replaying the finished units and continues with the same per-unit seeds, so it reproduces an uninterrupted
run exactly.

:data:`Checkpoint.last` is the checkpoint this process touched last, and :meth:`Checkpoint.progress` says how far it
got: the command line reports "interrupted after unit k/N; re-run to resume" from it on Ctrl-C, and a resumed run
prints "resuming: k/N units done". The command line deletes the directory after a successful run.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..errors import ArtifactError
from ..frontend.qmodel import QuantModel

STATE = "state.json"


class Checkpoint:
    #: the checkpoint this process loaded or saved last (for the command line's interrupt message)
    last: "Checkpoint | None" = None

    def __init__(self, directory: Path, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.count = 0
        self.done = 0           # finished "stage/unit" steps
        self.total: int | None = None   # all steps (units x stages), once the units are known

    def progress(self) -> tuple[int, int | None]:
        """(finished units, all units or None while not known yet); a unit is one stage of one reconstruction
        unit."""
        return self.done, self.total

    def _note(self, done: int, units: list[Any] | None, stages: list[Any] | None) -> None:
        self.done = int(done)
        self.total = len(units) * max(len(stages or []), 1) if units else None
        Checkpoint.last = self

    @staticmethod
    def remove(directory: str | Path) -> bool:
        """Delete a checkpoint directory (after a successful run, or to start over); True if there was one."""
        directory = Path(directory)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True

    @property
    def state_path(self) -> Path:
        return self.dir / STATE

    def load(self) -> tuple[QuantModel, dict[str, Any]] | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except ValueError as e:
            raise ArtifactError(f"{self.state_path}: corrupted reconstruction checkpoint: {e}") from e
        if state.get("fingerprint") != self.fingerprint:
            raise ArtifactError(f"{self.dir} holds a reconstruction checkpoint of a different run "
                                f"({describe_state(state)}): settings, "
                                "bits, model or calibration data differ; re-run that quantize command to finish it, "
                                "or start this one over with --force (deletes the checkpoint)")
        qm = QuantModel.load(self.dir / state["model"])
        self.count = int(state.get("count", 0))
        self._note(len(state.get("done", [])), state.get("units"), (state.get("report") or {}).get("stages"))
        total = f"/{self.total}" if self.total else ""
        print(f"resuming: {self.done}{total} units done (checkpoint {self.dir})", file=sys.stderr)
        return qm, state

    def save(self, qm: QuantModel, report: Any, done: set[str], finished: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count += 1
        name = f"model-{self.count:04d}.pt"
        qm.save(self.dir / name)
        old = None
        if self.state_path.is_file():
            try:
                old = json.loads(self.state_path.read_text()).get("model")
            except ValueError:
                old = None
        state = dict(fingerprint=self.fingerprint, model=name, count=self.count, done=sorted(done),
                     curves=report.curves, mrecg=report.mrecg, iterations=report.iterations,
                     optim_seconds=report.optim_seconds, finished=finished,
                     units=report.units, report=_light(report))
        write_json(self.state_path, state)
        self._note(len(done), report.units, getattr(report, "stages", None))
        if old and old != name:
            (self.dir / old).unlink(missing_ok=True)


def describe_state(state: dict[str, Any]) -> str:
    """What a checkpoint's ``state.json`` records, for messages: "W4A4 qdrop, 3/7 units done" (the bits and method
    of its fingerprint; a unit is one stage of one reconstruction unit)."""
    saved = state.get("fingerprint") or {}
    config, settings = saved.get("config") or {}, saved.get("settings") or {}
    what = " ".join(x for x in (f"W{config['w_bits']}A{config['a_bits']}" if "w_bits" in config else "",
                                str(settings.get("method") or "")) if x)
    done, units = len(state.get("done") or []), len(state.get("units") or [])
    stages = len(((state.get("report") or {}).get("stages")) or []) or 1
    progress = f"{done}/{units * stages} units done" if units else f"{done} units done"
    return f"{what}, {progress}" if what else progress


def _light(report: Any) -> dict[str, Any]:
    d = asdict(report)
    d.pop("curves", None)
    return d
