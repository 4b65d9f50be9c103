"""`ptq2tvm bench`: the compiled .so against PyTorch FP32, ONNX Runtime FP32 / INT8 and (when installed) OpenVINO
FP32 / INT8 in one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.nn as nn

from ..backend.compile import read_sidecar
from ..backend.isa import isa_label
from ..backend.runtime import CompiledModel, set_num_threads
from ..errors import ArtifactError
from .baselines import export_onnx, ort_fp32_runner, quantize_onnx_int8, torch_fp32_runner
from .openvino_rt import openvino_available, openvino_runner, openvino_version
from .timing import TimingStats, time_interleaved


#: a 1-minute load average above this many per core, before a benchmark's own threads start, means other work
#: competes for the CPU
BUSY_LOAD_PER_CORE = 0.5


def machine_load(warn: bool = True) -> dict[str, float]:
    """1-minute load average and core count; warns when other work competes for the cores (timings then mislead:
    e.g. PyTorch with 2 OpenMP threads slows down ~100x on an oversubscribed machine)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if warn and load > BUSY_LOAD_PER_CORE * cores:
        print(f"WARNING: load average {load:.1f} on {cores} cores: other processes compete for the CPU, latencies "
              "below are not representative", file=sys.stderr)
    return {"loadavg_1min": round(load, 2), "cores": cores}


def describe_load(loads: list[float], cores: int | None = None) -> str:
    """One sentence for a benchmark's markdown: the 1-minute load averages sampled during the run and what they
    mean (no higher than the core count: at most the benchmark's own threads ran; higher: other work competed, so
    absolute times are inflated and only ratios of interleaved runs compare)."""
    cores = cores or os.cpu_count() or 1
    span = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run"
    if max(loads) <= cores:
        return f"{span}, no higher than the {cores} cores (what the benchmark's own threads can account for)."
    return f"{span} on {cores} cores: other work competed, so absolute times are inflated and noisy."


def host_isa_label() -> str:
    """The best int8 vector ISA of this host ('amx', 'avx512_vnni', 'avx_vnni', 'avx512', 'avx2' or 'none'): what
    ONNX Runtime's MLAS kernels dispatch on at run time (by CPUID)."""
    from ..backend.isa import host_isa

    return host_isa() or "none"


def compare_latency(compiled: dict[str, CompiledModel], fp32_model: nn.Module, example: np.ndarray,
                    calib: np.ndarray, threads: int = 2, repeats: int = 50, warmup: int = 10,
                    ort_int8: bool = True, work_dir: str | Path = "runs/onnx", progress: bool = True,
                    calls_per_turn: int = 5, openvino: bool | None = None,
                    info: dict[str, dict[str, Any]] | None = None) -> dict[str, TimingStats]:
    """Median latencies of each .so (float in, float out: quantize + run + dequantize) and the FP32 baselines on the
    same ``example`` batch, same thread count, interleaved turn by turn (``calls_per_turn`` timed calls back to back
    per turn; see :func:`time_interleaved`).

    ``openvino`` (default: when the package is installed) adds ``openvino_fp32`` (the FP32 ONNX model) and
    ``openvino_int8`` (the QDQ model ORT INT8 runs; with ``ort_int8``). ``info``, when given, receives per runtime
    ``{"isa": ..., "kernels": {...}}``: the ISA each runtime ran (the .so: its sidecar's kernels; OpenVINO: the oneDNN
    primitives of its runtime model, and the ISA the oneDNN implementations reported for one inference, ``onednn``;
    ORT / torch: the host's best ISA, which their libraries dispatch on)."""
    set_num_threads(threads)
    machine_load()
    work_dir = Path(work_dir)
    host = host_isa_label()
    runners: dict[str, Callable[[np.ndarray], Any]] = {name: cm for name, cm in compiled.items()}
    details: dict[str, dict[str, Any]] = {name: {"isa": isa_label(getattr(cm, "isa", host))}
                                           for name, cm in compiled.items()}
    runners["torch_fp32"] = torch_fp32_runner(fp32_model, threads)
    onnx_path = export_onnx(fp32_model, example, work_dir / "fp32.onnx")
    runners["ort_fp32"] = ort_fp32_runner(onnx_path, threads)
    details["torch_fp32"] = {"isa": host}
    details["ort_fp32"] = {"isa": host}
    if openvino is None:
        openvino = openvino_available()
    if openvino:
        runners["openvino_fp32"] = openvino_runner(onnx_path, threads, tuple(example.shape))
    if ort_int8:
        q_path = quantize_onnx_int8(onnx_path, calib)
        runners["ort_int8"] = ort_fp32_runner(q_path, threads)   # same session options; the QDQ model runs in int8
        details["ort_int8"] = {"isa": host}
        if openvino:
            runners["openvino_int8"] = openvino_runner(q_path, threads, tuple(example.shape))
    for name in ("openvino_fp32", "openvino_int8"):
        if name in runners:
            r = runners[name]
            details[name] = {"isa": r.isa, "isa_source": r.isa_source, "kernels": r.kernels,  # type: ignore
                             "onednn": r.onednn, "version": openvino_version()}  # type: ignore
    if info is not None:
        info.update(details)
    return time_interleaved(runners, example, warmup=warmup, repeats=repeats, threads=threads, progress=progress,
                            calls_per_turn=calls_per_turn)


