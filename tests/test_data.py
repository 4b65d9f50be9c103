"""Data loading (IDX, digits, image folders, arrays), validation, and the cached built-in training."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptq2tvm.data import (DIGITS_MEAN, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD,
                          calibration_set, load_dataset, preprocess_image, read_idx, save_array_file,
                          validate_images)
from ptq2tvm.data.builtin import FASHION_MNIST_DIR, load_fashion_mnist, load_fashion_mnist_raw
from ptq2tvm.errors import DataError

FMNIST = FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# ---- Fashion-MNIST / IDX ------------------------------------------------------------------------------------
@needs_fmnist
def test_fashion_mnist_idx_real_files():
    images, labels = load_fashion_mnist_raw("test", FMNIST)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10  # balanced test set
    train_images, train_labels = load_fashion_mnist_raw("train", FMNIST)
    assert train_images.shape == (60000, 28, 28) and set(np.unique(train_labels)) == set(range(10))

    ds = load_dataset("fashion-mnist", split="test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.input_shape == (1, 28, 28) and ds.mean == FASHION_MNIST_MEAN and ds.std == FASHION_MNIST_STD
    np.testing.assert_allclose(ds.images[0, 0], (images[0] / 255 - 0.2860) / 0.3530, atol=1e-5)
    assert abs(float(ds.images.mean())) < 0.05 and abs(float(ds.images.std()) - 1) < 0.05
    np.testing.assert_array_equal(ds.labels, labels)


@needs_fmnist
def test_fashion_mnist_limit_and_calibration_are_seeded():
    a = load_dataset("fashion-mnist", split="test", limit=100, seed=3)
    b = load_dataset("fashion-mnist", split="test", limit=100, seed=3)
    c = load_dataset("fashion-mnist", split="test", limit=100, seed=4)
    assert len(a) == 100 and np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    calib = calibration_set("fashion-mnist", 64, seed=0)
    assert isinstance(calib, np.ndarray) and calib.shape == (64, 1, 28, 28) and calib.dtype == np.float32
    assert np.array_equal(calib, calibration_set("fashion-mnist", 64, seed=0))
    # drawn from the TRAIN split, never from the test set
    train, _ = load_fashion_mnist("train")
    assert all(np.any(np.all(train == img, axis=(1, 2, 3))) for img in calib[:4])


def _write_idx(path: Path, arr: np.ndarray, magic: bytes | None = None, extra: bytes = b"", cut: int = 0,
               compress: bool = True) -> Path:
    header = (magic or bytes([0, 0, 0x08, arr.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes() + extra
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def test_idx_parse_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(_write_idx(tmp_path / "ok.gz", arr), expect_ndim=3), arr)
    np.testing.assert_array_equal(read_idx(_write_idx(tmp_path / "raw-idx", arr, compress=False)), arr)

    bad = _write_idx(tmp_path / "truncated-images-idx3-ubyte.gz", arr, cut=5)
    with pytest.raises(DataError, match=r"truncated-images-idx3-ubyte\.gz: truncated IDX file"):
        read_idx(bad, expect_ndim=3)
    with pytest.raises(DataError, match=r"trailing\.gz: .*trailing bytes"):
        read_idx(_write_idx(tmp_path / "trailing.gz", arr, extra=b"xx"))
    with pytest.raises(DataError, match=r"magic\.gz: not an IDX file \(bad magic number 0x12340803\)"):
        read_idx(_write_idx(tmp_path / "magic.gz", arr, magic=b"\x12\x34\x08\x03"))
    with pytest.raises(DataError, match=r"ndim\.gz: IDX file has 3 dimension\(s\), expected 1"):
        read_idx(_write_idx(tmp_path / "ndim.gz", arr), expect_ndim=1)
    with pytest.raises(DataError, match=r"nofile\.gz"):
        read_idx(tmp_path / "nofile.gz")
    # a gzip stream cut short (a partial download)
    whole = gzip.compress(bytes(4) + bytes(range(256)) * 64)
    cut = tmp_path / "cut-labels-idx1-ubyte.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut-labels-idx1-ubyte\.gz: corrupted or truncated gzip"):
        read_idx(cut)


@needs_fmnist
def test_corrupted_fashion_mnist_dir_names_the_file(tmp_path, monkeypatch):
    d = tmp_path / "fm"
    d.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / name).write_bytes((FMNIST / name).read_bytes())
    real = (FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(real[: len(real) - 1000])  # truncated download
    monkeypatch.setenv("PTQ2TVM_FASHION_MNIST_DIR", str(d))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("fashion-mnist", split="test")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):  # missing file
        load_dataset("fashion-mnist", split="train")


def test_missing_fashion_mnist_dir_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQ2TVM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_unknown_spec_and_bad_split(tmp_path):
    with pytest.raises(DataError, match=r"array file not found: .*missing\.npy"):
        load_dataset(str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match=r"dataset not found: .*no-such-dir.* neither a built-in dataset"):
        load_dataset(str(tmp_path / "no-such-dir"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not a dataset"):
        load_dataset(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_dataset("digits", split="validation")
    with pytest.raises(DataError, match="calibration size"):
        calibration_set("digits", 0)


# ---- digits -------------------------------------------------------------------------------------------------
def test_digits_split():
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert tr.images.shape == (1437, 1, 8, 8) and te.images.shape == (360, 1, 8, 8)
    assert tr.images.dtype == np.float32 and tr.labels.dtype == np.int64 and tr.mean == DIGITS_MEAN
    assert abs(float(tr.images.mean())) < 0.05 and abs(float(tr.images.std()) - 1) < 0.05
    assert np.bincount(te.labels).min() >= 35  # stratified
    assert np.array_equal(te.images, load_dataset("digits", split="test").images)  # fixed split
    flat_tr = {x.tobytes() for x in tr.images}
    assert sum(x.tobytes() in flat_tr for x in te.images) < 5  # disjoint (up to duplicate images)


# ---- validation ---------------------------------------------------------------------------------------------
def test_validate_images_rejects_empty_rank_and_nonfinite():
    x = np.random.default_rng(0).standard_normal((8, 1, 4, 4)).astype(np.float32)
    assert validate_images(x) is x or np.array_equal(validate_images(x), x)
    assert validate_images(x.astype(np.float64)).dtype == np.float32
    with pytest.raises(DataError, match=r"calib is empty"):
        validate_images(x[:0], "calib")
    with pytest.raises(DataError, match=r"calib must be \(N, C, H, W\), got shape \(1, 4, 4\)"):
        validate_images(x[0], "calib")
    bad = x.copy()
    bad[2, 0, 1, 3] = np.nan
    bad[5, 0, 0, 0] = np.inf
    bad[5, 0, 2, 2] = np.nan
    with pytest.raises(DataError, match=r"calib has 3 NaN/Inf values \(2 NaN, 1 Inf\) in 2 image\(s\), first at "
                                        r"index 2 \(channel, row, col\) = \(0, 1, 3\); images: 2, 5"):
        validate_images(bad, "calib")
    with pytest.raises(DataError, match="numeric"):
        validate_images(np.array([["a"]]), "calib")


# ---- arrays -------------------------------------------------------------------------------------------------
def test_npy_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 5, 6)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    ds = load_dataset(str(save_array_file(tmp_path / "a.npy", x)))
    assert ds.labels is None and ds.input_shape == (3, 5, 6) and np.array_equal(ds.images, x)
    ds = load_dataset(save_array_file(tmp_path / "a.npz", x, y))
    assert np.array_equal(ds.images, x) and np.array_equal(ds.labels, y) and ds.labels.dtype == np.int64
    sub = load_dataset(tmp_path / "a.npz", limit=5, seed=1)
    assert len(sub) == 5 and all(np.any(np.all(x == img, axis=(1, 2, 3))) for img in sub.images)
    calib = calibration_set(tmp_path / "a.npy", 100)
    assert calib.shape == x.shape  # fewer than asked: all of them

    np.save(tmp_path / "rank3.npy", x[0])
    with pytest.raises(DataError, match=r"rank3\.npy: images must be \(N, C, H, W\), got shape \(3, 5, 6\)"):
        load_dataset(str(tmp_path / "rank3.npy"))
    x_nan = x.copy()
    x_nan[4, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", x_nan)
    with pytest.raises(DataError, match=r"1 NaN/Inf values .* first at index 4"):
        load_dataset(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "empty.npy", x[:0])
    with pytest.raises(DataError, match="empty"):
        calibration_set(str(tmp_path / "empty.npy"), 10)
    np.savez(tmp_path / "nolabels.npz", data=x)
    with pytest.raises(DataError, match=r"no 'images' array \(found: data\)"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    np.savez(tmp_path / "badlabels.npz", images=x, labels=y[:3])
    with pytest.raises(DataError, match="12 images but 3 labels"):
        load_dataset(str(tmp_path / "badlabels.npz"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"cannot read .*junk\.npy"):
        load_dataset(str(tmp_path / "junk.npy"))


# ---- image folders ------------------------------------------------------------------------------------------
def _png(path: Path, w: int, h: int, seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _denorm(x: np.ndarray) -> np.ndarray:
    """(3, H, W) normalized -> (H, W, 3) uint8-valued floats."""
    return np.rint((x.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255)


def test_image_folder_layout_labels_and_shapes(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "zebra" / "b.png", 300, 260, 0)
    _png(root / "zebra" / "a.png", 240, 320, 1)
    _png(root / "ant" / "x.png", 256, 256, 2)
    _png(root / "ant" / "sub" / "y.png", 500, 230, 3)
    (root / "ant" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(root))
    assert ds.images.shape == (4, 3, 224, 224) and ds.images.dtype == np.float32
    assert ds.classes == ["ant", "zebra"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD
    # order: sorted classes, then sorted relative paths: ant/sub/y.png, ant/x.png, zebra/a.png, zebra/b.png
    np.testing.assert_array_equal(ds.images[1], preprocess_image(root / "ant" / "x.png"))
    np.testing.assert_array_equal(ds.images[2], preprocess_image(root / "zebra" / "a.png"))
    small = load_dataset(str(root), resize=40, crop=32)
    assert small.images.shape == (4, 3, 32, 32)
    sub = load_dataset(str(root), limit=2, seed=0)
    assert len(sub) == 2 and np.array_equal(sub.images, load_dataset(str(root), limit=2, seed=0).images)

    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"img{i}.jpg" if i else flat / f"img{i}.png", 260 + 10 * i, 280, 10 + i)
    calib = calibration_set(str(flat), 2, seed=0)
    assert calib.shape == (2, 3, 224, 224)
    fds = load_dataset(str(flat))
    assert fds.labels is None and fds.classes is None and len(fds) == 3

    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) without images: empty_class"):
        load_dataset(str(root))
    with pytest.raises(DataError, match="contains no images"):
        load_dataset(str(tmp_path / "imgs" / "empty_class"))
    (flat / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset(str(flat))


def test_image_folder_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _png(tmp_path / split / f"c{i % 2}" / f"{i}.png", 230, 230, i)
    assert len(load_dataset(str(tmp_path), split="test")) == 2
    assert calibration_set(str(tmp_path), 10).shape == (3, 3, 224, 224)


def test_center_crop_and_resize_match_torchvision_definition(tmp_path):
    from PIL import Image

    # 320 wide x 256 high: shorter side already 256 -> no resize; crop top = 16, left = 48
    yy, xx = np.mgrid[0:256, 0:320]
    pattern = np.stack([xx % 256, yy, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(pattern).save(tmp_path / "p.png")
    out = preprocess_image(tmp_path / "p.png")
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_array_equal(_denorm(out), pattern[16:240, 48:272].astype(np.float64))

    # 600 x 500 -> Resize(256): (int(256 * 600 / 500), 256) = (307, 256), bilinear; crop top 16, left round(41.5)=42
    big = np.random.default_rng(0).integers(0, 256, (500, 600, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    ref = np.asarray(Image.fromarray(big).resize((307, 256), Image.BILINEAR))[16:240, 42:266]
    np.testing.assert_array_equal(_denorm(preprocess_image(tmp_path / "big.png")), ref.astype(np.float64))

    # grayscale input -> 3 identical RGB channels; image smaller than the crop is zero-padded (as torchvision)
    Image.fromarray(pattern[:, :, 1]).convert("L").save(tmp_path / "g.png")
    g = preprocess_image(tmp_path / "g.png")
    assert np.array_equal(_denorm(g)[..., 0], _denorm(g)[..., 2])
    tiny = preprocess_image(tmp_path / "p.png", resize=None, crop=300)
    assert tiny.shape == (3, 300, 300)
    np.testing.assert_array_equal(_denorm(tiny)[22:278, 0:300], pattern[:, 10:310].astype(np.float64))
    assert np.all(_denorm(tiny)[:22] == 0)


# ---- training -----------------------------------------------------------------------------------------------
def test_train_digits_is_accurate_and_cached(tmp_path):
    from ptq2tvm.train import evaluate_top1, train_builtin

    model, info = train_builtin("resnet_small", dataset="digits", epochs=3, seed=0, cache_dir=tmp_path,
                                progress=False, threads=1)
    assert info["cached"] is False and info["test_top1"] > 0.90
    assert info["model_name"] == "resnet_small" and info["dataset"] == "digits" and info["epochs"] == 3
    assert info["torch_version"] == torch.__version__ and info["train_seconds"] > 0
    ckpt = Path(info["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == tmp_path
    assert json.loads(ckpt.with_suffix(".json").read_text())["test_top1"] == info["test_top1"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp files
    assert not model.training
    assert evaluate_top1(model, load_dataset("digits")) == pytest.approx(info["test_top1"])

    model2, info2 = train_builtin("resnet_small", dataset="digits", epochs=3, seed=0, cache_dir=tmp_path,
                                  progress=False, threads=1)
    assert info2["cached"] is True and info2["test_top1"] == info["test_top1"]
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert evaluate_top1(model2, "digits") == pytest.approx(info["test_top1"])
    # a plain state_dict: loads strictly into a fresh model
    from ptq2tvm.models import create_model

    fresh = create_model("resnet_small", num_classes=10, in_channels=1)
    fresh.load_state_dict(torch.load(ckpt, weights_only=True), strict=True)
