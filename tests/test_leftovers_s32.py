"""Leftovers of session 31's breaker passes, fixed in session 32 (each test fails before its fix): a --preprocess
function returning a PIL Image (read by numpy as channels-last uint8), raw 0..255 outputs of a preprocess function
with no warning, a top-level folder holding train/, val/ and another folder treated as three classes, and a
symlinked folder inside a class folder skipped (torchvision's ImageFolder follows it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ptq2tvm.errors import DataError


def _png(path: Path, value: int, size: int = 8, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


# ---- a --preprocess function returning a PIL Image, or raw pixels ----------------------------------------------------
def test_a_preprocess_returning_a_pil_image_is_named():
    from PIL import Image

    from ptq2tvm.data.image_folder import apply_transform

    def prep(img):
        return img.resize((6, 4))

    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"preprocess function 'prep' \(.*\) returned a PIL Image \(mode RGB, 6x4\) "
                                        r"for a\.png; expected one float \(C, H, W\) image: convert and normalize"):
        apply_transform(prep, img, "a.png")


RAW = "def raw(img):\n    import numpy as np\n    return np.asarray(img).transpose(2, 0, 1)\n"
SCALED = "def scaled(img):\n    import numpy as np\n    return np.asarray(img, np.float32).transpose(2, 0, 1) / 255\n"


@pytest.mark.parametrize("src, fn, warned", [(RAW, "raw", True), (SCALED, "scaled", False)], ids=["raw", "scaled"])
def test_raw_pixels_from_a_preprocess_function_are_warned(tmp_path, src, fn, warned):
    from ptq2tvm.data import load_dataset

    for i in range(4):
        _png(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png", 60 * i + 3, 8, "RGB")
    (tmp_path / "prep.py").write_text(src)
    ds = load_dataset(tmp_path / "imgs", transform=f"{tmp_path / 'prep.py'}:{fn}", crop=None, resize=0)
    assert ds.images.shape == (4, 3, 8, 8)
    notes = ds.extra["notes"]
    if warned:
        assert len(notes) == 1, notes
        assert f"the images the preprocess function '{fn}' (" in notes[0] and "prep.py) returns values lie in [3, " \
            "183] and are whole numbers: they look like raw pixels" in notes[0], notes
    else:
        assert notes == []


# ---- image folders: train/ + val/ + another folder; symlinked folders ------------------------------------------------
def test_split_folders_next_to_another_folder_are_still_splits(tmp_path):
    from ptq2tvm.data import index_folder

    for split in ("train", "val"):
        for c in "ab":
            _png(tmp_path / split / c / "0.png", 10)
    _png(tmp_path / "docs" / "figure.png", 0)
    with pytest.warns(UserWarning, match=r"using its split folders \(train, val\) and ignoring the other folder\(s\) "
                                         r"next to them: docs"):
        train = index_folder(tmp_path, "train")
    assert train.classes == ["a", "b"] and train.root == tmp_path / "train"      # was classes docs, train, val
    with pytest.warns(UserWarning, match="ignoring the other folder"):
        assert index_folder(tmp_path, "test").root == tmp_path / "val"


def test_class_folders_named_like_a_split_alone_stay_classes(tmp_path):
    from ptq2tvm.data import index_folder

    for c in ("train", "zebra"):                     # no val/test next to train: two classes, as before
        _png(tmp_path / c / "0.png", 10)
    idx = index_folder(tmp_path, "train")
    assert idx.classes == ["train", "zebra"] and list(idx.labels) == [0, 1]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this OS")
def test_symlinked_folders_inside_a_class_are_followed_once(tmp_path):
    from ptq2tvm.data import index_folder

    for i in range(2):
        _png(tmp_path / "elsewhere" / f"{i}.png", 5)
    _png(tmp_path / "imgs" / "a" / "own.png", 1)
    _png(tmp_path / "imgs" / "b" / "own.png", 2)
    os.symlink(tmp_path / "elsewhere", tmp_path / "imgs" / "a" / "linked")
    os.symlink(tmp_path / "imgs" / "b", tmp_path / "imgs" / "b" / "loop")          # a link back up: listed once
    idx = index_folder(tmp_path / "imgs")
    names = [p.relative_to(tmp_path / "imgs").as_posix() for p in idx.files]
    assert names == ["a/linked/0.png", "a/linked/1.png", "a/own.png", "b/own.png"], names
    assert list(idx.labels) == [0, 0, 0, 1]
