"""Write benchmarks/results/gpu_<name>.{json,md} from what scripts/device/gpu_check.sh returned.

    .venv/bin/python scripts/device/report.py --bundles /work/.device/1/latency_bundles.json \\
        [--sweep /tmp/sweep] [--env ENV.txt] [--tests gpu_tests.txt] \\
        [--cpu-results benchmarks/results/accuracy_fmnist_fidelity.json] [--name h200]

``--bundles``: the bundle checks and timings (latency_bundle.py's rows, per bundle); ``--sweep``: the unpacked
``sweep.tgz`` (env.txt, rows/solo*.json: the reconstructions run alone on the GPU, rows/row*_ckpt: rows stopped at
the deadline, with their finished units); ``--env``: the environment lines where the sweep has none (the script's
log); ``--tests``: pytest's output of the GPU tests. Each solo row is compared with its CPU twin in ``--cpu-results``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ptq2tvm.atomic import write_text  # noqa: E402


def bundle_rows(path: Path) -> list[dict]:
    rows = []
    for tag, runs in json.loads(path.read_text()).items():
        ours = next(r for r in runs if r["runtime"] == "ptq2tvm")
        torch_fp32 = next((r for r in runs if r["runtime"] == "torch_fp32"), None)
        rows.append(dict(bundle=tag, model=ours["model"], w_bits=ours.get("w_bits"), a_bits=ours.get("a_bits"),
                         batch=ours["batch"], bit_exact=ours.get("bit_exact_check") == 0,
                         so_ms=ours["median_ms"], so_p10=ours["p10_ms"], so_p90=ours["p90_ms"],
                         torch_fp32_ms=torch_fp32["median_ms"] if torch_fp32 else None,
                         ratio=round(ours["median_ms"] / torch_fp32["median_ms"], 3) if torch_fp32 else None))
    return rows


def test_summary(path: Path) -> dict:
    """pytest's last summary line and the names of the failed tests (from the ``____ name ____`` headers)."""
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    failed = re.findall(r"^_{3,} (\S+) _{3,}$", text, flags=re.M)
    return dict(summary=lines[-1].strip("= ") if lines else "no summary line", failed=failed)


def solo_row(path: Path, cpu_results: Path) -> dict:
    gpu = json.loads(path.read_text())["rows"][0]
    cpu_rows = [r for r in json.loads(cpu_results.read_text())["rows"]
                if all(r.get(k) == gpu.get(k) for k in ("model", "method", "granularity", "adaqtransform", "w_bits",
                                                           "a_bits", "iters", "n_calib"))
                and r.get("device", "cpu") == "cpu"]
    method = gpu["method"] + (f":{gpu['granularity']}" if gpu.get("granularity") not in (None, "block") else "") \
        + ("+adaq" if gpu.get("adaqtransform") else "")
    row = dict(model=gpu["model"], bits=f"W{gpu['w_bits']}A{gpu['a_bits']}", method=method, seed=gpu["seed"],
               iters_per_unit=gpu["iters"], gpu=gpu.get("gpu"), gpu_fakequant_top1=gpu["fakequant_top1"],
               gpu_recon_seconds=gpu["seconds"], gpu_iters_per_s=gpu["iters_per_s"], gpu_fp32_top1=gpu["fp32_top1"])
    twin = next((r for r in cpu_rows if r["seed"] == gpu["seed"]), None)
    if twin is None:  # no CPU row of these settings and seed yet: the GPU row stands alone
        return dict(row, cpu_fakequant_top1_same_seed=None, cpu_seeds=len(cpu_rows))
    vals = [r["fakequant_top1"] for r in cpu_rows]
    return dict(row,
                cpu_fakequant_top1_same_seed=twin["fakequant_top1"], cpu_so_top1_same_seed=twin["so_top1"],
                cpu_fp32_top1_same_seed=twin["fp32_top1"],
                cpu_iters_per_s_same_seed=twin["iters_per_s"], cpu_recon_seconds_same_seed=twin["seconds"],
                cpu_seeds_mean=statistics.mean(vals), cpu_seeds_min=min(vals), cpu_seeds_max=max(vals),
                cpu_seeds_std=statistics.stdev(vals) if len(vals) > 1 else 0.0, cpu_seeds=len(vals))


def concurrent_rows(sweep: Path) -> dict:
    states = [json.loads(p.read_text()) for p in sorted(sweep.glob("rows/row*_ckpt/*/state.json"))]
    rates = [s["iterations"] / s["optim_seconds"] for s in states if s.get("optim_seconds")]
    return dict(processes=len(states), iterations=sum(s["iterations"] for s in states),
                per_process_it_s_min=round(min(rates), 1), per_process_it_s_median=round(statistics.median(rates), 1),
                per_process_it_s_max=round(max(rates), 1)) if states else {}


