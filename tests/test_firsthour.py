"""A new user's first hour (issue 14): stale artifacts, label-free fidelity at quantize time, your own preprocessing,
defaults and time in --help, interrupts and leftovers, self-contained run directories, one-line errors, outputs.

Everything runs on a user project made here: a model file of one's own (1-channel 16x16 CNN with BatchNorm), its
state_dict, and a folder of grayscale PNGs in class sub-folders."""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from conftest import run_cli as _cli  # noqa: E402
from ptq2tvm import cli  # noqa: E402
from ptq2tvm.api import RunDir, quantize, to_integer  # noqa: E402
from ptq2tvm.errors import ArtifactError, DataError  # noqa: E402
from ptq2tvm.frontend.qmodel import QuantConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_PY = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.body(self.bn(self.stem(x))))


def build(classes=4):
    return Net(classes)
'''
MEAN, STD = 0.3, 0.25


def _load_user_model(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_net", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """proj/net.py + net.pt (BN statistics of normalized inputs) + my_images/{train,val}/<class>/*.png (1 channel)
    + raw.npy (the same images as raw uint8 pixels)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("proj")
    (root / "net.py").write_text(MODEL_PY)
    rng = np.random.default_rng(0)
    raw = {}
    for split, n in (("train", 48), ("val", 16)):
        imgs = []
        for i in range(n):
            c = i % 4
            img = (rng.integers(0, 60, (16, 16)) + 45 * c).clip(0, 255).astype(np.uint8)
            d = root / "my_images" / split / f"{c}_class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:03d}.png")
            imgs.append(img)
        raw[split] = np.stack(imgs)[:, None]
    torch.manual_seed(0)
    model = _load_user_model(root / "net.py")
    model.bn.momentum = None                      # cumulative: BN statistics of the normalized training images
    model.train()
    with torch.no_grad():
        model(torch.from_numpy((raw["train"].astype(np.float32) / 255 - MEAN) / STD))
    model.eval()
    torch.save(model.state_dict(), root / "net.pt")
    np.save(root / "raw.npy", raw["train"])
    return root




def _quantize_folder(capsys, out, *extra):
    return _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "my_images",
                "--input-size", "16", "--resize", "0", "--mean", MEAN, "--std", STD, "--calib-size", 32,
                "--fidelity-images", 16, "--out", out, "--no-progress", *extra)


# ---- 3 + 6 + 1: a 1-channel folder model, run directory usable from anywhere, stale artifacts ---------------
def test_one_channel_folder_self_contained_run_and_stale_so(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, out, err = _quantize_folder(capsys, "runs/a", "--per-layer", "--json", tmp_path / "q.json")
    assert rc == 0, err
    assert "1 channel(s) (from the model)" in err and "resize to 16x16" in err
    res = json.loads((tmp_path / "q.json").read_text())
    fid = res["fidelity"]
    assert fid["held_out"] and fid["n_images"] == 16 and fid["sqnr_db"] > 15 and fid["top1_agreement"] >= 0.9
    assert [p["name"] for p in fid["per_layer"]][:1] == ["stem"] and "SQNR" in out
    assert res["weights"].startswith("checkpoint ") and Path(res["weights"].split()[1]).is_absolute()
    run = RunDir(project / "runs" / "a")
    info = run.info()
    assert info["data"] == str(project / "my_images") and info["preprocess"]["channels"] == 1
    assert Path(info["model"]["name"].split(":")[0]).is_absolute() and (run.path / "model_src" / "net.py").is_file()
    assert rc == 0 and _cli(capsys, "compile", run.path, "--no-progress")[0] == 0
    # item 8: bench --out-dir writes there only (the ONNX exports included)
    before = sorted(p.name for p in run.path.iterdir())
    rc, out, err = _cli(capsys, "bench", run.path, "--repeats", 1, "--warmup", 0, "--calls-per-turn", 1,
                        "--no-ort-int8", "--no-progress", "--out-dir", tmp_path / "bench", "--trust-code")
    assert rc == 0, err
    assert sorted(p.name for p in run.path.iterdir()) == before
    assert {"latency.json", "latency.md", "latency.png", "onnx"} <= {p.name for p in (tmp_path / "bench").iterdir()}
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(run.so, stale / "model.so")
    shutil.copy(run.so.with_suffix(".json"), stale / "model.json")

    # from another directory, with the model file gone: the run directory is self-contained
    monkeypatch.chdir(tmp_path)
    (project / "net.py").rename(project / "net.py.moved")
    try:
        rc, out, err = _cli(capsys, "eval", run.path, "--no-progress", "--json", tmp_path / "e.json", "--trust-code")
    finally:
        (project / "net.py.moved").rename(project / "net.py")
    assert rc == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["n"] == 16 and e["so_top1"] == e["fakequant_top1"]

    # re-quantizing supersedes the .so: removed (with another build's bench results, latency_<so>.*); a stale copy
    # put back is refused by every user of the .so
    for suffix in ("json", "md", "png"):
        (run.path / f"latency_model_b8.{suffix}").write_text("{}")
    monkeypatch.chdir(project)
    rc, out, err = _quantize_folder(capsys, "runs/a", "--w-bits", 4, "--a-bits", 4)
    assert rc == 0 and "removed what the new integer graph supersedes" in err and "model.so" in err
    assert "latency_model_b8.json" in err and not list(run.path.glob("latency_*"))
    assert not run.so.exists() and not run.so.with_suffix(".json").exists()
    assert "so_top1" not in run.info()
    shutil.copy(stale / "model.so", run.so)
    shutil.copy(stale / "model.json", run.so.with_suffix(".json"))
    for cmd in ("eval", "parity", "bench"):
        rc, out, err = _cli(capsys, cmd, run.path, "--no-progress")
        assert rc == 2 and "was compiled from another integer graph" in err and "ptq2tvm compile" in err, (cmd, err)
    with pytest.raises(ArtifactError, match="compiled from another integer graph"):
        run.load_compiled()
    # a replaced fake-quant model is caught too
    run.so.unlink()
    shutil.copy(run.fp32, run.fakequant)
    rc, out, err = _cli(capsys, "eval", run.path, "--no-progress", "--trust-code")
    assert rc == 2 and "fakequant.pt is not the file `quantize` wrote" in err


def test_folder_preprocessing_options_and_hook(project, tmp_path):
    from PIL import Image

    from ptq2tvm.data import load_dataset

    ds = load_dataset(project / "my_images", split="train", channels=1, crop=16, resize=0, mean=(MEAN,), std=(STD,))
    assert ds.images.shape == (48, 1, 16, 16) and ds.labels.tolist()[:4] == [0, 0, 0, 0]
    first = sorted((project / "my_images" / "train" / "0_class0").glob("*.png"))[0]
    want = (np.asarray(Image.open(first), np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(ds.images[0, 0], want, rtol=0, atol=1e-6)
    rgb = load_dataset(project / "my_images", split="train", crop=(8, 12), resize=0)
    assert rgb.images.shape == (48, 3, 8, 12)
    (tmp_path / "prep.py").write_text("import numpy as np\n"
                                      "def fn(img):\n    return np.asarray(img, np.float32)[None] / 100\n")
    hooked = load_dataset(project / "my_images", split="train", channels=1, transform=f"{tmp_path / 'prep.py'}:fn")
    np.testing.assert_allclose(hooked.images[0, 0], np.asarray(Image.open(first), np.float32) / 100)
    with pytest.raises(DataError, match="mean has 2 values"):
        load_dataset(project / "my_images", channels=1, mean=(0.1, 0.2), std=(1,))


def test_dataset_transform_form_arr0_and_nhwc(project, tmp_path):
    from ptq2tvm.data import CalibrationData, load_dataset

    model = _load_user_model(project / "net.py")
    model.load_state_dict(torch.load(project / "net.pt"))
    raw = np.load(project / "raw.npy")
    x = (raw.astype(np.float32) / 255 - MEAN) / STD
    items = [(torch.from_numpy(img), 0) for img in raw]            # what a DataLoader over a Dataset yields
    calib = CalibrationData(items, lambda item: (item[0].float() / 255 - MEAN) / STD)
    g1 = to_integer(quantize(model, calib, QuantConfig(8, 8), progress=False))
    g2 = to_integer(quantize(model, x, QuantConfig(8, 8), progress=False))
    assert g1.digest() == g2.digest()
    np.savez(tmp_path / "plain.npz", x)                            # numpy's default key
    assert load_dataset(tmp_path / "plain.npz").images.shape == x.shape
    np.save(tmp_path / "nhwc.npy", x.transpose(0, 2, 3, 1))
    ds = load_dataset(tmp_path / "nhwc.npy")
    assert any("channels-last" in n for n in ds.extra["notes"])
    with pytest.raises(DataError, match=r"expects 1-channel input .* first conv 'stem'.*channels-last"):
        quantize(model, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), progress=False)


# ---- 2: raw pixels are called out, and the fidelity report is printed ------------------------------------------
def test_raw_pixel_calibration_data_warns(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, out, err = _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "raw.npy",
                        "--calib-size", 32, "--fidelity-images", 16, "--out", "runs/raw", "--no-progress")
    assert rc == 0, err
    assert "integer dtype uint8" in err
    assert "look like raw pixels" in err
    assert re.search(r"first conv 'stem' sees inputs about \d+(\.\d+)?x larger than in training", err)
    assert "fidelity vs FP32 (no labels; 16 images not used for calibration)" in out
    assert "only 32 calibration image(s): reconstruction and activation ranges need a few hundred" in err
    assert "3 data warning(s) above: this fidelity is measured on images like the calibration images" in out
    info = RunDir(project / "runs" / "raw").info()
    assert len(info["data_warnings"]) == 4 and info["fidelity"]["n_images"] == 16


# ---- 4: --help shows defaults; training is announced; a CPU-sized reconstruction default ----------------------
def test_help_shows_defaults_and_training_is_announced(tmp_path, monkeypatch):
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, type(p._subparsers._group_actions[0])))
    helps = {name: " ".join(sp.format_help().split()) for name, sp in sub.choices.items()}
    assert "(default: 512)" in helps["quantize"] and "(default: 2000)" in helps["quantize"]
    assert "--iters 20000" in helps["quantize"]
    assert "(default: 1)" in helps["compile"] and "(default: 20)" in helps["bench"]
    assert all("commands:" in p.format_help() and f" {name}" in p.format_help() for name in sub.choices)
    assert "bundle" in p.description
    monkeypatch.setenv("PTQ2TVM_CACHE", str(tmp_path))
    from ptq2tvm.demo import training_notice

    note = training_notice("resnet_small", "fashion-mnist", threads=2)
    assert note and "training it first (6 epochs, about 10 min with 2 threads" in note and str(tmp_path) in note
    assert "the progress bar shows the time left" in note
    # one thread (a busy machine): the estimate grows with it (2.4x, measured)
    assert "about 23 min with 1 thread on" in training_notice("resnet_small", "fashion-mnist", threads=1)


def test_demo_summary_says_when_the_int8_baselines_have_7_bit_weights(capsys):
    from ptq2tvm.demo import print_summary

    row = dict(fp32_top1=0.92, fakequant_top1=0.92, so_top1=0.92, bit_exact_vs_reference=True, mismatched_elements=0,
               top1_agreement_vs_fakequant=1.0)
    base = dict(model="m", data="d", n_test=10, settings={"W8A8": row},
                latency=[dict(runtime="ort_int8", median_ms=1.0, p10_ms=0.9, p90_ms=1.1)])
    for bits, expected in ((7, True), (8, False)):
        print_summary(dict(base, baseline_int8_weight_bits=bits))
        out = capsys.readouterr().out
        assert ("7-bit weights" in out and "--bits 7/8" in out) == expected, out


# ---- 5: Ctrl-C during reconstruction; resume; cleanup --------------------------------------------------------
def test_interrupt_resume_and_cleanup(project, capsys, monkeypatch):
    from ptq2tvm.reconstruct.checkpoint import Checkpoint

    monkeypatch.chdir(project)
    args = ["quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "my_images", "--input-size", 16,
            "--resize", 0, "--calib-size", 16, "--fidelity-images", 0, "--method", "adaround", "--iters", 4,
            "--batch-size", 8, "--out", "runs/rec", "--no-progress"]
    real_save, calls = Checkpoint.save, []

    def save_then_interrupt(self, *a, **k):
        real_save(self, *a, **k)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_interrupt)
    rc, out, err = _cli(capsys, *args)
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        "ptq2tvm quantize: interrupted after unit 1/3; re-run the same command to resume"
    assert (project / "runs" / "rec" / "recon_checkpoint" / "state.json").is_file()
    rc, out, err = _cli(capsys, *args)
    assert rc == 0 and "resuming: 1/3 units done" in err and "interrupted" not in out + err
    assert not (project / "runs" / "rec" / "recon_checkpoint").exists()
    calls.clear()
    rc, out, err = _cli(capsys, *args)                         # interrupted again, then started over with --force
    assert rc == 130
    rc, out, err = _cli(capsys, *args, "--force")
    assert rc == 0 and "removed the reconstruction checkpoint" in err and "resuming" not in err


# ---- 6: no checkpoint = random weights, said so ----------------------------------------------------------------
@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "rgb.npy", np.repeat(x, 3, axis=1))
    (d / "notes.npz").write_text("these are my notes\n")
    (d / "junk.pt").write_text("not a checkpoint\n")
    return d


def test_random_weights_are_said(user_dir, capsys, monkeypatch):
    monkeypatch.chdir(user_dir)
    rc, out, err = _cli(capsys, "quantize", "--model", "resnet_small", "--data", "x.npy", "--calib-size", 4,
                        "--fidelity-images", 2, "--out", "r", "--no-progress")
    assert rc == 0 and "RANDOM weights" in err and "weights: random (no --checkpoint)" in out
    assert RunDir("r").info()["weights"].startswith("random")


# ---- 7: each message that pointed the wrong way: one line, naming the real problem -------------------------------
Q = ["quantize", "--no-progress", "--fidelity-images", 0, "--calib-size", 4, "--out", "q"]
ERROR_CASES = {
    "zoo_typo_with_npy_data": (Q + ["--model", "resnet_smal", "--data", "x.npy"],
                               r"unknown model 'resnet_smal' \(did you mean 'resnet_small'\?\)", "Traceback"),
    "py_file_without_its_factory": (Q + ["--model", "{net}", "--data", "x.npy"],
                                    r"name the function or class that builds the model too, e\.g\. --model "
                                    r"\S*net\.py:\w+ \(top-level names in it: .*build", "unknown model"),
    "checkpoint_given_as_model": (Q + ["--model", "junk.pt", "--data", "x.npy"],
                                  r"--model junk\.pt is a saved PyTorch file: .*--checkpoint junk\.pt", "unknown model"),
    "text_file_named_npz": (Q + ["--model", "resnet_small", "--data", "notes.npz"],
                            r"notes\.npz: it is not a \.npz file", "pickle"),
    "junk_checkpoint": (Q + ["--model", "resnet_small", "--checkpoint", "junk.pt", "--data", "x.npy"],
                        r"junk\.pt is not a PyTorch file written by torch.save", "KeyError"),
    "one_channel_model_three_channel_data": (
        Q + ["--model", "{net}:build", "--data", "rgb.npy"],
        r"the model expects 1-channel input \(its first conv 'stem' has in_channels=1\), the calibration data has 3 "
        r"channel", "ShapeProp"),
    "aarch64_target": (["compile", "{run}", "--target", '{{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}'],
                       r"cannot build for aarch64-linux-gnu on this x86_64 host: .*no cross toolchain", "linker"),
    "unknown_target_name": (["compile", "{run}", "--target", "aarch64"], r"unknown target.*'aarch64'", "Traceback"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_one_line_error(case, project, user_dir, capsys, monkeypatch):
    import platform

    argv, match, absent = ERROR_CASES[case]
    if case == "aarch64_target" and platform.machine() != "x86_64":
        pytest.skip("the cross-build case is written for an x86_64 host")
    monkeypatch.chdir(user_dir)
    if "{run}" in argv:
        if not (user_dir / "r" / "run.json").is_file():
            x = np.load(user_dir / "x.npy")
            _cli(capsys, "quantize", "--model", "resnet_small", "--data", "x.npy", "--calib-size", 4,
                 "--fidelity-images", 0, "--out", "r", "--no-progress")
            assert x.shape[1] == 1
    argv = [str(a).format(net=project / "net.py", run=user_dir / "r") for a in argv]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert "Traceback" not in err and absent not in out + err, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and re.search(match, lines[0]), err
    assert not (user_dir / "q").exists() and not (user_dir / "r" / "model.so").exists()


def test_torch_cat_is_supported(tiny_data):
    class Cat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 12 * 12, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], 1), 1))

    qm = quantize(Cat().eval(), tiny_data, progress=False)      # was refused as a "non-tensor input"
    assert "concat" in {n.op for n in qm.graph.nodes}


NO_TVM = "import sys, runpy; sys.modules['tvm'] = None; sys.argv = sys.argv[1:]; " \
         "runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.bundle import make_bundle

    d = tmp_path_factory.mktemp("bundle")
    graph = tiny_integer_graph(8, 8)
    compile_so(graph, d / "m.so", batch=2)
    return d, graph, make_bundle(d / "m.so", d / "bundle", graph=graph).path


def _run_bundle(bundle_dir: Path, *argv, cwd: Path):
    import subprocess

    return subprocess.run([sys.executable, "-c", NO_TVM, str(bundle_dir / "run_model.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd)


def test_bundle_output_is_float_and_no_library_copies_are_left(bundle, tmp_path):
    from ptq2tvm.backend import runtime
    from ptq2tvm.ir.reference import run_reference

    d, graph, b = bundle
    # item 5: the copy a CompiledModel loads (named by its checksum) is gone once loaded
    cm = runtime.CompiledModel(d / "m.so")
    assert cm(np.zeros((1, 1, 12, 12), np.float32)).shape == (1, 10)
    assert runtime._copy_dir is not None and list(runtime._copy_dir.iterdir()) == []
    x = np.random.default_rng(1).standard_normal((3, 1, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = _run_bundle(b, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, graph.output.dequantize(run_reference(graph, graph.input.quantize(x))))
    assert "warning" not in r.stderr, r.stderr       # standard-normal input: within the calibrated range
    # raw 0..255 pixels into a model calibrated on normalized images: every value clamps, exit 0 and no word (a
    # new-user helper); now one warning line naming the range
    np.save(tmp_path / "raw.npy", np.random.default_rng(1).integers(0, 256, (3, 1, 12, 12)).astype(np.float32))
    r = _run_bundle(b, "--input", tmp_path / "raw.npy", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("\n") == 1, r.stderr
    assert re.match(r"run_model.py: warning: \d+% of the input values lie outside the input quantizer's range "
                    r"\[-?[\d.]+, [\d.]+\] \(input values \d+\.\.255\) and are clamped: is the input preprocessed",
                    r.stderr), r.stderr


def test_bundle_check_of_a_truncated_so(bundle, tmp_path):
    trunc = tmp_path / "trunc"
    shutil.copytree(bundle[2], trunc)
    data = (trunc / "model.so").read_bytes()
    (trunc / "model.so").write_bytes(data[: len(data) // 2])
    r = _run_bundle(trunc, "--check", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.fullmatch(r"run_model.py: error: \S+model.so does not match the checksum in model.json \(\d+ bytes: "
                        r"truncated, corrupted or replaced\); copy the bundle again\n", r.stderr), r.stderr


def test_cuda_bundle_on_a_host_without_cuda(bundle, tmp_path):
    import tvm

    cuda = tmp_path / "cuda"
    shutil.copytree(bundle[2], cuda)
    meta = json.loads((cuda / "model.json").read_text())
    meta["target"] = {"kind": "cuda", "arch": "sm_80"}
    (cuda / "model.json").write_text(json.dumps(meta))
    shutil.copy(Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so", cuda / "lib")
    r = _run_bundle(cuda, "--random", 1, cwd=tmp_path)
    if r.returncode == 0:
        pytest.skip("this host can load the CUDA runtime")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("run_model.py: error: this bundle is a CUDA build and this host cannot load the CUDA "
                               "runtime") and "libcuda" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- 8: outputs ----------------------------------------------------------------------------------------------
def test_stored_weight_bytes_and_chart_axis():
    from conftest import tiny_integer_graph

    from ptq2tvm.api import stored_weight_bytes
    from ptq2tvm.bench.report import chart_top, use_log_axis

    g8, g4, g2 = (tiny_integer_graph(b, 8) for b in (8, 4, 2))
    n = g8.weight_bytes()
    b8, b4, b2 = (stored_weight_bytes(g, "x86-64-v3", subbyte_storage="packed") for g in (g8, g4, g2))
    assert b8 == n and b4 < 0.7 * n and b2 < 0.7 * b4    # two per byte at <= 4 bits, four per byte at 2 bits (AVX2)
    assert stored_weight_bytes(g2, "znver4", subbyte_storage="packed") == b2     # AVX-512 VNNI: four per byte too
    # the y-axis follows the medians, not one runtime's p90 outlier
    assert chart_top([1.0, 1.2, 1.1], [0.1, 0.1, 40.0]) == pytest.approx(2 * 1.2 * 1.15)
    assert chart_top([1.0, 1.2], [0.1, 0.2]) == pytest.approx(1.4 * 1.15)
    # a panel whose medians span more than 10x (FP32 PyTorch vs an int8 .so) gets a log axis
    assert use_log_axis([0.18, 0.33, 5.2]) and not use_log_axis([4.0, 24.0, 5.6]) and not use_log_axis([0.0, 3.0])


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```", section.index("```python")
                                                                                  + 3)]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(textwrap.dedent(snippet), "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    assert ns["logits"].shape[1] == 10 and (tmp_path / "m.so").is_file()


def test_training_threads_drop_to_one_on_a_busy_machine(monkeypatch, capsys):
    """The README's first command trains, evaluates and times a .so; 2 spinning threads on 2 busy cores crawl (a
    training batch 3-4 s instead of ~0.1 s; the .so 100-145 ms per call instead of 0.85 ms), so thread counts the user
    did not choose fall back to 1 when the load average says the cores are taken, and say so once."""
    from ptq2tvm import threads
    from ptq2tvm.backend import runtime

    monkeypatch.setattr(threads, "_announced", set())
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert threads.auto_threads(2, what="training") == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (6.0, 5.0, 4.0))
    assert threads.auto_threads(2, what="training") == 1 and threads.auto_threads(2, what="training") == 1
    assert capsys.readouterr().err.count("load average 6.0") == 1
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    runtime.set_num_threads(None)                      # the .so: 1 TVM thread on the busy machine
    assert threads.os.environ["TVM_NUM_THREADS"] == "1" and "the .so runs" in capsys.readouterr().err
    monkeypatch.setenv("TVM_NUM_THREADS", "2")         # the user's own setting wins
    runtime.set_num_threads(None)
    assert threads.os.environ["TVM_NUM_THREADS"] == "2"
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.auto_threads(2, what="training") == 1  # never more threads than cores


def test_saved_models_are_byte_identical_across_saves(tmp_path):
    """fakequant.pt / fp32.pt: the same object saved twice gives the same bytes (the zip's records were named after
    the temporary file, so identical runs had different files and checksums in run.json)."""
    from ptq2tvm.frontend.qmodel import atomic_torch_save

    obj = {"w": torch.arange(12.0).reshape(3, 4), "meta": {"bits": 4}}
    atomic_torch_save(obj, tmp_path / "a.pt")
    atomic_torch_save(obj, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], obj["w"])
