"""Image folders: ImageFolder layout (``root/<class>/<image>``, labels from sorted class names) or a flat folder of
unlabeled images, with evaluation preprocessing implemented in PIL + numpy (no torchvision):

    RGB (channels=3) or grayscale "L" (channels=1) -> Resize(resize) (shorter side, bilinear, PIL)
    -> CenterCrop(crop) -> /255 -> normalize(mean, std)

The default (resize 256, crop 224, ImageNet mean/std, RGB) matches torchvision's ``Resize(256)`` +
``CenterCrop(224)`` + ``ToTensor()`` + ``Normalize(...)`` on PIL images. ``resize=0`` resizes the whole image straight
to the crop size (aspect ratio not kept, nothing cut off: for images framed like the training images, e.g. 28x28
digits). A ``transform`` (``fn(PIL.Image.Image) -> (C, H, W)`` array or tensor) replaces all of it.

Labels: positions in the sorted class folder names; with ``train``/``val`` split folders, in ``train``'s list for
every split (:func:`index_folder`). Images wider than 8 bits are brought to 0..255 first (:func:`as_8bit`: 16-bit
grayscale by the full 16-bit range, float in [0, 1] by 255, with a note), not clipped.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test"), "val": ("val", "test")}


def is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


@dataclass
class FolderIndex:
    """The files of an image folder in deterministic order; ``labels``/``classes`` are None for a flat folder."""

    root: Path
    files: list[Path]
    labels: np.ndarray | None
    classes: list[str] | None


def _images_under(d: Path) -> list[Path]:
    """The image files under ``d`` (recursively, following symlinked folders like torchvision's ImageFolder, each
    real folder once), sorted by relative path; files and folders whose names start with '.'
    (``.ipynb_checkpoints``, ``.DS_Store``) are skipped at every level."""
    imgs: list[Path] = []
    seen: set[str] = set()
    top = os.path.realpath(d)
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:                  # a folder already listed (a link to it): once only
            dirnames[:] = []
            continue
        if dirpath != str(d) and (top == real or top.startswith(real + os.sep)):
            warnings.warn(f"{dirpath} links to {real}, a folder that holds {d} itself: skipped (its images would "
                          f"be labelled as {d.name}'s)", UserWarning, stacklevel=3)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        imgs += [p for p in (Path(dirpath) / f for f in filenames) if is_image_file(p)]
    return sorted(imgs, key=lambda p: p.relative_to(d).as_posix())


SPLIT_NAMES = ("train", "val", "test")


def _split_dirs(root: Path) -> dict[str, Path]:
    """{'train' / 'val' / 'test': folder} when the (non-hidden) sub-folders of ``root`` are split folders, named in
    any case (``Train/``, ``VAL/``): only split folders, or a ``train`` and a ``val`` / ``test`` next to other
    folders (``docs/``: :func:`_split_root` says they are ignored); {} otherwise. Raises :class:`DataError` for two
    folders of one split (``train/`` and ``Train/``)."""
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    names = {p.name.lower() for p in subdirs}
    if not subdirs or not (names <= set(SPLIT_NAMES) or ("train" in names and names & {"val", "test"})):
        return {}
    out: dict[str, Path] = {}
    for p in sorted(subdirs, key=lambda p: p.name):
        if p.name.lower() not in SPLIT_NAMES:
            continue
        if p.name.lower() in out:
            raise DataError(f"{root} has two folders for split {p.name.lower()!r}: {out[p.name.lower()].name} and "
                            f"{p.name}; keep one")
        out[p.name.lower()] = p
    return out


def _split_root(root: Path, split: str | None) -> Path:
    """``root/train`` or ``root/val`` (``root/test``) when ``root`` holds split folders (any case; other folders next
    to a ``train`` and a ``val`` / ``test`` are ignored with a :class:`UserWarning`), else ``root``."""
    if split is None:
        return root
    splits = _split_dirs(root)
    if not splits:
        return root
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and p.name.lower() not in SPLIT_NAMES)
    if others:
        warnings.warn(f"{root}: using its split folders ({', '.join(sorted(p.name for p in splits.values()))}) and "
                      f"ignoring the other folder(s) next to them: {', '.join(others[:5])}"
                      f"{' ...' if len(others) > 5 else ''}", UserWarning, stacklevel=3)
    for name in SPLIT_DIRS.get(split, (split,)):
        if name in splits:
            return splits[name]
    raise DataError(f"{root} has split folders {sorted(p.name for p in splits.values())} but none for split "
                    f"{split!r}")


def _class_dir_names(root: Path) -> list[str]:
    """The sorted names of the (non-hidden) sub-folders of ``root``."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _reference_classes(top: Path, root: Path) -> list[str] | None:
    """Train's class list when ``root`` is the ``val``/``test`` folder of ``top`` and ``top/train`` has class
    folders: the labels of every split are positions in it. None otherwise (``root`` numbers its own classes)."""
    train = _split_dirs(top).get("train") if root != top else None
    if train is None or root == train:
        return None
    return _class_dir_names(train) or None


