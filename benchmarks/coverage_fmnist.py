"""The new op families on real data: MobileNetV3-style (Hardswish, SE with Hardsigmoid) and EfficientNet-style
(SiLU, SE with Sigmoid) classifiers and an EDSR-style x2 super-resolution model, trained by the project on
Fashion-MNIST (cached under ~/.cache/ptq2tvm; training takes minutes the first time), quantized, compiled and
evaluated on the full 10,000-image test set.

    .venv/bin/python benchmarks/coverage_fmnist.py [--iters 500] [--out benchmarks/results/coverage_fmnist]

Rows: FP32, W8A8 (calibration only) fake-quant and .so, W4A4 with QDrop + AdaQTransform (``--iters`` per unit)
fake-quant and .so; top-1 for the classifiers, PSNR (dB) for the SR model (whose LR input is the 2x2 average pool
of the 28x28 image). Also ``<out>_edsr.png``: LR / bilinear / FP32 / W8A8 .so / W4A4 .so side by side.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq2tvm.api import compile_so, quantize, to_integer  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel  # noqa: E402
from ptq2tvm.data import calibration_set, load_dataset  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.parity import fakequant_outputs  # noqa: E402
from ptq2tvm.reconstruct.recon import ReconSettings  # noqa: E402

CLASSIFIERS = ["mobilenet_v3_small_fm", "efficientnet_small_fm"]
SR = "edsr_small_fm"


def _settings(bits: tuple[int, int], iters: int) -> tuple[str, ReconSettings | None]:
    if bits == (8, 8):
        return "rtn", None
    return "qdrop", ReconSettings(method="qdrop", adaqtransform=True, iters=iters, seed=0, threads=1)


def classifier_rows(name: str, iters: int, calib: np.ndarray, test, workdir: Path) -> list[dict]:
    from ptq2tvm.train import train_builtin

    model, info = train_builtin(name, "fashion-mnist", progress=False)
    rows = []
    for bits in ((8, 8), (4, 4)):
        method, settings = _settings(bits, iters)
        t0 = time.perf_counter()
        qm = quantize(model, calib, QuantConfig(w_bits=bits[0], a_bits=bits[1]), method=method, progress=False,
                      settings=settings)
        qtime = time.perf_counter() - t0
        graph = to_integer(qm)
        so = workdir / f"{name}_w{bits[0]}a{bits[1]}.so"
        compile_so(graph, so, batch=100)
        so_logits = CompiledModel(so, threads=2)(test.images)
        fq_logits = fakequant_outputs(qm, test.images)
        so_top1 = float((so_logits.argmax(1) == test.labels).mean())
        fq_top1 = float((fq_logits.argmax(1) == test.labels).mean())
        rows.append(dict(model=name, setting=f"W{bits[0]}A{bits[1]}" + (" QDrop+AdaQ" if method != "rtn" else " RTN"),
                         iters=iters if method != "rtn" else 0, fp32=info["test_top1"], fakequant=fq_top1,
                         so=so_top1, so_minus_fp32=so_top1 - info["test_top1"], so_minus_fakequant=so_top1 - fq_top1,
                         agreement=float((so_logits.argmax(1) == fq_logits.argmax(1)).mean()),
                         quantize_seconds=round(qtime, 1)))
        print(rows[-1], flush=True)
    return rows


def sr_rows(iters: int, train, test, workdir: Path, png: Path) -> list[dict]:
    from ptq2tvm.superres import bilinear_baseline, downsample, evaluate_psnr
    from ptq2tvm.train import train_builtin

    model, info = train_builtin(SR, "fashion-mnist", progress=False)
    calib = downsample(train.images[np.random.default_rng(0).permutation(len(train.images))[:512]], 2)
    rows, preds = [], {}
    lr = downsample(test.images[:6], 2)
    for bits in ((8, 8), (4, 4)):
        method, settings = _settings(bits, iters)
        qm = quantize(model, calib.astype(np.float32), QuantConfig(w_bits=bits[0], a_bits=bits[1]), method=method,
                      progress=False, settings=settings)
        graph = to_integer(qm)
        so = workdir / f"edsr_w{bits[0]}a{bits[1]}.so"
        compile_so(graph, so, batch=100)
        cm = CompiledModel(so, threads=2)
        so_psnr = evaluate_psnr(cm, test, 2)
        fq_psnr = evaluate_psnr(lambda x: fakequant_outputs(qm, x), test, 2)
        preds[f"W{bits[0]}A{bits[1]} .so"] = cm(lr)
        rows.append(dict(model=SR, setting=f"W{bits[0]}A{bits[1]}" + (" QDrop+AdaQ" if method != "rtn" else " RTN"),
                         iters=iters if method != "rtn" else 0, fp32=info["test_psnr_db"],
                         bilinear=info["bilinear_psnr_db"], fakequant=fq_psnr, so=so_psnr,
                         so_minus_fp32=so_psnr - info["test_psnr_db"]))
        print(rows[-1], flush=True)
    with torch.no_grad():
        preds = {"bilinear": bilinear_baseline(2)(lr), "FP32": model(torch.from_numpy(lr)).numpy(), **preds}
    _save_png(png, lr, test.images[:6], preds)
    return rows


def _save_png(path: Path, lr: np.ndarray, hr: np.ndarray, preds: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["LR (14x14)"] + list(preds) + ["HR (28x28)"]
    fig, axes = plt.subplots(len(lr), len(cols), figsize=(1.6 * len(cols), 1.6 * len(lr)))
    for i in range(len(lr)):
        imgs = [lr[i, 0]] + [p[i, 0] for p in preds.values()] + [hr[i, 0]]
        for j, (ax, im) in enumerate(zip(axes[i], imgs)):
            ax.imshow(im, cmap="gray", vmin=float(hr[i, 0].min()), vmax=float(hr[i, 0].max()))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=500, help="reconstruction iterations per unit for the W4A4 rows")
    ap.add_argument("--out", default="benchmarks/results/coverage_fmnist")
    ap.add_argument("--models", default=",".join(CLASSIFIERS + [SR]))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    test = load_dataset("fashion-mnist", split="test")
    calib = calibration_set("fashion-mnist", n=512, seed=0)
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cov_fm_") as td:
        for name in args.models.split(","):
            if name == SR:
                rows += sr_rows(args.iters, load_dataset("fashion-mnist", split="train"), test, Path(td),
                                out.with_name(out.name + "_edsr.png"))
            else:
                rows += classifier_rows(name, args.iters, calib, test, Path(td))
    meta = dict(command="python " + " ".join(sys.argv), load_average=os.getloadavg(),
                seconds=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M"))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["# New op families on Fashion-MNIST (full 10k test set)", "",
             f"Command: `{meta['command']}` ({meta['seconds']} s; load average at the end "
             f"{tuple(round(v, 1) for v in meta['load_average'])}: a shared machine).", "",
             "| model | setting | FP32 | fake-quant | .so | .so - FP32 | .so - fake-quant |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] == SR:
            lines.append(f"| {r['model']} (PSNR dB; bilinear {r['bilinear']:.2f}) | {r['setting']} | {r['fp32']:.2f} | "
                         f"{r['fakequant']:.2f} | {r['so']:.2f} | {r['so_minus_fp32']:+.2f} | "
                         f"{r['so'] - r['fakequant']:+.3f} |")
        else:
            lines.append(f"| {r['model']} (top-1 %) | {r['setting']} | {100 * r['fp32']:.2f} | "
                         f"{100 * r['fakequant']:.2f} | {100 * r['so']:.2f} | {100 * r['so_minus_fp32']:+.2f} | "
                         f"{100 * r['so_minus_fakequant']:+.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
