"""A/B of two versions of the compiler: the same integer graph compiled by an earlier git revision and by this tree,
both .so timed in one process.

    .venv/bin/python benchmarks/commit_ab.py --before REV [--models resnet_small resnet18 mobilenet_v2]
                                             [--bits 7/8 8/8 4/4] [--threads 1 2] [--batches 1 8]
                                             [--repeats 30] [--kernels] [--out benchmarks/results/commit_ab]

For a kernel or schedule change whose old path is not worth keeping behind a switch. ``git archive REV`` of
``kernels/`` and ``ptq2tvm/`` goes to a temporary folder; for every (model, bits) the graph is made once by this
tree (``latency_cpu.seeded_graphs``: seeded random weights and calibration images), saved, and compiled twice: by
REV's code in a subprocess (its folder first on ``sys.path``; the module path it imported is checked) and by this
tree, both for this host, at each of ``--batches`` (default 1). Both are checked bit-exact
against the reference executor on random uint8 inputs and timed interleaved
(``ptq2tvm.bench.timing.time_interleaved``: same input, rotated order, 3 calls back to back per turn) at each thread
count. Writes ``<out>.json`` (rows with the CPU model, ISA, load) and ``<out>.md`` and prints the table. Exit status 1
when a build is not bit-exact.

``--kernels``: also the kernels of both builds one by one, in network order with the arguments of one inference
(``layer_gap.so_kernels``), the two sequences alternating for ``--repeats`` turns: per-kernel medians and their
sums. On a host where a whole-network ratio within +-5% is noise, a change to a few kernels shows here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency_cpu import seeded_graphs  # noqa: E402

from ptq2tvm.api import compile_so  # noqa: E402
from ptq2tvm.atomic import write_json, write_text  # noqa: E402
from ptq2tvm.backend.isa import host_isa  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.bench.timing import time_interleaved  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402

_COMPILE_BEFORE = """
import sys
sys.path.insert(0, sys.argv[1])
import kernels, ptq2tvm
for mod in (kernels, ptq2tvm):
    assert mod.__file__.startswith(sys.argv[1]), f"imported {mod.__file__}, not the archived revision"
from ptq2tvm.api import compile_so
from ptq2tvm.ir.graph import IntegerGraph
compile_so(IntegerGraph.load(sys.argv[2]), sys.argv[3], batch=int(sys.argv[4]))
"""


def archive(rev: str, dest: Path) -> str:
    """Extract ``kernels/`` and ``ptq2tvm/`` of git revision ``rev`` into ``dest``; -> the full commit hash."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kernels", "ptq2tvm"], check=True,
                         capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return commit


def compile_before(tree: Path, graph_path: Path, so: Path, batch: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", _COMPILE_BEFORE, str(tree), str(graph_path), str(so), str(batch)],
                   check=True, env=env, cwd=str(tree))


def _compare(args: argparse.Namespace, name: str, w: int, a: int, batch: int, graph, graph_path: Path,
             shape: tuple[int, ...], tmp: Path, host: dict, isa: str) -> list[dict]:
    """Both builds of one (model, bits, batch): bit-exactness on 2 batches of random codes, interleaved timing."""
    stem = f"{name}_w{w}a{a}_b{batch}"
    sos = {"before": tmp / f"{stem}_before.so", "after": tmp / f"{stem}_after.so"}
    compile_before(tmp / "before", graph_path, sos["before"], batch)
    compile_so(graph, sos["after"], batch=batch)
    q = np.random.default_rng(1).integers(0, 256, (2 * batch, *shape), dtype=np.uint8)
    ref = np.asarray(run_reference(graph, q))
    rows = []
    for threads in args.threads:
        builds = {k: CompiledModel(so, threads=threads) for k, so in sos.items()}
        exact = {k: bool(np.array_equal(np.asarray(m.run_int(q)), ref)) for k, m in builds.items()}
        load = os.getloadavg()[0]
        stats = time_interleaved({k: m.run_int for k, m in builds.items()}, q[:batch], warmup=5,
                                 repeats=args.repeats, threads=threads, progress=False, calls_per_turn=3)
        row = dict(model=name, input="x".join(map(str, shape)), batch=batch, w_bits=w, a_bits=a,
                   threads=threads, before_ms=round(stats["before"].median_ms, 4),
                   after_ms=round(stats["after"].median_ms, 4),
                   speedup=round(stats["before"].median_ms / stats["after"].median_ms, 3),
                   bit_exact=exact, loadavg_1min=round(load, 2), cpu=host.get("model_name"), isa=isa)
        if args.kernels:
            row["kernels"] = kernel_sequences(sos, graph, (batch, *shape), args.repeats)
        rows.append(row)
        print(f"{name:14s} W{w}A{a} b{batch} {threads}T  before {row['before_ms']:8.3f} ms  after "
              f"{row['after_ms']:8.3f} ms  x{row['speedup']:.2f}  bit-exact {exact}  load {load:.2f}", flush=True)
    return rows


