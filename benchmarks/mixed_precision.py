"""Mixed precision (HAWQ-V3-style ILP) vs uniform W8A8 / W4A8 / W4A4: accuracy against measured .so latency and
stored weight size, and the ILP's predicted latency against the measured latency of each compiled .so.

    nice .venv/bin/python benchmarks/mixed_precision.py                     # both Fashion-MNIST models + ResNet-18
    nice .venv/bin/python benchmarks/mixed_precision.py --models resnet_small --n 2000 --rounds 3

Fashion-MNIST models: trained and cached by the project (``ptq2tvm train``), 512 calibration images, RTN
(calibration-only) PTQ, fake-quant top-1 on the first ``--n`` test images (the .so equals the integer reference bit
for bit: checked on 64 images per point (2 for ResNet-18), and the integer network equals fake-quant on > 99.9% of top-1 decisions,
see ``ptq2tvm parity``). ResNet-18 at 224x224: random weights, latency only (its ILP uses the weight-only proxy
||Q(W)-W||^2 / n as sensitivity: a Hessian of random weights means nothing).

Sensitivity: HAWQ Omega with Gauss-Newton traces (``--estimator``; never negative) or the FP32-output MSE of each
layer quantized alone. Writes benchmarks/results/mixed_precision.{json,md,png}. Latency: every .so compiled at
batch 1, timed round robin (``--rounds`` rounds; per round each .so: TVM time_evaluator, 20 windows of >= 1 ms),
the minimum over all windows (the least-disturbed window on a shared host; the per-layer costs use the same
statistic). Predicted latency: the ILP's cost model (W8A8 network timed with the kernels + per-layer deltas,
``ptq2tvm.mixed.latency``) and the same re-anchored on the uniform W8A8 .so of the round robin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":          # TVM's thread pool reads this when it starts (before the first kernel runs)
    _t = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
    os.environ["TVM_NUM_THREADS"] = _t

from ptq2tvm.api import quantize, to_integer, top1_torch  # noqa: E402
from ptq2tvm.atomic import write_json, write_text  # noqa: E402
from ptq2tvm.backend.compile import compile_graph  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402
from ptq2tvm.mixed.allocate import MixedPlan, allocate  # noqa: E402
from ptq2tvm.mixed.latency import robust_time, time_so  # noqa: E402
from ptq2tvm.mixed.layerbits import bits_summary  # noqa: E402
from ptq2tvm.mixed.pipeline import run_layer_costs, run_sensitivity  # noqa: E402
from ptq2tvm.mixed.sensitivity import LayerSensitivity, SensitivityReport  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UNIFORM = [(8, 8), (4, 8), (4, 4), (2, 4)]


def _sqnr(y: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / max(((y - ref) ** 2).sum(), 1e-30)))


def _proxy_report(model: torch.nn.Module, graph8, candidates) -> SensitivityReport:
    """Weight-only ||Q(W)-W||^2 / n per layer and candidate (random-weight ResNet-18: no meaningful Hessian)."""
    from ptq2tvm.frontend.quantizers import WeightQuantizer
    from ptq2tvm.frontend.trace import trace_model

    g = trace_model(model, tuple(graph8.input.shape))
    layers = []
    for n in g.nodes:
        if n.op not in ("conv", "linear"):
            continue
        lay = LayerSensitivity(n.name, n.op, int(n.weight.numel()), n.inputs[0], 0, 1, 1.0, 0.0, 0.0, 0.0)
        for w, a in candidates:
            q = WeightQuantizer(w, n.weight.shape[0])
            q.init_scale(n.weight)
            with torch.no_grad():
                e = float((q(n.weight) - n.weight).square().mean())
            lay.candidates[f"W{w}A{a}"] = dict(omega_w=e, omega_x=0.0, omega=e, output_mse=e, output_sqnr_db=0.0)
        layers.append(lay)
    return SensitivityReport(layers, [list(c) for c in candidates], "proxy ||Q(W)-W||^2/n", 0, 0, 0, "proxy")


def _model_and_calibration(name: str, data: str) -> tuple[torch.nn.Module, np.ndarray]:
    """ResNet-18 at 224: seeded random weights and 8 random images (latency only); the small models: the cached
    trained checkpoint and 512 calibration images (seed 0)."""
    if name == "resnet18":
        from ptq2tvm.models import create_model

        torch.manual_seed(0)
        return (create_model("resnet18").eval(),
                np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32))
    from ptq2tvm.data import calibration_set
    from ptq2tvm.train import train_builtin

    return train_builtin(name, dataset=data, progress=False)[0], calibration_set(data, 512, seed=0)


def _time_round_robin(live: list[dict[str, Any]], so_key: str, rounds: int) -> dict[str, list[float]]:
    """Every point's .so (``p[so_key]``) timed ``rounds`` times round robin (the start rotating), 20 windows of
    >= 1 ms each: label -> every window's seconds."""
    samples: dict[str, list[float]] = {p["label"]: [] for p in live}
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for p in order:
            time_so(p[so_key], repeat=20, min_repeat_ms=1, samples=samples[p["label"]])
    return samples


