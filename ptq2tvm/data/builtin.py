"""Built-in datasets: Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files) and scikit-learn's 8x8 digits.

Both come out as float32 NCHW, normalized with fixed per-dataset constants, and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "PTQ2TVM_FASHION_MNIST_DIR"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

# sklearn digits: pixel values 0..16; x / 16 is standardized with the statistics of all 1797 images.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)
DIGITS_TEST_SIZE = 360  # -> 1437 train / 360 test, stratified
DIGITS_SPLIT_SEED = 0

# IDX data type codes (third byte of the magic number) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_cache_lock = threading.Lock()


def read_idx(path: str | Path, expect_ndim: int | None = None, expect_dtype: int | None = 0x08) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or raw), validating the magic number and the payload size.

    Raises :class:`DataError` naming ``path`` if it is missing, not IDX, truncated, or has trailing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupted or truncated gzip stream ({type(e).__name__}: {e}); "
                        f"reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()})")
    if expect_dtype is not None and dtype_code != expect_dtype:
        raise DataError(f"{path}: IDX data type 0x{dtype_code:02x}, expected 0x{expect_dtype:02x} (unsigned byte)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(f"{path}: IDX file has {ndim} dimension(s), expected {expect_ndim} "
                        f"(magic 0x{raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[dtype_code]
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise DataError(f"{path}: truncated IDX file: shape {shape} needs {need} data bytes, found {have}")
    if have > need:
        raise DataError(f"{path}: IDX file has {have - need} unexpected trailing bytes after shape {shape}")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def fashion_mnist_dir() -> Path:
    """The directory with the Fashion-MNIST IDX files: ``$PTQ2TVM_FASHION_MNIST_DIR`` or Debian's location."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def load_fashion_mnist_raw(split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as (uint8 images (N, 28, 28), int64 labels (N,)), cached per process."""
    if split not in _FMNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else fashion_mnist_dir()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found: {root} does not exist; install it with "
                        f"`apt-get install dataset-fashion-mnist` (or set ${FASHION_MNIST_ENV} to a directory "
                        f"holding the four *-ubyte.gz files)")
    img_name, lbl_name, n_expected = _FMNIST_FILES[split]
    img_path, lbl_path = root / img_name, root / lbl_name
    key = (str(img_path.resolve()), str(lbl_path.resolve()))
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in (img_path, lbl_path))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DataError(f"Fashion-MNIST file missing: {p}; reinstall it with "
                            f"`apt-get install --reinstall dataset-fashion-mnist`")
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lbl_path, expect_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if len(images) != n_expected:
        raise DataError(f"{img_path}: {len(images)} images, expected {n_expected} for the {split} split")
    if labels.max(initial=0) > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    result = (images, labels.astype(np.int64))
    with _cache_lock:
        _cache[key] = (stamp, result)
    return result


def load_fashion_mnist(split: str = "test", root: str | Path | None = None,
                       indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (or its rows ``indices``) as normalized float32 (N, 1, 28, 28) images and int64
    labels."""
    images, labels = load_fashion_mnist_raw(split, root)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = images.astype(np.float32)[:, None] * np.float32(1 / 255)
    x -= np.float32(FASHION_MNIST_MEAN[0])
    x *= np.float32(1 / FASHION_MNIST_STD[0])
    return x, labels.copy()


def load_digits_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as normalized float32 (N, 1, 8, 8) images and int64 labels.

    The train/test split (1437/360) is stratified and fixed (seed ``DIGITS_SPLIT_SEED``).
    """
    if split not in ("train", "test"):
        raise DataError(f"digits split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32)[:, None] / np.float32(16) - np.float32(DIGITS_MEAN[0])) / np.float32(DIGITS_STD[0])
    y = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE,
                                           random_state=DIGITS_SPLIT_SEED, stratify=y)
    idx = np.sort(idx_train if split == "train" else idx_test)
    return np.ascontiguousarray(x[idx]), y[idx]
