"""Arrays on disk: a ``.npy`` of float (N, C, H, W) images, or a ``.npz`` with ``images`` and optional ``labels``.

    np.save("calib.npy", x)                        # x: float32 (N, C, H, W), preprocessed like the training data
    np.savez("calib.npz", images=x, labels=y)      # labels optional (int, (N,)): needed only by `eval`
    np.savez("calib.npz", x)                       # numpy's default key ``arr_0`` is accepted for the images

The values are used as they are (already preprocessed the way the model expects); they are cast to float32.
:func:`array_notes` says when an array looks like raw pixels or channels-last (NHWC).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError


def load_array_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``path`` (.npy or .npz) -> (float32 NCHW images, int64 labels or None). Rank and labels are checked;
    finiteness is checked by :func:`ptq2tvm.data.validate_images`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"array file not found: {path}")
    images, labels = read_array_file(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    return images, labels


_MAGIC = {".npy": (b"\x93NUMPY", "a .npy file (numpy.save)"), ".npz": (b"PK\x03\x04", "a .npz file (a zip archive "
                                                                             "written by numpy.savez)")}


def read_array_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`load_array_file` without the float32 cast: the images in the file's own dtype (for
    :func:`array_notes`), labels int64 or None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"array file not found: {path}")
    suffix = path.suffix.lower()
    labels = None
    if suffix not in _MAGIC:
        raise DataError(f"{path}: expected a .npy or .npz file")
    magic, what = _MAGIC[suffix]
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise DataError(f"cannot read {path}: it is not {what} (it starts with {head[:8]!r})")
    try:
        if suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                key = "images" if "images" in z.files else "arr_0" if "arr_0" in z.files else None
                if key is None:
                    raise DataError(f"{path}: .npz has no 'images' array (found: {', '.join(z.files) or 'nothing'}); "
                                    "write it with np.savez(path, images=x, labels=y) (labels optional)")
                images = z[key]
                labels = z["labels"] if "labels" in z.files else None
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiub":
        raise DataError(f"{path}: images must be a numeric array, got dtype {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4:
        raise DataError(f"{path}: images must be (N, C, H, W), got shape {images.shape} (rank {images.ndim})")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        if len(labels) != len(images):
            raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < 0:
            raise DataError(f"{path}: negative label {int(labels.min())}")
        labels = labels.astype(np.int64)
    return images, labels


def looks_nhwc(shape: tuple[int, ...]) -> bool:
    """(N, H, W, C) with C in 1/3/4 and H, W > 4: channels last, where ptq2tvm reads channels first."""
    return len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] > 4 and shape[2] > 4


def array_notes(images: np.ndarray, what: str) -> list[str]:
    """Warnings about an image array that is probably not what a model expects: an integer dtype, values that look
    like raw 0..255 pixels (not normalized), channels-last layout. Empty when nothing looks wrong."""
    notes = []
    a = np.asarray(images)
    if a.dtype.kind in "iub":
        notes.append(f"{what} has integer dtype {a.dtype}: ptq2tvm uses the values as they are (no /255, no "
                     "normalization); give float32 images preprocessed exactly as for the model's training")
    if a.size:
        sample = a.reshape(-1)[:: max(1, a.size // 200_000)].astype(np.float64)
        lo, hi = float(sample.min()), float(sample.max())
        integral = float(np.mean(sample == np.round(sample)))
        # whole numbers from 0 up, or anything on the 0..255 scale (raw pixels resized with interpolation are not
        # whole: a new user's 87%); normalized images stay within a few units of 0
        if lo >= 0 and hi > 20 and (integral > 0.99 or hi <= 255.5):
            what_kind = "are whole numbers" if integral > 0.99 else "are on the 0..255 scale"
            notes.append(f"{what} values lie in [{lo:g}, {hi:g}] and {what_kind}: they look like raw pixels; a "
                         "model trained on normalized inputs (x/255, then (x - mean) / std) needs them normalized")
    if looks_nhwc(a.shape):
        notes.append(f"{what} has shape {tuple(a.shape)}, which looks like channels-last (N, H, W, C); ptq2tvm "
                     "reads (N, C, H, W): use x.transpose(0, 3, 1, 2)")
    return notes


def save_array_file(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write images (and labels) in the format :func:`load_array_file` reads: .npy (images only) or .npz."""
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if path.suffix.lower() == ".npz":
        arrays = {"images": images}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        np.savez(path, **arrays)
    elif path.suffix.lower() == ".npy":
        if labels is not None:
            raise DataError(f"{path}: a .npy file holds images only; use .npz to keep labels")
        np.save(path, images)
    else:
        raise DataError(f"{path}: expected a .npy or .npz file name")
    return path
