"""Calibration and evaluation data: built-in datasets, image folders and arrays, as float32 NCHW numpy arrays.

    load_dataset("fashion-mnist", split="test")          # (10000, 1, 28, 28), labels 0..9
    load_dataset("digits", split="train")                # (1437, 1, 8, 8)
    load_dataset("path/to/imagenet/val", limit=1000)     # ImageFolder or flat folder -> (N, 3, 224, 224)
    load_dataset("my_images/", channels=1, crop=28, resize=0, mean=(0.286,), std=(0.353,))   # -> (N, 1, 28, 28)
    load_dataset("my_images/", transform="prep.py:fn")   # fn(PIL.Image) -> (C, H, W): your own preprocessing
    load_dataset("calib.npz")                            # 'images' (or numpy's default 'arr_0') (N, C, H, W) [+ 'labels']
    calibration_set("fashion-mnist", 512, seed=0)        # 512 unlabeled TRAIN images (np.ndarray)
    CalibrationData(loader, transform_fn)                # the API's dataset + transform form (see transform.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError
from .arrays import array_notes, load_array_file, looks_nhwc, read_array_file, save_array_file
from .builtin import (DIGITS_MEAN, DIGITS_STD, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                      load_digits_split, load_fashion_mnist, load_fashion_mnist_raw, read_idx)
from .image_folder import (IMAGENET_MEAN, IMAGENET_STD, _split_root, function_label, index_folder, load_image_folder,
                           check_seed, preprocess_image, subsample_indices)
from .transform import CalibrationData, as_images, load_callable

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


def validate_images(arr, what: str = "images", rows: np.ndarray | None = None) -> np.ndarray:
    """Check ``arr`` is a non-empty, finite (N, C, H, W) numeric array; return it as contiguous float32.

    Raises :class:`DataError` saying what is wrong (for NaN/Inf: how many values, in how many images, and where).
    ``rows``: the row numbers of ``arr``'s images in the user's file (a subsample of it): messages name those.
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
        if rows is not None:     # the user's row numbers, not positions in the subsample
            idx = np.asarray(rows)[idx]
        raise DataError(f"{what} has {n_bad} NaN/Inf values ({n_nan} NaN, {n_bad - n_nan} Inf) in {len(idx)} image(s), "
                        f"first at index {int(idx[0])} (channel, row, col) = {first}; images: "
                        f"{', '.join(str(int(i)) for i in idx[:10])}{' ...' if len(idx) > 10 else ''}")
    return arr


def _pick(n: int, limit: int | None, seed: int, indices: np.ndarray | None) -> np.ndarray:
    return subsample_indices(n, limit, seed) if indices is None else np.asarray(indices, dtype=np.int64)


