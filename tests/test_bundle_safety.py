"""`ptq2tvm bundle --force` replaces only a previous bundle (never another folder or a file), and the bundle's
run_model.py checks its input like CompiledModel (shape, channels-last hint, dtype, NaN / Inf, .npz files), all
with numpy + apache-tvm-ffi only (torch, ptq2tvm and tvm blocked)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from conftest import tiny_integer_graph  # noqa: E402
from ptq2tvm.api import compile_so  # noqa: E402
from ptq2tvm.bundle import make_bundle  # noqa: E402
from ptq2tvm.errors import ArtifactError  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("bsafe")
    graph = tiny_integer_graph(8, 8)
    compile_so(graph, d / "m.so", batch=2)
    return d, graph


def test_force_replaces_only_a_previous_bundle(built, tmp_path):
    d, graph = built
    so = d / "m.so"
    # a folder of the user's: refused with or without --force, its files untouched
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for force in (False, True):
        with pytest.raises(ArtifactError) as e:
            make_bundle(so, mine, overwrite=force)
        assert str(e.value) == (f"{mine} already exists and is not a ptq2tvm bundle (no bundle.json): choose a new "
                                "directory for the bundle (--force replaces only a previous bundle, never another folder)")
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a file at the path, or below one: one line, nothing written
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ArtifactError, match=rf"^cannot write the bundle to {f}: it is a file, not a directory"):
        make_bundle(so, f, overwrite=True)
    with pytest.raises(ArtifactError, match=rf"^cannot write the bundle {f / 'b'}: {f} is a file, not a directory"):
        make_bundle(so, f / "b", overwrite=True)
    assert f.read_text() == "x"
    # an empty directory is used as it is; a previous bundle is replaced with --force only
    empty = tmp_path / "empty"
    empty.mkdir()
    b = make_bundle(so, empty, graph=graph)
    assert json.loads((empty / "bundle.json").read_text())["files"] == [x for x in b.files if x != "bundle.json"]
    with pytest.raises(ArtifactError, match="already holds a bundle: pass --force"):
        make_bundle(so, empty)
    make_bundle(so, empty, overwrite=True)          # without the graph: no check files any more
    assert not (empty / "check_input.npy").exists() and not list(tmp_path.glob(".empty.*"))
    # a bundle the user added a file to: refused, the file kept
    (empty / "y.npy").write_bytes(b"mine")
    with pytest.raises(ArtifactError, match=r"is a previous bundle but also holds files that are not part of it "
                                            r"\(y\.npy\): move them away"):
        make_bundle(so, empty, overwrite=True)
    assert (empty / "y.npy").read_bytes() == b"mine"
    # a bundle from before the manifest (model.json + run_model.py, known files only) is still replaceable
    (empty / "y.npy").unlink()
    (empty / "bundle.json").unlink()
    make_bundle(so, empty, overwrite=True)
    assert (empty / "bundle.json").is_file()


# one process runs every case: torch, ptq2tvm and tvm blocked, run_model.main called per argv; rc + stderr back
DRIVER = """
import contextlib, io, json, runpy, sys
for m in ('tvm', 'torch', 'ptq2tvm'):
    sys.modules[m] = None
