"""Calibration and evaluation data: built-in datasets, image folders and arrays, as float32 NCHW numpy arrays.

    load_dataset("fashion-mnist", split="test")          # (10000, 1, 28, 28), labels 0..9
    load_dataset("digits", split="train")                # (1437, 1, 8, 8)
    load_dataset("path/to/imagenet/val", limit=1000)     # ImageFolder or flat folder -> (N, 3, 224, 224)
    load_dataset("calib.npz")                            # 'images' (N, C, H, W) [+ 'labels']
    calibration_set("fashion-mnist", 512, seed=0)        # 512 unlabeled TRAIN images (np.ndarray)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .arrays import load_array_file, save_array_file
from .builtin import (DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                      load_digits_split, load_fashion_mnist, load_fashion_mnist_raw, read_idx)
from .image_folder import IMAGENET_MEAN, IMAGENET_STD, load_image_folder, preprocess_image, subsample_indices

BUILTIN_DATASETS = ("fashion-mnist", "digits")
_ALIASES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist", "digits": "digits", "sklearn-digits": "digits"}


@dataclass
class Dataset:
    """Images as float32 (N, C, H, W), already normalized; ``labels`` int64 (N,) or None (unlabeled)."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None  # normalization applied (None: the data was used as given)
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None
    split: str | None = None
    source: str | None = None  # directory / file the data came from
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.images))

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else None


def builtin_name(spec: str) -> str | None:
    """The canonical built-in dataset name of ``spec`` ("fashion-mnist", "digits"), or None."""
    return _ALIASES.get(str(spec).strip().lower())


def is_builtin(spec: str) -> bool:
    return builtin_name(spec) is not None


def validate_images(arr, what: str = "images") -> np.ndarray:
    """Check ``arr`` is a non-empty, finite (N, C, H, W) numeric array; return it as contiguous float32.

    Raises :class:`DataError` saying what is wrong (for NaN/Inf: how many values, in how many images, and where).
    """
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except Exception as e:  # noqa: BLE001 - anything that is not array-like
            raise DataError(f"{what} must be a numpy array, got {type(arr).__name__}") from e
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise DataError(f"{what} must be (N, C, H, W), got shape {arr.shape} (rank {arr.ndim})")
    if arr.size == 0:
        raise DataError(f"{what} is empty (shape {arr.shape}, 0 images)" if len(arr) == 0
                        else f"{what} is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        n_bad = int(bad.sum())
        per_image = bad.reshape(len(arr), -1).any(1)
        idx = np.flatnonzero(per_image)
        first = tuple(int(v) for v in np.argwhere(bad[idx[0]])[0])
        n_nan = int(np.isnan(arr).sum())
        raise DataError(f"{what} has {n_bad} NaN/Inf values ({n_nan} NaN, {n_bad - n_nan} Inf) in {len(idx)} image(s), "
                        f"first at index {int(idx[0])} (channel, row, col) = {first}; images: "
                        f"{', '.join(str(int(i)) for i in idx[:10])}{' ...' if len(idx) > 10 else ''}")
    return arr


def load_dataset(spec: str | Path, split: str = "test", limit: int | None = None, seed: int = 0, *,
                 resize: int | None = 256, crop: int | None = 224, progress: bool = False) -> Dataset:
    """Load a dataset by ``spec``: "fashion-mnist", "digits", an image folder, or a .npy/.npz file.

    ``split`` ("train"/"test") selects the split of a built-in dataset, or ``train``/``val`` (``test``) sub-folders
    of an image folder that has them; an array file is one set whatever the split. ``limit`` keeps a seeded
    random subsample (in the original order). ``resize``/``crop`` are the image-folder preprocessing sizes.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    name = builtin_name(str(spec))
    if name is not None:
        if split not in ("train", "test"):
            raise DataError(f"{name}: split must be 'train' or 'test', got {split!r}")
        if name == "fashion-mnist":
            n_all = len(load_fashion_mnist_raw(split)[1])
            idx = subsample_indices(n_all, limit, seed)
            images, labels = load_fashion_mnist(split, indices=idx if len(idx) != n_all else None)
            mean, std, classes = FASHION_MNIST_MEAN, FASHION_MNIST_STD, list(FASHION_MNIST_CLASSES)
        else:
            images, labels = load_digits_split(split)
            mean, std, classes = DIGITS_MEAN, DIGITS_STD, [str(i) for i in range(10)]
            idx = subsample_indices(len(images), limit, seed)
            if len(idx) != len(images):
                images, labels = images[idx], labels[idx]
        ds = Dataset(images, labels, name, tuple(images.shape[1:]), mean, std, classes, split, name)
    else:
        path = Path(spec)
        if path.is_dir():
            images, labels, index = load_image_folder(path, split, limit, seed, resize=resize, crop=crop,
                                                      progress=progress)
            ds = Dataset(images, labels, str(path), tuple(images.shape[1:]), IMAGENET_MEAN, IMAGENET_STD,
                         index.classes, split if index.root != path else None, str(index.root),
                         extra=dict(resize=resize, crop=crop, layout="imagefolder" if index.classes else "flat"))
        elif path.suffix.lower() in (".npy", ".npz"):
            images, labels = load_array_file(path)
            idx = subsample_indices(len(images), limit, seed)
            if len(idx) != len(images):
                images = images[idx]
                labels = labels[idx] if labels is not None else None
            ds = Dataset(images, labels, str(path), tuple(images.shape[1:]), None, None, None, None, str(path))
        elif path.exists():
            raise DataError(f"{spec}: not a dataset (expected {', '.join(BUILTIN_DATASETS)}, an image folder, "
                            f"or a .npy/.npz file)")
        else:
            raise DataError(f"dataset not found: {spec!r} is neither a built-in dataset "
                            f"({', '.join(BUILTIN_DATASETS)}) nor an existing folder or .npy/.npz file")
    if limit != 0:
        ds.images = validate_images(ds.images, f"dataset {ds.name} ({split})")
    return ds


def calibration_set(spec: str | Path, n: int = 512, seed: int = 0, **kwargs) -> np.ndarray:
    """``n`` unlabeled images (seeded subsample) for calibration, float32 NCHW.

    Built-in datasets draw from the TRAIN split (never the test set); an image folder with ``train``/``val``
    sub-folders uses ``train``; other folders and array files are used as a whole. Fewer than ``n`` available
    images gives all of them.
    """
    if n is None or int(n) <= 0:
        raise DataError(f"calibration size must be a positive number of images, got {n}")
    ds = load_dataset(spec, split="train", limit=int(n), seed=seed, **kwargs)
    return validate_images(ds.images, f"calibration data from {ds.name}")


__all__ = [
    "BUILTIN_DATASETS", "DIGITS_MEAN", "DIGITS_STD", "Dataset", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "builtin_name", "calibration_set", "is_builtin",
    "load_array_file", "load_dataset", "load_digits_split", "load_fashion_mnist", "load_fashion_mnist_raw",
    "load_image_folder", "preprocess_image", "read_idx", "save_array_file", "subsample_indices", "validate_images",
]
