"""Tuning the hand-scheduled x86 kernels with MetaSchedule's measurement infrastructure and records database.

Each kernel PrimFunc of the Relax module (one task per distinct workload; ResNet-18 has about 15) has a small schedule
space (``kernels.tuning_space``: register tiles of the convs, column tiles of depthwise convs, output blocks of the
dense), hand schedule first. ``--tune-trials N`` measures the first N points of every task's space with MetaSchedule's
``LocalBuilder`` / ``LocalRunner`` and commits each as a ``TuningRecord`` (the schedule's trace and its median run
time) to a MetaSchedule ``JSONDatabase``. The build then replays, per task, the fastest record
(``Database.query_schedule``), so a rebuild from the records measures nothing. Because the hand schedule is always
measured, a tuned kernel is never slower than the untuned one as far as the measurement can tell.

Why not MetaSchedule's generic search: on this CPU it reached 10.5 ms for ResNet-18 after 19 minutes (10 trials per
task) while the hand schedules run it in about 3 ms untuned; the spaces here are small enough (4-40 points) to
measure in heuristic order instead of sampling them.

Files in the database directory: ``database_workload.json`` and ``database_tuning_record.json`` (MetaSchedule's
format) and ``ptq2tvm_tasks.json`` (per task: kernel kind, the options measured, in order, and their times).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tqdm.auto import tqdm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

import kernels as K

from ..atomic import write_json
from ..errors import ArtifactError

TASKS_FILE = "ptq2tvm_tasks.json"
FAILED_SECONDS = 1e9     # run time committed for a candidate that failed to build or run


@dataclass
class TuneReport:
    """What a tuning run measured and chose, per task."""

    db_dir: str
    trials: int
    tasks: list[dict[str, Any]] = field(default_factory=list)
    measured: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(db_dir=self.db_dir, trials=self.trials, measured=self.measured, seconds=round(self.seconds, 2),
                    tasks=self.tasks)

    def summary(self) -> str:
        gain = [t["hand_ms"] / t["best_ms"] for t in self.tasks if t.get("hand_ms") and t.get("best_ms")]
        faster = sum(1 for t in self.tasks if t.get("best_options") not in (None, "{}"))
        return (f"{len(self.tasks)} tasks, {self.measured} candidates measured in {self.seconds:.0f} s, "
                f"{faster} of them faster than the hand schedule"
                + (f" (kernel speed-ups x{min(gain):.2f}..x{max(gain):.2f})" if gain else ""))


def _options_key(options: dict[str, Any]) -> str:
    return json.dumps({k: (v.as_list() if isinstance(v, K.ConvTile) else v) for k, v in options.items()},
                      sort_keys=True)


def _task_module(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _restore_name(scheduled: tvm.tirx.PrimFunc, original: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    f = K.finish_scheduled(scheduled)
    if original.attrs is not None and "global_symbol" in original.attrs:
        return f.with_attr("global_symbol", original.attrs["global_symbol"])
    return f.without_attr("global_symbol")


class KernelTuner:
    """Measures and replays schedules of the ptq2tvm kernels in a Relax module (see the module docstring)."""

    def __init__(self, target: dict[str, Any] | tvm.target.Target, db_dir: str | Path, trials: int = 0,
                 progress: bool = True, number_ms: int = 40, repeat: int = 5):
        if trials < 0:
            raise ValueError(f"tune trials must be >= 0, got {trials}")
        self.target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
        self.db_dir = Path(db_dir)
        self.trials = trials
        self.progress = progress
        self.number_ms = number_ms
        self.repeat = repeat
        self.report = TuneReport(str(self.db_dir), trials)
        for scope in ("global", "local"):       # the traces replay `tensorize` with these names ("local": records
            for register in (K.register_vnni_intrinsic, K.register_avx2_intrinsic,        # written before ACC_SCOPE)
                             K.register_avx2w_intrinsic,
                             K.register_avxvnni_intrinsic, K.register_ubsw_intrinsic,
                             K.register_ubsw16_intrinsic, K.register_widen16_intrinsic,
                             K.register_unpack4_intrinsic):
                register(scope)

    # ---- database ----------------------------------------------------------------------------------------------
    def _open(self) -> tuple[ms.database.JSONDatabase, dict[str, Any]]:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        for name in DB_FILES:
            repair_json_lines(self.db_dir / name)
        records = self.db_dir / DB_FILES[1]
        if records.is_file():   # its traces name per-layer epilogue intrinsics: TVM parses them on opening
            K.register_named_epilogues(records.read_text(errors="replace"))
        db = ms.database.JSONDatabase(work_dir=str(self.db_dir))
        idx_path = self.db_dir / TASKS_FILE
        try:
            index = json.loads(idx_path.read_text()) if idx_path.is_file() else {}
        except ValueError as e:
            raise ArtifactError(f"tuning index {idx_path} is not valid JSON ({e}); delete it to re-measure") from None
        return db, index

    def _measure(self, mod: tvm.IRModule, args_info: list, options: list[dict[str, Any]]) -> list[tuple[Any, float]]:
        """Build every option (in this process: MetaSchedule's LocalBuilder starts a fresh interpreter per build,
        ~50 s each on 2 busy cores, against 0.2 s here), then time them all with one MetaSchedule LocalRunner call
        (a separate process, random inputs, ``repeat`` runs of at least ``number_ms`` each); -> [(trace or None,
        median seconds)]."""
        traces: list[Any] = []
        inputs: list[ms.runner.RunnerInput] = []
        slots: list[int | None] = []
        with tempfile.TemporaryDirectory(prefix="ptq2tvm_tune_") as tmp:
            for i, opt in enumerate(options):
                try:
                    sch = K.apply_schedule(Schedule(mod), self.target, **opt)
                    path = str(Path(tmp) / f"cand{i}.tar")
                    built = _task_module(K.finish_scheduled(sch.mod["main"]))   # as the network build compiles it
                    K.compile_module(built, self.target).export_library(path)
                except Exception:  # noqa: BLE001 - an option that does not schedule or build is a failed candidate
                    traces.append(None)
                    slots.append(None)
                    continue
                traces.append(sch.trace)
                slots.append(len(inputs))
                inputs.append(ms.runner.RunnerInput(path, "cpu", args_info))
            results = [f.result() for f in self._runner().run(inputs)] if inputs else []
        out: list[tuple[Any, float]] = []
        for trace, slot in zip(traces, slots):
            res = results[slot] if slot is not None else None
            secs = [float(v) for v in res.run_secs] if res is not None and res.error_msg is None and res.run_secs \
                else []
            out.append((trace, statistics.median(secs) if secs else FAILED_SECONDS))
        return out

    def _runner(self) -> ms.runner.LocalRunner:
        return ms.runner.LocalRunner(timeout_sec=120, evaluator_config=ms.runner.EvaluatorConfig(
            number=1, repeat=self.repeat, min_repeat_ms=self.number_ms, enable_cpu_cache_flush=False))

    # ---- the pass ----------------------------------------------------------------------------------------------
    def __call__(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Schedule every ptq2tvm kernel of ``mod``: the best record of its task, else the hand schedule."""
        t0 = time.perf_counter()
        db, index = self._open()
        tasks: dict[int, dict[str, Any]] = {}
        for gv, func in mod.functions.items():
            kind = K.kernel_kind(func)
            if kind is None:
                continue
            task_mod = _task_module(func)
            h = tvm_ffi.structural_hash(task_mod)
            tasks.setdefault(h, dict(kind=kind, func=func, mod=task_mod, gvs=[]))["gvs"].append(gv)
        todo: list[tuple[int, list[dict[str, Any]]]] = []
        for h, t in tasks.items():
            space = K.tuning_space(t["func"], self.target, limit=self.trials or None) if self.trials else []
            done = index.get(str(h), {}).get("measured", [])
            todo.append((h, space[len(done):] if len(space) > 1 else []))
        total = sum(len(s) for _, s in todo)
        bar = tqdm(total=total, desc="tuning", unit="cand", disable=not self.progress or total == 0)
        updates = {}
        try:
            for h, space in todo:
                t = tasks[h]
                name = ", ".join(gv.name_hint for gv in t["gvs"])
                entry = index.setdefault(str(h), dict(kind=t["kind"], kernels=name, measured=[]))
                if space:
                    bar.set_postfix_str(f"{name[:40]} ({len(space)})")
                    workload = db.commit_workload(t["mod"])
                    args_info = ms.arg_info.ArgInfo.from_prim_func(t["mod"]["main"])
                    for opt, (trace, sec) in zip(space, self._measure(t["mod"], args_info, space)):
                        if trace is not None:
                            db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [sec], self.target,
                                                                             args_info))
                        entry["measured"].append(dict(options=_options_key(opt), ms=round(sec * 1e3, 5)))
                        self.report.measured += 1
                        bar.update(1)
                    write_json(self.db_dir / TASKS_FILE, index)
                meas = [m for m in entry["measured"] if m["ms"] < FAILED_SECONDS * 1e3]
                best = min(meas, key=lambda m: m["ms"]) if meas else None
                # the fastest record; the hand schedule when nothing was measured or every candidate failed
                sch = db.query_schedule(t["mod"], self.target, "main") if best else None
                scheduled = (sch or K.apply_schedule(Schedule(t["mod"]), self.target)).mod["main"]
                for gv in t["gvs"]:
                    updates[gv] = _restore_name(scheduled, mod[gv])
                self.report.tasks.append(dict(
                    kernels=name, kind=t["kind"], candidates=len(entry["measured"]), from_records=sch is not None,
                    hand_ms=next((m["ms"] for m in entry["measured"] if m["options"] == "{}"), None),
                    best_ms=best["ms"] if best else None, best_options=best["options"] if best else None))
        finally:
            bar.close()
        new_mod = mod.clone()
        for gv, f in updates.items():
            new_mod.update_func(gv, f)
        self.report.seconds = time.perf_counter() - t0
        return new_mod


