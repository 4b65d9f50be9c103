"""Faults a breaker helper found in session 31 (each test fails before its fix): val/ classes numbered per split
(labels shifted when val lacks a class), input channels from the first *registered* conv, 16-bit / float images
clipped to white, an infeasible --size-budget leaving files, --target '', --tune-db naming a file, a checkpoint
holding a list, a --preprocess function returning a str, a batch-1-only model crashing the fidelity step, unquoted
next-step commands and a --layer-bits layer given twice."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from ptq2tvm.errors import ArtifactError, DataError, QuantConfigError


def _png(path: Path, value: int, size: int = 8, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _error_line(err: str) -> str:
    """The one `ptq2tvm CMD: error:` line of ``err`` (notes and warnings may come before it), no traceback."""
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- 1. val/ numbered by train/'s class list --------------------------------------------------------------------
@pytest.fixture
def split_folder(tmp_path):
    """train/{a,b,c} and val/{a,c}: two images per class, pixel value 10 * class index."""
    for split, classes in (("train", "abc"), ("val", "ac")):
        for c in classes:
            for i in range(2):
                _png(tmp_path / "imgs" / split / c / f"{i}.png", 10 * "abc".index(c))
    return tmp_path / "imgs"


def test_val_lacking_a_class_keeps_trains_numbering(split_folder):
    from ptq2tvm.data import load_dataset

    train = load_dataset(split_folder, split="train", channels=1, crop=8, resize=0)
    with pytest.warns(UserWarning, match=r"val has no images of 1 of the 3 classes of .*train \(b\): labels keep "
                                         r"train's numbering"):
        val = load_dataset(split_folder, split="test", channels=1, crop=8, resize=0)
    assert train.classes == val.classes == ["a", "b", "c"]
    assert val.labels.tolist() == [0, 0, 2, 2]       # was [0, 0, 1, 1]: 'c' scored as 'b'


def test_an_empty_val_class_folder_is_a_missing_class(split_folder):
    from ptq2tvm.data import load_dataset

    (split_folder / "val" / "b").mkdir()
    with pytest.warns(UserWarning, match=r"\(b\)"):
        val = load_dataset(split_folder, split="test", channels=1, crop=8, resize=0)
    assert val.labels.tolist() == [0, 0, 2, 2] and val.classes == ["a", "b", "c"]


def test_a_val_class_that_train_lacks_is_refused_by_name(split_folder):
    from ptq2tvm.data import load_dataset

    _png(split_folder / "val" / "aa" / "0.png", 3)      # sorts between a and c: would shift c
    with pytest.raises(DataError, match=r"val: class folder\(s\) aa not in .*train \(its classes: a, b, c\)"):
        load_dataset(split_folder, split="test", channels=1, crop=8, resize=0)


def test_empty_train_class_folder_is_still_an_error(split_folder):
    from ptq2tvm.data import load_dataset

    (split_folder / "train" / "d").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) without images: d"):
        load_dataset(split_folder, split="train", channels=1, crop=8, resize=0)


# ---- 2. channels from the conv that runs first ---------------------------------------------------------------------
class HeadFirst(nn.Module):
    """Registers its 1x1 head (8 -> 4 channels) before its stem (3 -> 8)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.head(self.bn(self.stem(x)).relu()).mean((2, 3))


class HeadFirstUntraceable(HeadFirst):
    def forward(self, x):
        if float(x.abs().sum()) < 0:         # data-dependent control flow: torch.fx cannot trace it
            return x
        return super().forward(x)


@pytest.mark.parametrize("cls", [HeadFirst, HeadFirstUntraceable])
def test_first_conv_is_the_one_that_runs_first(cls):
    from ptq2tvm.data.checks import expected_channels, first_conv

    m = cls().train()
    assert first_conv(m)[0] == "stem" and expected_channels(m) == 3
    assert all(mod.training for mod in m.modules())      # the probe leaves the training flags as they were


def test_input_scale_note_judges_the_stem():
    from ptq2tvm.data.checks import input_scale_notes

    notes = input_scale_notes(HeadFirst().eval(), 255 * np.random.default_rng(0).random((4, 3, 8, 8), np.float32))
    assert len(notes) == 1 and "the first conv 'stem'" in notes[0]


