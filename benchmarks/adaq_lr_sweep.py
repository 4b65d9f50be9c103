"""AdaQTransform's xi / eta learning rate (the paper does not state it): a small measured sweep.

    nice .venv/bin/python benchmarks/adaq_lr_sweep.py                    # resnet_small W2A4, 250 it/unit, seed 0
    nice .venv/bin/python benchmarks/adaq_lr_sweep.py --models resnet_small,mobilenet_v2_small --bits W2A4,W2A2

Each point is one ``qdrop+adaq`` row of benchmarks/accuracy_fmnist.py (same settings: 1024 calibration images, batch
32, first/last layer 8 bit, one torch thread) with ``--lr-adaq LR``, evaluated on ``--eval-limit`` test images; the
rows go to ``benchmarks/results/adaq_lr_sweep.{json,md}`` with the learned xi range (Adam moves a parameter by at most
about lr per step, so at 250 iterations lr 1e-3 lets xi move only about +-0.25 from 1). The machine is shared: the
load average is recorded per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy_fmnist as acc  # noqa: E402

from ptq2tvm.atomic import write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet_small")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or digits (8x8, trains in seconds)")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--bits", default="W2A4")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--iters", type=int, default=250)
    p.add_argument("--seeds", default="0")
    p.add_argument("--method", default="qdrop+adaq")
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaq_lr_sweep"))
    args = p.parse_args(argv)
    out = Path(args.out)
    for lr in args.lrs.split(","):
        acc.main(["--models", args.models, "--dataset", args.dataset, "--calib", str(args.calib), "--bits", args.bits,
                  "--methods", args.method, "--seeds", args.seeds,
                  "--multi-seed-bits", "all", "--iters", str(args.iters), "--eval-limit", str(args.eval_limit),
                  "--lr-adaq", lr, "--out", str(out), "--quiet"])
        print(f"lr_adaq {lr} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = acc.read_rows(out.with_suffix(".json"))
    lines = ["# AdaQTransform xi / eta learning rate sweep", "",
             f"`nice .venv/bin/python benchmarks/adaq_lr_sweep.py --models {args.models} --dataset {args.dataset} "
             f"--calib {args.calib} --bits {args.bits} "
             f"--lrs {args.lrs} --iters {args.iters} --seeds {args.seeds} --method {args.method} --eval-limit "
             f"{args.eval_limit}`", "",
             f"Fake-quant top-1 on the first eval-limit {args.dataset} test images (.so within 0.1 points), mean over "
             "seeds; xi range and the reconstruction time (shared 2-core machine, heavily loaded: times are "
             "indicative only).", "",
             "| model | W/A | method | it/unit | lr_adaq | seeds | fake-quant | .so | xi min | xi max | |eta| max | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["model"], r["w_bits"], r["a_bits"], acc.method_spec(r).split("(")[0], r["iters"],
                           r.get("lr_adaq")), []).append(r)
    for k in sorted(groups, key=lambda k: (k[0], -k[1], -k[2], k[3], k[4], k[5] or 0)):
        g = groups[k]
        ad = [r.get("adaq") or {} for r in g]
        lines.append(f"| {k[0]} | W{k[1]}A{k[2]} | {k[3]} | {k[4]} | {k[5]:g} | {len(g)} | "
                     f"{100 * statistics.mean(r['fakequant_top1'] for r in g):.2f} | "
                     f"{100 * statistics.mean(r['so_top1'] for r in g):.2f} | "
                     f"{min(a.get('xi_min', 1.0) for a in ad):.3f} | {max(a.get('xi_max', 1.0) for a in ad):.3f} | "
                     f"{max(a.get('eta_absmax', 0.0) for a in ad):.3f} | "
                     f"{statistics.mean(r['seconds'] for r in g):.0f} |")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
