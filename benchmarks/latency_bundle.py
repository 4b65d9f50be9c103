"""A deployment bundle against PyTorch FP32 on the same device (made for the GPU host, where there is no `tvm`
package: it needs only numpy, torch and apache-tvm-ffi, plus this repository for the model definitions).

    python benchmarks/latency_bundle.py --bundle BUNDLE --model resnet18 [--checkpoint fp32.pt] [--repeats 50]
        [--threads N] [--out latency_bundle.json]

The bundle's device (its model.json target: cuda or cpu) is used for PyTorch too. First the bundle's own parity
check runs (``run_model.py --check``: the integers of the reference executor, when the bundle has them), then both
runtimes are timed interleaved on the same float input, each call end to end from a host array to a host array
(host-to-device copy, run, device-to-host copy, synchronized), after a warm-up; medians and p10/p90. Latency does
not depend on the weights' values: without ``--checkpoint`` the PyTorch model has seeded random weights.
For CPU numbers use benchmarks/latency_cpu.py: back-to-back alternation here lets one runtime's spinning thread
pool slow the other (measured on this 2-core CPU: ResNet-18 bundle 4.8 ms here vs ~2.5 ms with latency_cpu.py's
idle gaps).
"""

from __future__ import annotations

import argparse
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

from ptq2tvm.bundle_runner import BundleModel  # noqa: E402  (numpy + tvm_ffi only)
from ptq2tvm.models import create_model  # noqa: E402  (torch only)


def _percentiles(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [10, 50, 90])
    return {"p10_ms": round(float(q[0]), 4), "median_ms": round(float(q[1]), 4), "p90_ms": round(float(q[2]), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", required=True, help="model zoo name of the bundled network (e.g. resnet18)")
    p.add_argument("--checkpoint", help="FP32 state_dict for the PyTorch model (default: seeded random weights)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of both runtimes")
    p.add_argument("--out", default="latency_bundle.json")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)      # read when TVM's thread pool starts
    torch.set_num_threads(args.threads)
    bundle_dir = Path(args.bundle)
    model = BundleModel(bundle_dir / "model.so")
    device = "cuda" if model.cuda else "cpu"
    meta = model.meta
    check = None
    if (bundle_dir / "check_input.npy").is_file():
        want = np.load(bundle_dir / "check_output.npy")
        got = model.run_int(np.load(bundle_dir / "check_input.npy"))
        check = int((got != want).sum())
        print(f"bundle check on {device}: {'bit-exact' if check == 0 else 'MISMATCH'} ({check} of {want.size} differ)")
    torch.manual_seed(0)
    net = create_model(args.model, in_channels=meta["input"]["shape"][0]).eval().to(device)
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location=device))
    x = np.random.default_rng(0).standard_normal((model.batch, *meta["input"]["shape"])).astype(np.float32)

    def run_bundle() -> None:
        model.run_batch(x if model.main_float is not None else model.quantize(x))

    def run_torch() -> None:
        with torch.inference_mode():
            net(torch.from_numpy(x).to(device)).cpu()
        if device == "cuda":
            torch.cuda.synchronize()

    runners = {"ptq2tvm": run_bundle, "torch_fp32": run_torch}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.warmup):
        for fn in runners.values():
            fn()
    for r in range(args.repeats):
        order = list(runners)[r % 2:] + list(runners)[:r % 2]
        for k in order:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    rows = [dict(model=args.model, batch=model.batch, device=device, runtime=k,
                 threads=args.threads, **_percentiles(v),
                 **({"w_bits": meta["graph_meta"].get("w_bits"), "a_bits": meta["graph_meta"].get("a_bits"),
                     "bit_exact_check": check} if k == "ptq2tvm" else {})) for k, v in times.items()]
    for r in rows:
        print(f"{r['runtime']:12s} {device} batch {r['batch']}: median {r['median_ms']:.3f} ms "
              f"(p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f})")
    ratio = statistics.median(times["ptq2tvm"]) / statistics.median(times["torch_fp32"])
    print(f"ptq2tvm / torch_fp32 = {ratio:.2f}x")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if check in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