def index_folder(root: str | Path, split: str | None = None) -> FolderIndex:
    """List the images of ``root``: ImageFolder layout if it has class sub-folders with images, else flat.

    Classes are sorted by name (label = position); files are sorted within each class (recursively, like
    torchvision's ImageFolder). If ``root`` contains only ``train``/``val``/``test`` folders, ``split`` picks one.

    Every split of such a folder is numbered by ``train``'s class list (its sorted class folder names), so a label
    means the same class in every split: a ``val`` that lacks some of train's classes (no folder, or an empty one)
    keeps train's numbers, with a :class:`UserWarning` naming the missing classes (accuracy is then over the others).
    Raises :class:`DataError` naming the folder for a ``val``/``test`` class folder with images that ``train`` does
    not have (its label would be a guess; an empty one is skipped with a :class:`UserWarning`), for class folders
    without images (in ``train``, or in a folder without splits), and for a folder without any image. Split folder
    names are matched in any case (``Train/``, ``Val/``); hidden files and folders (names starting with '.') are
    skipped at every level.
    """
    top = Path(root)
    if not top.is_dir():
        raise DataError(f"image folder not found: {top}")
    root = _split_root(top, split)
    reference = _reference_classes(top, root)
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    images = {d.name: _images_under(d) for d in class_dirs}
    train_dir = _split_dirs(top).get("train", top / "train") if reference is not None else top / "train"
    if reference is not None and class_dirs:
        unknown = [d.name for d in class_dirs if d.name not in reference]
        empty_unknown = [n for n in unknown if not images[n]]
        unknown = [n for n in unknown if images[n]]
        if empty_unknown:
            warnings.warn(f"{root}: skipping {len(empty_unknown)} empty class folder(s) that {train_dir} does not "
                          f"have ({', '.join(empty_unknown[:5])}{' ...' if len(empty_unknown) > 5 else ''})",
                          UserWarning, stacklevel=2)
            class_dirs = [d for d in class_dirs if d.name not in empty_unknown]
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                            f"not in {train_dir} (its classes: {', '.join(reference[:10])}"
                            f"{' ...' if len(reference) > 10 else ''}): labels are positions in train's sorted class "
                            "list, so every class of val/test needs a train folder of the same name")
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for d in class_dirs:
        imgs = images[d.name]
        if not imgs:
            continue  # an empty class folder is an error, as in torchvision's ImageFolder: checked below
        classes.append(d.name)
        files += imgs
        labels += [(reference.index(d.name) if reference is not None else len(classes) - 1)] * len(imgs)
    if classes:
        loose = sorted((p for p in root.iterdir() if is_image_file(p)), key=lambda p: p.name)
        if loose:       # a flat folder with one stray sub-folder used to calibrate on that sub-folder's images alone
            warnings.warn(f"{root}: the {len(loose)} image(s) directly in it ({loose[0].name}"
                          f"{', ...' if len(loose) > 1 else ''}) are not used: it has class folder(s) "
                          f"({', '.join(classes[:3])}{' ...' if len(classes) > 3 else ''}) with {len(files)} image(s), "
                          "and only those are read (ImageFolder layout); move the sub-folder(s) out to use the "
                          "folder's own images", UserWarning, stacklevel=2)
        if reference is not None:
            missing = [c for c in reference if c not in classes]
            if missing:
                warnings.warn(f"{root} has no images of {len(missing)} of the {len(reference)} classes of "
                              f"{train_dir} ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): "
                              "labels keep train's numbering; accuracy is over the other classes", UserWarning,
                              stacklevel=2)
            return FolderIndex(root, files, np.asarray(labels, dtype=np.int64), list(reference))
        empty = [d.name for d in class_dirs if d.name not in classes]
        if empty:
            raise DataError(f"{root}: class folder(s) without images: {', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''} (extensions: {', '.join(IMG_EXTENSIONS)})")
        return FolderIndex(root, files, np.asarray(labels, dtype=np.int64), classes)
    flat = sorted((p for p in root.iterdir() if is_image_file(p)), key=lambda p: p.name)
    if not flat:
        raise DataError(f"{root} contains no images (looked for {', '.join(IMG_EXTENSIONS)} files, directly or in "
                        f"class sub-folders)")
    return FolderIndex(root, flat, None, None)


