"""A new user's first hour, second trial (s8): options that messages name exist on the command, the ONNX export's
weight container chosen for this host, output paths that are files, small images, evaluation on the calibration
file, stale ONNX exports, options that do nothing, --help without an install.

Runs on a user project made here: a model file of one's own (1-channel 16x16 CNN), its state_dict, a labeled
.npz array and a folder of class-sorted PNGs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from conftest import run_cli as _cli  # noqa: E402
from ptq2tvm import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_PY = '''
import torch.nn as nn


def build(classes=4):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def build_fixed(classes=4):
    """A model that runs only at 16x16 (Flatten + Linear, no global pooling)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, classes))
'''


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """net.py + net.pt, data.npz (48 labeled 16x16 images, sorted by class) and imgs/<class>/*.png (16x16)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("proj2")
    (root / "net.py").write_text(MODEL_PY)
    torch.manual_seed(0)
    ns: dict = {}
    exec(MODEL_PY, ns)  # noqa: S102 - the test's own model file
    torch.save(ns["build"]().state_dict(), root / "net.pt")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 12)
    images = (rng.normal(0, 1, (48, 1, 16, 16)) + labels[:, None, None, None]).astype(np.float32)
    np.savez(root / "data.npz", images=images, labels=labels)
    for i, c in enumerate(labels):
        d = root / "imgs" / f"{c}_c"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root




def _quantize(capsys, out, *extra):
    return _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "data.npz",
                "--calib-size", 16, "--fidelity-images", 0, "--out", out, "--no-progress", *extra)


@pytest.fixture(scope="module")
def run_dir(proj):
    """A W8A8 run calibrated on 16 of data.npz's 48 images."""
    import contextlib
    import io
    import os

    cwd = os.getcwd()
    os.chdir(proj)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = cli.main(["quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "data.npz",
                           "--calib-size", "16", "--fidelity-images", "0", "--out", "runs/a", "--no-progress"])
        assert rc == 0, err.getvalue()
    finally:
        os.chdir(cwd)
    return proj / "runs" / "a"


def _parser_options(name: str) -> set[str]:
    p = cli.build_parser()
    sub = p._subparsers._group_actions[0]
    return {o for a in sub.choices[name]._actions for o in a.option_strings}


def test_trust_code_refusal_names_the_file_that_would_run(run_dir, proj, tmp_path):
    """The refusal named the original net.py even where that file was gone and the run's own copy
    (model_src/net.py) is what --trust-code would run (a new-user helper)."""
    from ptq2tvm.api import load_fp32
    from ptq2tvm.errors import ArtifactError

    with pytest.raises(ArtifactError, match=rf"built by build\(\) of the Python file {re.escape(str(proj))}/net\.py, "
                                            r"which would run"):
        load_fp32(run_dir / "fp32.pt")
    (proj / "net.py").rename(tmp_path / "net.py")        # the user's file is gone: the run's copy would run
    try:
        copy = run_dir / "model_src" / "net.py"
        with pytest.raises(ArtifactError, match=rf"of the Python file {re.escape(str(copy))} \(the run's copy of "
                                                rf"{re.escape(str(proj))}/net\.py, which is gone\)"):
            load_fp32(run_dir / "fp32.pt")
        assert isinstance(load_fp32(run_dir / "fp32.pt", trust_code=True), torch.nn.Module)
    finally:
        (tmp_path / "net.py").rename(proj / "net.py")


# ---- 7: an output path that is a file (or under one) -------------------------------------------------------
def test_output_path_that_is_a_file_is_one_line_and_writes_nothing(proj, run_dir, capsys, monkeypatch):
    monkeypatch.chdir(proj)
    (proj / "afile").write_text("keep")
    cases = [("quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "data.npz", "--out", "afile"),
             ("quantize", "--model", "net.py:build", "--data", "data.npz", "--out", "afile/run"),
             ("compile", run_dir, "--out", "afile/x.so"), ("export", run_dir, "--out", "afile/x.onnx"),
             ("bench", run_dir, "--out-dir", "afile"), ("bundle", run_dir, "--out", "afile"),
             ("eval", run_dir, "--json", "afile/e.json"), ("demo", "--out", "afile")]
    for argv in cases:
        before = sorted(p.name for p in run_dir.iterdir())
        rc, out, err = _cli(capsys, *argv, "--no-progress")
        assert rc == 2 and "afile" in err and "is a" in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err and (proj / "afile").read_text() == "keep"
        assert sorted(p.name for p in run_dir.iterdir()) == before
    rc, out, err = _cli(capsys, "compile", run_dir, "--out", run_dir, "--no-progress")   # a folder where a file goes
    assert rc == 2 and "is a directory, not a file" in err
    # every command with an --out / --out-dir option is covered by the one check
    from ptq2tvm.cli_checks import OUTPUTS

    p = cli.build_parser()
    for name, sp in p._subparsers._group_actions[0].choices.items():
        dests = {a.dest for a in sp._actions if a.option_strings and a.dest in ("out", "out_dir")}
        assert dests <= set(OUTPUTS.get(name, {})), name


# ---- 2 + 12: every option a message names exists on that command ---------------------------------------------
def test_trust_code_and_threads_exist_where_messages_name_them(run_dir, capsys, monkeypatch):
    for name in ("eval", "bench", "sensitivity"):        # the commands that load fp32.pt
        assert "--trust-code" in _parser_options(name), name
    for name in ("eval", "parity", "bench", "demo", "train"):   # the commands that run thread pools
        assert "--threads" in _parser_options(name), name
    rc, out, err = _cli(capsys, "sensitivity", run_dir, "--samples", 2, "--images", 8, "--no-progress")
    assert rc == 2 and "--trust-code" in err
    rc, out, err = _cli(capsys, "sensitivity", run_dir, "--samples", 2, "--images", 8, "--no-progress",
                        "--trust-code")
    assert rc == 0, err
    assert (run_dir / "sensitivity.json").is_file()
    # the load-average note names --threads only on a command that has it
    from ptq2tvm import threads

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    monkeypatch.setattr(threads, "_announced", set())
    monkeypatch.setattr(threads, "_cli_hint", None)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    hints: list = []
    real_hint = threads.set_override_hint
    monkeypatch.setattr(threads, "set_override_hint", lambda text: (hints.append(text), real_hint(text)))
    rc, out, err = _cli(capsys, "eval", run_dir, "--no-progress", "--trust-code", "--threads", 1)
    assert rc == 0, err
    assert hints == ["pass --threads N", None]        # set by main for a command with --threads, then reset
    hints.clear()
    rc, out, err = _cli(capsys, "compile", run_dir, "--qgraph", run_dir / "none.npz")
    assert rc == 2 and hints == [None, None]         # compile has no --threads: each caller's own hint
    rc, out, err = _cli(capsys, "eval", run_dir, "--threads", 0)
    assert rc == 2 and "--threads must be >= 1, got 0" in err
    monkeypatch.setattr(threads, "_announced", set())
    threads.auto_threads(2, what="the .so runs", hint="set TVM_NUM_THREADS=N")
    assert "to override: set TVM_NUM_THREADS=N" in capsys.readouterr().err
    threads.set_override_hint("pass --threads N")
    monkeypatch.setattr(threads, "_announced", set())
    threads.auto_threads(2, what="the .so runs", hint="set TVM_NUM_THREADS=N")
    assert "to override: pass --threads N" in capsys.readouterr().err
    threads.set_override_hint(None)


# ---- 3: export's weight container follows the host --------------------------------------------------------
def test_export_weights_auto_by_host(run_dir, tmp_path, capsys, monkeypatch):
    import onnx

    from ptq2tvm.bench import baselines

    for vnni, want in ((False, "uint8"), (True, "int8")):
        monkeypatch.setattr(baselines, "host_has_vnni", lambda v=vnni: v)
        out = tmp_path / f"m_{want}.onnx"
        rc, text, err = _cli(capsys, "export", run_dir, "--out", out, "--json", tmp_path / "x.json")
        assert rc == 0, err
        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        res = json.loads((tmp_path / "x.json").read_text())
        assert props["ptq2tvm_weights"] == want and res["weights"] == want and res["weights_requested"] == "auto"
        assert f"{want} weights: auto: this CPU has {'VNNI' if vnni else 'no VNNI'}" in text
        assert "warning" not in err
    monkeypatch.setattr(baselines, "host_has_vnni", lambda: False)
    rc, text, err = _cli(capsys, "export", run_dir, "--out", tmp_path / "i.onnx", "--weights", "int8")
    assert rc == 0 and "int8 weights" in text
    assert len([ln for ln in err.splitlines() if ln.startswith("warning")]) == 1 and "may saturate" in err


# ---- 11: re-quantizing removes the ONNX exports of the old graph -------------------------------------------
def test_requantize_removes_stale_onnx_exports(proj, capsys, monkeypatch):
    monkeypatch.chdir(proj)
    assert _quantize(capsys, "runs/b")[0] == 0
    run = proj / "runs" / "b"
    assert _cli(capsys, "export", run)[0] == 0
    assert _cli(capsys, "export", run, "--out", run / "onnx" / "ptq2tvm_qdq.onnx")[0] == 0
    (run / "onnx" / "fp32.onnx").write_bytes(b"bench baseline")
    (run / "recon_loss.png").write_bytes(b"old curve")
    shutil.copy(run / "model.onnx", run / "same_graph.onnx")
    (run / "mine.onnx").write_bytes(b"not ptq2tvm's")
    rc, out, err = _quantize(capsys, "runs/b")          # the same graph: its exports stay
    assert rc == 0 and (run / "model.onnx").is_file() and (run / "onnx" / "ptq2tvm_qdq.onnx").is_file()
    rc, out, err = _quantize(capsys, "runs/b", "--w-bits", 4, "--a-bits", 4)
    assert rc == 0
    for name in ("model.onnx", "onnx/ptq2tvm_qdq.onnx", "same_graph.onnx"):
        assert not (run / name).exists() and name in err, name
    assert not (run / "onnx").exists() and not (run / "recon_loss.png").exists()
    assert (run / "mine.onnx").read_bytes() == b"not ptq2tvm's"


# ---- 10: eval on the calibration file leaves the calibration images out; --n is a seeded random subset ---------
def test_eval_on_the_calibration_file_and_random_subset(proj, run_dir, tmp_path, capsys):
    rc, out, err = _cli(capsys, "eval", run_dir, "--trust-code", "--no-progress", "--json", tmp_path / "e.json")
    assert rc == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["n"] == 32 and e["calibration_images_excluded"] == 16
    assert "not used for calibration (the run's 16 calibration images left out)" in err
    from ptq2tvm.data import calibration_set, load_dataset

    calib = calibration_set(str(proj / "data.npz"), 16, seed=0)
    rc, out, err = _cli(capsys, "eval", run_dir, "--trust-code", "--no-progress", "--n", 8)
    assert rc == 0 and "seeded random subset" in err and "(8 images)" in out
    rc, out, err = _cli(capsys, "eval", run_dir, "--trust-code", "--no-progress", "--n", 5000)   # more than there are
    assert rc == 0 and "--n 5000, but there are only 32 evaluation images: using all of them" in err
    # the eval rows never include a calibration image
    from ptq2tvm.data import calibration_rows_in_test

    used, total = calibration_rows_in_test(str(proj / "data.npz"), 16, 0)
    full = load_dataset(str(proj / "data.npz"))
    assert total == 48 and np.array_equal(full.images[used], calib)
    assert calibration_rows_in_test(str(proj / "imgs"), 8, 0)[1] == 48            # a folder without train/val
    for split in ("train", "val"):
        (tmp_path / "split" / split / "a").mkdir(parents=True)
        shutil.copy(next((proj / "imgs" / "0_c").iterdir()), tmp_path / "split" / split / "a" / "x.png")
    assert calibration_rows_in_test(str(tmp_path / "split"), 8, 0) is None        # val/ is a set of its own
    assert calibration_rows_in_test("fashion-mnist", 8, 0) is None
    # a class-sorted folder: --n takes images of every class, not the first N
    ds = load_dataset(str(proj / "imgs"), split="test", limit=12, channels=1, crop=16, resize=0)
    assert len(set(ds.labels.tolist())) >= 3


# ---- 9: small images and the default 224x224 ------------------------------------------------------------------
def test_small_images_warn_without_input_size(proj, capsys, monkeypatch):
    monkeypatch.chdir(proj)
    rc, out, err = _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "imgs",
                        "--calib-size", 4, "--fidelity-images", 0, "--out", "runs/big", "--no-progress")
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if "median shorter side 16 px" in ln]
    assert len(warn) == 1 and "--input-size 16" in warn[0] and "--resize 0" in warn[0] and "14x" in warn[0]
    rc, out, err = _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--data", "imgs",
                        "--calib-size", 4, "--fidelity-images", 0, "--out", "runs/small", "--no-progress",
                        "--input-size", 16, "--resize", 0)
    assert rc == 0 and "median shorter side" not in err
    ns: dict = {}
    exec(MODEL_PY, ns)  # noqa: S102
    cli._warn_small_images(str(proj / "imgs"), ns["build_fixed"](), 1, (224, 224))
    assert "the model runs at 16x16 and not at 224x224" in capsys.readouterr().err


# ---- 13: options that do nothing with --method rtn; the checkpoint message names --force -------------------------
def test_reconstruction_options_with_rtn_warn(proj, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(proj)
    rc, out, err = _quantize(capsys, "runs/rtn", "--adaqtransform", "--iters", 10)
    assert rc == 0
    warn = [ln for ln in err.splitlines() if "ignored with --method rtn" in ln]
    assert len(warn) == 1 and "--adaqtransform" in warn[0] and "--iters" in warn[0]
    assert "AdaQTransform" not in out.splitlines()[0]
    rc, out, err = _quantize(capsys, "runs/rtn")
    assert rc == 0 and "ignored with --method rtn" not in err
    # MRECG's own options without an MRECG granularity (session 35: --mrecg-k 3 with qdrop was ignored silently)
    rc, out, err = _quantize(capsys, "runs/qd", "--method", "qdrop", "--iters", 2, "--mrecg-k", 3)
    assert rc == 0, err
    assert ("warning: --mrecg-k only affects MRECG's mixed granularity: ignored without --granularity mrecg-modcap / "
            "mrecg-loss / mrecg-authors") in err
    from ptq2tvm.errors import ArtifactError
    from ptq2tvm.reconstruct.checkpoint import Checkpoint

    ck = Checkpoint(tmp_path / "ck", {"a": 2})
    ck.state_path.parent.mkdir(parents=True)
    ck.state_path.write_text(json.dumps({"fingerprint": {"a": 1}}))
    with pytest.raises(ArtifactError, match="--force"):
        ck.load()


# ---- 14 + 15: defaults in --help; demo.sh --help without an install ---------------------------------------------
def test_help_defaults_and_demo_help_without_install(tmp_path):
    import re

    p = cli.build_parser()
    sub = p._subparsers._group_actions[0]
    helps = {name: " ".join(sp.format_help().split()) for name, sp in sub.choices.items()}
    assert "--threads THREADS threads of every runtime" in helps["bench"] and "(default: 2)" in helps["bench"]
    assert re.search(r"--seed SEED .*?\(default: 0\)", helps["sensitivity"])
    assert re.search(r"--seed SEED seed of the calibration subsample .*?\(default: 0\)", helps["quantize"])
    for opt, default in (("--out", "runs/demo"), ("--model", "resnet_small"), ("--calib-size", "512"),
                         ("--repeats", "30")):
        assert re.search(rf"{opt} \S+ [^-].*?\(default: {default}\)", helps["demo"]), opt
    for opt in ("--model", "--epochs", "--seed", "--threads"):
        assert re.search(rf"{opt} \S+ [a-z]", helps["train"]), opt
    # every option shown with a default has one
    for name, sp in sub.choices.items():
        for a in sp._actions:
            if a.option_strings and a.default not in (None, False) and a.help is None:
                pytest.fail(f"{name} {a.option_strings[0]} has a default and no help text")
    # demo.sh --help: no environment built (a stand-in setup_env.sh would leave a marker), every option listed
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    (tmp_path / "scripts" / "setup_env.sh").write_text("touch installed\n")
    res = subprocess.run(["bash", "scripts/demo.sh", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and not (tmp_path / "installed").exists()
    demo_opts = {o for a in sub.choices["demo"]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert demo_opts and all(o in res.stdout for o in demo_opts), demo_opts - set(res.stdout.split())


# ---- 13: a NaN in a subsampled array file is named by its row in the user's file ---------------------------------
def test_nan_in_a_subsampled_array_names_the_row_of_the_file(tmp_path):
    from ptq2tvm.data import calibration_set, subsample_indices
    from ptq2tvm.errors import DataError

    x = np.zeros((20, 1, 4, 4), np.float32)
    row = int(subsample_indices(20, 10, 0)[-1])    # drawn by the seeded subsample, at position 9 of it
    assert row > 9
    x[row, 0, 1, 2] = np.nan
    np.save(tmp_path / "calib_nan.npy", x)
    with pytest.raises(DataError, match=rf"first at index {row} \(channel, row, col\) = \(0, 1, 2\); images: {row}$"):
        calibration_set(str(tmp_path / "calib_nan.npy"), 10, seed=0)


def test_run_dir_invalidate_removes_onnx_exports_of_another_graph(tmp_path):
    """The Python API's save_run (RunDir.invalidate) removes stale ONNX exports too, not only the CLI's quantize."""
    import onnx
    from onnx import TensorProto, helper

    from ptq2tvm.api import RunDir

    def onnx_file(path, digest):
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g)
        if digest:
            helper.set_model_props(m, {"ptq2tvm_graph_sha256": digest})
        onnx.save(m, str(path))

    onnx_file(tmp_path / "old.onnx", "aaaa")
    onnx_file(tmp_path / "current.onnx", "bbbb")
    onnx_file(tmp_path / "users.onnx", None)
    removed = RunDir(tmp_path).invalidate("bbbb")
    assert "old.onnx" in removed and not (tmp_path / "old.onnx").exists()
    assert (tmp_path / "current.onnx").is_file() and (tmp_path / "users.onnx").is_file()


def test_quantize_into_a_users_folder_removes_nothing_of_theirs(tmp_path):
    """`quantize --out DIR` into an existing folder that is not a run directory deleted every *.so without a
    ptq2tvm sidecar (libfoo.so, a user's model.so), any subfolder holding a run_model.py, and parity.json /
    latency.*: only what ptq2tvm wrote, provably for another graph, is removed now; in a run directory the default
    model.so without a sidecar and the results of the old graph still go."""
    import json

    from ptq2tvm.api import RunDir

    users = tmp_path / "precious"
    (users / "tools").mkdir(parents=True)
    files = {"model.so": "so", "libfoo.so": "so", "parity.json": "{}", "latency.md": "x", "tools/run_model.py": "x",
             "libfoo.json": "{\"graph_sha256\": null}"}
    for name, text in files.items():
        (users / name).write_text(text)
    assert RunDir(users).invalidate("bbbb") == []
    assert all((users / name).read_text() == text for name, text in files.items())
    # a run directory: its own stale artifacts go, a foreign library stays
    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "model.qgraph.npz").write_text("x")
    (run / "model.so").write_text("so")                                   # the default library, no sidecar
    (run / "fast.so").write_text("so")
    (run / "fast.json").write_text(json.dumps({"graph_sha256": "aaaa"}))  # compiled from another graph
    (run / "keep.so").write_text("so")
    (run / "keep.json").write_text(json.dumps({"graph_sha256": "bbbb"}))  # from this graph
    (run / "libfoo.so").write_text("so")
    (run / "bundle" / "run_model.py").write_text("x")
    (run / "bundle" / "model.json").write_text(json.dumps({"graph_sha256": "aaaa"}))
    (run / "parity.json").write_text("{}")
    removed = RunDir(run).invalidate("bbbb")
    assert sorted(removed) == ["bundle/", "fast.so", "model.so", "parity.json"]
    assert sorted(p.name for p in run.iterdir()) == ["keep.json", "keep.so", "libfoo.so", "model.qgraph.npz"]
