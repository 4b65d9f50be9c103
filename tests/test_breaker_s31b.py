"""Faults a breaker helper found in session 31 (second batch; each test fails before its fix): a failed quantize
deleting a fresh parent folder another run wrote into, channel verdicts for models that change the channels before
their first conv (or whose first conv cannot be found), explicit --layer-bits names losing to a later glob, 32-bit /
signed 16-bit integer images scaled as unsigned 16-bit, and image-folder layouts (hidden sub-folders, Train/Val split
names, an empty extra val class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.errors import DataError


# ---- 1. a failed run removes only what it created ---------------------------------------------------------------
def test_a_failed_run_keeps_a_fresh_parent_another_run_wrote_into(tmp_path):
    from ptq2tvm.outpaths import removed_on_failure

    root = tmp_path / "newroot"
    with pytest.raises(RuntimeError, match="boom"):
        with removed_on_failure(root / "a"):
            (root / "a").mkdir(parents=True)
            (root / "a" / "model.qgraph.npz").write_bytes(b"partial")
            (root / "b").mkdir()                          # a second run, into newroot/b, finishes meanwhile
            (root / "b" / "model.qgraph.npz").write_bytes(b"done")
            raise RuntimeError("boom")
    assert not (root / "a").exists()
    assert (root / "b" / "model.qgraph.npz").read_bytes() == b"done"


def test_a_failed_run_removes_its_fresh_parents_when_empty(tmp_path):
    from ptq2tvm.outpaths import removed_on_failure

    with pytest.raises(RuntimeError):
        with removed_on_failure(tmp_path / "x" / "y" / "out"):
            (tmp_path / "x" / "y" / "out").mkdir(parents=True)
            (tmp_path / "x" / "y" / "out" / "f").write_text("1")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_a_fresh_grandparent_with_a_file(tmp_path):
    from ptq2tvm.outpaths import removed_on_failure

    with pytest.raises(RuntimeError):
        with removed_on_failure(tmp_path / "x" / "y" / "out"):
            (tmp_path / "x" / "y" / "out").mkdir(parents=True)
            (tmp_path / "x" / "other.txt").write_text("keep")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["other.txt"]   # y (empty) removed, x kept
    assert (tmp_path / "x" / "other.txt").read_text() == "keep"


def test_a_failed_run_in_an_existing_folder_removes_only_new_entries(tmp_path):
    from ptq2tvm.outpaths import removed_on_failure

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with removed_on_failure(tmp_path / "out"):
            (tmp_path / "out" / "new.txt").write_text("new")
            (tmp_path / "out" / "sub").mkdir()
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]


# ---- 2. a channel verdict only when the first conv reads the input --------------------------------------------------
class SpaceToDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(2)
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.conv(self.unshuffle(x)).relu()).mean((2, 3))


class GrayToRgb(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.cat([x, x, x], 1)).mean((2, 3))


class Untraceable(nn.Module):
    """fx cannot trace it (data-dependent control flow), and its forward raises on the zero probe input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if float(x.abs().sum()) == 0:
            raise ValueError("an all-zero image")
        return self.head(self.stem(x).relu()).mean((2, 3))


class UntraceableUnshuffle(SpaceToDepth):
    def forward(self, x):
        if float(x.abs().sum()) < 0:
            return x
        return super().forward(x)


class NormalizedStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.stem(self.drop((x - 0.5) / 0.25)).relu()).mean((2, 3))


@pytest.mark.parametrize("cls, data_channels", [(SpaceToDepth, 3), (GrayToRgb, 1), (UntraceableUnshuffle, 3),
                                                 (Untraceable, 1)])
def test_no_channel_verdict_when_the_first_conv_does_not_read_the_input(cls, data_channels):
    from ptq2tvm.data.checks import check_input_channels, expected_channels, first_conv

    m = cls().eval()
    assert first_conv(m) is None and expected_channels(m) is None
    check_input_channels(m, np.zeros((2, data_channels, 8, 8), np.float32))      # no verdict: nothing raised