def finished_rows_vs_cpu(sweep: Path, cpu_results: Path) -> list[dict]:
    """Each row the concurrent sweep finished, with the CPU rows of the same settings and seed (fake-quant top-1)."""
    keys = ("model", "method", "granularity", "adaqtransform", "w_bits", "a_bits", "iters", "n_calib", "seed")
    cpu = [r for r in json.loads(cpu_results.read_text())["rows"] if r.get("device", "cpu") == "cpu"]
    out = []
    for path in sorted(sweep.glob("rows/row*.json")):
        for gpu in json.loads(path.read_text())["rows"]:
            twins = [r for r in cpu if all(r.get(k) == gpu.get(k) for k in keys)
                     and r.get("expand_batch", 1) == gpu.get("expand_batch", 1)]
            method = gpu["method"] + (f":{gpu['granularity']}" if gpu.get("granularity") not in (None, "block")
                                      else "") + ("+adaq" if gpu.get("adaqtransform") else "")
            out.append(dict(model=gpu["model"], bits=f"W{gpu['w_bits']}A{gpu['a_bits']}", method=method,
                            seed=gpu["seed"], gpu_fakequant_top1=gpu["fakequant_top1"], gpu_fp32_top1=gpu["fp32_top1"],
                            cpu_fakequant_top1=[r["fakequant_top1"] for r in twins],
                            cpu_fp32_top1=[r["fp32_top1"] for r in twins]))
    return out


def command_line(argv: list[str]) -> str:
    """The command as typed, with ``--note``'s text (printed in full at the end) shortened to ``"..."``."""
    out = []
    for i, a in enumerate(argv):
        out.append('"..."' if i and argv[i - 1] == "--note" else a)
    return " ".join(out)