def _resize_shorter(img, size: int):
    """torchvision ``Resize(size)`` for PIL: shorter side -> ``size``, longer side -> int(size * long / short)."""
    from PIL import Image

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """torchvision ``CenterCrop`` on an (H, W, ...) array: top = round((H - h) / 2), zero padding if too small."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = arr.shape[:2]
    if h < ch or w < cw:
        pad_t, pad_l = (ch - h) // 2 if h < ch else 0, (cw - w) // 2 if w < cw else 0
        pad = [(pad_t, max(ch - h - pad_t, 0)), (pad_l, max(cw - w - pad_l, 0))] + [(0, 0)] * (arr.ndim - 2)
        arr = np.pad(arr, pad)
        h, w = arr.shape[:2]
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return arr[top:top + ch, left:left + cw]


def _size2(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def check_norm(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """mean/std as float32 arrays of ``channels`` values (one value is used for every channel)."""
    out = []
    for what, v in (("mean", mean), ("std", std)):
        v = tuple(float(x) for x in v)
        if len(v) not in (1, channels):
            raise DataError(f"{what} has {len(v)} values {v}, the images have {channels} channel(s): give "
                            f"{channels} value(s) or one")
        out.append(np.asarray(v * channels if len(v) == 1 else v, np.float32))
    if (out[1] <= 0).any():
        raise DataError(f"std must be positive, got {tuple(float(x) for x in std)}")
    return out[0], out[1]


def function_label(fn) -> str:
    """``'name' (file.py)`` of a user's function, for messages (just the name when it has no code object)."""
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return f"{name!r} ({code.co_filename})" if code is not None else repr(name)


def apply_transform(transform, img, where: str) -> np.ndarray:
    """``transform(img)`` as a float32 (C, H, W) array. Raises :class:`DataError` naming the function (and its file)
    and ``where`` when it fails, or returns something that is not a real-valued 3-D array or tensor (a str, None, a
    dict, a ragged list, a complex array, a 2-D or 4-D array: the returned type and shape are named)."""
    label = function_label(transform)
    try:
        x = transform(img)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: report it on one line
        raise DataError(f"preprocess function {label} failed on {where}: {type(e).__name__}: {e}") from e
    name = type(x).__name__
    article = "an" if name[:1].lower() in "aeiou" or name == "ndarray" else "a"
    returned = "None" if x is None else f"{article} {name}"
    if hasattr(x, "getbands") and hasattr(x, "mode"):       # a PIL image: numpy would read it as (H, W, C) uint8
        raise DataError(f"preprocess function {label} returned a PIL Image (mode {x.mode}, {x.size[0]}x{x.size[1]}) "
                        f"for {where}; expected one float (C, H, W) image: convert and normalize it, e.g. "
                        "(np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - mean) / std with mean, std of shape (C, 1, 1)")
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001 - a ragged list, an object numpy cannot read
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        raise DataError(f"preprocess function {label} returned {returned}"
                        + (f" (dtype {arr.dtype})" if arr is not None and isinstance(x, np.ndarray) else "")
                        + f" for {where}; expected one float (C, H, W) image as a numpy array or torch tensor")
    if arr.ndim != 3:
        raise DataError(f"preprocess function {label} returned {returned} of shape {arr.shape} for {where}; "
                        "expected one (C, H, W) image")
    return np.ascontiguousarray(arr, dtype=np.float32)


