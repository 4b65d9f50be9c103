"""CPU latency: the ptq2tvm .so (W8A8, W4A4 with packed int4 weights) vs PyTorch FP32, ONNX Runtime FP32 and ONNX
Runtime INT8 (static QDQ, per-channel) and, when the openvino package is installed, OpenVINO FP32 and OpenVINO INT8
(the same QDQ model; latency hint, one stream, same threads), ResNet-18 and MobileNetV2 1.0 at 224x224, batch 1 and 8.

    .venv/bin/python benchmarks/latency_cpu.py [--threads 2] [--repeats 20] [--calls-per-turn 5]
        [--models resnet18 mobilenet_v2] [--tune-trials 16 [--tune-bits 8/8] [--tune-batches 1]]
        [--name latency_cpu_avx2_host]

Rows record the host CPU (``cpu``), the vector ISA each runtime ran (``isa``: the .so's kernels from its sidecar,
OpenVINO's from the oneDNN implementations one inference created (ONEDNN_VERBOSE=profile_create), in ``onednn``, and the
primitives of its runtime model in ``kernels``; ORT / torch: the host's best ISA, which they dispatch on) and the
load average. ``--name`` sets the output file stem (results of different hosts side by side: latency_cpu.* is the Zen 5 AVX-512 VNNI host, latency_cpu_avx2_host.* an AVX2-only Zen 3).

Every runtime of one (model, batch) group runs in this process on the same input, same threads, interleaved
turn by turn with a rotated order after warm-up: per turn a 0.1 s idle gap (other runtimes' spinning workers go to
sleep), one untimed call, then ``--calls-per-turn`` timed calls back to back (steady-state latency; 1 gives the
latency right after an idle gap instead); medians and p10/p90 over all timed calls. Float in, float out for every runtime (the .so time includes the
wrapper's input quantization and output dequantization). Writes benchmarks/results/latency_cpu.json (rows
{model, input, batch, w_bits, a_bits, runtime, median_ms, p10_ms, p90_ms, threads, vpdpbusd_count}),
latency_cpu.md, latency_cpu.png and latency_cpu_builds.json (build seconds, weight bytes). Latency does not depend on
the weights' values, so the models have seeded random weights and random calibration images.
Run it on a quiet machine: it prints a warning when the load average says other work competes for the cores.

With ``--tune-trials N`` the ``--tune-bits`` settings are also built tuned (``ptq2tvm compile --tune-trials N``,
records under ``<work>/tuning/``) and timed as extra ``ptq2tvm`` rows with ``schedule: tuned``; the builds file then
has the tuning time, the candidates measured and the time of a rebuild from the records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.api import compile_so, quantize, to_integer, write_json  # noqa: E402
from ptq2tvm.backend.isa import host_isa  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel, set_num_threads  # noqa: E402
from ptq2tvm.bench.disasm import count_instructions, cpu_features  # noqa: E402
from ptq2tvm.bench.report import print_table, write_chart, write_markdown, write_rows  # noqa: E402
from ptq2tvm.bench.runner import compare_latency, describe_load, machine_load  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.mixed.latency import layer_macs  # noqa: E402
from ptq2tvm.models import create_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import vnni_peak  # noqa: E402

# input (C, H, W) of the models that are not 3x224x224: the demo's Fashion-MNIST nets (per-call overhead decides)
MODEL_INPUTS = {"resnet_small": (1, 28, 28), "mobilenet_v2_small": (1, 28, 28), "mobilenet_v3_small_fm": (1, 28, 28),
                "efficientnet_small_fm": (1, 28, 28)}


def seeded_graphs(name: str, settings: list[str]) -> tuple[torch.nn.Module, np.ndarray, dict[tuple[int, int], object]]:
    """The benchmark's model ``name`` with seeded random weights (torch seed 0), 16 seeded random images (float32,
    (16, C, H, W)) and its integer graph for each ``"W/A"`` setting, quantized with the first 8 of them;
    -> (model, images, {(w_bits, a_bits): graph}). Latency does not depend on the weights' values (which layers the
    per-layer proofs admit does, a little)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = np.random.default_rng(0).standard_normal((16, *MODEL_INPUTS.get(name, (3, 224, 224)))).astype(np.float32)
    graphs = {}
    for setting in settings:
        w, a = (int(v) for v in setting.split("/"))
        graphs[(w, a)] = to_integer(quantize(model, images[:8], QuantConfig(w, a), progress=False))
    return model, images, graphs


