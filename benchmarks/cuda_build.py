"""CUDA builds on a machine without a GPU: build time, dp4a instructions in the PTX, binary and weight sizes, and every
kernel checked bit-exact in the CPU emulation of the CUDA thread model (no GPU timing: that needs a GPU machine).

    .venv/bin/python benchmarks/cuda_build.py [--models resnet18 mobilenet_v2] [--bits 8/8 4/4] [--batch 1]
        [--qgraph RUN/model.qgraph.npz ...] [--arch sm_80] [--no-emulate]

``--qgraph`` adds already quantized integer graphs (e.g. the demo's Fashion-MNIST ResNet runs), named by their run
directory.

Seeded random weights and calibration images (the kernels' arithmetic does not depend on the values; the emulation
uses each network's own folded weights). Writes benchmarks/results/cuda_build.json (one row per build: model,
batch, w_bits, a_bits, arch, build_seconds, dp4a_count, fatbin_bytes, weight_bytes, kernels_emulated,
emulation_bit_exact, emulation_seconds) and cuda_build.md.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.api import compile_so, quantize, to_integer, write_json  # noqa: E402
from ptq2tvm.atomic import write_text  # noqa: E402
from ptq2tvm.backend.cuda_emulation import emulate_every_kernel  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.ir.graph import IntegerGraph  # noqa: E402
from ptq2tvm.models import create_model  # noqa: E402


def table(rows: list[dict]) -> str:
    """Markdown table with one column per key of the rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--bits", nargs="+", default=["8/8", "4/4"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--qgraph", nargs="*", default=[], help="integer graph files to build too")
    p.add_argument("--arch", default="sm_80")
    p.add_argument("--no-emulate", action="store_true", help="skip the (minutes-long) emulation of every kernel")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    graphs = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        calib = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
        for setting in args.bits:
            w, a = (int(v) for v in setting.split("/"))
            graphs.append((name, w, a, lambda m=model, c=calib, w=w, a=a:
                           to_integer(quantize(m, c, QuantConfig(w, a), progress=False))))
    for path in map(Path, args.qgraph):
        g = IntegerGraph.load(path)
        name = "/".join(path.parts[-3:-1])            # e.g. demo/w8a8
        graphs.append((name, g.meta.get("w_bits", "?"), g.meta.get("a_bits", "?"), lambda g=g: g))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptq2tvm-cuda-build-") as work:
        for name, w, a, make_graph in graphs:
            graph = make_graph()
            res = compile_so(graph, Path(work) / f"{name}_w{w}a{a}.so", batch=args.batch, target=f"cuda:{args.arch}")
            meta = res.meta
            row = dict(model=name, batch=args.batch, w_bits=w, a_bits=a, arch=args.arch,
                       build_seconds=round(res.seconds, 2), dp4a_count=meta["cuda_dp4a_count"],
                       fatbin_bytes=sum(len(base64.b64decode(b["data_b64"])) for b in meta["cuda_binaries"]),
                       weight_bytes=meta["stored_weight_bytes"])
            if not args.no_emulate:
                t0 = time.perf_counter()
                row["kernels_emulated"] = len(emulate_every_kernel(graph, args.batch))   # raises on a mismatch
                row["emulation_bit_exact"] = True
                row["emulation_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(row, flush=True)
    out = Path(args.out)
    write_json(out / "cuda_build.json", rows)
    footer = (f"Command: `.venv/bin/python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}), on a machine without "
              "a GPU: builds with nvcc, kernels run in the CPU emulation of the CUDA thread model "
              "(kernels/cuda_emulator.py). No GPU timing.")
    title = "# CUDA builds (dp4a), checked in emulation\n\n"
    write_text(out / "cuda_build.md", title + table(rows) + "\n" + footer + "\n")
    print(table(rows))
    print(f"wrote {out / 'cuda_build.json'} and cuda_build.md")


if __name__ == "__main__":
    main()
