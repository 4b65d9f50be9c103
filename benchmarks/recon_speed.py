"""Reconstruction speed before/after, in one process: iterations/s, wall time and peak RSS per unit.

    .venv/bin/python benchmarks/recon_speed.py                          # resnet_small W2A4 QDrop+AdaQ, b32, 2 threads
    .venv/bin/python benchmarks/recon_speed.py --threads 1 --iters 40 --rounds 3

For every reconstruction unit of the model (block units, inputs/targets cached from the RTN model) the same
``optimize_unit`` call runs with the code path of before the speed work (``legacy_code_path()``: the plain autograd
activation quantizers, torch.rand + torch.where QDrop masks, pow loss) and the current one, each on a fresh copy of
the model, interleaved round by round (order alternating), so both see the same machine load. Reported per unit:
median iterations/s of the optimisation loop, the ratio, the wall time per unit at ``--report-iters`` iterations
(loop time scaled + the unit's measured caching/evaluation time), and the peak RSS during the unit (VmHWM reset per
call). The machine load (os.getloadavg) is recorded: on a shared machine absolute numbers move, ratios much less.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.atomic import write_text  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.frontend.calibrate import quantize_rtn  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.reconstruct.recon import (ReconSettings, Stream, UnitRunner, _later_inputs, _seed_for,  # noqa: E402
                                       default_lambda, legacy_code_path, lp_loss, optimize_unit, stages_for)
from ptq2tvm.reconstruct.units import discover_units  # noqa: E402


def load_model(name: str, dataset: str, trained: bool) -> torch.nn.Module:
    if trained:
        from ptq2tvm.train import train_builtin

        return train_builtin(name, dataset=dataset, progress=False)[0].eval()
    from ptq2tvm.models import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=1).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_small")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--trained", action="store_true", help="use the cached trained model (else a seeded random "
                   "init: the speed is the same)")
    p.add_argument("--bits", default="W2A4")
    p.add_argument("--method", default="qdrop")
    p.add_argument("--no-adaq", action="store_true")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30, help="iterations per timed call")
    p.add_argument("--rounds", type=int, default=3, help="interleaved (old, new) rounds per unit")
    p.add_argument("--report-iters", type=int, default=2000, help="iterations per unit for the wall-time column")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recon_speed"))
    args = p.parse_args(argv)

    from ptq2tvm.data import calibration_set

    torch.set_num_threads(args.threads)
    w, a = (int(v) for v in args.bits.upper()[1:].split("A"))
    calib = calibration_set(args.dataset, args.calib, seed=0)
    model = load_model(args.model, args.dataset, args.trained)
    settings = ReconSettings(method=args.method, adaqtransform=not args.no_adaq, iters=args.iters,
                             batch_size=args.batch_size, seed=0, device="cpu")
    qm = quantize_rtn(model, calib, QuantConfig(w, a), progress=False)
    fp = copy.deepcopy(qm).set_quant(weights=False, acts=False)
    for prm in list(qm.parameters()) + list(fp.parameters()):
        prm.requires_grad_(False)
    if settings.adaqtransform:
        qm.enable_adaq()
        for prm in qm.parameters():
            prm.requires_grad_(False)
    lam = default_lambda(qm)
    stage = stages_for(settings)[0]
    units = discover_units(qm.graph, settings.resolved_granularity)
    images = torch.from_numpy(np.ascontiguousarray(calib))
    qm.set_quant(weights=True, acts=stage.acts_on)
    stream = Stream(qm, fp, images, stage.acts_on, settings.chunk)
    load0 = os.getloadavg()
    rows = []
    t_all = time.perf_counter()
    for ui, unit in enumerate(units):
        tgt = stream.targets(unit)
        seed = _seed_for(0, "", 0, ui, unit.name)
        res: dict[str, list[dict]] = {"old": [], "new": []}
        floor: list[float] = []
        for r in range(args.rounds):
            for path in (("old", "new") if r % 2 == 0 else ("new", "old")):
                work = copy.deepcopy(qm)
                with legacy_code_path(path == "old"):
                    res[path].append(optimize_unit(work, unit, stage, settings, lam, stream.q, stream.f, tgt, seed))
            floor.append(fp32_step_rate(fp, unit, stream.q, tgt, args.batch_size, args.iters, seed))
        row = dict(unit=unit.name, kind=unit.kind)
        for path in ("old", "new"):
            rates = [c["iters_per_s"] for c in res[path]]
            over = statistics.median(c["seconds"] - c["optim_seconds"] for c in res[path])
            rate = statistics.median(rates)
            row[f"{path}_it_s"] = round(rate, 2)
            row[f"{path}_it_s_all"] = [round(x, 2) for x in rates]
            row[f"{path}_wall_s_at_report_iters"] = round(args.report_iters / rate + over, 1)
            row[f"{path}_peak_rss_mb"] = max(c.get("peak_rss_mb", 0.0) for c in res[path])
            row[f"{path}_final_loss"] = statistics.median(c["final_loss"] for c in res[path])
        row["speedup"] = round(row["new_it_s"] / row["old_it_s"], 2)
        row["fp32_step_it_s"] = round(statistics.median(floor), 2)
        row["bound"] = round(row["fp32_step_it_s"] / row["old_it_s"], 2)
        rows.append(row)
        print(f"{unit.name:24s} old {row['old_it_s']:7.2f} it/s  new {row['new_it_s']:7.2f} it/s  "
              f"x{row['speedup']:.2f}  rss {row['old_peak_rss_mb']:.0f}/{row['new_peak_rss_mb']:.0f} MB", flush=True)
        stream.advance(unit, _later_inputs(units, ui), fp_out=tgt)
    load1 = os.getloadavg()

    def total(path: str) -> float:
        return sum(r[f"{path}_wall_s_at_report_iters"] for r in rows)

    def overall(path: str) -> float:      # iterations/s over the whole model (every unit the same iterations)
        return len(rows) / sum(1.0 / r[f"{path}_it_s"] for r in rows)

    summary = dict(model=args.model, bits=args.bits, method=args.method, adaqtransform=settings.adaqtransform,
                   batch_size=args.batch_size, threads=args.threads, iters_per_call=args.iters, rounds=args.rounds,
                   calib=args.calib, trained=args.trained, torch=torch.__version__, loadavg_start=load0,
                   loadavg_end=load1, seconds=round(time.perf_counter() - t_all, 1),
                   old_it_s_overall=round(overall("old"), 2), new_it_s_overall=round(overall("new"), 2),
                   speedup_overall=round(overall("new") / overall("old"), 2),
                   fp32_step_it_s_overall=round(len(rows) / sum(1.0 / r["fp32_step_it_s"] for r in rows), 2),
                   report_iters=args.report_iters, old_wall_s=round(total("old"), 1),
                   new_wall_s=round(total("new"), 1), cpu=cpu_features(llvm=False)["model_name"], units=rows)
    out = Path(args.out)
    write_text(out.with_suffix(".json"), json.dumps(summary, indent=1))
    write_text(out.with_suffix(".md"), markdown(summary, argv if argv is not None else sys.argv[1:]))
    print(markdown(summary, argv if argv is not None else sys.argv[1:]))
    return 0


def fp32_step_rate(fp: torch.nn.Module, unit, q_in: dict, tgt: dict, batch: int, iters: int, seed: int) -> float:
    """Iterations/s of the unit's plain FP32 training step at the same batch (quantizers off, no QDrop, no
    AdaRound/AdaQTransform variables: the conv/linear forward, the weight and input gradients, an MSE loss): the
    floor of any reconstruction that learns the unit's weights, so ``fp32 / old`` bounds the attainable speedup."""
    work = copy.deepcopy(fp)
    runner = UnitRunner(work)
    layers = [work.layer(n) for n in unit.layers]
    for layer in layers:
        layer.weight.requires_grad_(True)
    opt = torch.optim.Adam([layer.weight for layer in layers], lr=1e-6)
    gen = torch.Generator().manual_seed(seed)
    n_rows = next(iter(q_in.values())).shape[0]

    def step() -> None:
        idx = torch.randperm(n_rows, generator=gen)[:batch]
        env = runner.run(unit, {t: q_in[t].index_select(0, idx) for t in unit.inputs})
        loss = sum(lp_loss(env[t], tgt[t].index_select(0, idx)) for t in unit.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return iters / (time.perf_counter() - t0)


def markdown(s: dict, argv: list[str]) -> str:
    lines = [f"# Reconstruction speed: before/after in one process ({s['model']} {s['bits']} {s['method']}"
             f"{' + AdaQTransform' if s['adaqtransform'] else ''}, batch {s['batch_size']}, {s['threads']} threads)",
             "", f"Command: `.venv/bin/python benchmarks/recon_speed.py {' '.join(argv)}`", "",
             f"{s['cpu']}, torch {s['torch']}; load average {s['loadavg_start'][0]:.1f} at the start, "
             f"{s['loadavg_end'][0]:.1f} at the end (shared machine: absolute rates move with the load, the "
             f"interleaved ratios much less). {s['iters_per_call']} iterations per call, {s['rounds']} interleaved "
             "rounds per unit, medians. 'old' = the code before the speed work (`legacy_code_path()`), 'new' = now. "
             f"Wall per unit = {s['report_iters']} iterations at the median rate + the unit's caching/evaluation "
             "time; RSS = peak resident memory of the process during the unit.", "",
             "'FP32 step' = the unit's plain FP32 training step at the same batch (conv/linear forward, weight and "
             "input gradients, MSE, Adam; no quantizers, QDrop or AdaRound variables): the floor of any "
             "reconstruction that learns the unit's weights; 'bound' = FP32 step / old = the largest speedup over "
             "'old' that removing every quantization cost could give.", "",
             "| unit | kind | old it/s | new it/s | speedup | FP32 step it/s | bound | old wall s | new wall s | "
             "old peak RSS MB | new peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["units"]:
        lines.append(f"| {r['unit']} | {r['kind']} | {r['old_it_s']:.2f} | {r['new_it_s']:.2f} | x{r['speedup']:.2f} | "
                     f"{r['fp32_step_it_s']:.2f} | x{r['bound']:.2f} | {r['old_wall_s_at_report_iters']:.0f} | {r['new_wall_s_at_report_iters']:.0f} | "
                     f"{r['old_peak_rss_mb']:.0f} | {r['new_peak_rss_mb']:.0f} |")
    lines.append(f"| **all units** | | {s['old_it_s_overall']:.2f} | {s['new_it_s_overall']:.2f} | "
                 f"**x{s['speedup_overall']:.2f}** | {s['fp32_step_it_s_overall']:.2f} | "
                 f"x{s['fp32_step_it_s_overall'] / s['old_it_s_overall']:.2f} | {s['old_wall_s']:.0f} | {s['new_wall_s']:.0f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
