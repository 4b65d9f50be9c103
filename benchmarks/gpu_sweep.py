"""Accuracy rows of benchmarks/accuracy_fmnist.py as parallel processes on one GPU host, then merged here.

Made for the lent GPU machine (see scripts/device/README.md): it has torch with CUDA but neither Ray nor TVM, and it
is held for minutes. So each row runs as its own ``accuracy_fmnist.py --no-so --device cuda`` process (several at a
time share the GPU; each has its own results file and checkpoint folder), rows start in the given priority order
until a deadline, and rows still running at the hard deadline are stopped (they leave no row). Back on a machine
with TVM, ``merge`` adds the finished rows and their checkpoints to a results file and ``accuracy_fmnist.py
--fill-so`` compiles and evaluates each row's .so from its checkpoint.

    python3 benchmarks/gpu_sweep.py run --rows rows.txt --jobs 12 --deadline 420 --out /tmp/sweep \\
        [--iters 2000] [--device cuda]
    .venv/bin/python benchmarks/gpu_sweep.py merge --from /tmp/sweep --into benchmarks/results/accuracy_fmnist_fidelity
    .venv/bin/python benchmarks/accuracy_fmnist.py --fill-so --out benchmarks/results/accuracy_fmnist_fidelity

``rows.txt``: one row per line, ``model bits method seed`` (e.g. ``resnet_small W2A4 qdrop+adaq 0``), highest
priority first; ``#`` starts a comment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "benchmarks" / "accuracy_fmnist.py"


def read_rows(path: Path) -> list[tuple[str, str, str, int]]:
    """``model bits method seed`` lines of ``path`` (comments and blank lines skipped)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[3].isdigit():
            raise SystemExit(f"{path}:{n}: expected 'model bits method seed', got {line!r}")
        rows.append((parts[0], parts[1], parts[2], int(parts[3])))
    return rows


def row_command(row: tuple[str, str, str, int], out: Path, args: argparse.Namespace) -> list[str]:
    model, bits, method, seed = row
    return [sys.executable, str(ACCURACY), "--models", model, "--bits", bits, "--methods", method, "--seeds",
            str(seed), "--multi-seed-bits", "all", "--iters", str(args.iters), "--no-ray", "--no-so", "--quiet",
            "--device", args.device, "--threads", "1", "--out", str(out)]


def run(args: argparse.Namespace) -> int:
    rows = read_rows(Path(args.rows))
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log = (out / "sweep_log.txt").open("a")

    def note(msg: str) -> None:
        line = f"[{time.monotonic() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    running: dict[int, tuple[subprocess.Popen, float]] = {}
    queue = list(enumerate(rows))
    status: dict[int, str] = {}
    while queue or running:
        now = time.monotonic() - t0
        for i, (proc, start) in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                status[i] = "done" if rc == 0 else f"failed rc={rc}"
                note(f"row {i} {' '.join(map(str, rows[i]))}: {status[i]} after {now - start:.0f}s")
                del running[i]
            elif now > args.deadline:
                proc.kill()
                proc.wait()
                status[i] = "stopped at the deadline"
                note(f"row {i} {' '.join(map(str, rows[i]))}: stopped at the deadline after {now - start:.0f}s")
                del running[i]
        while queue and len(running) < args.jobs and now < args.deadline - args.min_left:
            i, row = queue.pop(0)
            stem = out / "rows" / f"row{i:03d}"
            with open(f"{stem}.log", "w") as f:
                running[i] = (subprocess.Popen(row_command(row, stem, args), stdout=f, stderr=subprocess.STDOUT,
                                               cwd=ROOT), now)
            note(f"row {i} {' '.join(map(str, row))}: started")
        if not running and queue and now >= args.deadline - args.min_left:   # (at the deadline all were stopped)
            for i, _ in queue:
                status[i] = "not started"
            queue = []
        time.sleep(1.0)
    summary = {f"{' '.join(map(str, rows[i]))}": s for i, s in sorted(status.items())}
    (out / "sweep_status.json").write_text(json.dumps(summary, indent=1))
    done = sum(s == "done" for s in status.values())
    note(f"{done} of {len(rows)} rows finished")
    return 0


def merge(args: argparse.Namespace) -> int:
    """Add the finished rows of a ``run`` folder (and their checkpoints) to the results file ``--into``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from accuracy_fmnist import finished_model_file, read_rows as read_results, row_ckpt, row_key, store_for

    src, into = Path(args.src), Path(args.into)
    store = store_for(into.with_suffix(".json"))
    added = 0
    have = set(store.keys())
    for jpath in sorted((src / "rows").glob("*.json")):
        for r in read_results(jpath):
            if row_key(r) in have and not args.replace:
                print(f"{row_key(r)} is already in {into.with_suffix('.json')}; kept (--replace to overwrite)",
                      file=sys.stderr)
                continue
            ckpt_src, ckpt_dst = row_ckpt(jpath.with_suffix(""), r), row_ckpt(into, r)
            model_file, why = finished_model_file(ckpt_src)
            if model_file is None:
                print(f"{jpath}: {row_key(r)}: {why}; skipped", file=sys.stderr)
                continue
            if ckpt_dst.exists():
                shutil.rmtree(ckpt_dst)
            shutil.copytree(ckpt_src, ckpt_dst)
            store.add(r)
            added += 1
            print(f"merged {row_key(r)}", file=sys.stderr)
    print(f"{added} rows merged into {into.with_suffix('.json')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the rows as parallel processes until the deadline")
    r.add_argument("--rows", required=True, help="file of 'model bits method seed' lines, highest priority first")
    r.add_argument("--out", required=True)
    r.add_argument("--jobs", type=int, default=8, help="rows at a time")
    r.add_argument("--deadline", type=float, required=True, help="seconds from now: running rows are stopped then")
    r.add_argument("--min-left", type=float, default=60.0, help="start no row with fewer seconds left than this")
    r.add_argument("--iters", type=int, default=2000)
    r.add_argument("--device", default="cuda")
    m = sub.add_parser("merge", help="add the finished rows of a run folder to a results file")
    m.add_argument("--from", dest="src", required=True)
    m.add_argument("--into", required=True, help="results path without suffix (as accuracy_fmnist.py --out)")
    m.add_argument("--replace", action="store_true", help="overwrite rows already in the results file")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else merge(args)


if __name__ == "__main__":
    raise SystemExit(main())