def kernel_sequences(sos: dict[str, Path], graph, input_shape: tuple[int, ...], turns: int) -> dict:
    """Both builds' kernels replayed one by one in network order (``layer_gap.so_kernels``: the arguments of one
    inference on a seeded float input), the two sequences alternating (order rotated) for ``turns`` turns after one
    warm-up turn; -> {build: {"kernels": [[symbol, median ms], ...], "sum_ms": median of the sequence's total}}."""
    from layer_gap import so_kernels

    x = np.random.default_rng(0).random(input_shape, dtype=np.float32)
    seqs = {k: so_kernels(so, x, graph) for k, so in sos.items()}
    times = {k: [[] for _ in seq] for k, seq in seqs.items()}
    totals: dict[str, list[float]] = {k: [] for k in seqs}
    clock = time.perf_counter_ns
    for turn in range(turns + 1):
        for k in (list(seqs) if turn % 2 == 0 else list(seqs)[::-1]):
            total = 0
            for i, (_, fn, call_args, _) in enumerate(seqs[k]):
                t = clock()
                fn(*call_args)
                dt = clock() - t
                total += dt
                if turn:
                    times[k][i].append(dt / 1e6)
            if turn:
                totals[k].append(total / 1e6)
    return {k: dict(kernels=[[sym, round(float(np.median(times[k][i])), 4)] for i, (sym, *_) in enumerate(seq)],
                    sum_ms=round(float(np.median(totals[k])), 4)) for k, seq in seqs.items()}


def _kernel_table(rows: list[dict]) -> list[str]:
    """Markdown of the ``kernels`` of each row: the kernels whose symbol is in one build only or whose median moved
    by more than 2%, and the sums."""
    lines = []
    for r in rows:
        if "kernels" not in r:
            continue
        kb, ka = (dict(r["kernels"][k]["kernels"]) for k in ("before", "after"))
        lines += ["", f"Kernels of {r['model']} W{r['w_bits']}A{r['a_bits']} batch {r['batch']}, {r['threads']} "
                  f"thread(s), one by one in network order (medians; only those in one build or moved by > 2%):", "",
                  "| kernel | before ms | after ms |", "|---|---:|---:|"]
        for sym in dict.fromkeys([*kb, *ka]):
            b, a = kb.get(sym), ka.get(sym)
            if b is None or a is None or abs(a / b - 1) > 0.02:
                lines.append(f"| {sym} | {'-' if b is None else f'{b:.3f}'} | {'-' if a is None else f'{a:.3f}'} |")
        sb, sa = r["kernels"]["before"]["sum_ms"], r["kernels"]["after"]["sum_ms"]
        lines.append(f"| **all kernels (sum)** | **{sb:.3f}** | **{sa:.3f}** ({sb / sa:.3f}x) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare against (e.g. a commit hash, HEAD~1)")
    p.add_argument("--models", nargs="+", default=["resnet_small", "resnet18", "mobilenet_v2"])
    p.add_argument("--bits", nargs="+", default=["7/8", "8/8", "4/4"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batches", nargs="+", type=int, default=[1], help="images per call (one build each)")
    p.add_argument("--repeats", type=int, default=30, help="timed turns per build and thread count")
    p.add_argument("--kernels", action="store_true",
                   help="also time both builds' kernels one by one in network order (see the module docstring)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "commit_ab"))
    args = p.parse_args(argv)
    host = cpu_features()
    isa = host_isa() or "none"
    after = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                           text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = archive(args.before, tmp / "before")
        for name in args.models:
            _, images, graphs = seeded_graphs(name, args.bits)
            shape = images.shape[1:]
            for (w, a), graph in graphs.items():
                graph_path = graph.save(tmp / f"{name}_w{w}a{a}.qgraph")
                for batch in args.batches:
                    rows += _compare(args, name, w, a, batch, graph, graph_path, shape, tmp, host, isa)
    command = " ".join(["benchmarks/commit_ab.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    write_json(out.with_suffix(".json"), dict(command=command, before=before, after=after,
                                              created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=rows))
    batches = "/".join(map(str, args.batches))
    lines = [f"# Compiler A/B: {before[:10]} (before) vs {after} (after), batch {batches}, "
             f"{host.get('model_name')} ({isa})",
             "", f"Command: `.venv/bin/python {command}`", "",
             "| model | W/A | batch | threads | before ms | after ms | speedup | bit-exact (both) | load |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {r['batch']} | {r['threads']} | "
                     f"{r['before_ms']:.3f} | {r['after_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{all(r['bit_exact'].values())} | "
                     f"{r['loadavg_1min']} |")
    lines += ["", "Medians of interleaved runs in one process (3 calls back to back per turn); the ratio is the "
              "comparable number on a shared host. Random weights (benchmarks/latency_cpu.py's models); both "
              "builds compile the same saved integer graph."]
    lines += _kernel_table(rows)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0 if all(all(r["bit_exact"].values()) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