def floor_gmac_per_image(graph) -> float | None:
    """G multiply-adds per image on real input (padding taps skipped, :func:`ptq2tvm.mixed.latency.layer_macs`) of a
    network of dense convs and linear layers: with the host's `vpdpbusd` rate measured right after each group's
    timing (benchmarks/vnni_peak.py), the "VNNI floor" the .so's time is quoted against on AVX-512 VNNI hosts
    without AMX. None for a network with grouped or depthwise convs (their products do not fill 4-byte groups)."""
    if any(n.op == "conv2d" and int(n.attrs["groups"]) > 1 for n in graph.nodes):
        return None
    return sum(layer_macs(graph, skip_padding=True).values()) / 1e9


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per (model, batch, bits) the .so's median over ORT INT8's and OpenVINO INT8's (< 1: .so faster)."""
    lines = ["| model | batch | W/A | ptq2tvm ms | ORT INT8 ms | OpenVINO INT8 ms | ptq2tvm / ORT INT8 | "
             "ptq2tvm / OpenVINO INT8 | VNNI floor ms (ptq2tvm / floor, OpenVINO INT8 / floor) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["runtime"] != "ptq2tvm":
            continue
        group = [x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]]
        base = {x["runtime"]: x["median_ms"] for x in group}
        ort, ov, ms = base.get("ort_int8"), base.get("openvino_int8"), r["median_ms"]

        def cell(v, fmt):
            return "-" if v is None else fmt.format(v)

        tuned = " tuned" if r.get("schedule") == "tuned" else ""
        lines.append(f"| {r['model']} | {r['batch']} | W{r['w_bits']}A{r['a_bits']}{tuned} | {ms:.2f} | "
                     f"{cell(ort, '{:.2f}')} | {cell(ov, '{:.2f}')} | {cell(ort and ms / ort, '{:.2f}x')} | "
                     f"{cell(ov and ms / ov, '{:.2f}x')} | {vnni_peak.floor_cell(r.get('vnni_floor_ms'), ms, ov)} |")
    return "\n".join(lines)


