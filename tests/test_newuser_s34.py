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


class SizeUp:
    """A U-Net skip: upsample to the skip's size (``F.interpolate(x, size=skip.shape[-2:])``), concat, conv. torch's
    legacy exporter writes the sizes as Shape / Slice / Concat of the skip's shape."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c0 = torch.nn.Conv2d(1, 8, 3, padding=1)
                self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
                self.c2 = torch.nn.Conv2d(16, 4, 3, padding=1)

            def forward(self, x):
                F = torch.nn.functional
                s = F.relu(self.c0(x))
                u = F.interpolate(F.relu(self.down(s)), size=s.shape[-2:], mode="nearest")
                return self.c2(torch.cat([s, u], 1))

        torch.manual_seed(0)
        return Net().eval()


def test_onnx_resize_to_a_computed_size_is_read_and_compiles_bit_exact(tmp_path):
    """The new user's U-Net (legacy exporter, opset 17, fixed input shape) was refused, listing '/Shape' and '/Slice'
    without naming the Resize they feed: the sizes resolve to constant scales now."""
    import torch

    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.onnx_import import onnx_to_torch

    model = SizeUp.build()
    path = tmp_path / "size.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(path), dynamo=False, opset_version=17)
    import onnx

    assert {"Shape", "Resize"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    gm = onnx_to_torch(path)
    x = np.random.default_rng(0).standard_normal((24, 1, 12, 12)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)
    graph = to_integer(quantize(gm, x[:16], QuantConfig(8, 8), progress=False))
    assert "upsample" in {n.op for n in graph.nodes}
    compile_so(graph, tmp_path / "size.so")
    q = graph.input.quantize(x[16:])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "size.so").run_int(q), run_reference(graph, q))


def test_onnx_resize_forms_it_cannot_read_are_named_with_the_fix(tmp_path):
    """Dynamic H / W sizes: the Resize is named with what to do (it was missing from the list); opset 10's Resize:
    one line per node saying to export at opset >= 11 (was onnx2torch internals)."""
    import torch

    from ptq2tvm.errors import UnsupportedModelError
    from ptq2tvm.onnx_import import onnx_to_torch

    model = SizeUp.build()
    dyn = tmp_path / "dyn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(dyn), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {2: "h", 3: "w"}})
    with pytest.raises(UnsupportedModelError) as e:
        onnx_to_torch(dyn)
    assert "(Resize): its output sizes are computed in the graph" in str(e.value)
    assert "scale_factor= instead of size=" in str(e.value)

    class Up(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    old = tmp_path / "op10.onnx"
    torch.onnx.export(Up().eval(), (torch.zeros(1, 1, 8, 8),), str(old), dynamo=False, opset_version=10)
    with pytest.raises(UnsupportedModelError) as e:
        onnx_to_torch(old)
    assert "opset 10's Resize" in str(e.value) and "opset_version >= 11" in str(e.value)
    assert "onnx2torch module" not in str(e.value)


def test_raw_pixels_resized_with_interpolation_are_flagged():
    """Raw 0..255 images resized with interpolation are not whole numbers (the new user's: 87%), so the raw-pixel
    warning stayed silent, and an ONNX model (BatchNorm folded by the exporter) has no other check: any float data
    from 0 up to at most 255 with a maximum above 20 is flagged now; normalized data is not."""
    from ptq2tvm.data.arrays import array_notes

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, 1, 16, 16)).astype(np.float32)
    resized = (raw[..., :-1] + raw[..., 1:]) / 2                     # bilinear-like: half-integers
    assert np.mean(resized == np.round(resized)) < 0.99
    notes = array_notes(resized, "x.npy")
    assert len(notes) == 1 and "are on the 0..255 scale: they look like raw pixels" in notes[0], notes
    assert "are whole numbers" in array_notes(raw, "x.npy")[0]
    assert array_notes((raw / 255 - 0.45) / 0.22, "x.npy") == []
    assert array_notes(raw / 255, "x.npy") == []


def test_onnx_run_directory_survives_the_onnx_file_moving(tmp_path, capsys):
    """`eval` / `bench` rebuilt the FP32 model from the original .onnx path: moving it broke the run ("ONNX model not
    found") although the README calls the run directory self-contained. The run keeps a copy (with the dynamo
    exporter's external data file) in model_src/ and uses it when the original is gone."""
    import shutil

    import torch

    from ptq2tvm import cli

    model = SizeUp.build()
    src = tmp_path / "src"
    src.mkdir()
    path = src / "net.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(path), dynamo=False, opset_version=17)
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.load(str(path))
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="net.onnx.data", size_threshold=0)
    onnx.save(m, str(path))
    assert (src / "net.onnx.data").is_file()
    x = np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(48) % 4)
    run = tmp_path / "run"
    assert cli.main(["quantize", "--model", str(path), "--data", str(tmp_path / "d.npz"), "--calib-size", "32",
                     "--fidelity-images", "0", "--out", str(run), "--no-progress"]) == 0
    assert {p.name for p in (run / "model_src").iterdir()} == {"net.onnx", "net.onnx.data"}
    assert cli.main(["compile", str(run), "--no-progress"]) == 0
    shutil.rmtree(src)
    capsys.readouterr()
    assert cli.main(["parity", str(run), "--data", str(tmp_path / "d.npz"), "--n", "8", "--no-progress"]) == 0
    assert "not found" not in capsys.readouterr().err
    from ptq2tvm.api import load_fp32

    fp32 = load_fp32(run / "fp32.pt")                  # what eval / bench / fidelity rebuild: from model_src/
    with torch.no_grad():
        np.testing.assert_allclose(fp32(torch.from_numpy(x[:4])).numpy(), model(torch.from_numpy(x[:4])).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_compiled_model_refuses_integer_input_to_the_float_call(tmp_path):
    """`CompiledModel(so)(x_uint8)` read the codes as float values (every output wrong, no word), while the bundle's
    run_model.py refused them with a hint."""
    from conftest import tiny_integer_graph
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.errors import InputShapeError

    graph = tiny_integer_graph(8, 8)
    compile_so(graph, tmp_path / "m.so", batch=1)
    cm = CompiledModel(tmp_path / "m.so")
    x = np.random.default_rng(0).standard_normal((2, *graph.input.shape)).astype(np.float32)
    q = graph.input.quantize(x)
    with pytest.raises(InputShapeError, match="got uint8; already quantized input codes go to run_int"):
        cm(q)
    with pytest.raises(InputShapeError, match="got int64"):
        cm(q.astype(np.int64))
    np.testing.assert_array_equal(cm.run_int(q), np.asarray(cm.run_int(graph.input.quantize(x.astype(np.float64)))))
    assert np.isfinite(cm(x)).all() and np.isfinite(cm(x.astype(np.float64))).all()


def test_fidelity_agreement_never_rounds_a_disagreement_to_100():
    """The report printed '100.0%' per-pixel agreement for 99.98%."""
    from ptq2tvm.fidelity_report import percent

    assert percent(0.9998) == "99.98%" and percent(0.99996) == "99.99%"
    assert percent(1.0) == "100.0%" and percent(0.994) == "99.4%" and percent(0.5) == "50.0%"


def test_bundle_runner_says_what_it_wrote_and_names_a_key_on_an_npy(tmp_path):
    """`run_model.py --output y.npy` wrote silently; `--input x.npy:images` said 'input file x.npy:images not found'."""
    from conftest import tiny_integer_graph
    from ptq2tvm.api import compile_so
    from ptq2tvm.bundle import make_bundle

    graph = tiny_integer_graph(8, 8)
    compile_so(graph, tmp_path / "m.so", batch=1)
    b = make_bundle(tmp_path / "m.so", tmp_path / "bundle")
    x = np.random.default_rng(0).standard_normal((3, *graph.input.shape)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = [sys.executable, str(b.path / "run_model.py")]
    r = subprocess.run(run + ["--input", "x.npy", "--output", "y.npy"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "wrote y.npy (dequantized float32, 3 input(s))" in r.stdout, r.stdout + r.stderr
    assert np.load(tmp_path / "y.npy").shape[0] == 3
    r = subprocess.run(run + ["--input", "x.npy:images"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "x.npy is an .npy file: it has no named arrays (drop ':images')" in r.stderr, r.stderr


def test_a_tvm_build_failure_is_one_line_with_the_way_around(tmp_path, monkeypatch, capsys):
    """A breaker's (N, 1, 1, W) signal crashed every AVX-512 VNNI build with TVM's raw InternalError traceback (fixed
    at its root in the builder, tests/test_stem_pool.py); the whole kind of failure (TVM cannot lower a kernel
    ptq2tvm scheduled) is now a CompileError naming the schedule, where to report it and `--schedule plain`."""
    import tvm

    from conftest import quantized_small_run
    from ptq2tvm import cli
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend import compile as compile_mod
    from ptq2tvm.errors import CompileError
    from ptq2tvm.ir.graph import IntegerGraph

    def broken(*_a, **_k):
        raise tvm.error.InternalError("Check failed: (...) is false: variable v has been used before definition!\n"
                                      "  more lines of the TVM stack")

    monkeypatch.setattr(compile_mod, "compile_module", broken)
    d = quantized_small_run(tmp_path, "r")
    graph = IntegerGraph.load(d / "r" / "model.qgraph.npz")
    with pytest.raises(CompileError) as e:
        compile_so(graph, tmp_path / "m.so")
    msg = str(e.value)
    assert "TVM could not build this graph (--schedule auto" in msg and "used before definition" in msg
    assert "--schedule plain" in msg and "more lines" not in msg
    assert not (tmp_path / "m.so").exists()
    capsys.readouterr()
    assert cli.main(["compile", str(d / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("ptq2tvm compile: error: TVM could not build this graph"), err
    assert not any("Traceback" in line or "more lines" in line for line in err), err
    assert not (d / "r" / "model.so").exists()