def test_a_stem_behind_constant_normalization_and_dropout_still_gets_a_verdict():
    from ptq2tvm.data.checks import check_input_channels, expected_channels, first_conv

    m = NormalizedStem().eval()
    assert first_conv(m)[0] == "stem" and expected_channels(m) == 3
    with pytest.raises(DataError, match=r"the model expects 3-channel input \(its first conv 'stem' has "
                                        r"in_channels=3\), the calibration data has 1 channel\(s\)"):
        check_input_channels(m, np.zeros((2, 1, 8, 8), np.float32))


# ---- 3. an explicit --layer-bits name wins over a glob ------------------------------------------------------------
@pytest.mark.parametrize("spec", ["layer1.0.conv1=8,layer1.*=4", "layer1.*=4,layer1.0.conv1=8",
                                  "layer1.0.conv1=8/8,layer1.*=4/4"])
def test_an_explicit_layer_name_wins_over_a_glob_in_any_order(spec):
    from ptq2tvm.mixed.layerbits import resolve_layer_bits

    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    w, a = resolve_layer_bits(spec, names)
    assert w == {"layer1.0.conv1": 8, "layer1.0.conv2": 4}
    assert a == ({"layer1.0.conv1": 8, "layer1.0.conv2": 4} if "/" in spec else {})


def test_globs_still_apply_in_order_among_themselves():
    from ptq2tvm.mixed.layerbits import resolve_layer_bits

    names = ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"]
    assert resolve_layer_bits("layer*=8,layer1.*=4", names)[0] == {"layer1.0.conv1": 4, "layer1.0.conv2": 4,
                                                                 "layer2.0.conv1": 8}
    assert resolve_layer_bits("layer1.*=4,layer*=8", names)[0] == {n: 8 for n in names}


# ---- 4. only unsigned 16-bit integer images are scaled by 65535 --------------------------------------------------
def _g() -> np.ndarray:
    return np.linspace(0, 1, 64).reshape(8, 8)


