"""Leftovers of session 31's breaker passes and a new user's first hour in session 32 (each test fails before its
fix): a --preprocess function returning a PIL Image (read by numpy as channels-last uint8), raw 0..255 outputs of a
preprocess function with no warning, a top-level folder holding train/, val/ and another folder treated as three
classes, a symlinked folder inside a class folder skipped (torchvision's ImageFolder follows it), an interrupted
quantize into an existing run leaving the previous run to be compiled and shipped as the new one, and fx's bare
control-flow error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

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
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "b" / "up")                  # to an ancestor: skipped, said
    with pytest.warns(UserWarning, match=r"b/up links to .*imgs, a folder that holds .*imgs/b itself: skipped"):
        idx = index_folder(tmp_path / "imgs")
    names = [p.relative_to(tmp_path / "imgs").as_posix() for p in idx.files]
    assert names == ["a/linked/0.png", "a/linked/1.png", "a/own.png", "b/own.png"], names
    assert list(idx.labels) == [0, 0, 0, 1]


# ---- an interrupted quantize into an existing run: the old run is refused, not shipped as the new one -------------
def test_an_interrupted_quantize_over_a_run_is_refused_until_resumed(tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    from ptq2tvm.reconstruct.checkpoint import Checkpoint

    import torch

    from ptq2tvm.models import create_model

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    torch.manual_seed(0)
    torch.save(create_model("resnet_small", in_channels=1, num_classes=10).state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    base = ["quantize", "--model", "resnet_small", "--checkpoint", "sd.pt", "--data", "x.npy", "--calib-size", 8,
            "--fidelity-images", 0, "--no-progress"]
    rc, _, err = run_cli(capsys, *base, "--out", "runs/r")                       # a finished W8A8 run, compiled
    assert rc == 0, err
    assert run_cli(capsys, "compile", "runs/r", "--no-progress")[0] == 0
    real_save = Checkpoint.save

    def save_then_interrupt(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    recon = [*base, "--w-bits", 4, "--a-bits", 4, "--method", "adaround", "--iters", 2, "--batch-size", 4]
    rc, _, err = run_cli(capsys, *recon, "--out", "runs/r")
    assert rc == 130 and "interrupted after unit 1/" in err
    for cmd in (["compile", "runs/r"], ["parity", "runs/r", "--n", 4], ["eval", "runs/r", "--n", 4],
                ["bundle", "runs/r"], ["export", "runs/r"]):
        rc, out, err = run_cli(capsys, *cmd)
        line = [ln for ln in err.splitlines() if ": error: " in ln]
        assert rc == 2 and len(line) == 1 and "Traceback" not in err, (cmd, err)
        assert "runs/r: a `ptq2tvm quantize` into this folder was interrupted (W4A4 adaround, 1/" in line[0], line
        pending = line[0].split("was interrupted (", 1)[1].split(";", 1)[0]            # "W4A4 adaround, 1/N units done"
        assert "its run.json and artifacts still describe the previous run (W8A8)" in line[0]
        assert "re-run that quantize command to finish it (it resumes from the last saved unit), or delete " \
            "runs/r/recon_checkpoint" in line[0]
    monkeypatch.setattr(Checkpoint, "save", real_save)
    rc, _, err = run_cli(capsys, *recon, "--seed", 3, "--out", "runs/r")        # other settings: the checkpoint named
    assert rc == 2 and f"holds a reconstruction checkpoint of a different run ({pending}): settings" in err, err
    assert pending.startswith("W4A4 adaround, 1/") and pending.endswith(" units done")
    rc, _, err = run_cli(capsys, *recon, "--out", "runs/r")                     # resumed: the new run, usable
    assert rc == 0 and "resuming: 1/" in err, err
    assert run_cli(capsys, "compile", "runs/r", "--no-progress")[0] == 0
    # an interrupted run, then an RTN quantize (no reconstruction) into the same folder: the new run replaces it
    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    assert run_cli(capsys, *recon, "--seed", 1, "--out", "runs/r")[0] == 130
    rc, _, err = run_cli(capsys, *base, "--out", "runs/r")
    assert rc == 0 and "removed the checkpoint of an interrupted earlier quantize into runs/r (W4A4 adaround" in err
    assert run_cli(capsys, "compile", "runs/r", "--no-progress")[0] == 0
    # a first quantize into a new folder, interrupted: said so, not "not a run directory"
    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    assert run_cli(capsys, *recon, "--out", "runs/new")[0] == 130
    rc, _, err = run_cli(capsys, "compile", "runs/new")
    assert rc == 2 and "interrupted (W4A4 adaround" in err and "it holds no run yet" in err
    assert "`rm -r runs/new` to drop it" in err


# ---- a model fx cannot trace: where, and what to do ------------------------------------------------------------------
class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:                                   # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_control_flow_names_the_line_and_the_way_out():
    from ptq2tvm.errors import UnsupportedModelError
    from ptq2tvm.frontend.trace import trace_model

    with pytest.raises(UnsupportedModelError) as e:
        trace_model(_Branchy().eval(), (1, 8, 8))
    msg = str(e.value)
    assert "torch.fx cannot trace the model at test_leftovers_s32.py:" in msg, msg
    assert "(`if x.sum() > 0:                                   # data-dependent control flow`)" in msg, msg
    assert "select with torch.where" in msg and "ONNX export" in msg and "\n" not in msg


def test_a_crop_larger_than_the_resized_image_warns_of_the_black_bars(tmp_path):
    import warnings

    from PIL import Image

    from ptq2tvm.data import image_folder, preprocess_image

    image_folder._PADDED_CROPS.clear()                                          # warned once per size per process
    Image.fromarray(np.full((96, 40, 3), 200, np.uint8)).save(tmp_path / "tall.png")     # 40 wide, 96 high
    with pytest.warns(UserWarning, match=r"tall\.png \(and any other image of its size\): resized to 88x37 "
                                         r"\(height x width; shorter side 37\), smaller than the 32x48 center crop: "
                                         r"the crop is padded with black bars"):
        x = preprocess_image(tmp_path / "tall.png", resize=37, crop=(32, 48), mean=(0.0,), std=(1.0,))
    assert x.shape == (3, 32, 48) and float(x[:, :, 0].max()) == 0.0          # the bar it warns of
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # a crop inside the image: silent
        preprocess_image(tmp_path / "tall.png", resize=48, crop=(32, 48), mean=(0.0,), std=(1.0,))


def test_an_interrupt_before_the_first_unit_is_saved_is_refused_too(tmp_path, capsys, monkeypatch):
    """Breaker finding: a Ctrl-C before the first reconstruction unit finished (always for nwq / network: one unit)
    left no checkpoint state, so every command used the previous run; an error (not an interrupt) leaves the previous
    run usable."""
    from conftest import run_cli

    import ptq2tvm.api as api
    from ptq2tvm.errors import DataError

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    base = ["quantize", "--model", "resnet_small", "--data", "x.npy", "--calib-size", 8, "--fidelity-images", 0,
            "--no-progress", "--out", "runs/r"]
    assert run_cli(capsys, *base)[0] == 0
    real = api.quantize_with_report

    def fail(exc):
        def quantize_with_report(*a, **k):
            raise exc
        return quantize_with_report

    monkeypatch.setattr(api, "quantize_with_report", fail(DataError("simulated failure")))
    assert run_cli(capsys, *base, "--w-bits", 2, "--a-bits", 4, "--method", "nwq")[0] == 2
    rc, _, err = run_cli(capsys, "compile", "runs/r", "--no-progress")
    assert rc == 0, err                                                             # an error: the old run stays usable
    monkeypatch.setattr(api, "quantize_with_report", fail(KeyboardInterrupt()))
    assert run_cli(capsys, *base, "--w-bits", 2, "--a-bits", 4, "--method", "nwq")[0] == 130
    rc, _, err = run_cli(capsys, "parity", "runs/r", "--n", 4)
    assert rc == 2 and "interrupted (W2A4 nwq, stopped before any reconstruction unit was saved" in err, err
    assert "still describe the previous run (W8A8)" in err
    monkeypatch.setattr(api, "quantize_with_report", real)
    rc, _, err = run_cli(capsys, *base)                                              # a finished run replaces it
    assert rc == 0 and "removed the checkpoint of an interrupted earlier quantize into runs/r (W2A4 nwq" in err
    assert run_cli(capsys, "compile", "runs/r", "--no-progress")[0] == 0
