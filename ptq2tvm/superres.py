"""Super-resolution helpers for the built-in data: low-resolution inputs by average pooling, PSNR evaluation.

The x``s`` task on Fashion-MNIST / digits: the low-resolution (LR) input is the normalized image average-pooled over
``s x s`` blocks (``F.avg_pool2d``; average pooling commutes with the per-channel normalization, so this is also the
normalized pooled image), the target is the normalized full-resolution image. PSNR is measured on pixels in [0, 1]
(the model output is de-normalized with the dataset's mean / std and clipped to [0, 1]):
``PSNR = 10 * log10(1 / MSE)`` dB per image, averaged over the images (MSE floored at 1e-10, i.e. at most 100 dB).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, load_dataset
from .errors import DataError

MSE_FLOOR = 1e-10


def downsample(images: np.ndarray | torch.Tensor, scale: int = 2) -> np.ndarray | torch.Tensor:
    """``s x s`` average pooling of (N, C, H, W) float images (numpy in -> numpy out, tensor in -> tensor out).

    Raises :class:`DataError` when H or W is not a multiple of ``scale`` or the array is not 4-d.
    """
    if images.ndim != 4:
        raise DataError(f"super-resolution input must be (N, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise DataError(f"image size {h}x{w} is not a multiple of the super-resolution scale {scale}")
    if isinstance(images, torch.Tensor):
        return F.avg_pool2d(images, scale)
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return F.avg_pool2d(t, scale).numpy()


def _denorm(x: np.ndarray, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    x = x.astype(np.float64)
    if mean is not None and std is not None:
        c = x.shape[1]
        x = x * np.asarray(std, np.float64).reshape(1, c, 1, 1) + np.asarray(mean, np.float64).reshape(1, c, 1, 1)
    return x


def psnr_per_image(pred: np.ndarray, target: np.ndarray, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> np.ndarray:
    """PSNR in dB of each image of ``pred`` against ``target`` (both (N, C, H, W), normalized with ``mean`` /
    ``std``, or already in [0, 1] when those are None); ``pred`` is clipped to [0, 1] after de-normalization."""
    if pred.shape != target.shape:
        raise DataError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    p = np.clip(_denorm(np.asarray(pred), mean, std), 0.0, 1.0)
    t = _denorm(np.asarray(target), mean, std)
    mse = np.maximum(((p - t) ** 2).reshape(len(p), -1).mean(1), MSE_FLOOR)
    return 10.0 * np.log10(1.0 / mse)


def _as_predict(model: nn.Module | Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(model, nn.Module):
        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        return predict
    return lambda x: np.asarray(model(x))


def evaluate_psnr(model: nn.Module | Callable[[np.ndarray], np.ndarray], dataset: Dataset | str | Path,
                  scale: int = 2, batch_size: int = 256, limit: int | None = None) -> float:
    """Mean PSNR (dB) of ``model`` on the x``scale`` task over ``dataset`` (a :class:`Dataset`, or a spec: its test
    split), the first ``limit`` images if given.

    ``model`` is an ``nn.Module`` (run in eval mode, restored afterwards) or any callable mapping a float32
    (N, C, H/s, W/s) array to the (N, C, H, W) prediction (e.g. a ``CompiledModel``).
    """
    ds = load_dataset(dataset, split="test") if isinstance(dataset, (str, Path)) else dataset
    images = ds.images if limit is None else ds.images[:limit]
    if len(images) == 0:
        raise DataError(f"dataset {ds.name} is empty")
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    predict = _as_predict(model)
    scores = []
    try:
        for i in range(0, len(images), batch_size):
            hr = np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)
            scores.append(psnr_per_image(predict(downsample(hr, scale)), hr, ds.mean, ds.std))
    finally:
        if was_training:
            model.train()
    return float(np.concatenate(scores).mean())


def bilinear_baseline(scale: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """The reference upsampler: bilinear interpolation by ``scale`` (``align_corners=False``), as a callable for
    :func:`evaluate_psnr`."""
    def predict(x: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear", align_corners=False).numpy()
    return predict
