"""`ptq2tvm bundle`: a runtime-only bundle runs the .so without the `tvm` package or its compiler library, bit-exact."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from conftest import tiny_integer_graph  # noqa: E402
from ptq2tvm.api import compile_so  # noqa: E402
from ptq2tvm.backend.runtime import CompiledModel  # noqa: E402
from ptq2tvm.bundle import make_bundle  # noqa: E402
from ptq2tvm.errors import ArtifactError, InputShapeError  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402

NO_TVM = "import sys, runpy; sys.modules['tvm'] = None; sys.argv = sys.argv[1:]; " \
         "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_bundle_runs_without_tvm_and_is_bit_exact(tmp_path):
    graph = tiny_integer_graph(8, 8)
    rng = np.random.default_rng(1)
    compile_so(graph, tmp_path / "m.so", batch=2)
    b = make_bundle(tmp_path / "m.so", tmp_path / "bundle")
    assert b.files == ["bundle.json", "lib/libtvm_runtime.so", "model.json", "model.so", "requirements.txt",
                       "run_model.py"]
    assert b.bytes < 8e6, "the bundle must not carry the TVM compiler library"
    q = rng.integers(0, 256, (5, 1, 12, 12), dtype=np.uint8)     # 5 inputs: chunks of the compiled batch 2
    np.save(tmp_path / "q.npy", q)
    r = subprocess.run([sys.executable, "-c", NO_TVM, str(b.path / "run_model.py"), "--input-int",
                        str(tmp_path / "q.npy"), "--output", str(tmp_path / "y.npy"), "--output-int", "--bench", "3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "median" in r.stdout
    assert np.array_equal(np.load(tmp_path / "y.npy"), run_reference(graph, q))

    # float input: quantized inside the .so (main_float), the same integers as numpy's QTensor.quantize, ties included
    x = rng.standard_normal((5, 1, 12, 12)).astype(np.float32)
    k = rng.integers(-100, 100, x.shape)
    x.reshape(-1)[::2] = ((k + 0.5) * np.float64(graph.input.scale)).astype(np.float32).reshape(-1)[::2]
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", NO_TVM, str(b.path / "run_model.py"), "--input", str(tmp_path / "x.npy"),
                        "--output", str(tmp_path / "yf.npy"), "--output-int"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = run_reference(graph, graph.input.quantize(x))
    assert np.array_equal(np.load(tmp_path / "yf.npy"), want)
    cm = CompiledModel(tmp_path / "m.so")
    assert {"main": "uint8", "main_float": "float32"}.items() <= cm.meta["entries"].items()  # (+ the x86 checked one)
    assert np.array_equal(cm(x), graph.output.dequantize(want))
    with pytest.raises(InputShapeError, match="NaN"):
        cm(np.full_like(x, np.nan))

    # with the integer graph: seeded inputs + reference outputs, checked on the host by the runner alone
    bc = make_bundle(tmp_path / "m.so", tmp_path / "bundle_check", graph=graph)
    assert {"check_input.npy", "check_output.npy"} <= set(bc.files)
    r = subprocess.run([sys.executable, "-c", NO_TVM, str(bc.path / "run_model.py"), "--check"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "bit-exact (0 of 80 output elements differ, 8 inputs)" in r.stdout, r.stdout + r.stderr
    np.save(bc.path / "check_output.npy", np.load(bc.path / "check_output.npy") ^ np.uint8(1))
    r = subprocess.run([sys.executable, "-c", NO_TVM, str(bc.path / "run_model.py"), "--check"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 1 and "MISMATCH (80 of 80" in r.stdout, r.stdout + r.stderr
    with pytest.raises(ArtifactError, match="not compiled from this integer graph"):
        make_bundle(tmp_path / "m.so", tmp_path / "bundle_other", graph=tiny_integer_graph(4, 4))
    assert not (tmp_path / "bundle_other").exists()

    with pytest.raises(ArtifactError, match="already holds a bundle: pass --force"):
        make_bundle(tmp_path / "m.so", tmp_path / "bundle")
    (tmp_path / "m.so").write_bytes(b"not a library")
    with pytest.raises(ArtifactError, match="checksum"):
        make_bundle(tmp_path / "m.so", tmp_path / "bundle2")
    assert not (tmp_path / "bundle2").exists()
