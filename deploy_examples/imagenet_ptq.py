"""The papers' ImageNet protocol (BRECQ / QDrop / MRECG / AdaQTransform), ready for a host with ImageNet and a GPU.

    python deploy_examples/imagenet_ptq.py --imagenet /data/imagenet --checkpoints /data/torchvision_ckpts \
        --device cuda --out results/imagenet                      # the full table (days on a CPU, hours on a GPU)
    python deploy_examples/imagenet_ptq.py --imagenet /data/imagenet --checkpoints ckpts --models resnet18 \
        --bits W4A4 --methods qdrop+adaq --seeds 0 --eval-limit 5000      # one row, part of the validation set

Protocol: 1024 calibration images drawn (seeded) from ``<imagenet>/train`` (ImageFolder layout), Resize(256) +
CenterCrop(224) + ImageNet normalization; ResNet-18, ResNet-50, MobileNetV2, RegNetX-600MF, MnasNet-1.0 with
torchvision's checkpoints (the zoo's parameter names are torchvision's: ``--checkpoints DIR`` holds the files
torchvision downloads, found by their name prefix, e.g. ``resnet18-*.pth``); W4A4 / W2A4 / W2A2; 20,000 iterations
per unit, batch 32; first conv and last layer at 8 bit (QuantConfig's default); top-1 on ``<imagenet>/val``
(streamed in batches: the 50,000 images are never all in memory). Each finished row goes to ``<out>.json`` (+ a
markdown table) with the same fields as the Fashion-MNIST table (benchmarks/accuracy_fmnist.py); the file is keyed
by config, so a re-run skips finished rows and an interrupted row resumes after its last finished unit
(``<out>_ckpt/``). ``--ray`` runs the rows as Ray tasks (``ptq2tvm.sweep``; one GPU per row with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ptq2tvm.errors import ArtifactError, DataError  # noqa: E402
from ptq2tvm.sweep import ResultsStore, key_dir, markdown, parse_bits, parse_method, row_key, run_sweep  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_600mf", "mnasnet1_0"]
#: torchvision checkpoint file-name prefixes (e.g. resnet18-f37072fd.pth, mnasnet1.0_top1_73.512-f206786ef8.pth)
CKPT_PREFIX = {"resnet18": "resnet18-", "resnet50": "resnet50-", "mobilenet_v2": "mobilenet_v2-",
               "regnet_x_600mf": "regnet_x_600mf-", "mnasnet1_0": "mnasnet1.0_"}
METHODS = ["qdrop", "qdrop:mrecg-modcap", "qdrop+adaq", "qdrop:mrecg-modcap+adaq"]
BITS = ["W4A4", "W2A4", "W2A2"]


def create(name: str) -> torch.nn.Module:
    """A zoo model with torchvision's parameter names (RegNetX-600MF: torchvision's stage parameters)."""
    from ptq2tvm.models import create_model, list_models

    if name == "regnet_x_600mf" and name not in list_models():
        from ptq2tvm.models.regnet import RegNet, regnet_stages

        depths, widths, groups = regnet_stages(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
        return RegNet(depths, widths, groups, num_classes=1000, in_channels=3)
    return create_model(name)


def find_checkpoint(name: str, directory: Path) -> Path:
    hits = sorted(p for p in directory.iterdir() if p.name.startswith(CKPT_PREFIX[name]) and p.suffix == ".pth")
    if not hits:
        raise ArtifactError(f"no torchvision checkpoint for {name} in {directory} (expected a file "
                            f"{CKPT_PREFIX[name]}*.pth, as torchvision names it)")
    return hits[0]


def load_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    model = create(name)
    if args.random_init:
        torch.manual_seed(0)
        return model.eval()
    ckpt = find_checkpoint(name, Path(args.checkpoints))
    try:
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ArtifactError(f"{ckpt}: does not match {name}: {e}") from e
    return model.eval()


@torch.no_grad()
def top1_folder(model: torch.nn.Module, root: Path, split: str, limit: int | None, resize: int, crop: int,
                batch: int = 100) -> tuple[float, int]:
    """Top-1 on an ImageFolder split, images decoded batch by batch (seeded subsample of ``limit``)."""
    from ptq2tvm.data.image_folder import index_folder, preprocess_image, subsample_indices

    index = index_folder(root, split)
    if index.labels is None:
        raise DataError(f"{index.root}: the evaluation split needs the ImageFolder layout (class folders)")
    idx = subsample_indices(len(index.files), limit, seed=0)
    correct = 0
    for i in range(0, len(idx), batch):
        sel = idx[i:i + batch]
        x = np.stack([preprocess_image(index.files[j], resize, crop) for j in sel])
        correct += int((model(torch.from_numpy(x)).argmax(1).numpy() == index.labels[sel]).sum())
    return correct / max(1, len(idx)), len(idx)


def run_row(row: dict[str, Any]) -> dict[str, Any]:
    """One table row: calibrate + reconstruct, fake-quant top-1 (+ the compiled .so's with --compile-so)."""
    from ptq2tvm.data import load_dataset
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.reconstruct import ReconSettings, reconstruct

    args = argparse.Namespace(**row.pop("_args"))
    torch.set_num_threads(args.threads)
    root = Path(args.imagenet)
    model = load_model(row["model"], args)
    calib = load_dataset(root, split="train", limit=args.calib, seed=0, resize=args.resize, crop=args.crop).images
    settings = ReconSettings(method=row["method"], granularity=row["granularity"],
                             adaqtransform=row["adaqtransform"], iters=max(1, row["iters"]), seed=row["seed"],
                             batch_size=args.batch_size, threads=args.threads, device=args.device,
                             time_budget=args.time_budget)
    ckpt = Path(str(Path(args.out)) + "_ckpt") / key_dir(row_key(row))
    t0 = time.perf_counter()
    qm, rep = reconstruct(model, calib, QuantConfig(row["w_bits"], row["a_bits"]), settings,
                          progress=not args.quiet, checkpoint_dir=None if row["method"] == "rtn" else ckpt)
    seconds = time.perf_counter() - t0
    fp32, n = top1_folder(model, root, "val", args.eval_limit, args.resize, args.crop)
    fq, _ = top1_folder(qm.eval(), root, "val", args.eval_limit, args.resize, args.crop)
    res = dict(row, fp32_top1=fp32, fakequant_top1=fq, so_top1=None, seconds=round(seconds, 2),
               rtn_seconds=round(rep.rtn_seconds, 2), iterations=rep.iterations,
               iters_per_s=round(rep.iters_per_s, 2), units=len(rep.units), lam=rep.lam,
               mrecg_groups=(rep.mrecg or {}).get("groups"), resumed_units=rep.resumed_units, device=rep.device,
               eval_images_used=n)
    if args.compile_so:
        import tempfile

        from ptq2tvm.api import compile_so, to_integer
        from ptq2tvm.backend.runtime import CompiledModel

        with tempfile.TemporaryDirectory() as td:
            so = Path(td) / "model.so"
            compile_so(to_integer(qm), so, batch=args.so_batch)
            cm = CompiledModel(so)
            res["so_top1"], _ = top1_folder(lambda x: torch.from_numpy(cm(x.numpy())), root, "val",
                                            args.eval_limit, args.resize, args.crop)
    return res


def rows_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ptq2tvm.reconstruct import ReconSettings

    rows = []
    for model in args.models.split(","):
        if model not in CKPT_PREFIX:
            raise SystemExit(f"unknown model {model!r}; the protocol's models: {', '.join(MODELS)}")
        for bits in args.bits.split(","):
            w, a = parse_bits(bits)
            for spec in args.methods.split(","):
                method, gran, adaq = parse_method(spec)
                for seed in (int(s) for s in args.seeds.split(",")):
                    rows.append(dict(model=model, dataset="imagenet", method=method,
                                     granularity=gran or ReconSettings(method=method).resolved_granularity,
                                     adaqtransform=adaq, w_bits=w, a_bits=a, seed=seed,
                                     iters=0 if method == "rtn" else args.iters, n_calib=args.calib,
                                     eval_images=args.eval_limit or "all"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", required=True, help="ImageNet root with train/ and val/ in ImageFolder layout")
    p.add_argument("--checkpoints", help="folder of torchvision checkpoints (resnet18-*.pth, ...)")
    p.add_argument("--random-init", action="store_true", help="seeded random weights instead of checkpoints "
                   "(smoke tests only)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS), help="method[:granularity][+adaq], comma-separated")
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--iters", type=int, default=20000, help="iterations per unit (papers: 20000)")
    p.add_argument("--calib", type=int, default=1024, help="calibration images from the train split (papers: 1024)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-limit", type=int, help="validation images (default: all 50,000)")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--time-budget", help="per row, e.g. 2h (iterations from measured rates, at most --iters)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--compile-so", action="store_true", help="also compile each row to a .so and report its top-1")
    p.add_argument("--so-batch", type=int, default=50)
    p.add_argument("--ray", action="store_true", help="run the rows as Ray tasks (local instance, or --address)")
    p.add_argument("--address", help="Ray cluster address (with --ray)")
    p.add_argument("--out", default="results/imagenet_ptq")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.random_init and not args.checkpoints:
        p.error("--checkpoints DIR is required (or --random-init for a smoke test)")

    rows = rows_for(args)
    store = ResultsStore(Path(args.out).with_suffix(".json"), markdown=markdown,
                         extra=dict(protocol="imagenet", torch=torch.__version__))
    todo = [r for r in rows if row_key(r) not in store.keys()]
    print(f"{len(todo)} of {len(rows)} rows to run -> {store.path}", file=sys.stderr)
    arg_dict = vars(args)
    if args.ray:
        for r in todo:
            r["_args"] = arg_dict
        summary = run_sweep(todo, run_row, store, cpus_per_task=args.threads,
                            gpus_per_task=1 if args.device.startswith("cuda") else 0, address=args.address,
                            progress=not args.quiet)
        if summary.failed:
            print(f"{len(summary.failed)} row(s) failed: {summary.failed}", file=sys.stderr)
            return 1
    else:
        for r in todo:
            r["_args"] = arg_dict
            res = run_row(r)
            store.add(res)
            print(f"{row_key(res)}: FP32 {100 * res['fp32_top1']:.2f}  fake-quant {100 * res['fakequant_top1']:.2f}"
                  f"  {res['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(markdown(store.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