def markdown_footer(args: argparse.Namespace, host: dict, loads: list[float], rows: list[dict]) -> str:
    """The host, the command, the ratios and the timing protocol, under the markdown table."""
    kernels = [(r["model"], r["batch"], r["runtime"], json.dumps(r["kernels"])) for r in rows if r.get("kernels")]
    ov = "; ".join(f"{m} b{b} {rt}: {k}" for m, b, rt, k in kernels) or "OpenVINO not installed"
    impls = [(r["model"], r["batch"], r["runtime"], json.dumps(r["onednn"])) for r in rows if r.get("onednn")]
    ov_impls = ("; ".join(f"{m} b{b} {rt}: {k}" for m, b, rt, k in impls) + ". "
                "The `isa` column of the OpenVINO rows comes from these (its primitive names say avx512 for VNNI "
                "kernels too)") if impls else ""
    return (f"Host: {host['model_name']} ({host['logical_cpus']} logical CPUs, LLVM cpu {host['llvm_cpu']}, int8 ISA "
            f"{host['isa']}). {describe_load(loads, host['logical_cpus'])} (Sampled per group; the runtimes of one "
            "group run interleaved in one process, so their ratios are the comparable numbers.)"
            + (" One thread per runtime: on a host this oversubscribed, every runtime's parallel regions wait for "
               "descheduled workers (here the 28x28 .so took 0.7 s per call with 2 threads, 1 ms with 1)."
               if args.threads == 1 and max(loads) > 2 * (host["logical_cpus"] or 1) else "")
            + (" Without VNNI the ORT INT8 / OpenVINO INT8 model has 7-bit weights (quantize_onnx_int8's reduce_range, "
               "ORT's advice for non-VNNI x86, whose vpmaddubsw would saturate otherwise): the like-for-like .so row "
               "is W7A8 (every layer on exact vpmaddubsw); W8A8 keeps full 8-bit weights, and its layers that "
               "vpmaddubsw could saturate run the int16 vpmaddwd kernel." if host["isa"] in ("avx2", "avx512") else "")
            + " The Zen 5 (AVX-512 VNNI) results are latency_cpu.{json,md}, measured on another host.\n\n"
            f"{ratio_table(rows)}\n\n"
            + ("VNNI floor: the model's multiply-adds on real input (padding taps skipped, as the .so's convs do; "
               "ResNet-18: 1.680 G per image of its 1.814 G) at the `vpdpbusd` rate that benchmarks/vnni_peak.py "
               "measured on as many cores as threads right after the group's timing (12 independent register "
               "chains; one 512-bit `vpdpbusd` = 64 multiply-adds): the time of a network that did nothing but its "
               f"products on VNNI. Only for networks of dense convs. {vnni_peak.FLOOR_CAVEAT}.\n\n"
               if any(r.get("vnni_floor_ms") for r in rows) else "")
            + f"OpenVINO kernels (oneDNN primitives of the runtime model, conv/dense layers): "
            f"{ov}.\n\n"
            + (f"oneDNN implementations OpenVINO ran (ONEDNN_VERBOSE=profile_create, one inference in a child process, conv/dense "
               f"primitives): {ov_impls}.\n\n" if ov_impls else "")
            + f"Command: `.venv/bin/python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}). Per turn: 0.1 s idle, "
            f"one untimed call, {args.calls_per_turn} timed calls back to back; {args.warmup} warm-up and "
            f"{args.repeats} timed turns per runtime, rotated order. Builds and tuning: {args.name}_builds.json.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--bits", nargs="+", default=["8/8", "4/4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="timed turns per runtime")
    p.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    p.add_argument("--calls-per-turn", type=int, default=5,
                   help="timed calls back to back per turn (1: the latency right after an idle gap)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=str(ROOT / "runs" / "latency_cpu"))
    p.add_argument("--tune-trials", type=int, default=0, help="also build tuned .so files (schedules per kernel)")
    p.add_argument("--tune-bits", nargs="+", default=["8/8"], help="settings built tuned too")
    p.add_argument("--tune-batches", nargs="+", type=int, default=None, help="batches built tuned too (default all)")
    p.add_argument("--name", default="latency_cpu", help="output file stem under --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    rows, builds = [], []
    load_before = machine_load()
    host = cpu_features()
    host["isa"] = host_isa() or "none"
    loads = [load_before["loadavg_1min"]]
    for name in args.models:
        model, calib, graphs = seeded_graphs(name, args.bits)
        shape = calib.shape[1:]
        floor_gmac = floor_gmac_per_image(next(iter(graphs.values())))
        for batch in args.batches:
            names = {}
            for (w, a), graph in graphs.items():
                tune_this = args.tune_trials and f"{w}/{a}" in args.tune_bits and \
                    (args.tune_batches is None or batch in args.tune_batches)
                tuned = [False] + ([True] if tune_this else [])
                for tune in tuned:
                    stem = f"{name}_b{batch}_w{w}a{a}" + ("_tuned" if tune else "")
                    so = work / f"{stem}.so"
                    kw = dict(tune_trials=args.tune_trials, tune_db=work / "tuning" / stem, progress=True) if tune \
                        else {}
                    res = compile_so(graph, so, batch=batch, **kw)
                    names[f"ptq2tvm_w{w}a{a}" + ("_tuned" if tune else "")] = CompiledModel(so, threads=args.threads)
                    vnni = count_instructions(so, ("vpdpbusd",))["vpdpbusd"]
                    b = dict(model=name, batch=batch, w_bits=w, a_bits=a, backend=res.meta["backend"],
                             schedule="tuned" if tune else "hand", build_seconds=round(res.seconds, 2),
                             weight_bytes_int8=res.meta["weight_bytes"],
                             stored_weight_bytes=res.meta["stored_weight_bytes"], vpdpbusd_count=vnni)
                    if tune:
                        t = res.meta["tuning"]
                        again = compile_so(graph, work / f"{stem}_rebuilt.so", batch=batch,
                                           tune_db=work / "tuning" / stem)
                        b.update(tune_trials=args.tune_trials, tune_candidates_measured=t["measured"],
                                 tune_seconds=t["seconds"], rebuild_from_records_seconds=round(again.seconds, 2),
                                 tasks=t["tasks"])
                    builds.append(b)
                    print(f"built {so.name}: {res.meta['backend']}, {res.seconds:.1f} s"
                          + (f" (rebuild from records {b['rebuild_from_records_seconds']:.1f} s)" if tune else "")
                          + f", {res.meta['stored_weight_bytes'] / 1e6:.2f} MB weights, {vnni} vpdpbusd", flush=True)
            example = calib[:batch] if batch <= len(calib) else np.resize(calib, (batch, *calib.shape[1:]))
            info: dict = {}
            stats = compare_latency(names, model, example, calib, threads=args.threads, repeats=args.repeats,
                                    warmup=args.warmup, work_dir=work / f"onnx_{name}_b{batch}", progress=False,
                                    calls_per_turn=args.calls_per_turn, info=info)
            loads.append(round(os.getloadavg()[0], 2))
            # the VNNI ceiling now (the 2-core VMs' clock moves by up to 25% within an hour)
            peak = vnni_peak.measure(args.threads, repeats=3, seconds=0.3) \
                if floor_gmac and host["isa"] == "avx512_vnni" else None
            vnni_of = {f"ptq2tvm_w{b['w_bits']}a{b['a_bits']}" + ("_tuned" if b["schedule"] == "tuned" else ""):
                       b["vpdpbusd_count"] for b in builds if b["model"] == name and b["batch"] == batch}
            for rt, st in stats.items():
                ours = rt.startswith("ptq2tvm_")
                w, a = (int(rt[9]), int(rt[11])) if ours else (32, 32)
                rows.append(dict(model=name, input="x".join(map(str, shape)), batch=batch, w_bits=w, a_bits=a,
                                 runtime="ptq2tvm" if ours else rt, median_ms=st.median_ms,
                                 p10_ms=st.p10_ms, p90_ms=st.p90_ms, threads=args.threads,
                                 vpdpbusd_count=vnni_of.get(rt),
                                 vnni_floor_ms=vnni_peak.floor_ms(floor_gmac, batch, peak["per_core"], args.threads)
                                 if ours and peak else None,
                                 floor_gmac_per_image=round(floor_gmac, 4) if ours and peak else None,
                                 vpdpbusd_per_s_per_core=peak["per_core"] if ours and peak else None,
                                 schedule=("tuned" if rt.endswith("_tuned") else "hand") if ours else None,
                                 cpu=host["model_name"], loadavg_1min=loads[-1], **info.get(rt, {})))
            group = [r for r in rows if r["model"] == name and r["batch"] == batch]
            ort8 = next(r["median_ms"] for r in group if r["runtime"] == "ort_int8")
            ov8 = next((r["median_ms"] for r in group if r["runtime"] == "openvino_int8"), None)
            for r in group:
                if r["runtime"] == "ptq2tvm":
                    extra = (f", {r['median_ms'] / r['vnni_floor_ms']:.2f}x the VNNI floor measured after it "
                             f"({r['vnni_floor_ms']:.2f} ms at {r['vpdpbusd_per_s_per_core'] / 1e9:.2f} G vpdpbusd/s "
                             "per core)" if r.get("vnni_floor_ms") else "")
                    if ov8:
                        extra += f", {r['median_ms'] / ov8:.2f}x OpenVINO INT8 ({ov8:.2f} ms)"
                    print(f"{name} batch {batch} W{r['w_bits']}A{r['a_bits']} {r['schedule']}: {r['median_ms']:.2f} ms = "
                          f"{r['median_ms'] / ort8:.2f}x ONNX Runtime INT8 ({ort8:.2f} ms){extra}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name
    write_rows(rows, out / f"{stem}.json")
    write_json(out / f"{stem}_builds.json", dict(builds=builds, machine_before=load_before, host=host,
                                                 machine_after=machine_load(warn=False), loadavg_samples=loads,
                                                 command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d")))
    write_markdown(rows, out / f"{stem}.md", title=f"CPU latency (ms), {args.threads} threads, interleaved medians, "
                   f"{host['model_name']} ({host['isa']})", footer=markdown_footer(args, host, loads, rows))
    write_chart(rows, out / f"{stem}.png")
    print_table(rows)


if __name__ == "__main__":
    main()
