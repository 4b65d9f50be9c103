"""A/B of the AVX2 arithmetic shortcuts: the same integer graph compiled with and without them, in one process.

    .venv/bin/python benchmarks/shortcuts_ab.py [--models resnet_small resnet18 mobilenet_v2] [--bits 4/4 8/8]
                                                [--threads 1] [--repeats 30] [--out benchmarks/results/shortcuts_ab]

The shortcuts (kernels/README.md) are proved per layer by the builder: int16 accumulators for ``vpmaddubsw`` convs
(``kernels.u8s8_int16_group``), int16 depthwise sums (``kernels.depthwise_int16_exact``) and the int32-clamp requant
epilogue (``kernels.shifts_allow_int32_epilogue``). ``PTQ2TVM_BASELINE_KERNELS=1`` at compile time builds without
them. For every (model, bits) both builds are checked bit-exact against the reference executor on random inputs and
timed interleaved (``ptq2tvm.bench.timing.time_interleaved``: same input, same threads, rotated order, 3 calls back to
back per turn), batch 1; medians and the ratio. Models have seeded random weights and random calibration images, as
in benchmarks/latency_cpu.py (latency does not depend on the weights' values; which layers the proofs admit does, a
little). Writes ``<out>.json`` (rows with the CPU model, ISA, load and the kernels using each shortcut) and
``<out>.md``, and prints the table. Meant for AVX2 hosts (elsewhere most shortcuts do not apply).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency_cpu import seeded_graphs  # noqa: E402

from ptq2tvm.api import compile_so  # noqa: E402
from ptq2tvm.atomic import write_json, write_text  # noqa: E402
from ptq2tvm.backend.blocked_builder import BASELINE_KERNELS_ENV  # noqa: E402
from ptq2tvm.backend.isa import host_isa  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel, set_num_threads  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.bench.timing import time_interleaved  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402


def build(graph, so: Path, baseline: bool, threads: int) -> CompiledModel:
    """Compile ``graph`` with (``baseline=False``) or without the shortcuts and load it."""
    old = os.environ.get(BASELINE_KERNELS_ENV)
    os.environ[BASELINE_KERNELS_ENV] = "1" if baseline else "0"
    try:
        compile_so(graph, so, batch=1)
    finally:
        if old is None:
            os.environ.pop(BASELINE_KERNELS_ENV, None)
        else:
            os.environ[BASELINE_KERNELS_ENV] = old
    return CompiledModel(so, threads=threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet_small", "resnet18", "mobilenet_v2"])
    p.add_argument("--bits", nargs="+", default=["4/4", "8/8"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="timed turns per build")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shortcuts_ab"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    host = cpu_features()
    isa = host_isa() or "none"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            _, images, graphs = seeded_graphs(name, args.bits)
            shape = images.shape[1:]
            for (w, a), graph in graphs.items():
                builds = {k: build(graph, Path(tmp) / f"{name}_w{w}a{a}_{k}.so", k == "baseline", args.threads)
                          for k in ("baseline", "shortcuts")}
                q = np.random.default_rng(1).integers(0, 256, (2, *shape), dtype=np.uint8)
                ref = run_reference(graph, q)
                exact = {k: bool(np.array_equal(np.asarray(m.run_int(q)), np.asarray(ref))) for k, m in builds.items()}
                load = os.getloadavg()[0]
                stats = time_interleaved({k: m.run_int for k, m in builds.items()}, q[:1], warmup=5,
                                         repeats=args.repeats, threads=args.threads, progress=False,
                                         calls_per_turn=3)
                row = dict(model=name, input="x".join(map(str, shape)), batch=1, w_bits=w, a_bits=a,
                           threads=args.threads, baseline_ms=round(stats["baseline"].median_ms, 4),
                           shortcuts_ms=round(stats["shortcuts"].median_ms, 4),
                           speedup=round(stats["baseline"].median_ms / stats["shortcuts"].median_ms, 3),
                           bit_exact=exact, shortcut_kernels=builds["shortcuts"].meta.get("arithmetic_shortcuts"),
                           loadavg_1min=round(load, 2), cpu=host.get("model_name"), isa=isa)
                rows.append(row)
                print(f"{name:14s} W{w}A{a}  baseline {row['baseline_ms']:8.3f} ms  shortcuts {row['shortcuts_ms']:8.3f}"
                      f" ms  x{row['speedup']:.2f}  bit-exact {exact}  {row['shortcut_kernels']}", flush=True)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), dict(command=" ".join(["benchmarks/shortcuts_ab.py", *(argv or sys.argv[1:])]),
                                              created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=rows))
    lines = [f"# AVX2 arithmetic shortcuts: same graph with / without, {args.threads} thread(s), batch 1, "
             f"{host.get('model_name')} ({isa})", "",
             f"Command: `.venv/bin/python benchmarks/shortcuts_ab.py {' '.join(argv or sys.argv[1:])}`", "",
             "| model | W/A | baseline ms | shortcuts ms | speedup | bit-exact (both) | kernels using int16 acc / "
             "int16 depthwise / int32 epilogue | load |", "|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        k = r["shortcut_kernels"] or {}
        lines.append(f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {r['baseline_ms']:.3f} | {r['shortcuts_ms']:.3f}"
                     f" | {r['speedup']:.2f}x | {all(r['bit_exact'].values())} | {k.get('int16_accumulator', 0)} / "
                     f"{k.get('int16_depthwise', 0)} / {k.get('int32_epilogue', 0)} | {r['loadavg_1min']} |")
    lines += ["", "Medians of interleaved runs in one process (3 calls back to back per turn); the ratio is the "
              "comparable number on a shared host. Random weights (benchmarks/latency_cpu.py's models)."]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0 if all(all(r["bit_exact"].values()) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
