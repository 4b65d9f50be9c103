"""The main job on the built-in default: Fashion-MNIST ResNet -> W8A8 and W4A4 .so -> accuracy, parity, latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .api import ModelSpec, RunDir, compile_so, quantize, save_run, to_integer, top1_torch, write_json
from .backend.runtime import CompiledModel, set_num_threads
from .errors import QuantConfigError
from .frontend.qmodel import QuantConfig
from .parity import run_parity


#: measured training time per epoch on 2 CPU threads (benchmarks/results/demo_fmnist_*.json: 582 s / 6 epochs and
#: 404 s / 6 epochs); other models and datasets: unknown, the notice says so
TRAIN_SECONDS_PER_EPOCH = {("resnet_small", "fashion-mnist"): 97.0, ("mobilenet_v2_small", "fashion-mnist"): 67.0,
                           ("resnet_small", "digits"): 1.0, ("mobilenet_v2_small", "digits"): 1.0}


def training_notice(model: str, data: str, epochs: int | None = None, seed: int = 0,
                    threads: int | None = None) -> str | None:
    """What :func:`ptq2tvm.train.train_builtin` is about to do when ``model`` is not cached yet (training, how
    long with ``threads`` threads, where it is cached); None when the cached checkpoint will be loaded.
    ``threads`` None: the count train_builtin is about to pick (:func:`ptq2tvm.threads.auto_threads`; it announces
    a reduction itself)."""
    from .data import builtin_name
    from .threads import auto_threads
    from .train import TRAIN_THREADS, checkpoint_key, default_cache_dir, recipe_for

    ds = builtin_name(data)
    if ds is None:
        return None
    recipe = recipe_for(model, ds, epochs)
    cache = default_cache_dir()
    if (cache / f"{checkpoint_key(model, ds, recipe, seed)}.pt").is_file():
        return None
    if threads is None:
        threads = auto_threads(TRAIN_THREADS, announce=False)
    per_epoch = TRAIN_SECONDS_PER_EPOCH.get((model, ds))
    minutes = per_epoch * recipe.epochs / 60 if per_epoch else 0.0
    if threads < 2:     # one thread: measured 2.4x the 2-thread time (AVX2 EPYC, resnet_small, 2026-12-02)
        minutes *= 2.4
    how_long = (f"about {minutes:.0f} min with {threads} thread{'s' * (threads != 1)} on a recent x86 CPU, more on "
                "an older one: the progress bar shows the time left" if minutes > 0.5
                else "under a minute" if per_epoch else "time unknown for this model")
    return (f"no --checkpoint and no cached {model} for {ds}: training it first ({recipe.epochs} epochs, {how_long}; "
            f"once: cached in {cache})")


def parse_bits(setting: str) -> tuple[int, int]:
    """'4/4' or 'W4A4' -> (4, 4)."""
    s = setting.upper().replace("W", "").replace("A", "/")
    try:
        w, a = (int(v) for v in s.split("/") if v)
    except ValueError:
        raise QuantConfigError(f"bit setting {setting!r}: expected W/A such as 8/8 or W4A4") from None
    return w, a


def run_demo(out: str | Path = "runs/demo", model: str = "resnet_small", data: str = "fashion-mnist",
             bits: list[str] | None = None, calib_size: int = 512, threads: int | None = None, repeats: int = 100,
             progress: bool = True) -> dict[str, Any]:
    """Train (or load the cached) model, then for each bit setting quantize, compile, evaluate on the whole test
    set, check parity and time it against PyTorch / ONNX Runtime. Writes ``out/summary.json``."""
    from .bench.runner import compare_latency, machine_load
    from .data import calibration_set, load_dataset
    from .threads import auto_threads
    from .train import train_builtin

    t_start = time.perf_counter()
    settings = [parse_bits(b) for b in (bits or ["8/8", "4/4"])]
    for w, a in settings:
        QuantConfig(w, a).validate()
    out = Path(out)
    if threads is None:    # 2 on a quiet machine, 1 on a busy one (spinning thread pools collapse there)
        threads = auto_threads(2, what="the demo (PyTorch, the .so, ONNX Runtime, OpenVINO) runs")
    torch.set_num_threads(threads)
    set_num_threads(threads)
    notice = training_notice(model, data)
    if notice:
        print(notice, flush=True)
    fp_model, train_info = train_builtin(model, dataset=data, progress=progress)
    fp_model.eval()
    test = load_dataset(data, split="test")
    calib = calibration_set(data, calib_size, seed=0)
    fp32_top1 = top1_torch(fp_model, test.images, test.labels)
    print(f"\n{model} on {data}: FP32 test top-1 {100 * fp32_top1:.2f}% ({len(test.images)} images); "
          f"calibration: {len(calib)} unlabeled training images")
    spec = ModelSpec(model, {"num_classes": 10, "in_channels": 1}, train_info.get("checkpoint"))

    per_setting: dict[str, dict[str, Any]] = {}
    compiled: dict[str, CompiledModel] = {}
    for w, a in settings:
        key = f"W{w}A{a}"
        print(f"\n=== {key} ===")
        qm = quantize(fp_model, calib, QuantConfig(w, a), progress=progress)
        graph = to_integer(qm)
        run = save_run(RunDir(out / key.lower()), fp_model, spec, qm, graph, data=data, calib_size=len(calib),
                       method="rtn", seed=0)
        res = compile_so(graph, run.so, batch=1)
        cm = CompiledModel(run.so, threads=threads)
        rep = run_parity(graph, cm, qm, test.images, test.labels, per_layer_inputs=256, progress=progress)
        print(rep.summary())
        write_json(run.path / "parity.json", rep.to_dict())
        run.update_info(fp32_top1=fp32_top1, fakequant_top1=rep.fakequant_top1, so_top1=rep.so_top1)
        compiled[key] = cm
        per_setting[key] = dict(
            w_bits=w, a_bits=a, fp32_top1=fp32_top1, fakequant_top1=rep.fakequant_top1, so_top1=rep.so_top1,
            bit_exact_vs_reference=rep.bit_exact_vs_reference, mismatched_elements=rep.mismatched_elements,
            n_test=rep.n_inputs, exact_fraction_vs_fakequant=rep.exact_fraction_vs_fakequant,
            max_abs_lsb_vs_fakequant=rep.max_abs_lsb_vs_fakequant,
            top1_agreement_vs_fakequant=rep.top1_agreement_vs_fakequant, so_path=str(run.so),
            build_seconds=round(res.seconds, 2), weight_bytes=res.meta.get("stored_weight_bytes"),
            weight_count=graph.weight_bytes())

    print(f"\n=== latency: batch 1, {threads} threads, interleaved, {repeats} rounds ===")
    example = test.images[:1]
    stats = compare_latency({f"ptq2tvm_{k.lower()}": cm for k, cm in compiled.items()}, fp_model, example, calib,
                            threads=threads, repeats=repeats, work_dir=out / "onnx", progress=progress)
    latency = {name: st.median_ms for name, st in stats.items()}
    for key in per_setting:
        per_setting[key]["latency_ms"] = {
            "ptq2tvm": latency[f"ptq2tvm_{key.lower()}"],
            **{k: v for k, v in latency.items() if not k.startswith("ptq2tvm_")}}

    from .bench.baselines import host_has_vnni

    summary = dict(model=model, data=data, n_test=int(len(test.images)), fp32_top1=fp32_top1, threads=threads,
                   calib_size=int(len(calib)), train=train_info, settings=per_setting,
                   baseline_int8_weight_bits=8 if host_has_vnni() else 7,
                   latency=[dict(runtime=k, median_ms=s.median_ms, p10_ms=s.p10_ms, p90_ms=s.p90_ms, n=s.n)
                            for k, s in stats.items()],
                   machine=machine_load(warn=False), seconds=round(time.perf_counter() - t_start, 1))
    write_json(out / "summary.json", summary)
    print_summary(summary)
    print(f"\nwrote {out / 'summary.json'}")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n=== summary: {summary['model']} on {summary['data']} ({summary['n_test']} test images) ===")
    print(f"{'setting':<8} {'FP32':>7} {'fake-q':>7} {'.so':>7} {'bit-exact':>10} {'mismatch':>9} {'int=fq':>7}")
    for key, r in summary["settings"].items():
        print(f"{key:<8} {100 * r['fp32_top1']:6.2f}% {100 * r['fakequant_top1']:6.2f}% {100 * r['so_top1']:6.2f}% "
              f"{str(r['bit_exact_vs_reference']):>10} {r['mismatched_elements']:>9} "
              f"{100 * r['top1_agreement_vs_fakequant']:6.2f}%")
    print(f"\n{'runtime (batch 1)':<20} {'median ms':>10} {'p10':>8} {'p90':>8}")
    for row in summary["latency"]:
        print(f"{row['runtime']:<20} {row['median_ms']:10.3f} {row['p10_ms']:8.3f} {row['p90_ms']:8.3f}")
    if summary.get("baseline_int8_weight_bits") == 7:
        print("note: this CPU has no VNNI, so the ORT INT8 / OpenVINO INT8 models use 7-bit weights (ORT's "
              "reduce_range, against vpmaddubsw saturation); the .so W8A8 keeps full 8-bit weights. "
              "The like-for-like .so setting here is W7A8: `bash scripts/demo.sh --bits 7/8 8/8 4/4`.")
