"""Where a lookup table's input grid sits: ``QuantConfig.lut_input_bits`` = 8 (the default: the conv output a table
reads keeps 8 bits whatever a_bits is) against = a_bits, on the project's Fashion-MNIST MobileNetV3-style (Hardswish,
Hardsigmoid SE gate) and EfficientNet-style (SiLU, Sigmoid SE gate) classifiers, calibration only (RTN), fake-quant
top-1 on the full 10,000-image test set (the .so equals the fake-quant model on these models: coverage_fmnist.md).

    .venv/bin/python benchmarks/lut_input_bits.py [--bits 4] [--first-layer-output-bits a_bits|8]
        [--out benchmarks/results/lut_input_bits_fmnist]

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq2tvm.api import quantize  # noqa: E402
from ptq2tvm.data import calibration_set, load_dataset  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.parity import fakequant_outputs  # noqa: E402
from ptq2tvm.train import train_builtin  # noqa: E402

MODELS = ["mobilenet_v3_small_fm", "efficientnet_small_fm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, help="w_bits = a_bits")
    ap.add_argument("--first-layer-output-bits", default="a_bits", help="'a_bits' or a number (QuantConfig field)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="benchmarks/results/lut_input_bits_fmnist")
    args = ap.parse_args()
    torch.set_num_threads(1)
    flo = None if args.first_layer_output_bits == "a_bits" else int(args.first_layer_output_bits)
    test = load_dataset("fashion-mnist", split="test")
    calib = calibration_set("fashion-mnist", n=512, seed=0)
    rows = []
    for name in args.models.split(","):
        model, info = train_builtin(name, "fashion-mnist", progress=False)
        for lut_bits in (8, None):
            t0 = time.perf_counter()
            cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits, lut_input_bits=lut_bits,
                              first_layer_output_bits=flo)
            qm = quantize(model, calib, cfg, method="rtn", progress=False)
            fq = fakequant_outputs(qm, test.images)
            rows.append(dict(model=name, w_bits=args.bits, a_bits=args.bits, lut_input_bits=lut_bits or args.bits,
                             method="rtn", fp32=info["test_top1"], fakequant=float((fq.argmax(1) == test.labels).mean()),
                             seconds=round(time.perf_counter() - t0)))
            print(json.dumps(rows[-1]), flush=True)
    write(Path(args.out), rows, "python " + " ".join(sys.argv))


def write(out: Path, rows: list[dict], command: str) -> None:
    meta = dict(command=command, load_average=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["# Lookup-table input grid: lut_input_bits = 8 vs = a_bits (Fashion-MNIST, full 10k test set)", "",
             f"Command: `{command}` (load average at the end {tuple(round(v, 1) for v in meta['load_average'])}: "
             "a shared machine; accuracy is not affected by load).", "",
             "| model | W/A | lut_input_bits | method | FP32 | fake-quant top-1 | - FP32 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {r['lut_input_bits']} | {r['method']} | "
                     f"{100 * r['fp32']:.2f} | {100 * r['fakequant']:.2f} | {100 * (r['fakequant'] - r['fp32']):+.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