def run_model(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from ptq2tvm.data import load_dataset

    work = out_dir / (name if name == "resnet18" else f"{name}_{args.data}")
    work.mkdir(parents=True, exist_ok=True)
    latency_only = name == "resnet18"
    model, calib = _model_and_calibration(name, args.data)
    test = None if latency_only else load_dataset(args.data, split="test", limit=args.n)
    t0 = time.perf_counter()
    qm8 = quantize(model, calib, QuantConfig(8, 8), progress=False)
    graph8 = to_integer(qm8)
    costs = run_layer_costs(graph8, work, batch=1, progress=not args.quiet)
    print(f"[{name}] per-layer costs: {costs.measured} kernels measured, {costs.cached} cached "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    from ptq2tvm.mixed.layerbits import CANDIDATES

    if latency_only:
        rep = _proxy_report(model, graph8, CANDIDATES)
    else:
        rep = run_sensitivity(model, calib, work, samples=args.samples, progress=not args.quiet,
                              estimator=args.estimator)
        print(f"[{name}] sensitivity in {rep.seconds} s", flush=True)
    fp_out = None if test is None else model(torch.from_numpy(test.images[:512])).detach().numpy()
    fp_top1 = None if test is None else top1_torch(model, test.images, test.labels)

    points: list[dict[str, Any]] = []
    for w, a in UNIFORM:
        cfg = QuantConfig(w, a)
        points.append(dict(label=f"uniform W{w}A{a}", kind="uniform", config=cfg))
    # budgets: the uniform W4A4 figures (size, BOPs) and fractions of W8A8
    w4a4 = to_integer(quantize(model, calib, QuantConfig(4, 4), progress=False))
    lb = {n: b["w_bits"] for n, b in w4a4.meta["layer_bits"].items()}
    size_w4a4 = costs.predict_bytes(lb)
    bops_w4a4 = sum(costs.macs[n] * b["w_bits"] * b["a_bits"] for n, b in w4a4.meta["layer_bits"].items())
    plans = []
    specs = ([("size = W4A4", {"size": f"{size_w4a4}b"}),
              ("size + BOPs = W4A4", {"size": f"{size_w4a4}b", "bops": f"{bops_w4a4 / 1e9}G"}),
              ("BOPs = 0.5 W8A8", {"bops": "0.5"}),
              ("size 0.6 W8A8", {"size": "0.6"}),
              ("size 0.75 W8A8", {"size": "0.75"}),
              ("size 0.3 W8A8", {"size": "0.3"}),
              ("size 0.4 W8A8", {"size": "0.4"}),
              ("latency 0.8 W8A8", {"latency": "0.8"}),
              ("latency 0.9 W8A8", {"latency": "0.9"})] if not latency_only else
             [("size 0.75 W8A8", {"size": "0.75"}), ("size 0.6 W8A8", {"size": "0.6"}),
              ("latency 0.8 W8A8", {"latency": "0.8"}), ("latency 0.9 W8A8", {"latency": "0.9"})])
    measures = ["hessian"] if latency_only else ["hessian", "output"]
    if args.specs:
        keep = set(args.specs.split(";"))
        specs = [sp for sp in specs if sp[0] in keep]
    for label, budgets in specs:
        for measure in measures:
            if measure == "output" and label not in ("size + BOPs = W4A4", "BOPs = 0.5 W8A8"):
                continue
            try:
                plan = allocate(rep, costs, graph8, budgets, measure)
            except Exception as e:  # noqa: BLE001 - an infeasible budget is a result
                points.append(dict(label=f"ILP {label} ({measure})", kind="ilp", error=str(e)))
                continue
            plans.append(plan)
            points.append(dict(label=f"ILP {label} ({measure})", kind="ilp", config=plan.config(QuantConfig()),
                               plan=plan.to_dict()))
    # quantize, compile, check, evaluate every point
    for i, p in enumerate(points):
        if "config" not in p:
            continue
        cfg = p.pop("config")
        qm = quantize(model, calib, cfg, progress=False)
        graph = to_integer(qm)
        bits = graph.meta["layer_bits"]
        so = work / f"point{i}.so"
        res = compile_graph(graph, so, batch=1)
        cm = CompiledModel(so)
        q = graph.input.quantize(calib[:2] if test is None else test.images[:64])
        p["bit_exact_vs_reference"] = bool(np.array_equal(cm.run_int(q), run_reference(graph, q)))
        p["bits"] = {n: [b["w_bits"], b["a_bits"]] for n, b in bits.items()}
        p["bits_summary"] = bits_summary(bits)
        p["stored_weight_bytes"] = int(res.meta["stored_weight_bytes"])
        p["bops"] = int(sum(costs.macs[n] * b["w_bits"] * b["a_bits"] for n, b in bits.items()))
        p["w_bits"] = {n: b["w_bits"] for n, b in bits.items()}
        p["a_bits"] = {n: b["a_bits"] for n, b in bits.items()}
        p["predicted_ms"] = 1e3 * costs.predict_seconds(p["w_bits"], a_bits=p["a_bits"])
        p["so"] = str(so)
        if test is not None:
            p["top1"] = top1_torch(qm, test.images, test.labels)
            with torch.no_grad():
                p["sqnr_db"] = _sqnr(qm(torch.from_numpy(test.images[:512])).numpy(), fp_out)
        print(f"[{name}] {p['label']}: {p['bits_summary']}; {p['stored_weight_bytes']} B"
              + (f", top-1 {100 * p['top1']:.2f}%" if test is not None else ""), flush=True)
    # latency, round robin
    live = [p for p in points if "so" in p]
    samples = _time_round_robin(live, "so", args.rounds)
    ref_now = robust_time(samples["uniform W8A8"])
    for p in live:
        p["measured_ms"] = 1e3 * robust_time(samples[p["label"]])
        p["measured_ms_median"] = 1e3 * float(np.median(samples[p["label"]]))
        p["predicted_over_measured"] = p["predicted_ms"] / p["measured_ms"]
        p["reanchored_ms"] = 1e3 * costs.predict_seconds(p.pop("w_bits"), reference_seconds=ref_now,
                                                         a_bits=p.pop("a_bits"))
        p["reanchored_over_measured"] = p["reanchored_ms"] / p["measured_ms"]
        Path(p.pop("so")).unlink(missing_ok=True)
    for f in work.glob("point*.json"):
        f.unlink()
    return dict(model=name if latency_only else f"{name} ({args.data})", fp32_top1=fp_top1, n_test=None if test is None else int(len(test.images)),
                latency_only=latency_only, points=points,
                sensitivity_loss=rep.loss, trace_samples=rep.hutchinson_samples,
                trace_estimator=getattr(rep, "estimator", None), sensitivity_seconds=rep.seconds,
                w8a8_network_ms=1e3 * costs.reference_seconds, overhead_ms=1e3 * costs.overhead_seconds,
                other_kernels_ms=1e3 * costs.other_seconds, isa=costs.isa, load_average_costs=costs.load_average,
                latency_statistic=costs.statistic)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Per model: top-1 vs measured latency, top-1 vs stored bytes, SQNR vs stored bytes (latency-only models:
    measured latency vs stored bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(17, 4.4 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        if res["latency_only"]:
            panels = [(row[0], "stored_weight_bytes", "stored weight bytes (.so)", "measured_ms",
                       "measured .so latency, batch 1 (ms)"),
                      (row[1], "predicted_ms", "ILP-predicted latency (ms)", "measured_ms",
                       "measured .so latency (ms)")]
            row[2].axis("off")
        else:
            panels = [(row[0], "measured_ms", "measured .so latency, batch 1 (ms)", "top1", "top-1 (%)"),
                      (row[1], "stored_weight_bytes", "stored weight bytes (.so)", "top1", "top-1 (%)"),
                      (row[2], "stored_weight_bytes", "stored weight bytes (.so)", "sqnr_db",
                       "FP32-output SQNR (dB)")]
        for ax, xkey, xlabel, ykey, ylabel in panels:
            # top-1 panels zoom on the useful range (FP32 - 8 .. FP32 + 1); points below sit on the lower edge as
            # down-triangles labelled with their top-1 (2-bit RTN points collapse to ~10-80%)
            floor = 100 * res["fp32_top1"] - 8 if ykey == "top1" and res.get("fp32_top1") else None
            for p in res["points"]:
                if xkey not in p or ykey not in p:
                    continue
                y = 100 * p[ykey] if ykey == "top1" else p[ykey]
                uni = p["kind"] == "uniform"
                label = p["label"].replace("ILP ", "")
                clipped = floor is not None and y < floor
                if clipped:
                    label, y = f"{label}: {y:.1f}%", floor
                ax.scatter(p[xkey], y, marker="v" if clipped else "s" if uni else "o", s=60 if uni else 40,
                           color="tab:red" if uni else "tab:blue")
                ax.annotate(label, (p[xkey], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if floor is not None:
                ax.set_ylim(floor - 0.5, floor + 9.5)
                ax.axhline(floor + 8, color="gray", lw=0.8, ls=":")
            if xkey == "predicted_ms":
                lim = [min(p["measured_ms"] for p in res["points"] if "measured_ms" in p) * 0.9,
                       max(p["measured_ms"] for p in res["points"] if "measured_ms" in p) * 1.1]
                ax.plot(lim, lim, color="gray", lw=0.8, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{res['model']}: uniform (red squares) vs ILP (blue)", fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def dominated_by(p: dict[str, Any], points: list[dict[str, Any]]) -> str:
    """Uniform points at most as large (stored bytes) and as slow (measured ms) as ``p`` that are strictly more
    accurate (top-1; FP32-output SQNR breaks no ties), i.e. that put ``p`` below the uniform Pareto front; 'no' when
    none does, '-' for uniform points and latency-only models."""
    if p["kind"] == "uniform" or "top1" not in p:
        return "-"
    worse = [u["label"].replace("uniform ", "") for u in points
             if u["kind"] == "uniform" and "top1" in u and u["stored_weight_bytes"] <= p["stored_weight_bytes"]
             and u["measured_ms"] <= p["measured_ms"] and u["top1"] > p["top1"]]
    return "no" if not worse else "yes: " + ", ".join(worse)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Mixed precision vs uniform bits\n"]
    for res in results:
        m = res["meta"]
        lines.append(f"Command: `{m['command']}` ({m['started']}); host: {m['cpu']} ({m.get('isa')}), load average "
                     f"at start {m['load_start']}, at end {m.get('load_end')} (a shared 2-core VM loaded by other "
                     f"agents: absolute times are inflated; every latency is the minimum over 1 ms windows, points "
                     f"of one model timed round robin); TVM threads {m['tvm_threads']}.\n")
        if res.get("retimed"):
            t = res["retimed"]
            lines.append(f"Latencies re-timed with `--retime --rounds {t['rounds']}` at {t['at']} (load average "
                         f"{t['load_start']} -> {t['load_end']}): every point rebuilt (same bits and stored bytes) "
                         "and timed round robin again; accuracy and predictions from the sweep above.\n")
        lines.append(f"## {res['model']}" + (" (random weights, latency only)" if res["latency_only"] else
                                             f" (FP32 top-1 {100 * res['fp32_top1']:.2f}% on {res['n_test']} test "
                                             "images)"))
        lines.append("")
        if not res["latency_only"]:
            lines.append(f"Sensitivity: {res.get('trace_estimator') or 'hutchinson'} traces, "
                         f"{res.get('trace_samples', res.get('hutchinson_samples'))} samples "
                         f"({res.get('sensitivity_seconds')} s). ")
        if "w8a8_network_ms" in res:
            lines.append(f"Cost model: W8A8 network {res['w8a8_network_ms']:.3f} ms when the kernels were timed "
                         f"(fitted overhead over its kernels {res['overhead_ms']:.3f} ms), load {res['load_average_costs']}.")
        lines.append("")
        lines.append("| point | bits | stored KB | GBOPs | top-1 % | SQNR dB | predicted ms | measured ms | "
                     "pred/meas | re-anchored/meas | .so exact | dominated by a uniform point |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for p in res["points"]:
            if "error" in p:
                lines.append(f"| {p['label']} | infeasible: {p['error']} | | | | | | | | | |")
                continue
            lines.append(f"| {p['label']} | {p['bits_summary']} | {p['stored_weight_bytes'] / 1e3:.1f} | "
                         f"{p['bops'] / 1e9:.3f} | {100 * p['top1']:.2f} | {p['sqnr_db']:.1f} | "
                         if "top1" in p else
                         f"| {p['label']} | {p['bits_summary']} | {p['stored_weight_bytes'] / 1e3:.1f} | "
                         f"{p['bops'] / 1e9:.3f} | - | - | ")
            lines[-1] += (f"{p['predicted_ms']:.3f} | {p['measured_ms']:.3f} | {p['predicted_over_measured']:.3f} | "
                          + (f"{p['reanchored_over_measured']:.3f}" if "reanchored_over_measured" in p else "-")
                          + f" | {'yes' if p['bit_exact_vs_reference'] else 'NO'} | {dominated_by(p, res['points'])} |")
        lines.append("")
    return "\n".join(lines)


def _point_config(p: dict[str, Any]) -> QuantConfig:
    """The QuantConfig a stored point was quantized with: uniform ``QuantConfig(w, a)``; ILP points their stored
    plan's :meth:`MixedPlan.config` (every layer explicit), as in the sweep."""
    if p["kind"] == "uniform":
        w, a = (int(v) for v in p["label"].split("W")[1].split("A"))
        return QuantConfig(w, a)
    return MixedPlan(**p["plan"]).config(QuantConfig())


def retime(res: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Rebuild every point of a stored result (RTN quantization is deterministic: the same integer graph, checked by
    its per-layer bits and stored bytes) and time the .so files again round robin (``--rounds``): for a quieter
    moment of a shared host than the one the sweep ran in. Accuracy columns are kept."""
    name = res["model"].split(" ")[0]
    data = res["model"].split("(")[1].rstrip(")") if "(" in res["model"] else args.data
    model, calib = _model_and_calibration(name, data)
    work.mkdir(parents=True, exist_ok=True)
    live = [p for p in res["points"] if "measured_ms" in p]
    for i, p in enumerate(live):
        graph = to_integer(quantize(model, calib, _point_config(p), progress=False))
        got = {n: [b["w_bits"], b["a_bits"]] for n, b in graph.meta["layer_bits"].items()}
        if got != p["bits"]:
            raise SystemExit(f"{res['model']} {p['label']}: rebuilt bits {bits_summary(graph.meta['layer_bits'])} "
                             f"differ from the stored {p['bits_summary']}")
        so = work / f"retime{i}.so"
        meta = compile_graph(graph, so, batch=1).meta
        if int(meta["stored_weight_bytes"]) != p["stored_weight_bytes"]:
            raise SystemExit(f"{res['model']} {p['label']}: rebuilt .so stores {meta['stored_weight_bytes']} B, "
                             f"the sweep's {p['stored_weight_bytes']} B")
        p["_so"] = str(so)
    load0 = [round(v, 1) for v in os.getloadavg()]
    samples = _time_round_robin(live, "_so", args.rounds)
    ref = next(p for p in live if p["label"] == "uniform W8A8")
    ref_now = robust_time(samples[ref["label"]])
    for p in live:
        p["measured_ms"] = 1e3 * robust_time(samples[p["label"]])
        p["measured_ms_median"] = 1e3 * float(np.median(samples[p["label"]]))
        p["predicted_over_measured"] = p["predicted_ms"] / p["measured_ms"]
        p["reanchored_ms"] = p["predicted_ms"] - res["w8a8_network_ms"] + 1e3 * ref_now
        p["reanchored_over_measured"] = p["reanchored_ms"] / p["measured_ms"]
        Path(p.pop("_so")).unlink(missing_ok=True)
    res["retimed"] = dict(rounds=args.rounds, at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          load_start=load0, load_end=[round(v, 1) for v in os.getloadavg()])
    print(f"[{res['model']}] re-timed {len(live)} points, {args.rounds} rounds; pred/meas "
          f"{min(p['predicted_over_measured'] for p in live):.3f}..{max(p['predicted_over_measured'] for p in live):.3f}",
          flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet_small,mobilenet_v2_small,resnet18")
    ap.add_argument("--n", type=int, default=10000, help="test images for top-1")
    ap.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"],
                    help="dataset of the small models (trained and cached by ptq2tvm train)")
    ap.add_argument("--samples", type=int, default=32, help="random draws of the Hessian-trace estimate")
    ap.add_argument("--estimator", default="gauss-newton", choices=["gauss-newton", "hutchinson"])
    ap.add_argument("--specs", default="", help="only these ILP budgets, ';'-separated labels (e.g. 'size = W4A4;"
                    "BOPs = 0.5 W8A8')")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin latency rounds")
    ap.add_argument("--work", default=str(ROOT / "runs" / "mixed_precision_bench"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads for every timing (1: a loaded shared host "
                    "makes a 2-thread pool wait on the OS scheduler at every parallel region)")
    ap.add_argument("--retime", action="store_true", help="rebuild the stored points of --models (names as in the "
                    "JSON, e.g. resnet_small) and time them again round robin; sensitivity and accuracy are kept")
    ap.add_argument("--replot", action="store_true", help="only redraw mixed_precision.png from the stored JSON")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.replot:
        stored = json.loads((RESULTS / "mixed_precision.json").read_text())
        plot(stored["results"], RESULTS / "mixed_precision.png")
        return
    if args.retime:
        stored = json.loads((RESULTS / "mixed_precision.json").read_text())
        for res in stored["results"]:
            if res["model"].split(" ")[0] in args.models.split(","):
                retime(res, args, Path(args.work) / "retime")
        write_json(RESULTS / "mixed_precision.json", stored)
        md = markdown(stored["results"], stored["meta"])
        write_text(RESULTS / "mixed_precision.md", md)
        plot(stored["results"], RESULTS / "mixed_precision.png")
        print(md)
        return
    meta = dict(command="nice .venv/bin/python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:]),
                tvm_threads=args.threads,
                cpu=platform.processor() or platform.machine(), load_start=[round(v, 1) for v in os.getloadavg()],
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    results = []
    for name in args.models.split(","):
        results.append(run_model(name, args, Path(args.work)))
        meta["isa"] = results[-1]["isa"]
    meta["load_end"] = [round(v, 1) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = RESULTS / "mixed_precision.json"          # models not run this time keep their earlier results
    if old.is_file():
        prev = json.loads(old.read_text())
        done = {r["model"] for r in results}
        kept = [dict(r, meta=r.get("meta", prev["meta"])) for r in prev["results"] if r["model"] not in done]
        results = kept + results
    for r in results:
        r.setdefault("meta", meta)
    write_json(RESULTS / "mixed_precision.json", dict(meta=meta, results=results))
    md = markdown(results, meta)
    write_text(RESULTS / "mixed_precision.md", md)
    plot(results, RESULTS / "mixed_precision.png")
    print(md)


if __name__ == "__main__":
    main()
