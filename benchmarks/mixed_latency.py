"""Predicted vs measured latency of mixed-precision .so files, all in one process.

    nice .venv/bin/python benchmarks/mixed_latency.py                      # the three models below, 6 plans each
    nice .venv/bin/python benchmarks/mixed_latency.py --models resnet_small --plans 4 --rounds 5

Per model (random weights and random calibration images: latency does not depend on the weights' values): the
per-layer costs (``ptq2tvm.mixed.latency.measure_layer_costs``: every layer kernel with int8 and with packed int4
weights, interleaved with the whole W8A8 network, medians over rounds), then uniform W8A8 / W4A8 and seeded random
W4/W8 plans (a fraction of the free layers at 4 bits; first/last layers at 8), each compiled to a batch-1 .so and
timed round robin (``--rounds`` rounds, each .so once per round: TVM time_evaluator, ``--windows`` windows of
>= ``--window-ms`` ms of back-to-back calls); every figure is the ``--statistic`` (min) over all windows.
``predicted`` = T(W8A8 network measured with the kernels) + sum of per-layer deltas; ``re-anchored`` = the same
scaled by (W8A8 .so measured now / W8A8 network measured with the kernels), i.e. the prediction relative to the
W8A8 .so timed next to the plan's .so. Writes benchmarks/results/mixed_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    _t = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
    os.environ["TVM_NUM_THREADS"] = _t

from ptq2tvm.api import quantize, to_integer  # noqa: E402
from ptq2tvm.atomic import write_json, write_text  # noqa: E402
from ptq2tvm.backend.compile import compile_graph  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.mixed.allocate import fixed_layers  # noqa: E402
from ptq2tvm.mixed.latency import measure_layer_costs, robust_time, time_so  # noqa: E402
from ptq2tvm.models import create_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"resnet_small": (dict(in_channels=1, num_classes=10), (1, 28, 28)),
          "mobilenet_v2_small": (dict(in_channels=1, num_classes=10), (1, 28, 28)),
          "resnet18": ({}, (3, 224, 224))}


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    kwargs, shape = SHAPES[name]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    calib = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    load0 = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    graph8 = to_integer(quantize(model, calib, QuantConfig(8, 8), progress=False))
    costs = measure_layer_costs(graph8, batch=1, rounds=args.cost_rounds, progress=False, statistic=args.statistic)
    cost_s = time.perf_counter() - t0
    layers = list(costs.seconds)
    first, last = fixed_layers(graph8)
    free = [n for n in layers if n not in first | last]
    rng = np.random.default_rng(1)
    plans = [("uniform W8A8", {}), ("uniform W4A8", {n: 4 for n in free})]
    for k in range(args.plans):
        frac = (k + 1) / (args.plans + 1)
        pick = rng.choice(len(free), max(1, round(frac * len(free))), replace=False)
        plans.append((f"random {100 * frac:.0f}% W4", {free[i]: 4 for i in pick}))
    points = []
    for label, w4 in plans:
        w_bits = {n: w4.get(n, 8) for n in layers}
        g = to_integer(quantize(model, calib, QuantConfig(8, 8, layer_w_bits=w_bits), progress=False))
        got = {n: b["w_bits"] for n, b in g.meta["layer_bits"].items()}
        assert got == w_bits, (label, got)
        so = work / f"{name}_{len(points)}.so"
        compile_graph(g, so, batch=1)
        points.append(dict(label=label, n_w4=len(w4), so=str(so),
                           predicted_ms=1e3 * costs.predict_seconds(w_bits), w_bits=w_bits))
    samples: dict[int, list[float]] = {i: [] for i in range(len(points))}
    for r in range(args.rounds):
        order = list(range(len(points)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            time_so(points[i]["so"], repeat=args.windows, min_repeat_ms=args.window_ms, samples=samples[i])
    ref_now = robust_time(samples[0], args.statistic)
    for i, p in enumerate(points):
        p["measured_ms"] = 1e3 * robust_time(samples[i], args.statistic)
        p["measured_ms_median"] = 1e3 * float(np.median(samples[i]))
        p["reanchored_ms"] = 1e3 * costs.predict_seconds(p.pop("w_bits"), reference_seconds=ref_now)
        p["predicted_over_measured"] = p["predicted_ms"] / p["measured_ms"]
        p["reanchored_over_measured"] = p["reanchored_ms"] / p["measured_ms"]
        Path(p.pop("so")).unlink(missing_ok=True)
    return dict(model=name, input_shape=list(shape), layers=len(layers), free_layers=len(free),
                reference_ms=1e3 * costs.reference_seconds, overhead_ms=1e3 * costs.overhead_seconds,
                other_kernels_ms=1e3 * costs.other_seconds, kernels_int8_ms=1e3 * sum(v["int8"] for v in
                                                                                    costs.seconds.values()),
                cost_seconds=round(cost_s, 1), load_at_costs=load0, load_after_timing=[round(v, 2) for v in
                                                                                      os.getloadavg()],
                points=points)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Mixed precision: predicted vs measured .so latency (one process)\n",
             f"Command: `{meta['command']}` ({meta['started']}); host {meta['cpu']}, TVM threads {meta['threads']}, "
             f"every time the {meta.get('statistic', 'min')} over 1 ms timing windows; "
             f"load average at start {meta['load_start']}, at end {meta['load_end']} (a shared 2-core VM with "
             "other engineers' jobs: absolute times are inflated; what matters is predicted / measured).\n",
             "predicted = T(W8A8 network, timed interleaved with the per-layer kernels) + sum of per-layer "
             "(int4 - int8) kernel deltas; re-anchored = predicted x (W8A8 .so measured in the round robin / the "
             "W8A8 network time of the cost measurement).\n"]
    for res in results:
        lines.append(f"## {res['model']} {tuple(res['input_shape'])}: {res['layers']} layers ({res['free_layers']} "
                     f"free), W8A8 network {res['reference_ms']:.3f} ms = int8 layer kernels "
                     f"{res['kernels_int8_ms']:.3f} + other kernels {res['other_kernels_ms']:.3f} + fitted overhead "
                     f"{res['overhead_ms']:.3f} ms; costs measured in {res['cost_seconds']} s at load "
                     f"{res['load_at_costs']}\n")
        lines.append("| plan | W4 layers | predicted ms | measured ms | predicted / measured | re-anchored ms | "
                     "re-anchored / measured |")
        lines.append("|---|---|---|---|---|---|---|")
        for p in res["points"]:
            lines.append(f"| {p['label']} | {p['n_w4']} | {p['predicted_ms']:.3f} | {p['measured_ms']:.3f} | "
                         f"{p['predicted_over_measured']:.3f} | {p['reanchored_ms']:.3f} | "
                         f"{p['reanchored_over_measured']:.3f} |")
        worst = max(abs(p["predicted_over_measured"] - 1) for p in res["points"])
        worst_r = max(abs(p["reanchored_over_measured"] - 1) for p in res["points"])
        lines.append(f"\nlargest error: predicted {100 * worst:.1f} %, re-anchored {100 * worst_r:.1f} %\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet_small,mobilenet_v2_small,resnet18")
    ap.add_argument("--plans", type=int, default=4, help="random W4/W8 plans per model (plus uniform W8A8, W4A8)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the .so timing")
    ap.add_argument("--cost-rounds", type=int, default=7, help="interleaved rounds of the per-layer kernel timing")
    ap.add_argument("--windows", type=int, default=20, help="timing windows per .so per round")
    ap.add_argument("--window-ms", type=int, default=1, help="minimum ms of back-to-back calls per window")
    ap.add_argument("--statistic", default="min", choices=["min", "median"], help="of all timing windows (min: the "
                    "least-disturbed window on a shared host)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="mixed_latency", help="results file stem under benchmarks/results")
    args = ap.parse_args()
    meta = dict(command="nice .venv/bin/python benchmarks/mixed_latency.py " + " ".join(sys.argv[1:]),
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), threads=args.threads,
                statistic=args.statistic,
                cpu=platform.processor() or platform.machine(), load_start=[round(v, 2) for v in os.getloadavg()])
    results = []
    with tempfile.TemporaryDirectory(prefix="mixed_latency_") as work:
        for name in args.models.split(","):
            results.append(run_model(name, args, Path(work)))
            r = results[-1]
            print(f"[{name}] " + "; ".join(f"{p['label']}: pred {p['predicted_ms']:.3f} / meas "
                                           f"{p['measured_ms']:.3f} ms" for p in r["points"]), flush=True)
    meta["load_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.out}.json", dict(meta=meta, results=results))
    md = markdown(results, meta)
    write_text(RESULTS / f"{args.out}.md", md)
    print(md)


if __name__ == "__main__":
    main()
