"""Evaluation time of the fake-quant model's exact conv / linear path (``QuantModel._integer_weighted``) against its
float path, with the layers' integer constants cached (``QLayer.integer_constants``) and recomputed every call.

    .venv/bin/python benchmarks/exact_path_speed.py [--model resnet18] [--batches 1 16] [--threads 2]

Random-weight model (the zoo definition, seeded), W8A8 RTN on 16 random 224x224 images; per batch size, the three
modes run interleaved in one process under ``torch.no_grad()``, medians of the timed calls. Writes
benchmarks/results/exact_path_speed.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq2tvm.api import quantize  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402
from ptq2tvm.bench.runner import host_isa_label  # noqa: E402
from ptq2tvm.data import CalibrationData  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel  # noqa: E402
from ptq2tvm.models import create_model  # noqa: E402

MODES = {"float": (False, False), "exact": (True, False), "exact_uncached": (True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "exact_path_speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    images = np.random.default_rng(0).standard_normal((max(16, *args.batches), 3, 224, 224)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(model, CalibrationData(images[:16]), QuantConfig(w_bits=8, a_bits=8), progress=False).eval()
    rows = []
    for bs in args.batches:
        x = torch.from_numpy(images[:bs])
        times: dict[str, list[float]] = {k: [] for k in MODES}
        with torch.no_grad():
            for flag, _ in MODES.values():          # warm-up (and fill the cache)
                QuantModel.exact_weighted = flag
                qm(x)
            for _ in range(args.rounds):
                for mode, (flag, uncached) in MODES.items():
                    QuantModel.exact_weighted = flag
                    if uncached:
                        for layer in qm.layers.values():
                            layer._constants_cache = None
                    t0 = time.perf_counter()
                    qm(x)
                    times[mode].append((time.perf_counter() - t0) * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append(dict(model=args.model, batch=bs, threads=args.threads, **{f"{k}_ms": round(v, 2) for k, v in
                                                                            med.items()},
                         exact_vs_float=round(med["exact"] / med["float"], 3),
                         uncached_vs_float=round(med["exact_uncached"] / med["float"], 3)))
    QuantModel.exact_weighted = True
    host = dict(cpu=cpu_features(llvm=False)["model_name"], isa=host_isa_label(),
                loadavg_1min=round(os.getloadavg()[0], 2))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, host=host, command=" ".join(sys.argv),
                                                        date=time.strftime("%Y-%m-%d")), indent=1))
    lines = ["| model | batch | float ms | exact ms | exact, constants recomputed ms | exact / float | "
             "recomputed / float |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['float_ms']:.1f} | {r['exact_ms']:.1f} | "
              f"{r['exact_uncached_ms']:.1f} | {r['exact_vs_float']:.2f}x | {r['uncached_vs_float']:.2f}x |"
              for r in rows]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(
        "# Fake-quant evaluation: exact conv / linear path vs float path (W8A8, no_grad)\n\n" + table + "\n\n"
        f"Host: {host['cpu']} ({host['isa']}), {args.threads} threads, 1-minute load {host['loadavg_1min']}. "
        f"Medians of {args.rounds} interleaved rounds. Command: `.venv/bin/python {' '.join(sys.argv)}` "
        f"({time.strftime('%Y-%m-%d')}).\n")
    print(table)


if __name__ == "__main__":
    main()