def model_label(name: str) -> str:
    """The model column of the latency table: a zoo name as it is, a model file by its file name
    ('/home/u/net.py:build' -> 'net.py:build', '/data/m.onnx' -> 'm.onnx')."""
    return Path(name).name if ("/" in name or "\\" in name) else name


def run_bits_label(info: dict[str, Any], graph_meta: dict[str, Any] | None) -> str | None:
    """The W/A label of a run with per-layer bits (a mixed-precision plan: "mixed W4A8 x11, W2A8 x2, ...";
    ``--layer-bits``: "W4A4 with --layer-bits: ..."), from its run.json ``info`` and the .so's ``graph_meta``
    (``layer_bits``); None for a run with one setting (its rows say W{w_bits}A{a_bits})."""
    from ..mixed.layerbits import layer_bits_label

    layer_bits = (graph_meta or {}).get("layer_bits")
    if not layer_bits or not (info.get("mixed_precision") or info.get("layer_bits_spec")):
        return None
    return layer_bits_label(layer_bits, bool(info.get("mixed_precision")), f"W{info['w_bits']}A{info['a_bits']}")


def _ptq2tvm_graph(runtime: str) -> bool:
    """Whether a runtime runs the run's own integer graph (the .so, or ORT on its QDQ export)."""
    return runtime == "ort_ptq2tvm_qdq" or runtime == "ptq2tvm" or runtime.startswith("ptq2tvm_")