#: PIL modes of 16-bit (unsigned) grayscale images: scaled to 8 bits by the full range (65535 -> 255); also the raw
#: modes (``im.tile``) of a mode ``I`` image read from an unsigned 16-bit file (a 16-bit PNG / PGM)
MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _raw_mode(img) -> str | None:
    """The raw mode of ``img``'s file data (from ``img.tile``, before the image is loaded), or None when unknown."""
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str):
            return raw
    return None


def _raw_depth(raw: str | None) -> str:
    """'raw mode I;32S: 32-bit signed' for messages (``I`` alone: 32-bit signed; unknown without a raw mode)."""
    if raw is None:
        return "raw mode unknown"
    bits, signed = "32", True
    if raw.startswith("I;"):
        rest = raw[2:]
        digits = "".join(c for c in rest if c.isdigit())
        bits, signed = digits or "32", "S" in rest[len(digits):]
    elif raw != "I":
        return f"raw mode {raw}"
    return f"raw mode {raw}: {bits}-bit {'signed' if signed else 'unsigned'}"


def as_8bit(img, path: str | Path):
    """``img`` (a PIL image) in a mode whose pixels are 0..255, so that ``convert("RGB")`` / ``convert("L")`` keep
    its contrast (PIL clips wider pixels to 255: a 16-bit PNG came out white, a [0, 1] float TIFF black).

    Unsigned 16-bit grayscale (modes ``I;16`` / ``I;16B`` / ``I;16L``, and ``I`` read from an unsigned 16-bit file:
    its raw mode in ``img.tile`` is one of :data:`MODES_16BIT`, e.g. a 16-bit PNG / PGM) is scaled by the full 16-bit
    range (v * 255 / 65535, rounded); float (``F``) with pixels in [0, 1] by 255. Either way a :class:`UserWarning`
    says so (once per kind). Other modes are returned as they are. Raises :class:`DataError` naming ``path``, its mode
    and its pixel range for ``I`` / ``F`` pixels outside those ranges (no scale to assume: convert such files, or pass
    ``--preprocess``), for NaN / Inf pixels, and, naming the raw mode / bit depth, for other integer images (a 32-bit
    or a signed 16-bit TIFF: 0..255 in a 32-bit file is not 16-bit data). ``img`` must not be loaded yet (its raw mode
    is read from ``img.tile``)."""
    from PIL import Image

    mode = img.mode
    if mode not in MODES_16BIT + ("F",) and not (mode == "I" or mode.startswith("I;")):
        return img
    raw = _raw_mode(img) if mode == "I" else mode
    arr = np.asarray(img)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"image {path} (PIL mode {mode}) has NaN/Inf pixels")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode == "F":
        if lo < 0 or hi > 1:
            raise DataError(f"image {path} is a float image (PIL mode F) with pixels in [{lo:.6g}, {hi:.6g}]: ptq2tvm "
                            "reads float images as [0, 1] (scaled by 255); convert it to 8 or 16 bits, or pass "
                            "--preprocess file.py:fn")
        scale, what = 255.0, "float images (PIL mode F, pixels in [0, 1]) are scaled by 255"
    else:
        if lo < 0 or hi > 65535:
            raise DataError(f"image {path} has integer pixels (PIL mode {mode}) in [{lo:.0f}, {hi:.0f}], outside "
                            "the 16-bit range 0..65535: no scale to 8 bits to assume; convert it, or pass "
                            "--preprocess file.py:fn")
        if raw not in MODES_16BIT:
            raise DataError(f"image {path} has integer pixels of PIL mode {mode} ({_raw_depth(raw)}): only unsigned "
                            "16-bit integer images are accepted (PIL modes I;16 / I;16B / I;16L, or I from an "
                            "unsigned 16-bit file: raw mode I;16 / I;16B), besides 8-bit and float [0, 1] images; "
                            "convert it to 8 or unsigned 16 bits, or pass --preprocess file.py:fn")
        scale, what = 255.0 / 65535.0, (f"16-bit images (PIL mode {mode}) are scaled to 8 bits by the full 16-bit "
                                         "range (65535 -> 255)")
    warnings.warn(f"{what} before preprocessing", UserWarning, stacklevel=3)
    out = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out)          # uint8 (H, W): mode L


