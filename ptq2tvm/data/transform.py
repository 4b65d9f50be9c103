"""Your own preprocessing: a ``file.py:fn`` hook for image folders, and a dataset + transform form of calibration data
for the Python API (the shape of NNCF's ``Dataset(loader, transform_fn)`` and ONNX Runtime's
``CalibrationDataReader``)::

    from ptq2tvm.data import CalibrationData
    calib = CalibrationData(my_dataset, lambda item: my_transform(item[0]))   # any iterable: list, Dataset, DataLoader
    qm = ptq2tvm.api.quantize(model, calib, QuantConfig(4, 4))
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import DataError


def load_callable(spec: str, what: str = "preprocess function") -> Callable[..., Any]:
    """``"path/to/file.py:name"`` -> the attribute ``name`` of that file (imported once, under its stem).

    Raises :class:`DataError` naming the file when it is missing, fails to import, or lacks ``name``."""
    if ":" not in spec or not spec.rsplit(":", 1)[0].endswith(".py"):
        raise DataError(f"{what} must be given as path/to/file.py:function, got {spec!r}")
    file, attr = spec.rsplit(":", 1)
    path = Path(file)
    if not path.is_file():
        raise DataError(f"{what} file not found: {file}")
    mod_spec = importlib.util.spec_from_file_location(f"ptq2tvm_user_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code
        raise DataError(f"cannot import {file}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"{file} has no function {attr!r}")
    return fn


#: the dict keys a calibration item's image is taken from without a transform_fn (HuggingFace datasets' "image" /
#: "pixel_values", albumentations' "image"); an item with exactly one of them gives that value
IMAGE_KEYS = ("image", "img", "images", "pixel_values")


def _as_array(x: Any, index: int | None = None) -> np.ndarray:
    """One calibration item as float32. Raises DataError for a dict (a dataset of {"image": ..., "label": ...}
    records), naming its keys and the transform_fn that picks the image, and for anything not array-like."""
    where = "calibration item" + (f" {index}" if index is not None else "")
    if type(x).__module__.startswith("PIL."):
        raise DataError(f"{where} is a PIL image ({type(x).__name__}, mode {getattr(x, 'mode', '?')}): ptq2tvm takes "
                        "float arrays preprocessed like the training data; pass CalibrationData(items, transform_fn) "
                        "with a transform_fn that turns the image into a (C, H, W) float array (resize, /255, "
                        "normalize), or an image folder on the command line")
    if isinstance(x, Mapping):
        keys = ", ".join(repr(k) for k in list(x)[:6])
        found = "none" if not set(x) & set(IMAGE_KEYS) else "more than one"
        first = next(iter(x), "image")
        raise DataError(f"{where} is a dict (keys {keys}) holding {found} of the keys an image is taken from "
                        f"({', '.join(IMAGE_KEYS)}): pass CalibrationData(loader, lambda b: b[{first!r}]) with the "
                        "key that holds the image")
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where} ({type(x).__name__}) is not an image array: {e}; use CalibrationData(items, "
                        "transform_fn) with a transform_fn that returns the image") from e


class CalibrationData:
    """Calibration (or evaluation) images from any iterable of ``items`` and a ``transform_fn(item)`` that returns
    one image (C, H, W) or a batch (N, C, H, W), as a numpy array or torch tensor.

    Without ``transform_fn`` an item is used as is, except that an ``(image, label)`` pair (what a torch
    ``DataLoader`` over a labelled dataset yields) gives its first element, and a dict with exactly one of
    :data:`IMAGE_KEYS` (``{"image": ..., "label": ...}``) gives that value. :meth:`to_numpy` stops after ``limit``
    images; nothing is loaded before it is called."""

    def __init__(self, items: Iterable[Any], transform_fn: Callable[[Any], Any] | None = None):
        self.items = items
        self.transform_fn = transform_fn

    def __iter__(self):
        for item in self.items:
            if self.transform_fn is not None:
                yield self.transform_fn(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                yield item[0]
            elif isinstance(item, Mapping) and len([k for k in item if k in IMAGE_KEYS]) == 1:
                yield next(item[k] for k in item if k in IMAGE_KEYS)     # a dict, or HF's BatchFeature (UserDict)
            else:
                yield item

    def to_numpy(self, limit: int | None = None) -> np.ndarray:
        """The images as one float32 (N, C, H, W) array (at most ``limit``). Raises :class:`DataError` naming the
        item whose shape differs or is not 3-/4-D."""
        out: list[np.ndarray] = []
        n = 0
        for i, x in enumerate(self):
            a = _as_array(x, i)
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4:
                raise DataError(f"calibration item {i} has shape {a.shape}: transform_fn must return one image "
                                "(C, H, W) or a batch (N, C, H, W)")
            if out and a.shape[1:] != out[0].shape[1:]:
                raise DataError(f"calibration item {i} has image shape {a.shape[1:]}, earlier items "
                                f"{out[0].shape[1:]}")
            out.append(a)
            n += len(a)
            if limit is not None and n >= limit:
                break
        if not out:
            raise DataError("calibration data is empty (the iterable gave no items)")
        images = np.concatenate(out)
        return np.ascontiguousarray(images[:limit] if limit is not None else images)


def as_images(data: Any, limit: int | None = None) -> np.ndarray:
    """float32 (N, C, H, W) from a numpy array, a torch tensor, a :class:`CalibrationData`, or any other iterable
    of images / batches / (image, label) pairs."""
    if isinstance(data, np.ndarray):
        return data if limit is None else data[:limit]
    if hasattr(data, "detach"):
        return _as_array(data) if limit is None else _as_array(data[:limit])
    if isinstance(data, CalibrationData):
        return data.to_numpy(limit)
    if isinstance(data, (str, Path)):
        raise DataError(f"calibration data {str(data)!r} is a path: load it with ptq2tvm.data.calibration_set")
    try:
        iter(data)
    except TypeError:
        raise DataError(f"calibration data must be an array, a tensor or an iterable of images, got "
                        f"{type(data).__name__}") from None
    return CalibrationData(data).to_numpy(limit)


__all__ = ["CalibrationData", "as_images", "load_callable"]
