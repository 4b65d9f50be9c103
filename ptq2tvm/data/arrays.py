"""Arrays on disk: a ``.npy`` of float (N, C, H, W) images, or a ``.npz`` with ``images`` and optional ``labels``.

The values are used as they are (already preprocessed the way the model expects); they are cast to float32.
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
    suffix = path.suffix.lower()
    labels = None
    try:
        if suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise DataError(f"{path}: .npz has no 'images' array (found: {', '.join(z.files) or 'nothing'})")
                images = z["images"]
                labels = z["labels"] if "labels" in z.files else None
        else:
            raise DataError(f"{path}: expected a .npy or .npz file")
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiub":
        raise DataError(f"{path}: images must be a numeric array, got dtype {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4:
        raise DataError(f"{path}: images must be (N, C, H, W), got shape {images.shape} (rank {images.ndim})")
    images = np.ascontiguousarray(images, dtype=np.float32)
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
