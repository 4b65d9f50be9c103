"""Serving and artifact robustness (issue 11): threads, a 100,000-call soak, SIGKILL in the middle of quantize /
compile / bundle, and a full disk.

    nice .venv/bin/python benchmarks/robustness.py [--soak 100000] [--kills 4] [--tune-trials 2] [--no-tmpfs]

1. threads: one CompiledModel called from 8 Python threads at once (200 calls each) -> every output equals the
   reference executor's; the same without the wrapper's lock in a child process (what the lock prevents);
2. soak: N calls of a tiny model (batch 1, uint8 in/out and float in/out), RSS sampled along the way;
3. kill: `ptq2tvm quantize / compile / bundle / compile --tune-trials` started in a subprocess and SIGKILLed at
   several fractions of its uninterrupted duration and once the moment its first file appears (mid-write); afterwards every artifact present is complete (loads / checksum matches) or detected
   (a stale .so/.json pair is refused), and the rerun succeeds;
4. full disk: a 1 MiB tmpfs filled to 16 kB free (root only; skipped otherwise) as the output of each command ->
   exit code 2, one clear line, nothing partial left.
Phases run in the order threads, soak, full disk, kill; the results are written after each.
Writes benchmarks/results/robustness.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
from ptq2tvm.backend.tune import default_db_dir  # noqa: E402  (where compile --tune-trials keeps its records)

MODEL_PY = textwrap.dedent('''
    import torch, torch.nn as nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                             nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 10)).eval()
''')


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptq2tvm", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def setup(work: Path) -> tuple[Path, Path]:
    (work / "tinymodel.py").write_text(MODEL_PY)
    np.save(work / "data.npy", np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32))
    return work / "tinymodel.py", work / "data.npy"


def quantize_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["quantize", "--model", f"{model}:make", "--data", str(data), "--calib-size", "64", "--out", str(out),
            "--no-progress"]


# ---- 1. threads -------------------------------------------------------------------------------------------------
THREAD_CHILD = textwrap.dedent('''
    import sys, threading, contextlib, numpy as np
    sys.path.insert(0, sys.argv[1])
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.graph import IntegerGraph
    from ptq2tvm.ir.reference import run_reference
    g = IntegerGraph.load(sys.argv[2] + "/model.qgraph.npz")
    cm = CompiledModel(sys.argv[2] + "/model.so", threads=1)
    cm._lock = contextlib.nullcontext()          # the wrapper without its lock
    q = np.random.default_rng(1).integers(0, 256, (64, *g.input.shape)).astype(np.uint8)
    want = run_reference(g, q)
    bad = [0]
    def work(i):
        for k in range(200):
            j = (i * 7 + k) % 64
            if not np.array_equal(cm.run_int(q[j:j + 1]), want[j:j + 1]):
                bad[0] += 1
    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print("WRONG", bad[0])
''')


def bench_threads(run: Path) -> dict:
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.graph import IntegerGraph
    from ptq2tvm.ir.reference import run_reference

    g = IntegerGraph.load(run / "model.qgraph.npz")
    cm = CompiledModel(run / "model.so", threads=1)
    q = np.random.default_rng(1).integers(0, 256, (64, *g.input.shape)).astype(np.uint8)
    want = run_reference(g, q)
    wrong, errors = [0], []

    def work(i: int) -> None:
        try:
            for k in range(200):
                j = (i * 7 + k) % 64
                if not np.array_equal(cm.run_int(q[j:j + 1]), want[j:j + 1]):
                    wrong[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    threaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(1600):
        cm.run_int(q[k % 64:k % 64 + 1])
    serial = time.perf_counter() - t0
    child = subprocess.run([sys.executable, "-c", THREAD_CHILD, str(ROOT), str(run)], capture_output=True, text=True,
                           timeout=900)
    if child.returncode == 0 and "WRONG" in child.stdout:
        nolock = f"{child.stdout.split('WRONG')[1].split()[0]} wrong outputs of 1600"
    else:
        nolock = f"process died (exit {child.returncode}): {(child.stderr.strip().splitlines() or [''])[-1][:200]}"
    return dict(threads=8, calls=1600, wrong=wrong[0], errors=errors, seconds_threaded=round(threaded, 2),
                seconds_serial=round(serial, 2), without_lock=nolock)


# ---- 2. soak ----------------------------------------------------------------------------------------------------
def bench_soak(run: Path, n: int) -> dict:
    from ptq2tvm.backend.runtime import CompiledModel

    cm = CompiledModel(run / "model.so", threads=1)
    q = np.random.default_rng(2).integers(0, 256, (1, *cm.input.shape)).astype(np.uint8)
    x = np.random.default_rng(2).standard_normal((1, *cm.input.shape)).astype(np.float32)
    first = cm.run_int(q)
    samples = []
    t0 = time.perf_counter()
    for i in range(n):
        out = cm.run_int(q) if i % 2 == 0 else cm(x)
        if i % 2 == 0 and not np.array_equal(out, first):
            raise SystemExit(f"soak: output changed at call {i}")
        if i in (0, 1000) or (i + 1) % (n // 20) == 0:
            samples.append((i + 1, round(rss_mb(), 2)))
    seconds = time.perf_counter() - t0
    base = next(r for c, r in samples if c >= 1000)
    return dict(calls=n, seconds=round(seconds, 1), us_per_call=round(1e6 * seconds / n, 1), rss_mb=samples,
                rss_growth_after_1000_calls_mb=round(samples[-1][1] - base, 2))


# ---- 3. SIGKILL in the middle -----------------------------------------------------------------------------------
def check_run_dir(run: Path) -> str:
    """'complete' | 'absent' | 'incomplete-detected' | 'CORRUPT: ...' for a quantize output directory."""
    import torch

    from ptq2tvm.api import RunDir
    from ptq2tvm.errors import Ptq2TvmError
    from ptq2tvm.frontend.qmodel import QuantModel
    from ptq2tvm.ir.graph import IntegerGraph

    visible = sorted(p.name for p in run.glob("*") if not p.name.startswith(".")) if run.exists() else []
    try:
        for name in visible:
            p = run / name
            if name == "fp32.pt":
                torch.load(p, weights_only=True)
            elif name == "fakequant.pt":
                QuantModel.load(p)
            elif name.endswith(".npz"):
                IntegerGraph.load(p)
            elif name.endswith(".json"):
                json.loads(p.read_text())
    except (Ptq2TvmError, Exception) as e:  # noqa: BLE001
        return f"CORRUPT: {name}: {e}"
    if not visible:
        return "absent"
    if (run / "run.json").is_file():
        RunDir(run).info()
        missing = [f for f in ("fp32.pt", "fakequant.pt", "model.qgraph.npz") if f not in visible]
        return f"CORRUPT: run.json without {missing}" if missing else "complete"
    return "incomplete-detected"      # no run.json: not a run directory (every command says so)


def check_so(so: Path) -> str:
    from ptq2tvm.backend.compile import read_sidecar, sidecar_path
    from ptq2tvm.errors import ArtifactError

    if not so.exists() and not sidecar_path(so).exists():
        return "absent"
    try:
        read_sidecar(so)
        return "complete"
    except ArtifactError as e:
        return "incomplete-detected" if ("not found" in str(e) or "does not match" in str(e)) else f"CORRUPT: {e}"


def check_bundle(d: Path, want: list[str]) -> str:
    if not d.exists():
        return "absent"
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    return "complete" if files == want else f"CORRUPT: {sorted(set(want) ^ set(files))}"


def hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob(".*")) if d.exists() else []


def _tuning_state(db: Path) -> str:
    """'absent' | 'complete' (every JSON-lines record of MetaSchedule's database_*.json parses, and ptq2tvm's own
    task index, one JSON document, parses) | 'truncated line' (repaired by the next run)."""
    if not db.exists():
        return "absent"
    bad = 0
    for f in db.glob("database_*.json"):
        for line in f.read_text(errors="replace").splitlines():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
    for f in db.glob("ptq2tvm_*.json"):
        try:
            json.loads(f.read_text(errors="replace"))
        except ValueError:
            bad += 1
    return "complete" if not bad else f"{bad} truncated line(s) (the next run drops them)"


def _first_write(watch: list[Path], before: set[str], p: subprocess.Popen, limit: float) -> float | None:
    """Poll (every 1 ms) until a new entry appears in one of the ``watch`` directories (a temporary being written, or
    the artifact itself); return the seconds waited, or None if the process ended or ``limit`` passed first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit and p.poll() is None:
        now = {str(q) for d in watch if d.exists() for q in d.iterdir()}
        if now - before:
            return time.perf_counter() - t0
        time.sleep(0.001)
    return None