MODEL_FILE = '''
import torch.nn as nn

class HeadFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.stem(x).relu()).mean((2, 3))

class OnlyBatch1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().view(1, -1))

def head_first(): return HeadFirst()
def only_batch1(): return OnlyBatch1()
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(MODEL_FILE)
    for i in range(6):
        _png(tmp_path / "rgb" / "train" / f"c{i % 2}" / f"{i}.png", 40 * i, 12, "RGB")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("channels", [[], ["--channels", "3"]])
def test_quantize_a_model_that_registers_its_head_first(project, capsys, channels):
    rc, _, err = run_cli(capsys, "quantize", "--model", "nets.py:head_first", "--data", "rgb", "--input-size", 12,
                         "--resize", 0, *channels, "--fidelity-images", 0, "--out", "r", "--no-progress")
    assert rc == 0, err
    assert ("3 channel(s) (--channels)" if channels else "3 channel(s) (from the model)") in err
    assert (project / "r" / "model.qgraph.npz").is_file()


# ---- 3. 16-bit and float images --------------------------------------------------------------------------------------
def _ramp16() -> np.ndarray:
    return (np.arange(16 * 16, dtype=np.int64).reshape(16, 16) * 257).astype(np.uint16)   # 0 .. 65535 in steps of 257


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16bit_png_is_scaled_by_its_full_range(tmp_path, channels):
    from PIL import Image

    from ptq2tvm.data import preprocess_image

    a = _ramp16()
    Image.fromarray(a).save(tmp_path / "a16.png")
    with Image.open(tmp_path / "a16.png") as im:
        assert im.mode in ("I;16", "I")
    with pytest.warns(UserWarning, match=r"16-bit images \(PIL mode I(;16)?\) are scaled to 8 bits by the full "
                                         r"16-bit range \(65535 -> 255\)"):
        x = preprocess_image(tmp_path / "a16.png", resize=0, crop=16, mean=(0.0,), std=(1.0,), channels=channels)
    want = (a.astype(np.float64) / 257).astype(np.float32) / 255       # 257 * k -> k: exact
    assert x.shape == (channels, 16, 16)
    np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), atol=1e-6)   # was 1.0 (white) above pixel 255


def test_a_float_tiff_in_0_1_is_scaled_and_one_outside_is_refused(tmp_path):
    from PIL import Image

    from ptq2tvm.data import preprocess_image

    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f).save(tmp_path / "f.tif")
    with pytest.warns(UserWarning, match=r"float images \(PIL mode F, pixels in \[0, 1\]\) are scaled by 255"):
        x = preprocess_image(tmp_path / "f.tif", resize=0, crop=8, mean=(0.0,), std=(1.0,), channels=1)
    np.testing.assert_allclose(x[0], np.rint(f * 255) / 255, atol=1e-6)      # was 0 / 1 (black)
    Image.fromarray(f * 1000).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif is a float image \(PIL mode F\) with pixels in \[0, 1000\]"):
        preprocess_image(tmp_path / "big.tif", resize=0, crop=8, channels=1)
    Image.fromarray((np.arange(64).reshape(8, 8) * 10**6).astype(np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"i32\.tif has integer pixels \(PIL mode I\) in \[0, 63000000\], outside "
                                        r"the 16-bit range"):
        preprocess_image(tmp_path / "i32.tif", resize=0, crop=8, channels=1)


# ---- 4. an infeasible mixed-precision budget leaves nothing --------------------------------------------------------
@pytest.fixture
def array_project(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


MIXED = ("quantize", "--model", "resnet_small", "--data", "x.npy", "--calib-size", 8, "--fidelity-images", 0,
         "--mixed-precision", "--hutchinson-samples", 2, "--no-progress")


def test_an_unreachable_size_budget_fails_before_sensitivity_and_leaves_nothing(array_project, capsys, monkeypatch):
    from ptq2tvm.mixed import pipeline

    def never(*a, **k):
        raise AssertionError("the sensitivity pass ran for a budget the sizes alone rule out")

    monkeypatch.setattr(pipeline, "run_sensitivity", never)
    rc, _, err = run_cli(capsys, *MIXED, "--size-budget", "0.01", "--out", "new/run")
    assert rc == 2
    assert "--size-budget 0.01: no bit allocation fits" in _error_line(err)
    assert sorted(p.name for p in array_project.iterdir()) == ["x.npy"]      # not even new/


def test_a_failed_mixed_run_removes_only_what_it_added(array_project, capsys, monkeypatch):
    from ptq2tvm.mixed import pipeline

    def infeasible(*a, **k):
        raise QuantConfigError("no allocation (test)")

    monkeypatch.setattr(pipeline, "allocate", infeasible)          # after the sensitivity pass wrote its files
    (array_project / "mine").mkdir()
    (array_project / "mine" / "notes.txt").write_text("keep")
    rc, _, err = run_cli(capsys, *MIXED, "--size-budget", "1", "--out", "mine")
    assert rc == 2 and "no allocation (test)" in err
    assert [p.name for p in (array_project / "mine").iterdir()] == ["notes.txt"]   # no sensitivity.*, layer_costs
    assert (array_project / "mine" / "notes.txt").read_text() == "keep"


# ---- 5., 6. compile: empty --target, --tune-db naming a file -----------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from conftest import quantized_small_run

    return quantized_small_run(tmp_path_factory.mktemp("s31"), "run sp")      # a space: quoting tests


@pytest.mark.parametrize("target, says", [("", "is empty"), ("   ", "is empty"),
                                          ("llvm -mcpu=", "sets an empty CPU name"),
                                          ('{"kind": "llvm", "mcpu": ""}', "sets an empty CPU name")])
def test_an_empty_target_is_refused_with_the_accepted_forms(small_run, capsys, target, says):
    rc, _, err = run_cli(capsys, "compile", small_run / "run sp", "--target", target, "--out",
                         small_run / "t.so", "--no-progress")
    assert rc == 2
    line = _one_line(err)
    assert f"--target {target!r} {says}" in line and "'host'" in line and "'x86-64-v3'" in line and \
        "LLVM CPU name" in line, line
    assert not (small_run / "t.so").exists() and not (small_run / "t.json").exists()


def test_tune_db_naming_a_file_is_one_line(small_run, capsys):
    f = small_run / "records.txt"
    f.write_text("mine")
    rc, _, err = run_cli(capsys, "compile", small_run / "run sp", "--tune-db", f, "--out", small_run / "t.so",
                         "--no-progress")
    assert rc == 2
    assert f"--tune-db {f}: {f} is an existing file, not a directory" in _one_line(err)
    assert f.read_text() == "mine" and not (small_run / "t.so").exists()


def test_the_default_tune_db_folder_being_a_file_is_one_line(small_run, capsys):
    run = small_run / "run sp"
    (run / "model.tuning").write_text("x")
    try:
        rc, _, err = run_cli(capsys, "compile", run, "--tune-trials", 2, "--no-progress")
        assert rc == 2 and "(default of --tune-db)" in _one_line(err) and "is an existing file" in err
        assert not (run / "model.so").exists()
    finally:
        (run / "model.tuning").unlink()


# ---- 7. a checkpoint that holds no state_dict --------------------------------------------------------------------
@pytest.mark.parametrize("obj, what", [([torch.zeros(2)], "holds a list of 1 item(s), not a state_dict"),
                                       (torch.zeros(3, 2), "holds a single tensor of shape (3, 2), not a state_dict"),
                                       ({"net": {"w": torch.zeros(1)}, "epoch": 3},
                                        "holds a dict without tensors (keys 'net', 'epoch')")])
def test_a_checkpoint_holding_something_else_is_named(array_project, capsys, obj, what):
    torch.save(obj, array_project / "ck.pt")
    rc, _, err = run_cli(capsys, "quantize", "--model", "resnet_small", "--checkpoint", "ck.pt", "--data", "x.npy",
                         "--out", "r", "--no-progress")
    assert rc == 2
    line = _one_line(err)
    assert f"checkpoint {array_project / 'ck.pt'} {what}" in line, line
    assert "'state_dict' / 'model_state_dict' / 'model'" in line
    assert sorted(p.name for p in array_project.iterdir()) == ["ck.pt", "x.npy"]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_a_training_checkpoint_dict_loads(tmp_path, key):
    from ptq2tvm.api import load_checkpoint

    src = HeadFirst()
    torch.save({key: src.state_dict(), "epoch": 7}, tmp_path / "ck.pt")
    dst = load_checkpoint(HeadFirst(), tmp_path / "ck.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


# ---- 8. a --preprocess function returning something else ---------------------------------------------------------
@pytest.mark.parametrize("ret, says", [("not an image", "returned a str"), (None, "returned None"),
                                       ({"x": 1}, "returned a dict"), ([[1, 2], [3]], "returned a list"),
                                       (np.zeros((1, 4, 4), np.complex64), "returned an ndarray (dtype complex64)"),
                                       (np.zeros((4, 4), np.float32), "returned an ndarray of shape (4, 4)"),
                                       (5, "returned an int of shape ()")])
def test_a_preprocess_result_that_is_no_image_is_named(ret, says):
    from ptq2tvm.data.image_folder import apply_transform

    def prep(img):
        return ret

    with pytest.raises(DataError, match=r"preprocess function 'prep' \(.*test_breaker_s31\.py\) " + f"{says}"
                       .replace("(", r"\(").replace(")", r"\)") + r" for img\.png"):
        apply_transform(prep, None, "img.png")


def test_preprocess_returning_a_str_is_one_line_on_the_cli(project, capsys):
    (project / "prep.py").write_text("def fn(img):\n    return 'oops'\n")
    rc, _, err = run_cli(capsys, "quantize", "--model", "nets.py:head_first", "--data", "rgb", "--preprocess",
                         "prep.py:fn", "--out", "r", "--no-progress")
    assert rc == 2
    line = _error_line(err)
    assert "preprocess function 'fn' (" in line and "prep.py) returned a str for " in line and "0.png" in line
    assert not (project / "r").exists()


# ---- 9. a model that runs only at batch 1 -------------------------------------------------------------------------
def test_a_batch1_only_model_gets_fidelity_one_image_at_a_time(project, capsys):
    rc, out, err = run_cli(capsys, "quantize", "--model", "nets.py:only_batch1", "--data", "x.npy", "--calib-size",
                           8, "--out", "r", "--no-progress")
    assert rc == 0, err
    assert "warning: the FP32 model nets.py:only_batch1 fails on a batch of 8 images" in err
    assert "runs on one image: running it one image at a time" in err
    assert "fidelity vs FP32" in out and "top-1 agreement" in out


def test_top1_torch_runs_a_batch1_only_model(project):
    import importlib.util

    from ptq2tvm.api import top1_torch

    spec = importlib.util.spec_from_file_location("nets_s31", project / "nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.only_batch1().eval()
    x = np.load(project / "x.npy")
    with torch.no_grad():
        labels = np.array([int(m(torch.from_numpy(x[i:i + 1])).argmax()) for i in range(len(x))])
    with pytest.warns(UserWarning, match="fails on a batch of 16 images"):
        assert top1_torch(m, x, labels) == 1.0


# ---- 10. quoted next-step commands, a --layer-bits layer given twice ---------------------------------------------
def test_bundle_prints_commands_that_paste_with_spaces(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from ptq2tvm import bundle

    out = tmp_path / "deploy dir" / "my bundle"
    monkeypatch.setattr(bundle, "make_bundle", lambda so, o, overwrite, graph: SimpleNamespace(
        path=Path(o), files=["run_model.py"], bytes=10))
    rc, text, err = run_cli(capsys, "bundle", tmp_path / "run x", "--so", tmp_path / "run x" / "model.so",
                            "--out", out)
    assert rc == 0, err
    cmd = text.split("on the target: ", 1)[1].strip()
    words = shlex.split(cmd)
    assert str(out / "requirements.txt") in words and str(out / "run_model.py") in words, cmd


def test_run_dir_messages_quote_the_paths(tmp_path):
    from ptq2tvm.api import RunDir

    run = tmp_path / "run sp"
    run.mkdir()
    with pytest.raises(ArtifactError) as e:
        RunDir(run).load_compiled(tmp_path / "other dir" / "m.so")
    assert f"`ptq2tvm compile {shlex.quote(str(run))} --out {shlex.quote(str(tmp_path / 'other dir' / 'm.so'))}`" \
        in str(e.value)


@pytest.mark.parametrize("spec", ["conv1=4,conv1=8", "conv1=4/8, conv1 =4/8"])
def test_a_layer_named_twice_in_layer_bits_is_refused(spec):
    from ptq2tvm.mixed.layerbits import parse_layer_bits

    with pytest.raises(QuantConfigError, match=r"--layer-bits names layer 'conv1' twice .*give each layer once"):
        parse_layer_bits(spec)
    assert len(parse_layer_bits("layer2.*=4,layer2.0.conv1=8")) == 2        # a glob then an override: allowed


def test_layer_bits_given_twice_on_the_command_line_is_refused(array_project, capsys):
    rc, _, err = run_cli(capsys, "quantize", "--model", "resnet_small", "--data", "x.npy", "--calib-size", 8,
                         "--fidelity-images", 0, "--layer-bits", "conv1=4", "--layer-bits", "conv1=8", "--out", "r",
                         "--no-progress")
    assert rc == 2
    assert "--layer-bits names layer 'conv1' twice ('conv1=4' and 'conv1=8')" in _error_line(err)
    assert sorted(p.name for p in array_project.iterdir()) == ["x.npy"]

