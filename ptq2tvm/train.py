"""Train (once, then cache) the small zoo models on the built-in datasets.

    python -m ptq2tvm.train --model resnet_small --dataset fashion-mnist

The recipe is deterministic for a given seed and thread count (2 threads): SGD with Nesterov momentum, a one-cycle
learning-rate schedule, and light augmentation on Fashion-MNIST (random crop with 2-pixel padding, horizontal flip).
The checkpoint (a plain state_dict, loadable with ``load_state_dict(strict=True)``) and a JSON description are
cached under ``$PTQ2TVM_CACHE/checkpoints`` (default ``~/.cache/ptq2tvm/checkpoints``), keyed by model, dataset,
epochs, seed, :data:`RECIPE_VERSION` and a digest of the recipe settings; a cached checkpoint is loaded instead of
retraining. Both files are written atomically (temp file, then ``os.replace``).

Measured on 2 CPU threads (see ``DEFAULT_EPOCHS``): resnet_small 6 epochs -> 92.3 % Fashion-MNIST test top-1,
mobilenet_v2_small (width 0.5) 6 epochs -> 90.7 %; on digits both reach > 98 % in seconds. On 1 thread:
mobilenet_v3_small_fm 3 epochs -> 88.56 %, efficientnet_small_fm 2 epochs -> 88.88 %, edsr_small_fm 1 epoch ->
23.75 dB PSNR (bilinear: 18.65 dB).

Super-resolution models (``models.model_task(name) == "super_resolution"``, e.g. ``edsr_small_fm``) train on the
x2 task of :mod:`ptq2tvm.superres` (input: the 2x2 average-pooled image, target: the image) with an L1 loss, Adam
and a one-cycle schedule (:class:`SRRecipe`); their info reports ``test_psnr_db`` (and the bilinear baseline)
instead of ``test_top1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import atomic_path, write_text
from .data import Dataset, builtin_name, load_dataset
from .errors import DataError, Ptq2TvmError
from .threads import auto_threads

RECIPE_VERSION = "r1"
TRAIN_THREADS = 2
CACHE_ENV = "PTQ2TVM_CACHE"


@dataclass(frozen=True)
class SRRecipe:
    """Super-resolution recipe: L1 loss, Adam with a one-cycle schedule peaking at ``max_lr``, horizontal flips."""

    epochs: int
    scale: int = 2
    batch_size: int = 64
    max_lr: float = 2e-3
    weight_decay: float = 0.0
    pct_start: float = 0.15
    hflip: bool = True
    loss: str = "l1"


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    pct_start: float = 0.25
    label_smoothing: float = 0.0
    crop_pad: int = 0  # random crop with this much zero padding (0: off)
    hflip: bool = False


_FMNIST = dict(batch_size=128, max_lr=0.1, weight_decay=5e-4, crop_pad=2, hflip=True)
_DIGITS = dict(batch_size=32, max_lr=0.05, weight_decay=5e-4, crop_pad=0, hflip=False)
DEFAULT_EPOCHS = {
    ("resnet_small", "fashion-mnist"): 6,
    ("mobilenet_v2_small", "fashion-mnist"): 6,
    ("resnet_small", "digits"): 8,
    ("mobilenet_v2_small", "digits"): 10,
    ("mobilenet_v3_small_fm", "fashion-mnist"): 3,
    ("efficientnet_small_fm", "fashion-mnist"): 2,
    ("edsr_small_fm", "fashion-mnist"): 1,
}


def _task(model_name: str) -> str:
    from .models import model_task

    return model_task(model_name)


def recipe_for(model_name: str, dataset: str, epochs: int | None = None) -> Recipe | SRRecipe:
    task = _task(model_name)
    if task == "super_resolution":
        if epochs is None:
            epochs = DEFAULT_EPOCHS.get((model_name, dataset), 1 if dataset == "fashion-mnist" else 20)
        if int(epochs) < 1:
            raise Ptq2TvmError(f"epochs must be >= 1, got {epochs}")
        return SRRecipe(epochs=int(epochs))
    if task != "classification":
        raise Ptq2TvmError(f"model {model_name!r} is a {task} model: the built-in training covers classifiers and "
                           f"super-resolution models only")
    base = _FMNIST if dataset == "fashion-mnist" else _DIGITS
    if epochs is None:
        epochs = DEFAULT_EPOCHS.get((model_name, dataset), 6 if dataset == "fashion-mnist" else 10)
    if int(epochs) < 1:
        raise Ptq2TvmError(f"epochs must be >= 1, got {epochs}")
    return Recipe(epochs=int(epochs), **base)


def default_cache_dir() -> Path:
    """``$PTQ2TVM_CACHE/checkpoints``, else ``$XDG_CACHE_HOME/ptq2tvm/checkpoints`` (``~/.cache/...``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ptq2tvm" / "checkpoints"


def checkpoint_key(model_name: str, dataset: str, recipe: Recipe | SRRecipe, seed: int) -> str:
    """Cache key: model, dataset, epochs, seed, :data:`RECIPE_VERSION` and a digest of every recipe setting."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    digest = hashlib.sha1(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:8]
    return f"{safe}__{dataset}__e{recipe.epochs}__s{seed}__{RECIPE_VERSION}-{digest}"


def _build(model_name: str, in_channels: int, num_classes: int) -> nn.Module:
    from .models import create_model

    try:
        if _task(model_name) != "classification":
            return create_model(model_name, in_channels=in_channels)
        return create_model(model_name, num_classes=num_classes, in_channels=in_channels)
    except ValueError as e:
        raise Ptq2TvmError(str(e)) from e


# ---- augmentation -------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, recipe: Recipe, g: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``crop_pad``, per sample) and horizontal flip, on a batch (B, C, H, W)."""
    b, _, h, w = x.shape
    if recipe.crop_pad:
        p = recipe.crop_pad
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
        bidx = torch.arange(b)[:, None, None, None]
        cidx = torch.arange(x.shape[1])[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if recipe.hflip:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# ---- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_top1(model: nn.Module, dataset: Dataset | str, batch_size: int = 256) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``dataset`` (a :class:`Dataset`, or a spec: its test split)."""
    ds = load_dataset(dataset, split="test") if isinstance(dataset, (str, Path)) else dataset
    if ds.labels is None:
        raise DataError(f"dataset {ds.name} has no labels: cannot compute accuracy")
    if len(ds.images) == 0:
        raise DataError(f"dataset {ds.name} is empty")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(ds.images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(ds.images[i:i + batch_size]))
            correct += int((model(x).argmax(1).numpy() == ds.labels[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(ds.images)


# ---- training -----------------------------------------------------------------------------------------------
def _fit(model: nn.Module, train: Dataset, recipe: Recipe, seed: int, progress: bool, desc: str,
         test: Dataset | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place; returns per-epoch history (loss, train accuracy[, test accuracy])."""
    g = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(train.images)
    y_all = torch.from_numpy(train.labels)
    n = len(x_all)
    bs = min(recipe.batch_size, n)
    steps = n // bs  # drop_last: no tiny BatchNorm batches
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.max_lr, momentum=recipe.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, total_steps=recipe.epochs * steps,
                                                pct_start=recipe.pct_start, div_factor=20.0,
                                                final_div_factor=200.0)
    channels_last = train.images.shape[-1] >= 16  # faster on CPU for 28x28; no gain for 8x8
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.epochs * steps, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr)
    history: list[dict[str, float]] = []
    try:
        for epoch in range(recipe.epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            loss_sum, correct, seen = 0.0, 0, 0
            for s in range(steps):
                idx = perm[s * bs:(s + 1) * bs]
                x, y = x_all[idx], y_all[idx]
                x = _augment(x, recipe, g)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise Ptq2TvmError(f"training diverged: loss {lv} at epoch {epoch + 1}, step {s + 1}")
                loss_sum += lv * len(y)
                correct += int((out.detach().argmax(1) == y).sum())
                seen += len(y)
                if bar is not None:
                    bar.update(1)
                    if s % 10 == 0 or s == steps - 1:
                        bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{loss_sum / seen:.4f}",
                                        acc=f"{100 * correct / seen:.2f}%", refresh=False)
            rec = dict(epoch=epoch + 1, loss=loss_sum / seen, train_top1=correct / seen)
            if test is not None:
                rec["test_top1"] = evaluate_top1(model, test)
            history.append(rec)
    finally:
        if bar is not None:
            bar.close()
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def _fit_sr(model: nn.Module, train: Dataset, recipe: SRRecipe, seed: int, progress: bool,
            desc: str) -> list[dict[str, float]]:
    """Train super-resolution ``model`` in place on (downsample(x), x) pairs; per-epoch history (mean L1 loss)."""
    from .superres import downsample

    g = torch.Generator().manual_seed(seed)
    hr_all = torch.from_numpy(train.images)
    n = len(hr_all)
    bs = min(recipe.batch_size, n)
    steps = n // bs
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.max_lr,
                           weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.max_lr, total_steps=recipe.epochs * steps,
                                                pct_start=recipe.pct_start, div_factor=10.0,
                                                final_div_factor=100.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.epochs * steps, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr)
    history: list[dict[str, float]] = []
    try:
        for epoch in range(recipe.epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            loss_sum, seen = 0.0, 0
            for s in range(steps):
                hr = hr_all[perm[s * bs:(s + 1) * bs]]
                if recipe.hflip:
                    flip = torch.rand(len(hr), generator=g) < 0.5
                    hr = torch.where(flip[:, None, None, None], hr.flip(3), hr)
                loss = F.l1_loss(model(downsample(hr, recipe.scale)), hr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise Ptq2TvmError(f"training diverged: loss {lv} at epoch {epoch + 1}, step {s + 1}")
                loss_sum += lv * len(hr)
                seen += len(hr)
                if bar is not None:
                    bar.update(1)
                    if s % 10 == 0 or s == steps - 1:
                        bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", l1=f"{loss_sum / seen:.4f}",
                                        refresh=False)
            history.append(dict(epoch=epoch + 1, loss=loss_sum / seen))
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history


def _load_cached(model: nn.Module, pt: Path, js: Path) -> dict[str, Any] | None:
    if not (pt.is_file() and js.is_file()):
        return None
    try:
        info = json.loads(js.read_text())
        sd = torch.load(pt, map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001 - a broken cache entry is retrained, not fatal
        warnings.warn(f"ignoring unreadable cached checkpoint {pt} ({type(e).__name__}: {e}); retraining",
                      stacklevel=3)
        return None
    return info


def train_builtin(model_name: str, dataset: str = "fashion-mnist", epochs: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None, progress: bool = True, *, force: bool = False,
                  threads: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train zoo model ``model_name`` on built-in ``dataset`` ("fashion-mnist" or "digits"), or load it from cache.

    Returns the model (eval mode, FP32) and an info dict: model_name, dataset, epochs, seed, recipe,
    recipe_version, test_top1 (classifiers) or test_psnr_db / bilinear_psnr_db / scale (super-resolution models),
    train_seconds, torch_version, checkpoint (the state_dict path), cached (True when loaded from the cache, False
    when trained by this call), ... ``force`` retrains and overwrites the cache.
    Training uses ``threads`` intra-op threads (restored afterwards; None: :func:`ptq2tvm.threads.auto_threads`,
    2 on a quiet machine, 1 on a busy one); results are reproducible for the same seed and thread count.
    """
    ds_name = builtin_name(dataset)
    if ds_name is None:
        raise DataError(f"train_builtin needs a built-in dataset (fashion-mnist, digits), got {dataset!r}")
    recipe = recipe_for(model_name, ds_name, epochs)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = checkpoint_key(model_name, ds_name, recipe, seed)
    pt, js = cache / f"{key}.pt", cache / f"{key}.json"

    prev_threads = torch.get_num_threads()
    if threads is None:
        threads = auto_threads(TRAIN_THREADS, what="training",
                               announce=progress and not (pt.is_file() and not force),
                               hint=f"train it first: ptq2tvm train --model {model_name} --data {ds_name} --threads N")
    torch.set_num_threads(int(threads))
    try:
        test = load_dataset(ds_name, split="test")
        in_channels, num_classes = int(test.images.shape[1]), 10
        torch.manual_seed(seed)
        model = _build(model_name, in_channels, num_classes)
        if not force:
            info = _load_cached(model, pt, js)
            if info is not None:
                info.update(cached=True, checkpoint=str(pt))
                if progress:
                    print(f"loaded cached {model_name} ({ds_name}, {recipe.epochs} epochs, seed {seed}): "
                          f"{_metric_text(info)}  [{pt}]", file=sys.stderr)
                return model.eval(), info
        train = load_dataset(ds_name, split="train")
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        desc = f"train {model_name} on {ds_name}"
        metrics: dict[str, Any]
        if isinstance(recipe, SRRecipe):
            from .superres import bilinear_baseline, evaluate_psnr

            history = _fit_sr(model, train, recipe, seed, progress, desc=desc)
            train_seconds = time.perf_counter() - t0
            metrics = dict(test_psnr_db=evaluate_psnr(model, test, recipe.scale),
                           bilinear_psnr_db=evaluate_psnr(bilinear_baseline(recipe.scale), test, recipe.scale),
                           scale=recipe.scale,
                           input_shape=[in_channels] + [d // recipe.scale for d in test.input_shape[1:]],
                           output_shape=list(test.input_shape))
        else:
            history = _fit(model, train, recipe, seed, progress, desc=desc)
            train_seconds = time.perf_counter() - t0
            metrics = dict(test_top1=evaluate_top1(model, test), num_classes=num_classes,
                           input_shape=list(test.input_shape))
    finally:
        torch.set_num_threads(prev_threads)

    info: dict[str, Any] = dict(
        model_name=model_name, dataset=ds_name, epochs=recipe.epochs, seed=seed, recipe_version=RECIPE_VERSION,
        recipe=asdict(recipe), **metrics, n_test=len(test), n_train=len(train),
        train_seconds=round(train_seconds, 2), threads=int(threads), torch_version=torch.__version__,
        in_channels=in_channels, mean=list(test.mean), std=list(test.std), history=history,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(pt) as tmp:
        torch.save(state, tmp)
    write_text(js, json.dumps(info, indent=2) + "\n")
    info.update(cached=False, checkpoint=str(pt))
    if progress:
        print(f"trained {model_name} on {ds_name} in {train_seconds:.1f} s: {_metric_text(info)}  [{pt}]",
              file=sys.stderr)
    return model, info


def _metric_text(info: dict[str, Any]) -> str:
    if "test_psnr_db" in info:
        return (f"test PSNR {info['test_psnr_db']:.2f} dB (bilinear {info.get('bilinear_psnr_db', float('nan')):.2f}"
                f" dB)")
    return f"test top-1 {100 * info.get('test_top1', float('nan')):.2f}%"


# ---- command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ptq2tvm.train",
                                description="Train (or load from cache) a small zoo model on a built-in dataset.")
    p.add_argument("--model", default="resnet_small", help="zoo model name (default: resnet_small; also "
                   "mobilenet_v2_small, mobilenet_v3_small_fm, efficientnet_small_fm, edsr_small_fm)")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"],
                   help="built-in dataset (default: fashion-mnist)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's, e.g. 6 on Fashion-MNIST)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--cache-dir", default=None,
                   help=f"checkpoint cache (default: ${CACHE_ENV}/checkpoints or ~/.cache/ptq2tvm/checkpoints)")
    p.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="PATH", help="also write the info dict as JSON to PATH")
    p.add_argument("--threads", type=int, default=None,
                   help=f"intra-op threads (default: {TRAIN_THREADS}, or 1 when the machine is busy; results are "
                   "reproducible per thread count)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _, info = train_builtin(args.model, dataset=args.dataset, epochs=args.epochs, seed=args.seed,
                                cache_dir=args.cache_dir, progress=not args.no_progress, force=args.force,
                                threads=args.threads)
    except Ptq2TvmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