def bench_kill(work: Path, model: Path, data: Path, fractions: list[float], tune_trials: int = 2,
               log=print, result: dict | None = None, save=lambda: None) -> dict:
    """SIGKILL each command at ``fractions`` of its uninterrupted duration and once at its first file write.
    ``result`` is filled as rows come in and ``save`` called after each (a partial run keeps what it measured)."""
    res = result if result is not None else {}
    out: dict[str, list] = res.setdefault("runs", {})
    base = work / "base"
    dur = {}
    t0 = time.perf_counter()
    assert _cli(quantize_args(model, data, base)).wait() == 0
    dur["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert _cli(["compile", str(base), "--no-progress"]).wait() == 0
    dur["compile"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert _cli(["bundle", str(base), "--out", str(work / "base_bundle")]).wait() == 0
    dur["bundle"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tune_args = ["compile", str(base), "--out", str(work / "base_tuned" / "model.so"), "--tune-trials",
                 str(tune_trials), "--no-progress"]
    assert _cli(tune_args).wait() == 0
    dur["tune"] = time.perf_counter() - t0
    log(f"uninterrupted durations (s): {dur}")
    res["durations_s"] = {k: round(v, 2) for k, v in dur.items()}
    bundle_files = sorted(str(p.relative_to(work / "base_bundle")) for p in (work / "base_bundle").rglob("*")
                          if p.is_file())
    points: list[float | str] = [*fractions, "first write"]
    for cmd in ("quantize", "compile", "bundle", "tune"):
        rows = out.setdefault(cmd, [])
        for k, f in enumerate(points):
            run = work / f"k_{cmd}_{k}"
            if cmd == "quantize":
                args, watch = quantize_args(model, data, run), [run, run.parent]
            else:
                subprocess.run(["cp", "-r", str(base), str(run)], check=True)
                for stale in ("model.so", "model.json", "bundle", "model.tuning", "tuned"):
                    subprocess.run(["rm", "-rf", str(run / stale)], check=True)
                if cmd == "compile":
                    args, watch = ["compile", str(run), "--no-progress"], [run]
                elif cmd == "bundle":
                    subprocess.run(["cp", str(base / "model.so"), str(base / "model.json"), str(run)], check=True)
                    args, watch = ["bundle", str(run), "--out", str(run / "bundle")], [run, run / "bundle"]
                else:
                    (run / "tuned").mkdir()
                    args = ["compile", str(run), "--out", str(run / "tuned" / "model.so"), "--tune-trials",
                            str(tune_trials), "--no-progress"]
                    watch = [run / "tuned", default_db_dir(run / "tuned" / "model.so")]
            before = {str(q) for d in watch if d.exists() for q in d.iterdir()}
            p = _cli(args)
            if f == "first write":
                waited = _first_write(watch, before, p, 3 * dur[cmd])
                at = f"first write ({waited:.2f} s)" if waited is not None else "first write (not seen)"
            else:
                time.sleep(f * dur[cmd])
                at = round(f * dur[cmd], 2)
            killed = p.poll() is None
            if killed:
                p.send_signal(signal.SIGKILL)
            p.wait()

            def state() -> str:
                if cmd == "quantize":
                    return check_run_dir(run)
                if cmd == "compile":
                    return check_so(run / "model.so")
                if cmd == "bundle":
                    return check_bundle(run / "bundle", bundle_files)
                return f"so: {check_so(run / 'tuned' / 'model.so')}; records: " \
                       f"{_tuning_state(default_db_dir(run / 'tuned' / 'model.so'))}"

            st = state()
            left = sorted({x for d in watch for x in hidden(d)})
            r2 = _cli(args + (["--force"] if cmd == "bundle" and (run / "bundle").exists() else [])).wait()
            after = state()
            rows.append(dict(kill_at_s=at, killed=killed, state_after_kill=st, temporaries_left=left,
                             temporaries_after_rerun=sorted({x for d in watch for x in hidden(d)}), rerun_exit=r2,
                             state_after_rerun=after))
            log(f"kill {cmd} at {at}: {rows[-1]}")
            save()
    return res


# ---- 4. full disk -----------------------------------------------------------------------------------------------
def bench_full_disk(work: Path, model: Path, data: Path) -> dict:
    if os.geteuid() != 0:
        return dict(skipped="needs root to mount a tmpfs")
    mnt = work / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        return dict(skipped=f"mount failed: {r.stderr.strip()}")
    res = {}
    try:
        base = work / "base"
        (mnt / "pad").write_bytes(b"\0" * (1024 * 1024 - 16 * 1024))   # leave 16 kB: less than any artifact set
        cases = {
            "quantize": quantize_args(model, data, mnt / "run"),
            "compile": ["compile", str(base), "--out", str(mnt / "m.so"), "--no-progress"],
            "bundle": ["bundle", str(base), "--out", str(mnt / "bundle")],
        }
        for name, args in cases.items():
            p = _cli(args)
            _, err = p.communicate(timeout=1800)
            left = sorted(str(q.relative_to(mnt)) for q in mnt.rglob("*") if q.name != "pad")
            res[name] = dict(exit=p.returncode, stderr_lines=len(err.strip().splitlines()),
                             message=err.strip().splitlines()[-1][:300] if err.strip() else "", left_on_disk=left)
            for q in sorted(mnt.rglob("*"), reverse=True):
                if q.name != "pad":
                    subprocess.run(["rm", "-rf", str(q)])
    finally:
        subprocess.run(["umount", str(mnt)])
    return res


def write_md(r: dict, path: Path) -> None:
    la = ", ".join(f"{x:.1f}" for x in r["loadavg"])
    lines = ["# Serving and artifact robustness (issue 11)", "",
             f"Command: `nice .venv/bin/python {r['command']}`"
             + (f" (earlier phases: {'; '.join(f'`{c}`' for c in r['commands'][:-1])})" if r.get("commands") else "")
             + "; load average at the start "
             f"{', '.join(f'{x:.1f}' for x in r.get('loadavg_start', r['loadavg']))}, at the last write {la} on 2 "
             "cores shared with other agents (timings are slow and noisy; the properties are what counts).", ""]
    t = r.get("threads")
    if t:
        lines += ["## Threads", "",
                  f"One CompiledModel, {t['threads']} Python threads, {t['calls']} calls in all: **{t['wrong']} wrong "
                  f"outputs, {len(t['errors'])} errors** ({t['seconds_threaded']} s threaded vs {t['seconds_serial']} "
                  "s serial: the wrapper serializes calls on one Relax VM). Without the wrapper's lock (child "
                  f"process): {t['without_lock']}.", ""]
    s = r.get("soak")
    if s:
        lines += ["## Soak", "",
                  f"{s['calls']} calls (uint8 and float entry alternating, every uint8 output compared with the first) "
                  f"in {s['seconds']} s ({s['us_per_call']} us per call); RSS after 1,000 calls -> end: "
                  f"**{s['rss_growth_after_1000_calls_mb']:+.2f} MB**; samples (calls, MB): {s['rss_mb']}", ""]
    fd = r.get("full_disk")
    if fd is not None:
        lines += ["## Full disk (a 1 MiB tmpfs filled to 16 kB free)", ""]
        if "skipped" in fd:
            lines.append(f"skipped: {fd['skipped']}")
        else:
            lines += ["| command | exit | stderr lines | message | left on the disk |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {x['exit']} | {x['stderr_lines']} | {x['message']} | {x['left_on_disk'] or 'nothing'} |"
                      for c, x in fd.items()]
        lines.append("")
    k = r.get("kill")
    if k and any(k.get("runs", {}).values()):
        lines += ["## SIGKILL in the middle", "",
                  f"Uninterrupted durations (s): {k['durations_s']}. Each row: killed at t s (or the moment the first "
                  "file of the command appeared: a temporary being written), what the artifact was afterwards, hidden "
                  "temporaries left, the rerun's exit code and result. 'tune' is `compile --tune-trials`: its .so and "
                  "its MetaSchedule records.", "",
                  "| command | kill at (s) | killed | after the kill | temporaries left | rerun exit | after the rerun |",
                  "|---|---|---|---|---|---|---|"]
        for cmd, rows in k["runs"].items():
            for x in rows:
                lines.append(f"| {cmd} | {x['kill_at_s']} | {x['killed']} | {x['state_after_kill']} | "
                             f"{len(x['temporaries_left'])} | {x['rerun_exit']} | {x['state_after_rerun']} |")
        lines += ["", "'incomplete-detected': some files of the set are missing (no run.json, or a .so without its "
                  "sidecar / with a stale one), and every command refuses it with a clear error; never a half-written "
                  "file. Temporaries of a killed writer are removed by the next write of the same artifact.", ""]
    elif k is not None:
        lines += ["## SIGKILL in the middle", "", "not finished in this run", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--soak", type=int, default=100_000)
    p.add_argument("--kills", type=int, default=4, help="kill points per command (at fractions of its duration; "
                   "plus one at its first file write)")
    p.add_argument("--tune-trials", type=int, default=2)
    p.add_argument("--no-tmpfs", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "robustness"))
    p.add_argument("--phases", default="threads,soak,disk,kill",
                   help="which phases to run; the others' results are kept from an existing --out JSON")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    os.environ["TVM_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="robust-"))
    model, data = setup(work)
    fractions = [0.3 + 0.6 * i / max(1, args.kills - 1) for i in range(args.kills)]
    out = Path(args.out)
    res: dict = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() and \
        phases != {"threads", "soak", "disk", "kill"} else {}
    cmd = " ".join(["benchmarks/robustness.py"] + sys.argv[1:])
    if res:
        res.setdefault("commands", [res.get("command")]).append(cmd)
    res.update(command=cmd, host=platform.node(), loadavg_start=os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:          # after every phase: a partial run still leaves its results
        res["loadavg"] = os.getloadavg()
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        write_md(res, out.with_suffix(".md"))

    assert _cli(quantize_args(model, data, work / "base")).wait() == 0
    assert _cli(["compile", str(work / "base"), "--no-progress"]).wait() == 0
    if "threads" in phases:
        res["threads"] = bench_threads(work / "base")
        print(res["threads"], flush=True)
        save()
    if "soak" in phases:
        res["soak"] = bench_soak(work / "base", args.soak)
        print({k: v for k, v in res["soak"].items() if k != "rss_mb"}, flush=True)
        save()
    if "disk" in phases:
        res["full_disk"] = dict(skipped="--no-tmpfs") if args.no_tmpfs else bench_full_disk(work, model, data)
        print(res["full_disk"], flush=True)
        save()
    if "kill" in phases:
        res["kill"] = dict(runs={}, durations_s={})
        bench_kill(work / "kill", model, data, fractions, args.tune_trials, log=lambda m: print(m, flush=True),
                   result=res["kill"], save=save)
        save()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