def test_a_32bit_int_tiff_is_refused_naming_mode_and_raw_mode(tmp_path):
    from PIL import Image

    from ptq2tvm.data import preprocess_image

    Image.fromarray((_g() * 255).astype(np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(DataError) as e:
        preprocess_image(tmp_path / "i32.tif", resize=0, crop=8, channels=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"image {tmp_path / 'i32.tif'} has integer pixels of PIL mode I (raw mode I;32")
    assert "only unsigned 16-bit integer images are accepted (PIL modes I;16 / I;16B / I;16L" in msg


def test_a_signed_16bit_tiff_is_refused(tmp_path):
    from PIL import Image

    from ptq2tvm.data import preprocess_image

    Image.fromarray((_g() * 30000).astype(np.int16)).save(tmp_path / "s16.tif")
    with pytest.raises(DataError, match=r"s16\.tif has integer pixels of PIL mode I.* \(raw mode I;\d+S: \d+-bit "
                                        r"signed\): only unsigned 16-bit integer images are accepted"):
        preprocess_image(tmp_path / "s16.tif", resize=0, crop=8, channels=1)


@pytest.mark.parametrize("ext", ["png", "pgm", "tif"])
def test_an_unsigned_16bit_file_is_still_scaled(tmp_path, ext):
    from PIL import Image

    from ptq2tvm.data import preprocess_image

    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / f"u16.{ext}")
    with pytest.warns(UserWarning, match=r"16-bit images \(PIL mode I(;16)?\) are scaled to 8 bits"):
        x = preprocess_image(tmp_path / f"u16.{ext}", resize=0, crop=8, mean=(0.0,), std=(1.0,), channels=1)
    np.testing.assert_allclose(x[0], np.rint(a * 255.0 / 65535) / 255, atol=1e-6)


# ---- 5. image-folder layout -------------------------------------------------------------------------------------
def _png(path: Path, value: int, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def test_images_in_hidden_sub_folders_are_skipped(tmp_path):
    from ptq2tvm.data.image_folder import index_folder

    for c in "ab":
        _png(tmp_path / "train" / c / "x.png", 1)
        _png(tmp_path / "train" / c / ".ipynb_checkpoints" / "x.png", 2)
        _png(tmp_path / "train" / c / "sub" / ".hidden" / "deep" / "y.png", 3)
        _png(tmp_path / "train" / c / "sub" / "z.png", 4)
    idx = index_folder(tmp_path, "train")
    assert [p.relative_to(tmp_path).as_posix() for p in idx.files] == [
        "train/a/sub/z.png", "train/a/x.png", "train/b/sub/z.png", "train/b/x.png"]
    assert idx.labels.tolist() == [0, 0, 1, 1]


def test_split_folders_are_recognised_in_any_case(tmp_path):
    from ptq2tvm.data.image_folder import index_folder

    for split, classes in (("Train", "abc"), ("VAL", "ac")):
        for c in classes:
            _png(tmp_path / split / c / "0.png", 1)
    train = index_folder(tmp_path, "train")
    assert train.root == tmp_path / "Train" and train.classes == ["a", "b", "c"]
    with pytest.warns(UserWarning, match=r"has no images of 1 of the 3 classes of .*Train \(b\)"):
        val = index_folder(tmp_path, "test")
    assert val.root == tmp_path / "VAL" and val.classes == ["a", "b", "c"] and val.labels.tolist() == [0, 2]


def test_an_empty_extra_val_class_is_skipped_with_a_warning(tmp_path):
    from ptq2tvm.data.image_folder import index_folder

    for split in ("train", "val"):
        for c in "ab":
            _png(tmp_path / split / c / "0.png", 1)
    (tmp_path / "val" / "zz").mkdir()
    with pytest.warns(UserWarning, match=r"val: skipping 1 empty class folder\(s\) that .*train does not have "
                                         r"\(zz\)"):
        val = index_folder(tmp_path, "test")
    assert val.classes == ["a", "b"] and val.labels.tolist() == [0, 1]
    _png(tmp_path / "val" / "zz" / "0.png", 1)                # a non-empty extra class is still refused
    with pytest.raises(DataError, match=r"class folder\(s\) zz not in .*train"):
        index_folder(tmp_path, "test")


def test_bench_rows_of_a_mixed_run_say_mixed():
    """bench labelled every ptq2tvm row of a mixed-precision run 'W8A8' (the run's nominal bits): the rows of the
    run's own graph (.so, ORT on its QDQ export) now carry its per-layer summary; the peers' rows keep theirs."""
    from ptq2tvm.bench.report import bits_label, validate_row
    from ptq2tvm.bench.runner import run_bits_label

    layer_bits = {"stem": dict(w_bits=8, a_bits=8), "a": dict(w_bits=4, a_bits=8), "b": dict(w_bits=4, a_bits=8),
                  "c": dict(w_bits=2, a_bits=8)}
    mixed = run_bits_label(dict(w_bits=8, a_bits=8, mixed_precision={"bits": {}}), dict(layer_bits=layer_bits))
    assert mixed == "mixed W4A8 x2, W8A8 x1, W2A8 x1"
    assert run_bits_label(dict(w_bits=4, a_bits=4, layer_bits_spec="stem=8"), dict(layer_bits=layer_bits)) == \
        "W4A4 with --layer-bits: W4A8 x2, W8A8 x1, W2A8 x1"
    assert run_bits_label(dict(w_bits=8, a_bits=8), dict(layer_bits=layer_bits)) is None      # one setting
    # a budget loose enough for one setting on every layer ("--size-budget 1.5") said "mixed W8A8 x4"
    all8 = {k: dict(w_bits=8, a_bits=8) for k in layer_bits}
    assert run_bits_label(dict(w_bits=8, a_bits=8, mixed_precision={"bits": {}}), dict(layer_bits=all8)) == \
        "W8A8 on every layer (the plan --mixed-precision chose)"
    row = dict(model="m", input="1x28x28", batch=1, w_bits=8, a_bits=8, median_ms=1.0, p10_ms=1.0, p90_ms=1.0,
               threads=2, vpdpbusd_count=None)
    assert validate_row({**row, "runtime": "ptq2tvm", "bits": mixed})["precision"] == mixed
    assert bits_label({**row, "runtime": "openvino_int8", "bits": None}) == "W8A8"
    assert bits_label({**row, "runtime": "ptq2tvm"}) == "W8A8"