def load_dataset(spec: str | Path, split: str = "test", limit: int | None = None, seed: int = 0, *,
                 resize: int | None = 256, crop: int | tuple[int, int] | None = 224, progress: bool = False,
                 channels: int = 3, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 transform=None, indices: np.ndarray | None = None) -> Dataset:
    """Load a dataset by ``spec``: "fashion-mnist", "digits", an image folder, or a .npy/.npz file.

    ``split`` ("train"/"test") selects the split of a built-in dataset, or ``train``/``val`` (``test``) sub-folders
    of an image folder that has them; an array file is one set whatever the split. ``limit`` keeps a seeded
    random subsample (in the original order); ``indices`` picks exact rows instead. Image folders only:
    ``resize``/``crop`` (sizes; ``resize=0``: straight to the crop size), ``channels`` (1: grayscale, 3: RGB),
    ``mean``/``std`` (default ImageNet's, averaged for 1 channel) and ``transform`` (a callable or
    ``"file.py:fn"``, ``fn(PIL image) -> (C, H, W)``, replacing the rest). ``Dataset.extra["notes"]`` lists what
    looks wrong about array data (integer dtype, raw pixels, NHWC).
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    check_seed(seed)
    name = builtin_name(str(spec))
    if name is None and transform is not None and not Path(spec).is_dir():
        raise DataError(f"a preprocess function applies to image folders only, not to {spec}")
    if name is not None:
        if split not in ("train", "test"):
            raise DataError(f"{name}: split must be 'train' or 'test', got {split!r}")
        if name == "fashion-mnist":
            n_all = len(load_fashion_mnist_raw(split)[1])
            idx = _pick(n_all, limit, seed, indices)
            images, labels = load_fashion_mnist(split, indices=idx if len(idx) != n_all else None)
            mean, std, classes = FASHION_MNIST_MEAN, FASHION_MNIST_STD, list(FASHION_MNIST_CLASSES)
        else:
            images, labels = load_digits_split(split)
            mean, std, classes = DIGITS_MEAN, DIGITS_STD, [str(i) for i in range(10)]
            idx = _pick(len(images), limit, seed, indices)
            if len(idx) != len(images) or indices is not None:
                images, labels = images[idx], labels[idx]
        ds = Dataset(images, labels, name, tuple(images.shape[1:]), mean, std, classes, split, name)
    else:
        path = Path(spec)
        if path.is_dir():
            if isinstance(transform, str):
                transform = load_callable(transform)
            m = tuple(mean) if mean is not None else (
                IMAGENET_MEAN if channels == 3 else (round(float(np.mean(IMAGENET_MEAN)), 4),))
            s = tuple(std) if std is not None else (
                IMAGENET_STD if channels == 3 else (round(float(np.mean(IMAGENET_STD)), 4),))
            images, labels, index = load_image_folder(path, split, limit, seed, resize=resize, crop=crop,
                                                      progress=progress, channels=channels, mean=m, std=s,
                                                      transform=transform, indices=indices)
            ds = Dataset(images, labels, str(path), tuple(images.shape[1:]), None if transform else m,
                         None if transform else s, index.classes, split if index.root != path else None,
                         str(index.root), extra=dict(resize=resize, crop=crop, channels=channels,
                                                     layout="imagefolder" if index.classes else "flat",
                                                     notes=preprocess_notes(images, transform)))
        elif path.suffix.lower() in (".npy", ".npz"):
            raw, labels = read_array_file(path)
            idx = _pick(len(raw), limit, seed, indices)
            if len(idx) != len(raw) or indices is not None:
                raw = raw[idx]
                labels = labels[idx] if labels is not None else None
            notes = array_notes(raw, str(path))
            images = np.ascontiguousarray(raw, dtype=np.float32)
            ds = Dataset(images, labels, str(path), tuple(images.shape[1:]), None, None, None, None, str(path),
                         extra=dict(notes=notes, dtype=str(raw.dtype), rows=idx))
        elif path.exists():
            raise DataError(f"{spec}: not a dataset (expected {', '.join(BUILTIN_DATASETS)}, an image folder, "
                            f"or a .npy/.npz file)")
        else:
            raise DataError(f"dataset not found: {spec!r} is neither a built-in dataset "
                            f"({', '.join(BUILTIN_DATASETS)}) nor an existing folder or .npy/.npz file")
    if limit != 0:
        ds.images = validate_images(ds.images, f"dataset {ds.name} ({split})", rows=ds.extra.get("rows"))
    return ds


def preprocess_notes(images: np.ndarray, transform: Callable[..., Any] | None) -> list[str]:
    """Warnings about the images a ``--preprocess`` function returned (float32 (N, C, H, W)): whole numbers in
    [0, > 20] look like raw pixels it forgot to normalize (:func:`array_notes`; its layout is judged by the channel
    check, which knows the model). Empty without a preprocess function."""
    if transform is None or not len(images):
        return []
    what = f"the images the preprocess function {function_label(transform)} returns"
    return [n for n in array_notes(images, what) if "channels-last" not in n]


def dataset_size(spec: str | Path, split: str = "train") -> int:
    """How many images ``load_dataset(spec, split)`` has (without decoding image files)."""
    name = builtin_name(str(spec))
    if name == "fashion-mnist":
        return len(load_fashion_mnist_raw(split)[1])
    if name == "digits":
        return len(load_digits_split(split)[1])
    path = Path(spec)
    if path.is_dir():
        return len(index_folder(path, split).files)
    return len(read_array_file(path)[0])


def holdout_set(spec: str | Path, n_calib: int, n: int, seed: int = 0, **kwargs) -> np.ndarray | None:
    """Up to ``n`` images of the calibration split that :func:`calibration_set` (``n_calib``, ``seed``) did NOT
    draw (seeded), for judging the quantized model on images it was not calibrated on; None when calibration used
    every image. ``kwargs`` as for :func:`load_dataset`. :class:`DataError` for a negative ``n`` (CLI
    ``--fidelity-images``: 0 skips the fidelity report)."""
    check_fidelity_images(n)
    check_seed(seed)
    total = dataset_size(spec, "train")
    used = subsample_indices(total, int(n_calib), seed)
    rest = np.setdiff1d(np.arange(total), used)
    if len(rest) == 0 or n <= 0:
        return None
    pick = np.sort(np.random.default_rng(seed + 1).choice(rest, size=min(int(n), len(rest)), replace=False))
    ds = load_dataset(spec, split="train", indices=pick, **kwargs)
    return validate_images(ds.images, f"held-out data from {ds.name}")


def check_fidelity_images(n: int) -> int:
    """``n`` if it is an integer >= 0 (a number of held-out images; 0: none), else :class:`DataError` naming it."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"--fidelity-images must be an integer >= 0 (0 skips the fidelity report), got {n!r}")
    return int(n)