def bench_run(run_dir: str | Path, threads: int = 2, repeats: int = 20, warmup: int = 3, ort_int8: bool = True,
              progress: bool = True, out_dir: str | Path | None = None, calls_per_turn: int = 5,
              trust_code: bool = False, so: str | Path | None = None) -> dict[str, Any]:
    """Benchmark the run's .so (``so``, default ``RUN/model.so``) at its compiled batch against the baselines, which
    run that batch too; write JSON, markdown and PNG (and the ONNX exports) into ``out_dir`` (default: the run
    directory), as ``latency.*`` for ``RUN/model.so`` and ``latency_<so name>.*`` for another .so. ``trust_code``: see :func:`ptq2tvm.api.load_fp32`.

    Raises :class:`~ptq2tvm.errors.ArtifactError` for a missing .so, one compiled from another integer graph, or a
    CUDA build (this benchmark times CPU runtimes; a CUDA bundle has ``benchmarks/latency_bundle.py``)."""
    from ..api import RunDir, load_fp32
    from ..data import calibration_set, run_data_kwargs
    from .disasm import count_instructions, cpu_features
    from .report import print_table, write_chart, write_markdown, write_rows

    run = RunDir(run_dir)
    info = run.info()
    so_path = Path(so) if so else run.so
    if so_path.is_file() and (read_sidecar(so_path).get("target") or {}).get("kind") == "cuda":
        raise ArtifactError(f"{so_path} is a CUDA build: `ptq2tvm bench` times CPU runtimes against each other; "
                            "time a CUDA .so on its GPU host with benchmarks/latency_bundle.py (from `ptq2tvm bundle`)")
    cm = run.load_compiled(so, threads=threads)
    fp32 = load_fp32(run.check(run.fp32, info), trust_code=trust_code)
    calib = calibration_set(info["data"], min(int(info.get("calib_size", 256)), 256), seed=0, **run_data_kwargs(info))
    example = calib[: cm.batch]
    if len(example) < cm.batch:
        example = np.resize(example, (cm.batch, *example.shape[1:])).astype(np.float32)
    out = Path(out_dir) if out_dir else run.path
    # RUN/model.so's results are latency.*; another .so's go beside them as latency_<name>.* (a second build's
    # bench replaced the first's)
    stem = "latency" if cm.so_path.resolve() == run.so.resolve() else f"latency_{cm.so_path.stem}"
    runs: dict[str, Any] = {"ptq2tvm": cm}
    if ort_int8 and run.qgraph.is_file():  # ONNX Runtime on ptq2tvm's own QDQ export (ptq2tvm/onnx_export.py)
        from ..ir.graph import IntegerGraph
        from ..onnx_parity import ort_qdq_runner

        runs["ort_ptq2tvm_qdq"] = ort_qdq_runner(IntegerGraph.load(run.qgraph), out / "onnx" / "ptq2tvm_qdq.onnx",
                                                 threads)
    rt_info: dict[str, dict[str, Any]] = {}
    loads = [machine_load(warn=False)["loadavg_1min"]]
    stats = compare_latency(runs, fp32, example, calib, threads=threads, repeats=repeats,
                            warmup=warmup, ort_int8=ort_int8, work_dir=out / "onnx", progress=progress,
                            calls_per_turn=calls_per_turn, info=rt_info)
    loads.append(machine_load(warn=False)["loadavg_1min"])
    cpu = cpu_features(llvm=False)["model_name"]
    vnni = count_instructions(cm.so_path, ("vpdpbusd",)).get("vpdpbusd")
    model_name = model_label((info.get("model") or {}).get("name", "model"))
    mixed_bits = run_bits_label(info, cm.meta.get("graph_meta"))
    rows = [dict(model=model_name, input="x".join(map(str, info["input_shape"])), batch=cm.batch,
                 w_bits=info["w_bits"], a_bits=info["a_bits"], runtime=name, median_ms=st.median_ms,
                 p10_ms=st.p10_ms, p90_ms=st.p90_ms, threads=threads,
                 vpdpbusd_count=vnni if name == "ptq2tvm" else None, so=cm.so_path.name if name == "ptq2tvm" else None,
                 **({"bits": mixed_bits} if mixed_bits and (_ptq2tvm_graph(name)) else {}),
                 cpu=cpu, loadavg_1min=loads[0],
                 **rt_info.get(name, {}))
            for name, st in stats.items()]
    for r in rows:
        if r["runtime"] == "ort_ptq2tvm_qdq":
            r.update(onnx_weights=runs[r["runtime"]].weights, ort_kernels=runs[r["runtime"]].kernels)
    write_rows(rows, out / f"{stem}.json")
    cores = os.cpu_count() or 1
    busy = "" if loads[0] <= BUSY_LOAD_PER_CORE * cores else (      # the load before our own threads
        "**Warning: other processes competed for the CPU during this run; the latencies are not representative.** ")
    write_markdown(rows, out / f"{stem}.md", footer=f"{busy}The .so: {cm.so_path} (batch {cm.batch}). Host: {cpu}, "
                   f"{cores} logical CPUs, {threads} thread(s) per runtime; {describe_load(loads, cores)}")
    write_chart(rows, out / f"{stem}.png")
    print_table(rows)
    base = {r["runtime"]: r["median_ms"] for r in rows}
    for other in ("torch_fp32", "ort_fp32", "ort_int8", "ort_ptq2tvm_qdq", "openvino_fp32", "openvino_int8"):
        if other in base:
            ratio = base["ptq2tvm"] / base[other]
            verdict = f"{1 / ratio:.3g}x faster" if ratio < 1 else f"{ratio:.3g}x slower"
            print(f"ptq2tvm / {other}: {ratio:.3g}x (the .so is {verdict})")
    print(f"wrote {out / stem}.json, {stem}.md, {stem}.png and the ONNX exports in {out / 'onnx'}")
    return dict(rows=rows, machine=machine_load(warn=False), json=str(out / f"{stem}.json"),
                markdown=str(out / f"{stem}.md"), chart=str(out / f"{stem}.png"))
