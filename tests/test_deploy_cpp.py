"""The C++ deployment example (deploy_examples/cpp): a bundle's model.so run from a C++ program through the TVM
runtime in the bundle and tvm-ffi, no Python at run time; its integer outputs equal the bundle's reference ones."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (g++) to build the example")
@pytest.mark.parametrize("batch", [1, 2])
def test_cpp_example_runs_a_bundle_bit_exact(tmp_path, batch):
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.bundle import make_bundle

    graph = tiny_integer_graph(4, 4)
    compile_so(graph, tmp_path / "m.so", batch=batch)
    bundle = make_bundle(tmp_path / "m.so", tmp_path / "bundle", graph=graph).path
    import sys

    build = subprocess.run(["bash", str(ROOT / "deploy_examples/cpp/build.sh"), str(bundle)], capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert build.returncode == 0, build.stderr
    bundle = Path(shutil.move(str(bundle), str(tmp_path / "shipped")))     # self-contained: rpath $ORIGIN/lib
    assert (bundle / "lib" / "libtvm_ffi.so").is_file()
    # run from the bundle folder with a bare library name, as a user would; no Python, no LD_LIBRARY_PATH
    r = subprocess.run(["./run_model", "model.so", "check_input.npy", str(tmp_path / "out_"), str(batch)],
                       capture_output=True, text=True, cwd=bundle, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    meta = json.loads((bundle / "model.json").read_text())
    outputs = meta.get("outputs") or [meta["output"]]
    single = bundle / "check_output.npy"      # one output: .npy; several: .npz, one array per output
    ref = {"y": np.load(single)} if single.is_file() else dict(np.load(bundle / "check_output.npz"))
    assert len(ref) == len(outputs) >= 1
    for k, (name, want) in enumerate(ref.items()):
        got = np.fromfile(tmp_path / f"out_{k}.bin", dtype=want.dtype)
        assert got.size == want.size and np.array_equal(got.reshape(want.shape), want), name
    # a float file where codes go: one line, exit 2
    np.save(tmp_path / "f.npy", np.zeros((batch, *graph.input.shape), np.float32))
    r = subprocess.run([str(bundle / "run_model"), str(bundle / "model.so"), str(tmp_path / "f.npy"),
                        str(tmp_path / "o_"), str(batch)], capture_output=True, text=True)
    assert r.returncode == 2 and "expected uint8 codes" in r.stderr, r.stderr
