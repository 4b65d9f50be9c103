"""A new user's first hour, session 34 (ONNX in and out, shipping a bundle): output options that replaced the run's
compiled library, `eval` on data of another layout (a torch traceback), the bundle runner on a host without its
requirements (a ModuleNotFoundError traceback)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    from conftest import quantized_small_run
    from ptq2tvm import cli

    d = quantized_small_run(tmp_path_factory.mktemp("nu34"), "r")
    assert cli.main(["compile", str(d / "r")]) == 0
    return d


@pytest.mark.parametrize("argv, what", [
    (["export", "{r}", "--format", "onnx", "--out", "{r}/model.so"], "the run's compiled library model.so"),
    (["parity", "{r}", "--json", "{r}/model.json"], "the run's library sidecar model.json"),
    (["compile", "{r}", "--out", "{r}/other.so", "--json", "{r}/model.so"], "the run's compiled library model.so")])
def test_output_options_never_replace_the_runs_library(compiled_run, argv, what, capsys):
    """`export RUN --out RUN/model.so` and `parity RUN --json RUN/model.json` exited 0 after replacing them, and every
    later command refused the run until it was compiled again."""
    from ptq2tvm import cli

    r = compiled_run / "r"
    before = {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()}
    assert cli.main([a.format(r=r) for a in argv] + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"would overwrite {what}" in err, err
    assert {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()} == before


def test_compile_may_still_rebuild_the_runs_own_library(compiled_run):
    from ptq2tvm import cli

    r = compiled_run / "r"
    assert cli.main(["compile", str(r), "--out", str(r / "model.so")]) == 0


@pytest.mark.parametrize("layout, hint", [("nhwc", "channels-last"), ("rgb", "got (16, 3, 12, 12)")])
def test_eval_on_data_of_another_layout_is_one_line(compiled_run, layout, hint, capsys):
    """The FP32 model ran before any shape check: a torch RuntimeError traceback."""
    from ptq2tvm import cli

    x = np.load(compiled_run / "x.npy")
    x = x.transpose(0, 2, 3, 1) if layout == "nhwc" else np.repeat(x, 3, axis=1)
    f = compiled_run / f"eval_{layout}.npz"
    np.savez(f, images=x, labels=np.arange(16) % 10)
    capsys.readouterr()
    assert cli.main(["eval", str(compiled_run / "r"), "--data", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "traced for input (N, 1, 12, 12)" in err and hint in err, err


@pytest.mark.parametrize("missing", ["tvm_ffi", "numpy"])
def test_bundle_runner_without_its_requirements_is_one_line(tmp_path, missing):
    """A deployment host without `pip install -r requirements.txt`: a ModuleNotFoundError traceback before."""
    from conftest import tiny_integer_graph
    from ptq2tvm.api import compile_so
    from ptq2tvm.bundle import make_bundle

    compile_so(tiny_integer_graph(8, 8), tmp_path / "m.so", batch=1)
    b = make_bundle(tmp_path / "m.so", tmp_path / "bundle")
    block = (f"import sys, runpy; sys.modules['tvm'] = None; sys.modules[{missing!r}] = None; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", block, str(b.path / "run_model.py"), "--random", "1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "is not installed: pip install -r" in r.stderr, r.stderr
    assert ("apache-tvm-ffi" if missing == "tvm_ffi" else "numpy") in r.stderr