SOLO_NOTE = ("The two runs are not bit-identical and need not be: QDrop masks are drawn by the device's own generator "
             "(torch.rand on the GPU, numpy's or torch's CPU generator on the CPU) and cuDNN sums convolutions in "
             "another order.")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", required=True)
    p.add_argument("--sweep", help="the unpacked sweep.tgz (solo rows, concurrent rows, env.txt)")
    p.add_argument("--env", help="a file with the environment lines (when the sweep has no env.txt)")
    p.add_argument("--tests", help="pytest's output of the GPU tests (gpu_tests.txt)")
    p.add_argument("--cpu-results", default=str(ROOT / "benchmarks" / "results" / "accuracy_fmnist_fidelity.json"))
    p.add_argument("--sweep-seconds", type=float, default=141.0, help="wall time of the concurrent rows")
    p.add_argument("--name", default="h200")
    p.add_argument("--note", default="", help="a closing paragraph (what the run found, what came after it)")
    args = p.parse_args()
    sweep = Path(args.sweep) if args.sweep else None
    env_file = Path(args.env) if args.env else (sweep / "env.txt" if sweep else None)
    env = env_file.read_text().strip() if env_file and env_file.is_file() else ""
    solos = sorted(sweep.glob("rows/solo*.json")) if sweep else []
    res = dict(env=env, bundles=bundle_rows(Path(args.bundles)),
               solo=[solo_row(f, Path(args.cpu_results)) for f in solos],
               concurrent=concurrent_rows(sweep) if sweep else {},
               finished=finished_rows_vs_cpu(sweep, Path(args.cpu_results)) if sweep else [],
               tests=test_summary(Path(args.tests)) if args.tests else None)
    if res["concurrent"]:
        res["concurrent"]["wall_seconds"] = args.sweep_seconds
    out = ROOT / "benchmarks" / "results" / f"gpu_{args.name}"
    write_text(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    gpu_name = next((ln.split(",")[0] for ln in env.splitlines() if ln.startswith("NVIDIA")), "GPU")
    lines = [f"# On a lent GPU ({gpu_name}): CUDA bundles and reconstruction", "",
             "Made by `bash scripts/device/gpu_check.sh` on the device machine (scripts/device/README.md), this "
             f"table by `.venv/bin/python {command_line(sys.argv)}`.", "", "```", env, "```", "",
             "## CUDA .so (dp4a kernels, sm_90 fatbin) in a deployment bundle", "",
             "`run_model.py --check`: the bundle's 8 seeded inputs through the .so on the GPU against the reference "
             "executor's integers (no `tvm` package on that machine: numpy + apache-tvm-ffi + TVM's runtime "
             "libraries). Latency: `benchmarks/latency_bundle.py` (time_interleaved, 20 turns of 5 calls, each call "
             "host array in -> host array out, synchronized), PyTorch FP32 eager on the same GPU as the peer; "
             "resnet_small is the Fashion-MNIST model (28x28), the others 224x224 with seeded random weights.", "",
             "| bundle | batch | bit-exact on the GPU | .so median ms (p10-p90) | PyTorch FP32 ms | .so / PyTorch |",
             "|---|---|---|---|---|---|"]
    for r in res["bundles"]:
        lines.append(f"| {r['bundle']} | {r['batch']} | {'yes' if r['bit_exact'] else 'NO'} | {r['so_ms']:.3f} "
                     f"({r['so_p10']:.3f}-{r['so_p90']:.3f}) | {r['torch_fp32_ms']:.3f} | {r['ratio']:.2f}x |")
    lines += ["", "PyTorch FP32 here is eager mode at batch 1-8: launch-bound, not what cuDNN can reach with CUDA "
              "graphs, TensorRT or FP16; it is the peer the bundle script has on that machine, not a claim of the "
              "fastest GPU runtime. No TensorRT / ORT-GPU row (not installed there).", ""]
    if res["tests"]:
        t = res["tests"]
        lines += ["## The tests that skip without a CUDA device", "",
                  f"`python3 -m pytest tests/test_recon_runtime.py` on the GPU machine: {t['summary']}"
                  + (f"; failed: {', '.join(f'`{n}`' for n in t['failed'])}" if t["failed"] else "") + ".", ""]
    for s in res["solo"]:
        if s["cpu_fakequant_top1_same_seed"] is None:
            lines += [f"## {s['model']} {s['bits']} {s['method']} on the GPU", "",
                      f"seed {s['seed']}, {s['iters_per_unit']} iterations per unit, `--device cuda`, run alone: "
                      f"fake-quant top-1 **{100 * s['gpu_fakequant_top1']:.2f}%** in {s['gpu_recon_seconds']:.0f} s "
                      f"({s['gpu_iters_per_s']:.0f} it/s). No CPU row of these settings and seed in "
                      "`accuracy_fmnist_fidelity.json` to compare with.", ""]
            continue
        lines += [f"## {s['model']} {s['bits']} {s['method']} on the GPU against the same run on the CPU", "",
                  f"seed {s['seed']}, {s['iters_per_unit']} iterations per unit, batch 32, 1024 calibration images "
                  "(the train file carried to the machine keeps exactly the calibration subset), `--device cuda`, "
                  "run alone on the machine:", "",
                  "| | fake-quant top-1 | reconstruction s | it/s |", "|---|---|---|---|",
                  f"| GPU ({s['gpu']}) | {100 * s['gpu_fakequant_top1']:.2f} | {s['gpu_recon_seconds']:.0f} | "
                  f"{s['gpu_iters_per_s']:.0f} |",
                  f"| CPU, same seed | {100 * s['cpu_fakequant_top1_same_seed']:.2f} "
                  f"(.so {100 * s['cpu_so_top1_same_seed']:.2f}) | {s['cpu_recon_seconds_same_seed']:.0f} | "
                  f"{s['cpu_iters_per_s_same_seed']:.0f} |",
                  f"| CPU, {s['cpu_seeds']} seeds | {100 * s['cpu_seeds_mean']:.2f} ± {100 * s['cpu_seeds_std']:.2f} "
                  "| | |", "",
                  f"GPU - CPU (same seed): {100 * (s['gpu_fakequant_top1'] - s['cpu_fakequant_top1_same_seed']):+.2f}"
                  f" points; the CPU seeds span {100 * s['cpu_seeds_min']:.2f}-{100 * s['cpu_seeds_max']:.2f}. "
                  + SOLO_NOTE
                  + (f" The FP32 checkpoints differ (GPU run {100 * s['gpu_fp32_top1']:.2f}, CPU rows "
                     f"{100 * s['cpu_fp32_top1_same_seed']:.2f}: the models are trained per host), so this compares "
                     "two checkpoints too." if s["gpu_fp32_top1"] != s["cpu_fp32_top1_same_seed"] else ""), ""]
    c = res["concurrent"]
    if c:
        lines += ["## Several reconstructions at once on the one GPU", "",
                  f"{c['processes']} rows (`scripts/device/rows.txt`) as separate processes "
                  "(`benchmarks/gpu_sweep.py`) "
                  f"for {c['wall_seconds']:.0f} s of wall time (start-up and calibration included): "
                  f"{c['iterations']} iterations done, **{c['iterations'] / c['wall_seconds']:.0f} it/s together**; "
                  f"per process {c['per_process_it_s_min']}-{c['per_process_it_s_max']} it/s (median "
                  f"{c['per_process_it_s_median']}) of reconstruction time. Rows stopped at the deadline keep their "
                  "finished units and resume on the CPU.", ""]
    if res["finished"]:
        lines += ["Rows the sweep finished, against the CPU rows of the same settings and seed in "
                  "`accuracy_fmnist_fidelity.json` (fake-quant top-1 %, and the FP32 checkpoint's top-1: the models "
                  "are trained per host, so a different FP32 figure is a different checkpoint; not merged there, "
                  "since the CPU rows exist):",
                  "", "| model | bits | method | seed | GPU (FP32) | CPU (FP32) | GPU - CPU |",
                  "|---|---|---|---|---|---|---|"]
        for f in res["finished"]:
            cpu = f["cpu_fakequant_top1"]
            fp32 = "/".join(sorted({f"{100 * v:.2f}" for v in f["cpu_fp32_top1"]}))
            lines.append(f"| {f['model']} | {f['bits']} | {f['method']} | {f['seed']} | "
                         f"{100 * f['gpu_fakequant_top1']:.2f} ({100 * f['gpu_fp32_top1']:.2f}) | "
                         + (" / ".join(f"{100 * v:.2f}" for v in cpu) + f" ({fp32})" if cpu else "none") + " | "
                         + (f"{100 * (f['gpu_fakequant_top1'] - statistics.mean(cpu)):+.2f}" if cpu else "") + " |")
        lines.append("")
    if args.note:
        lines += ["## Note", "", args.note, ""]
    write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