#: (resized (H, W), crop (H, W)) pairs :func:`preprocess_image` has warned of (a padded crop), once each per process
_PADDED_CROPS: set[tuple[tuple[int, int], tuple[int, int]]] = set()


def preprocess_image(path: str | Path, resize: int | None = 256, crop: int | tuple[int, int] | None = 224,
                     mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                     channels: int = 3, transform=None) -> np.ndarray:
    """One image file -> float32 (channels, crop_h, crop_w): RGB (or grayscale for ``channels=1``),
    Resize(resize) (``0``: straight to the crop size), CenterCrop(crop), /255, normalize with ``mean``/``std``.
    ``transform(PIL image) -> (C, H, W)`` replaces the whole pipeline. Raises :class:`DataError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    path = Path(path)
    try:
        with Image.open(path) as im:
            img = as_8bit(im, path).convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if transform is not None:
        return apply_transform(transform, img, str(path))
    m, s = check_norm(mean, std, channels)
    if resize == 0 and crop:
        ch, cw = _size2(crop)
        img = img.resize((cw, ch), Image.BILINEAR)
    elif resize:
        img = _resize_shorter(img, int(resize))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if crop:
        ch, cw = _size2(crop)
        if (arr.shape[0] < ch or arr.shape[1] < cw) and (arr.shape[:2], (ch, cw)) not in _PADDED_CROPS:
            _PADDED_CROPS.add((arr.shape[:2], (ch, cw)))   # torchvision's CenterCrop pads too, silently; once per size
            warnings.warn(f"{path.name} (and any other image of its size): resized to {arr.shape[0]}x{arr.shape[1]} "
                          f"(height x width; shorter side {resize}), smaller than the {ch}x{cw} center crop: the crop "
                          f"is padded with black bars; give --resize at least {max(ch, cw)} (or 0: straight to the "
                          "crop size) for images of another aspect ratio", UserWarning, stacklevel=2)
        arr = center_crop(arr, (ch, cw))
    x = arr.astype(np.float32) * np.float32(1 / 255)
    x = (x - m) / s
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image_folder(root: str | Path, split: str | None = None, limit: int | None = None, seed: int = 0,
                      resize: int | None = 256, crop: int | tuple[int, int] | None = 224,
                      mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                      progress: bool = False, channels: int = 3, transform=None, indices: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None, FolderIndex]:
    """Load (a seeded subsample of ``limit``, or the rows ``indices``) images of a folder -> (float32 NCHW, labels or
    None, index). ``channels``/``transform``: see :func:`preprocess_image`.

    The subsample keeps the folder order. Without ``crop`` all images must end up the same size.
    """
    index = index_folder(root, split)
    idx = subsample_indices(len(index.files), limit, seed) if indices is None else np.asarray(indices)
    files = [index.files[i] for i in idx]
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc=f"loading {index.root.name}", unit="img", leave=False)
    arrays = [preprocess_image(p, resize, crop, mean, std, channels, transform) for p in it]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{index.root}: images have different sizes after preprocessing {sorted(shapes)[:3]}; "
                        f"give a crop size")
    images = np.stack(arrays) if arrays else np.zeros((0, channels, *_size2(crop or 0)), np.float32)
    labels = index.labels[idx] if index.labels is not None else None
    return images, labels, index


def median_shorter_side(root: str | Path, split: str | None = "train", sample: int = 64, seed: int = 0) -> int | None:
    """Median shorter side (pixels) of up to ``sample`` images of the folder (seeded; image headers only, no
    decoding), or None when none can be read."""
    from PIL import Image

    files = index_folder(root, split).files
    sides = []
    for i in subsample_indices(len(files), sample, seed):
        try:
            with Image.open(files[int(i)]) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported when the images are loaded
            continue
    return int(np.median(sides)) if sides else None


def check_seed(seed: int) -> int:
    """``seed`` if it is an integer >= 0 (what numpy's generators take), else :class:`DataError` naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0 (--seed), got {seed!r}")
    return int(seed)


def subsample_indices(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or ``limit`` of them drawn without replacement (seeded), in increasing order. The seed
    is checked either way (:func:`check_seed`)."""
    check_seed(seed)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))