def calibration_rows_in_test(spec: str | Path, n_calib: int, seed: int = 0) -> tuple[np.ndarray, int] | None:
    """When the ``test`` split of ``spec`` is the same set of images as its ``train`` split (an array file, an image
    folder without ``train``/``val`` sub-folders): (the rows :func:`calibration_set` (``n_calib``, ``seed``) drew,
    the number of rows), so an evaluation can leave them out. None when the test split is a set of its own
    (built-in datasets, folders with ``train``/``val``)."""
    if is_builtin(str(spec)):
        return None
    path = Path(spec)
    if path.is_dir():
        if _split_root(path, "train") != _split_root(path, "test"):    # train/ and val/: no listing needed
            return None
    elif path.suffix.lower() not in (".npy", ".npz") or not path.is_file():
        return None
    total = dataset_size(spec, "test")
    return subsample_indices(total, int(n_calib), seed), total


def run_data_kwargs(info: dict) -> dict:
    """The :func:`load_dataset` keyword arguments of a run directory's recorded image-folder preprocessing
    (``run.json`` ``preprocess``; {} for built-in and array data)."""
    prep = dict(info.get("preprocess") or {})
    if isinstance(prep.get("crop"), list):
        prep["crop"] = tuple(prep["crop"])
    return prep


def calibration_set(spec: str | Path, n: int = 512, seed: int = 0, **kwargs) -> np.ndarray:
    """``n`` unlabeled images (seeded subsample) for calibration, float32 NCHW.

    Built-in datasets draw from the TRAIN split (never the test set); an image folder with ``train``/``val``
    sub-folders uses ``train``; other folders and array files are used as a whole. Fewer than ``n`` available
    images gives all of them.
    """
    return calibration_dataset(spec, n, seed, **kwargs).images


def calibration_dataset(spec: str | Path, n: int = 512, seed: int = 0, **kwargs) -> Dataset:
    """:func:`calibration_set` as a :class:`Dataset` (its ``extra["notes"]`` say what looks wrong about array
    data)."""
    if n is None or int(n) <= 0:
        raise DataError(f"calibration size must be a positive number of images, got {n}")
    ds = load_dataset(spec, split="train", limit=int(n), seed=seed, **kwargs)
    ds.images = validate_images(ds.images, f"calibration data from {ds.name}")
    return ds


__all__ = [
    "BUILTIN_DATASETS", "CalibrationData", "calibration_dataset", "check_fidelity_images", "check_seed", "calibration_rows_in_test", "DIGITS_MEAN", "DIGITS_STD", "Dataset", "array_notes", "as_images",
    "dataset_size", "holdout_set", "run_data_kwargs", "load_callable", "looks_nhwc", "read_array_file", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "builtin_name", "calibration_set", "is_builtin",
    "load_array_file", "load_dataset", "load_digits_split", "load_fashion_mnist", "load_fashion_mnist_raw",
    "load_image_folder", "preprocess_image", "read_idx", "save_array_file", "subsample_indices", "validate_images",
]