#: MetaSchedule's JSON-lines files in a tuning directory (appended one record per line by TVM)
DB_FILES = ("database_workload.json", "database_tuning_record.json")


def repair_json_lines(path: Path) -> int:
    """Drop the lines of a MetaSchedule JSON-lines file that do not parse (a writer killed or out of disk space in
    the middle of an append leaves a truncated last line, and TVM then refuses the whole database with
    "parallel_for_dynamic error with Unexpected token"). The file is rewritten atomically, with a warning; returns
    the number of lines dropped (0: the file is left untouched)."""
    import warnings

    from ..atomic import write_text

    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
            keep.append(line)
        except ValueError:
            dropped += 1
    if dropped:
        write_text(path, "".join(x + "\n" for x in keep))
        warnings.warn(f"tuning records: dropped {dropped} unreadable line(s) of {path} (a write was interrupted); "
                      "those candidates will be measured again", RuntimeWarning, stacklevel=2)
    return dropped


def default_db_dir(so_path: str | Path) -> Path:
    """Where ``ptq2tvm compile --tune-trials`` keeps its records by default: ``<artifact>.tuning/`` next to it."""
    p = Path(so_path)
    return p.with_name(p.stem + ".tuning")


__all__ = ["KernelTuner", "TuneReport", "default_db_dir"]
