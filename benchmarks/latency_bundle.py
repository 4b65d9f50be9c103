"""A deployment bundle against PyTorch FP32 on the same device (made for the GPU host, where there is no `tvm`
package: it needs only numpy, torch and apache-tvm-ffi, plus this repository for the model definitions).

    python benchmarks/latency_bundle.py --bundle BUNDLE --model resnet18 [--checkpoint fp32.pt] [--repeats 50]
        [--threads N] [--calls-per-turn 5] [--out latency_bundle.json]

The bundle's device (its model.json target: cuda or cpu) is used for PyTorch too. First the bundle's own parity
check runs (``run_model.py --check``: the integers of the reference executor, when the bundle has them), then both
runtimes are timed on the same float input with the protocol of ``ptq2tvm bench`` (``ptq2tvm.bench.time_interleaved``:
turns interleaved in rotated order, each an idle gap, one untimed call, ``--calls-per-turn`` timed calls); each call
end to end from a host array to a host array (host-to-device copy, run, device-to-host copy, synchronized); medians
and p10/p90. Latency does not depend on the weights' values: without ``--checkpoint`` the PyTorch model has seeded
random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.bench.timing import ratio, time_interleaved  # noqa: E402  (numpy only)
from ptq2tvm.bundle_runner import BundleModel  # noqa: E402  (numpy + tvm_ffi only)
from ptq2tvm.models import create_model  # noqa: E402  (torch only)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", required=True, help="model zoo name of the bundled network (e.g. resnet18)")
    p.add_argument("--checkpoint", help="FP32 state_dict for the PyTorch model (default: seeded random weights)")
    p.add_argument("--repeats", type=int, default=20, help="timed turns per runtime")
    p.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    p.add_argument("--calls-per-turn", type=int, default=5, help="timed calls back to back per turn")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of both runtimes")
    p.add_argument("--out", default="latency_bundle.json")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)      # read when TVM's thread pool starts
    bundle_dir = Path(args.bundle)
    model = BundleModel(bundle_dir / "model.so")
    device = "cuda" if model.cuda else "cpu"
    meta = model.meta
    check = None
    if (bundle_dir / "check_input.npy").is_file():
        check, size, _ = model.check(bundle_dir)
        print(f"bundle check on {device}: {'bit-exact' if check == 0 else 'MISMATCH'} ({check} of {size} differ)")
    torch.manual_seed(0)
    net = create_model(args.model, in_channels=meta["input"]["shape"][0]).eval().to(device)
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location=device))
    x = np.random.default_rng(0).standard_normal((model.batch, *meta["input"]["shape"])).astype(np.float32)

    def run_bundle(batch: np.ndarray) -> np.ndarray:
        return model.run_batch(batch if model.main_float is not None else model.quantize(batch))

    def run_torch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = net(torch.from_numpy(batch).to(device)).cpu().numpy()   # .cpu() waits for the device
        return out

    stats = time_interleaved({"ptq2tvm": run_bundle, "torch_fp32": run_torch}, x, warmup=args.warmup,
                             repeats=args.repeats, threads=args.threads, progress=False,
                             calls_per_turn=args.calls_per_turn)
    rows = []
    for name, st in stats.items():
        row = dict(model=args.model, batch=model.batch, device=device, runtime=name, threads=args.threads,
                   median_ms=round(st.median_ms, 4), p10_ms=round(st.p10_ms, 4), p90_ms=round(st.p90_ms, 4))
        if name == "ptq2tvm":
            row.update(w_bits=meta["graph_meta"].get("w_bits"), a_bits=meta["graph_meta"].get("a_bits"),
                       bit_exact_check=check)
        rows.append(row)
        print(f"{name:12s} {device} batch {model.batch}: median {st.median_ms:.3f} ms "
              f"(p10 {st.p10_ms:.3f}, p90 {st.p90_ms:.3f})")
    print(f"ptq2tvm / torch_fp32 = {ratio(stats['ptq2tvm'], stats['torch_fp32']):.2f}x")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if check in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
