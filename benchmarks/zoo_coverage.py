"""Model coverage: every zoo family quantized (W8A8, calibration only, seeded random weights), folded, compiled to a
.so and checked bit-exact against the reference executor.

    .venv/bin/python benchmarks/zoo_coverage.py                       # full sizes (224; EDSR 64x64 LR), ~tens of min
    .venv/bin/python benchmarks/zoo_coverage.py --size 64 --out benchmarks/results/zoo_coverage_64

Writes <out>.json and <out>.md and prints the table. Random weights (BN statistics randomized too, so that no
channel is trivially constant): this measures whether the integer pipeline takes the model and stays exact, not
accuracy (see benchmarks/coverage_fmnist.py for trained models on real data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq2tvm.api import compile_so, to_integer  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel  # noqa: E402
from ptq2tvm.frontend.calibrate import quantize_rtn  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402
from ptq2tvm.models import create_model, model_task  # noqa: E402

FAMILIES = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "regnet_x_400mf", "regnet_y_400mf",
            "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121", "edsr_x2", "edsr_x4", "resnet18_fpn"]


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def run_one(name: str, size: int | None, workdir: Path) -> dict:
    row: dict = {"model": name}
    torch.manual_seed(0)
    model = create_model(name).eval()
    _randomize_bn(model, 0)
    sr = model_task(name) == "super_resolution"
    hw = size or (64 if sr else 224)
    row["input"] = f"3x{hw}x{hw}"
    rng = np.random.default_rng(0)
    calib = rng.normal(0, 1, (4, 3, hw, hw)).astype(np.float32)
    t0 = time.perf_counter()
    try:
        qm = quantize_rtn(model, calib, QuantConfig(w_bits=8, a_bits=8), progress=False)
        graph = to_integer(qm)
        row["nodes"] = len(graph.nodes)
        row["ops"] = sorted({n.op for n in graph.nodes})
        row["outputs"] = len(graph.output_names)
        t1 = time.perf_counter()
        res = compile_so(graph, workdir / f"{name}.so", batch=1)
        row["build_s"] = round(time.perf_counter() - t1, 1)
        row["stored_weight_bytes"] = res.meta.get("stored_weight_bytes")
        cm = CompiledModel(workdir / f"{name}.so")
        # a few inputs: two calibration images (the quantized activations' usual range) and two uniform random codes
        # (saturating every layer), run one at a time through the batch-1 .so
        q = np.concatenate([graph.input.quantize(calib[:2]),
                            rng.integers(0, 256, (2, 3, hw, hw)).astype(np.uint8)])
        t1 = time.perf_counter()
        got = [_as_list(cm.run_int(q[i:i + 1])) for i in range(len(q))]
        row["so_run_s"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        ref = [_as_list(run_reference(graph, q[i:i + 1])) for i in range(len(q))]
        row["reference_s"] = round(time.perf_counter() - t1, 1)
        got = [np.concatenate(v) for v in zip(*got)]
        ref = [np.concatenate(v) for v in zip(*ref)]
        row["inputs"] = len(q)
        bad = sum(int((g != r).sum()) for g, r in zip(got, ref))
        row["elements"] = sum(int(r.size) for r in ref)
        row["mismatches"] = bad
        row["status"] = "bit-exact" if bad == 0 else f"{bad} mismatches"
    except Exception as e:  # noqa: BLE001 - a coverage table records every failure
        row["status"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc(limit=3)
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


def _run_isolated(name: str, size: int | None, timeout: float, workdir: Path) -> dict:
    """Run one family in a child process (its own memory, killed after ``timeout`` seconds)."""
    row_file = workdir / f"{name}.row.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--row-file", str(row_file),
           "--workdir", str(workdir)] + (["--size", str(size)] if size else [])
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the compilers it started
        proc.communicate()
        return {"model": name, "input": "", "status": f"TIMEOUT after {timeout:.0f} s (wall)",
                "total_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_children_cpu() - cpu0, 1)}
    if row_file.exists():
        row = json.loads(row_file.read_text())
        row["total_s"], row["cpu_s"] = round(time.perf_counter() - t0, 1), round(_children_cpu() - cpu0, 1)
        return row
    tail = (err or "").strip().splitlines()[-1:] or ["no output"]
    return {"model": name, "input": "", "status": f"FAIL: child exited {proc.returncode}: {tail[0][:200]}",
            "total_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--size", type=int, default=None, help="input H=W for every model (default: 224, EDSR 64)")
    ap.add_argument("--out", default="benchmarks/results/zoo_coverage")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per family (each runs in a child process)")
    ap.add_argument("--merge", action="store_true",
                    help="update the rows of these models in an existing <out>.json (a rerun of some families)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        row = run_one(args.one, args.size, Path(args.workdir))
        Path(args.row_file).write_text(json.dumps(row))
        return
    rows: list[dict] = []
    old: list[dict] = []
    if args.merge and Path(args.out).with_suffix(".json").exists():
        old = json.loads(Path(args.out).with_suffix(".json").read_text())["rows"]
    with tempfile.TemporaryDirectory(prefix="zoo_cov_") as td:
        for name in args.models.split(","):
            row = _run_isolated(name, args.size, args.timeout, Path(td))
            row["load_average"] = [round(v, 1) for v in os.getloadavg()]
            rows.append(row)
            if old:
                row["command"] = "python " + " ".join(sys.argv)
            print(f"{name:22s} {row['input']:>10s} {row['status']} ({row['total_s']} s)", flush=True)
            _write(args, _merged(old, rows))  # partial results after every family
    print(Path(args.out).with_suffix(".md").read_text())


def _merged(old: list[dict], new: list[dict]) -> list[dict]:
    by_name = {r["model"]: r for r in new}
    out = [by_name.pop(r["model"], r) for r in old]
    return out + list(by_name.values())


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    prev = {}
    if args.merge and Path(args.out).with_suffix(".json").exists():
        prev = json.loads(Path(args.out).with_suffix(".json").read_text())["meta"]
    cpu_model = cpu_features(llvm=False)["model_name"]    # "unknown" without /proc/cpuinfo
    meta = {"command": prev.get("command", "python " + " ".join(sys.argv)),
            "cpu": platform.processor() or platform.machine(),
            "cpu_model": cpu_model if cpu_model != "unknown" else platform.processor(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Zoo coverage (W8A8, seeded random weights, .so vs reference executor)", "",
             f"Command: `{meta['command']}`; host: {meta['cpu_model']}; load average at the end "
             f"{tuple(round(v, 1) for v in meta['load_average'])} (builds ran on a shared machine).", "",
             "| model | input | nodes | outputs | ops | build s | reference s | inputs | output elements | "
             "cpu s | total s | load avg | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r.get('nodes', '')} | {r.get('outputs', '')} | "
                     f"{' '.join(r.get('ops', []))} | {r.get('build_s', '')} | {r.get('reference_s', '')} | "
                     f"{r.get('inputs', '')} | {r.get('elements', '')} | {r.get('cpu_s', '')} | {r.get('total_s', '')} | "
                     f"{r.get('load_average', [''])[0]} | "
                     f"{r['status']} |")
    lines += ["", "cpu s: CPU seconds of the family's process and the compilers it ran; total s: wall seconds (the load "
              "average column shows how far the machine was shared)."]
    lines += [f"- {r['model']} rerun: `{r['command']}`" for r in rows if r.get("command")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
