"""Accuracy of the reconstruction methods on the small Fashion-MNIST models: FP32, fake-quant and compiled .so top-1.

    .venv/bin/python benchmarks/accuracy_fmnist.py                       # the full table (~hours on 2 cores)
    .venv/bin/python benchmarks/accuracy_fmnist.py --models resnet_small --methods qdrop --bits W4A4 \
        --seeds 0 --iters 200 --eval-limit 2000                          # one quick row

Rows {model, method, granularity, adaqtransform, w_bits, a_bits, seed, iters, fp32_top1, fakequant_top1, so_top1,
seconds, ...} go to ``<out>.json`` (rewritten atomically after every row) and a markdown table ``<out>.md`` (mean
+- std over seeds). The run is resumable at two levels: finished rows are skipped, and an interrupted row resumes
after its last finished reconstruction unit (``<out>_ckpt/<row key>``).

Methods are ``method[:granularity][+adaq]``, e.g. ``rtn``, ``adaround``, ``brecq``, ``qdrop``, ``qdrop:mrecg-modcap``,
``qdrop:mrecg-loss``, ``network+adaq``. First and last layers stay at 8 bit (QuantConfig default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.atomic import write_text  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402
from ptq2tvm.reconstruct import ReconSettings, reconstruct  # noqa: E402

DEFAULT_METHODS = ["rtn", "adaround", "brecq", "qdrop", "qdrop:mrecg-modcap", "qdrop:mrecg-loss", "qdrop+adaq",
                   "network+adaq"]
DEFAULT_BITS = ["W4A4", "W2A4", "W3A3"]


def parse_method(spec: str) -> tuple[str, str | None, bool]:
    adaq = spec.endswith("+adaq")
    spec = spec[:-5] if adaq else spec
    method, _, gran = spec.partition(":")
    return method, (gran or None), adaq


def parse_bits(spec: str) -> tuple[int, int]:
    s = spec.upper()
    if not (s.startswith("W") and "A" in s):
        raise ValueError(f"bits must look like W4A4, got {spec!r}")
    w, a = s[1:].split("A")
    return int(w), int(a)


def row_key(r: dict[str, Any]) -> str:
    return (f"{r['model']}|{r['method']}|{r['granularity']}|{'adaq' if r['adaqtransform'] else '-'}|"
            f"W{r['w_bits']}A{r['a_bits']}|s{r['seed']}|i{r['iters']}|c{r['n_calib']}|e{r['eval_images']}")


def markdown(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        k = (r["model"], r["method"], r["granularity"], r["adaqtransform"], r["w_bits"], r["a_bits"], r["iters"])
        groups.setdefault(k, []).append(r)

    def ms(vals: list[float]) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        m = 100 * statistics.mean(vals)
        return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {100 * statistics.stdev(vals):.2f}"

    lines = ["| model | method | granularity | AdaQ | W/A | iters | seeds | FP32 | fake-quant | .so | s/run | it/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(groups, key=lambda k: (k[0], -k[4], -k[5], k[1], k[2] or "", k[3])):
        g = groups[k]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {'yes' if k[3] else 'no'} | W{k[4]}A{k[5]} | {k[6]} | {len(g)} | "
                     f"{ms([r['fp32_top1'] for r in g])} | {ms([r['fakequant_top1'] for r in g])} | "
                     f"{ms([r['so_top1'] for r in g])} | {statistics.mean(r['seconds'] for r in g):.0f} | "
                     f"{statistics.mean(r.get('iters_per_s', 0.0) for r in g):.1f} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def top1_torch(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, bs: int = 500) -> float:
    correct = 0
    for i in range(0, len(images), bs):
        out = model(torch.from_numpy(np.ascontiguousarray(images[i:i + bs])))
        correct += int((out.argmax(1).numpy() == labels[i:i + bs]).sum())
    return correct / len(images)


def run_row(model: torch.nn.Module, calib: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, row: dict[str, Any],
            args: argparse.Namespace, ckpt: Path, work: Path) -> dict[str, Any]:
    from ptq2tvm.api import compile_so, to_integer, top1_so
    from ptq2tvm.backend.runtime import CompiledModel

    settings = ReconSettings(method=row["method"], granularity=row["granularity"],
                             adaqtransform=row["adaqtransform"], iters=max(1, row["iters"]), seed=row["seed"],
                             batch_size=args.batch_size, threads=args.threads)
    t0 = time.perf_counter()
    qm, rep = reconstruct(model, calib, QuantConfig(row["w_bits"], row["a_bits"]), settings,
                          progress=not args.quiet, checkpoint_dir=ckpt)
    seconds = time.perf_counter() - t0
    qm.eval()
    fq = top1_torch(qm, test_x, test_y)
    graph = to_integer(qm)
    so = work / "model.so"
    compile_so(graph, so, batch=args.so_batch)
    so_top1 = top1_so(CompiledModel(so), test_x, test_y)
    rep.save(ckpt, stem="recon_loss")
    return dict(row, fakequant_top1=fq, so_top1=so_top1, seconds=round(seconds, 2),
                rtn_seconds=round(rep.rtn_seconds, 2), iterations=rep.iterations,
                iters_per_s=round(rep.iters_per_s, 2), units=len(rep.units), lam=rep.lam,
                mrecg_groups=(rep.mrecg or {}).get("groups"), resumed_units=rep.resumed_units,
                loss_json=str(ckpt / "recon_loss.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet_small,mobilenet_v2_small")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits (smoke tests)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the FP32 models (default: recipe)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--bits", default=",".join(DEFAULT_BITS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--calib", type=int, default=1024, help="calibration images (train split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: the whole test split)")
    p.add_argument("--so-batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--train-threads", type=int, default=None, help="threads for training a missing FP32 model "
                   "(default: ptq2tvm.train's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy_fmnist"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from ptq2tvm.data import calibration_set, load_dataset
    from ptq2tvm.train import train_builtin

    out = Path(args.out)
    jpath, mpath = out.with_suffix(".json"), out.with_suffix(".md")
    rows: list[dict[str, Any]] = json.loads(jpath.read_text())["rows"] if jpath.is_file() else []
    done = {row_key(r) for r in rows}
    test = load_dataset(args.dataset, split="test", limit=args.eval_limit)
    calib = calibration_set(args.dataset, args.calib, seed=0)
    models = [m for m in args.models.split(",") if m]
    for name in models:
        kw = {} if args.train_threads is None else dict(threads=args.train_threads)
        model, info = train_builtin(name, dataset=args.dataset, epochs=args.epochs, progress=not args.quiet, **kw)
        model.eval()
        fp32 = top1_torch(model, test.images, test.labels)
        for bits in args.bits.split(","):
            w, a = parse_bits(bits)
            for mspec in args.methods.split(","):
                method, gran, adaq = parse_method(mspec)
                for seed in [int(s) for s in args.seeds.split(",")]:
                    row = dict(model=name, dataset=args.dataset, method=method,
                               granularity=gran or ReconSettings(method=method).resolved_granularity,
                               adaqtransform=adaq, w_bits=w, a_bits=a, seed=seed,
                               iters=0 if method == "rtn" else args.iters, n_calib=len(calib),
                               eval_images=len(test), fp32_top1=fp32, model_epochs=info.get("epochs"))
                    key = row_key(row)
                    if key in done:
                        continue
                    safe = key.replace("|", "_").replace(":", "-")
                    ckpt = out.parent / f"{out.name}_ckpt" / safe
                    print(f"[row] {key}", file=sys.stderr, flush=True)
                    with tempfile.TemporaryDirectory() as td:
                        res = run_row(model, calib, test.images, test.labels, row, args, ckpt, Path(td))
                    print(f"      fp32 {100 * fp32:.2f}  fake-quant {100 * res['fakequant_top1']:.2f}  "
                          f".so {100 * res['so_top1']:.2f}  {res['seconds']:.0f}s  {res['iters_per_s']:.1f} it/s",
                          file=sys.stderr, flush=True)
                    rows.append(res)
                    done.add(key)
                    write_text(jpath, json.dumps(dict(rows=rows, torch=torch.__version__), indent=1))
                    write_text(mpath, markdown(rows))
    if rows:
        write_text(mpath, markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