main = runpy.run_path(sys.argv[1], run_name='run_model')['main']
res = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    res.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(res))
"""


def test_runner_checks_its_input(built, tmp_path):
    d, graph = built
    b = make_bundle(d / "m.so", tmp_path / "bundle", graph=graph).path
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 12, 12)).astype(np.float32)
    files = {
        "nhwc.npy": x.transpose(0, 2, 3, 1), "small.npy": x[:, :, :10, :10], "one.npy": x[0], "ok.npy": x,
        "nan.npy": np.where(np.arange(3)[:, None, None, None] == 1, np.nan, x).astype(np.float32),
        "u8.npy": rng.integers(0, 256, x.shape).astype(np.uint8), "big.npy": np.full(x.shape, 300, np.int64),
        "empty.npy": x[:0],
    }
    for name, a in files.items():
        np.save(tmp_path / name, a)
    np.savez(tmp_path / "one.npz", x)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    (tmp_path / "junk.npy").write_text("not numpy")
    t = str(tmp_path)
    cases = {
        "nhwc": ["--input", f"{t}/nhwc.npy"],
        "small": ["--input", f"{t}/small.npy"],
        "one_image": ["--input", f"{t}/one.npy"],
        "nan": ["--input", f"{t}/nan.npy"],
        "u8_as_float": ["--input", f"{t}/u8.npy"],
        "int_range": ["--input-int", f"{t}/big.npy"],
        "float_as_int": ["--input-int", f"{t}/ok.npy"],
        "empty": ["--input", f"{t}/empty.npy"],
        "npz_one": ["--input", f"{t}/one.npz", "--output", f"{t}/y1.npy"],
        "npz_two": ["--input", f"{t}/two.npz"],
        "npz_key": ["--input", f"{t}/two.npz:b", "--output", f"{t}/y2.npy"],
        "npz_bad_key": ["--input", f"{t}/two.npz:c"],
        "missing": ["--input", f"{t}/nothere.npy"],
        "junk": ["--input", f"{t}/junk.npy"],
        "output_int_alone": ["--input", f"{t}/ok.npy", "--output-int"],
        "random_zero": ["--random", "0"],
        "int_ok": ["--input-int", f"{t}/u8.npy", "--output", f"{t}/yi.npy", "--output-int"],
    }
    r = subprocess.run([sys.executable, "-c", DRIVER, str(b / "run_model.py"), json.dumps(list(cases.values()))],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = dict(zip(cases, json.loads(r.stdout)))
    want_err = {
        "nhwc": "run_model.py: error: model.so expects input (N, 1, 12, 12), got (3, 12, 12, 1); it looks channels-last "
                "(N, H, W, C): use x.transpose(0, 3, 1, 2)",
        "small": "run_model.py: error: model.so expects input (N, 1, 12, 12), got (3, 1, 10, 10)",
        "one_image": "run_model.py: error: model.so expects input (N, 1, 12, 12), got (1, 12, 12); one image without "
                     "the batch axis: use x[None]",
        "nan": "run_model.py: error: input contains NaN or Inf (1 of 3 images, first at index 1)",
        "u8_as_float": "run_model.py: error: expected float input (N, C, H, W) preprocessed like the training data, "
                       "got uint8; already quantized codes go to --input-int",
        "int_range": "run_model.py: error: --input-int codes must lie in 0..255 (the input's 8 bits), got 300..300",
        "float_as_int": "run_model.py: error: --input-int expects integer codes (uint8), got float32; float images go "
                        "to --input",
        "empty": "run_model.py: error: empty input batch (N = 0)",
        "npz_two": f"run_model.py: error: {t}/two.npz holds 2 arrays (a, b): name the input, e.g. --input "
                   f"{t}/two.npz:a",
        "npz_bad_key": f"run_model.py: error: {t}/two.npz has no array 'c'; it holds a, b",
        "missing": f"run_model.py: error: input file {t}/nothere.npy not found",
    }
    for name, msg in want_err.items():
        rc, out, err = res[name]
        assert (rc, err, out) == (2, msg + "\n", ""), (name, res[name])
    rc, out, err = res["junk"]
    assert rc == 2 and err.startswith(f"run_model.py: error: {t}/junk.npy is not a numpy .npy / .npz array file") \
        and len(err.splitlines()) == 1, err
    rc, out, err = res["output_int_alone"]
    assert rc == 2 and err.endswith("error: --output-int needs --output FILE (it selects what --output writes)\n")
    rc, out, err = res["random_zero"]
    assert rc == 2 and err.endswith("error: --random needs at least 1 input, got 0\n")
    for name in ("npz_one", "npz_key", "int_ok"):
        assert res[name][0] == 0 and res[name][1].startswith("top-1: ["), res[name]
    want = graph.output.dequantize(run_reference(graph, graph.input.quantize(x)))
    np.testing.assert_array_equal(np.load(tmp_path / "y1.npy"), want)
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), want)
    np.testing.assert_array_equal(np.load(tmp_path / "yi.npy"), run_reference(graph, files["u8.npy"]))


_RUN_INT_DRIVER = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from run_model import BundleModel, InputError
model = BundleModel(sys.argv[1] + "/model.so")
q = np.load(sys.argv[2])
res = {"ok": model.run_int(q).tolist()}
for name, bad in (("high", q + 16), ("negative", q.astype(np.int16) - 1), ("one_image", q[0])):
    try:
        model.run_int(bad)
        res[name] = "ran"
    except InputError as e:
        res[name] = str(e)
print(json.dumps(res))
"""


def test_bundle_run_int_refuses_codes_outside_the_input_bits(tmp_path):
    """The bundle's BundleModel.run_int (the API beside run_model.py's --input-int) checks its codes like
    CompiledModel.run_int: a 4-bit input's kernels are proved for codes <= 15, so 16..255 would give wrong integers,
    not saturated ones. Run in a child process (the bundle's libtvm_runtime next to tvm's aborts)."""
    from conftest import four_bit_input_graph

    graph = four_bit_input_graph()
    compile_so(graph, tmp_path / "m.so", batch=2)
    b = make_bundle(tmp_path / "m.so", tmp_path / "b").path
    q = np.random.default_rng(0).integers(0, 16, size=(3, 16, 6, 6)).astype(np.uint8)
    np.save(tmp_path / "q.npy", q)
    r = subprocess.run([sys.executable, "-c", _RUN_INT_DRIVER, str(b), str(tmp_path / "q.npy")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    np.testing.assert_array_equal(np.array(res.pop("ok")), run_reference(graph, q))
    assert res == {
        "high": "--input-int codes must lie in 0..15 (the input's 4 bits), got 16..31",
        "negative": "--input-int codes must lie in 0..15 (the input's 4 bits), got -1..14",
        "one_image": "model.so expects input (N, 16, 6, 6), got (16, 6, 6); one image without the batch axis: use "
                     "x[None]",
    }
