"""A new user's mistakes get one clear line naming the model, file or value at fault (never a torch / numpy
traceback) and leave nothing on disk: a forward() with two inputs, a factory that returns no module or raises, a
negative seed, a pickled module as --checkpoint, calibration data that does not fit an ONNX model's fixed input,
a folder or file that is not a run directory, a negative --fidelity-images, very few calibration images, the bundle
runner's --threads, and one image without its batch dimension."""

from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TinyNet, randomize_bn, run_cli, tiny_integer_graph
from ptq2tvm.api import ModelSpec, build_model, check_calibration, load_checkpoint
from ptq2tvm.data import calibration_dataset, check_seed, holdout_set
from ptq2tvm.errors import ArtifactError, DataError, QuantConfigError, UnsupportedModelError
from ptq2tvm.frontend.trace import trace_model

MODELS = '''
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))

class Two(Net):
    def forward(self, x, y):
        return super().forward(x + y)

def net(): return Net()
def twoin(): return Two()
def notmodule(): return 3
def needs(width): return Net()
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with extra.py (the factories above) and calib.npy (200 N(0, 1) 1x12x12 images), as the cwd."""
    (tmp_path / "extra.py").write_text(MODELS)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((200, 1, 12, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _quantize(capsys, *argv):
    return run_cli(capsys, "quantize", "--data", "calib.npy", "--no-progress", "--fidelity-images", 0, *argv)


def test_two_input_forward_is_one_line_without_traceback(project, capsys):
    rc, out, err = _quantize(capsys, "--model", "extra.py:twoin", "--out", "runs/e13")
    assert rc == 2 and "model forward() takes 2 inputs (x, y); ptq2tvm quantizes single-input models" in err, err
    assert "Traceback" not in err and not (project / "runs").exists()


def test_model_that_does_not_run_is_one_line_naming_the_layer(capsys):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 2))
    with pytest.raises(UnsupportedModelError) as e:
        trace_model(model, (1, 10, 10))
    msg = str(e.value)
    assert msg.startswith("the model does not run on an input of shape (1, 1, 10, 10) at layer '2': RuntimeError: "
                          "mat1 and mat2 shapes cannot be multiplied"), msg
    assert "\n" not in msg and "tlparse" not in msg
    assert capsys.readouterr().err == ""     # torch.fx's ShapeProp prints a traceback: withheld


@pytest.mark.parametrize("attr,kwargs,want", [
    ("notmodule", {}, "extra.py:notmodule returned int, not a torch.nn.Module"),
    ("needs", {}, "extra.py:needs raised TypeError: needs() missing 1 required positional argument: 'width' "
                  "(with --model-kwargs '{}')"),
    ("net", {"depth": 3}, "extra.py:net raised TypeError: net() got an unexpected keyword argument 'depth'"),
])
def test_factory_returning_no_module_or_raising(project, attr, kwargs, want):
    with pytest.raises(ArtifactError) as e:
        build_model(ModelSpec(f"extra.py:{attr}", kwargs))
    assert want in str(e.value) and "\n" not in str(e.value)


def test_factory_errors_on_the_command_line(project, capsys):
    rc, _, err = _quantize(capsys, "--model", "extra.py:notmodule", "--out", "runs/a")
    assert rc == 2 and "extra.py:notmodule returned int, not a torch.nn.Module" in err and "Traceback" not in err
    (project / "broken.py").write_text("def f(:\n")
    with pytest.raises(ArtifactError, match=r"cannot import broken\.py: SyntaxError"):
        build_model(ModelSpec("broken.py:f"))
    with pytest.raises(ArtifactError, match=r"model 'resnet_small' raised TypeError: .*'bogus'"):
        build_model(ModelSpec("resnet_small", {"bogus": 1}))


def test_negative_seed(project, capsys):
    with pytest.raises(DataError, match=r"seed must be an integer >= 0 \(--seed\), got -1"):
        calibration_dataset("calib.npy", 512, seed=-1)     # every image: no subsample drawn, still refused
    with pytest.raises(DataError, match="got -1"):
        check_seed(-1)
    from conftest import fast_recon

    with pytest.raises(QuantConfigError, match=r"seed must be an integer >= 0 \(--seed\), got -1"):
        fast_recon(seed=-1).validate()
    for method in ("rtn", "adaround"):
        rc, _, err = _quantize(capsys, "--model", "extra.py:net", "--seed", -1, "--calib-size", 100,
                               "--method", method, "--out", f"runs/{method}")
        assert rc == 2 and "seed must be an integer >= 0 (--seed), got -1" in err and "Traceback" not in err, err
    assert not (project / "runs").exists()
    from ptq2tvm.cli import _eval_data       # eval / parity --n K --seed -1 on an array file (numpy's traceback)

    with pytest.raises(DataError, match=r"seed must be an integer >= 0 \(--seed\), got -1"):
        _eval_data(argparse.Namespace(data="calib.npy", n=5, seed=-1), {"data": "elsewhere.npy"})


def test_pickled_module_as_checkpoint(tmp_path):
    model = randomize_bn(TinyNet())
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(TinyNet(), tmp_path / "whole.pt")
    assert str(e.value) == (f"{tmp_path / 'whole.pt'} holds a pickled module, not a state_dict: save "
                            "model.state_dict() (torch.save(model.state_dict(), path))")
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match=r"holds pickled Python objects \(global argparse\.Namespace\)") as e:
        load_checkpoint(TinyNet(), tmp_path / "other.pt")
    assert "\n" not in str(e.value)


def _onnx_model(path, shape):
    """A conv -> relu -> global pool -> flatten -> gemm ONNX classifier with input ``shape`` (None: dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    dims = [d if d is not None else "n" for d in shape]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_fixed_input_shape_against_the_data(project, capsys):
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    _onnx_model(project / "fixed.onnx", (1, 1, 28, 28))
    rc, _, err = _quantize(capsys, "--model", "fixed.onnx", "--out", "runs/e")
    assert rc == 2 and ("the ONNX model fixed.onnx (input 'x') has the fixed input shape (1, 1, 28, 28), the "
                        "calibration data has shape (200, 1, 12, 12)") in err, err
    assert not (project / "runs").exists()
    model = build_model(ModelSpec(str(_onnx_model(project / "dyn.onnx", (None, 1, None, None)))))
    images = np.load("calib.npy")[:8]
    assert model.fixed_input_shape == (None, 1, None, None)
    check_calibration(model, images)     # dynamic dimensions take any size


def test_not_a_run_directory(project, capsys):
    rc, _, err = run_cli(capsys, "compile", "runs/nothere")
    assert rc == 2 and err.strip() == ("ptq2tvm compile: error: runs/nothere is not a run directory (no "
                                       "model.qgraph.npz): create one with `ptq2tvm quantize ... --out runs/nothere`")
    rc, _, err = run_cli(capsys, "compile", "calib.npy")
    assert rc == 2 and "calib.npy is a file, not a run directory" in err and "calib.npy/" not in err, err
    rc, _, err = run_cli(capsys, "bundle", "runs/nothere")
    assert rc == 2 and "runs/nothere is not a run directory" in err and "`ptq2tvm compile runs/nothere`" in err
    for cmd in ("eval", "parity", "export", "bench"):
        rc, _, err = run_cli(capsys, cmd, "calib.npy")
        assert rc == 2 and "calib.npy is a file, not a run directory" in err, (cmd, err)
    run = project / "runs" / "r"
    run.mkdir(parents=True)
    tiny_integer_graph(8, 8).save(run / "model.qgraph.npz")
    rc, _, err = run_cli(capsys, "bundle", run)
    assert rc == 2 and f"compiled library {run / 'model.so'} not found: run `ptq2tvm compile {run}` first" in err
    assert not (run / "bundle").exists()


def test_negative_fidelity_images_and_few_calibration_images(project, capsys):
    with pytest.raises(DataError, match=r"--fidelity-images must be an integer >= 0 \(0 skips the fidelity "
                                        r"report\), got -1"):
        holdout_set("calib.npy", 100, -1)
    # on the command line too (the report used to be skipped without a word), before any work
    rc, _, err = _quantize(capsys, "--model", "extra.py:net", "--fidelity-images", -1, "--out", "runs/f")
    assert rc == 2 and "--fidelity-images must be an integer >= 0" in err and "Traceback" not in err, err
    assert not (project / "runs").exists()
    model = build_model(ModelSpec("extra.py:net"))
    images = np.load("calib.npy")
    few = [n for n in check_calibration(model, images[:100]) if "calibration image" in n]
    assert few == ["only 100 calibration image(s): reconstruction and activation ranges need a few hundred (at "
                   "least 128, ideally 512: --calib-size and enough data)"]
    assert not [n for n in check_calibration(model, images[:128]) if "calibration image" in n]


@pytest.mark.parametrize("option,value,least", [("--repeats", "0", 1), ("--warmup", "-1", 0),
                                                 ("--calls-per-turn", "0", 1), ("--threads", "0", 1)])
def test_bench_counts_are_checked_before_any_work(tmp_path, capsys, option, value, least):
    """bench with a count below its least value stops in one line before it opens the run or exports anything (it
    used to export the ONNX models for ~20 s, then end in the timing function's traceback)."""
    from ptq2tvm.cli import main

    out = tmp_path / "out"
    assert main(["bench", str(tmp_path / "no_such_run"), option, value, "--out-dir", str(out)]) == 2
    assert f"{option} must be >= {least}, got {value}" in capsys.readouterr().err
    assert not out.exists()


def test_threads_above_the_core_count_warn_in_one_line(tmp_path, capsys, monkeypatch):
    """--threads above the logical CPUs: one ptq2tvm warning naming both numbers (before, only TVM's own log line
    said so); the command then goes on (here it stops at the missing run directory)."""
    from ptq2tvm.cli import main

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert main(["bench", str(tmp_path / "no_such_run"), "--threads", "3"]) == 2
    err = capsys.readouterr().err
    assert "warning: --threads 3 is more than this machine's 2 logical CPUs" in err
    assert main(["bench", str(tmp_path / "no_such_run"), "--threads", "2"]) == 2
    assert "warning: --threads" not in capsys.readouterr().err
    # far above (a breaker's `parity RUN --threads 1000` ran 3000 spinning threads for > 8 minutes): refused first
    for argv in (["parity", str(tmp_path / "no_such_run"), "--threads", "9"],
                 ["bench", str(tmp_path / "no_such_run"), "--threads", "1000"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is more than 4x this machine's 2 logical CPUs" in err and "at most 8" in err
        assert "no_such_run" not in err          # refused before the run directory is even read
    from ptq2tvm import bundle_runner

    with pytest.raises(SystemExit):
        bundle_runner.main(["--random", "1", "--threads", "9"])
    assert "more than 4x this machine's 2 logical CPUs" in capsys.readouterr().err


def test_bundle_runner_threads(monkeypatch, capsys):
    from ptq2tvm import bundle_runner

    with pytest.raises(SystemExit) as e:
        bundle_runner.main(["--random", "1", "--threads", "0"])
    assert e.value.code == 2 and "--threads must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("TVM_NUM_THREADS", "5")
    assert bundle_runner.main(["--so", "missing.so", "--random", "1", "--threads", "3"]) == 2
    assert os.environ["TVM_NUM_THREADS"] == "3"
    monkeypatch.setenv("TVM_NUM_THREADS", "5")
    bundle_runner.set_threads(None)      # the default: what is set, else the CPU count
    assert os.environ["TVM_NUM_THREADS"] == "5"
    monkeypatch.delenv("TVM_NUM_THREADS")
    bundle_runner.set_threads(None)
    assert os.environ["TVM_NUM_THREADS"] == str(os.cpu_count() or 1)


def test_one_image_without_batch_dimension(tmp_path):
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.errors import InputShapeError

    compile_so(tiny_integer_graph(8, 8), tmp_path / "m.so")
    cm = CompiledModel(tmp_path / "m.so")
    x = np.zeros((1, 1, 12, 12), np.float32)
    with pytest.raises(InputShapeError, match=r"expects input \(N, 1, 12, 12\), got \(1, 12, 12\); add the batch "
                                              r"dimension: x\[None\]"):
        cm(x[0])
    with pytest.raises(InputShapeError, match=r"got \(1, 12, 12, 1\); it looks channels-last"):
        cm(x.transpose(0, 2, 3, 1))


OPTIONAL_ARGS = '''
import torch, torch.nn as nn
from extra import Net

class Opt(Net):
    def forward(self, x, y=None):
        out = super().forward(x)
        return out if y is None else out + y

class KwOnly(Net):
    def forward(self, x, *, scale=1.0):
        return super().forward(x) * scale

class Star(Net):
    def forward(self, *xs):
        return super().forward(xs[0])

class VarUnused(Net):
    def forward(self, x, *args, **kwargs):
        return super().forward(x)

class VarUsed(Net):
    def forward(self, x, *args):
        return super().forward(x + args[0])

def opt(): return Opt()
def kwonly(): return KwOnly()
def star(): return Star()
'''


def test_optional_forward_arguments_take_their_defaults(project, capsys):
    """forward(x, y=None) and forward(x, *, scale=1.0) are traced with the defaults (fx concrete_args), as at
    inference: one graph input, the same output as model(x); unused *args / **kwargs are accepted."""
    (project / "optargs.py").write_text(OPTIONAL_ARGS)
    import sys

    sys.path.insert(0, str(project))
    try:
        spec = importlib.util.spec_from_file_location("optargs", project / "optargs.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(project))
    from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel

    x = torch.from_numpy(np.load("calib.npy")[:4])
    for cls in (mod.Opt, mod.KwOnly, mod.VarUnused):
        model = cls().eval()
        graph = trace_model(model, (1, 12, 12))
        assert graph.input_name == "x" and [n.name for n in graph.nodes if n.op == "input"] == ["x"], cls
        with torch.no_grad():     # the float graph (quantization off) computes model(x): the defaults were used
            torch.testing.assert_close(QuantModel(graph, QuantConfig(8, 8)).set_quant(False, False)(x), model(x))
    with pytest.raises(UnsupportedModelError) as e:
        trace_model(mod.VarUsed(), (1, 12, 12))
    assert str(e.value) == ("model forward(x, *args) uses its argument *args as a second input; ptq2tvm supports "
                            "forward(x) (plus arguments with defaults, which take their defaults)")
    rc, _, err = _quantize(capsys, "--model", "optargs.py:opt", "--calib-size", 128, "--method", "rtn",
                           "--out", "runs/opt")
    assert rc == 0, err


def test_var_positional_forward_is_one_line(project, capsys):
    (project / "optargs.py").write_text(OPTIONAL_ARGS)
    rc, _, err = _quantize(capsys, "--model", "optargs.py:star", "--out", "runs/star")
    assert rc == 2 and ("model forward(*xs) takes its input as *xs; ptq2tvm supports forward(x) (plus arguments "
                        "with defaults, which take their defaults)") in err, err
    assert "Traceback" not in err and not (project / "runs").exists()


def test_onnx_fixed_input_channels_keep_the_channel_hints(project):
    """An ONNX model's fixed input (N?, 3, 16, 16): channels-last data gets the transpose hint and folder data the
    --channels hint (the channel check, not the fixed-shape one); 20x20 data gets the fixed-shape message."""
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    import onnx
    from onnx import numpy_helper

    path = _onnx_model(project / "rgb.onnx", (None, 3, 16, 16))
    m = onnx.load(str(path))
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    m.graph.initializer[0].CopyFrom(w)
    onnx.save(m, str(path))
    model = build_model(ModelSpec(str(path)))
    with pytest.raises(DataError, match=r"the calibration data has 16 channel\(s\) \(shape \(8, 16, 16, 3\)\); the "
                                        r"array looks channels-last \(N, H, W, C\): use x\.transpose\(0, 3, 1, 2\)$"):
        check_calibration(model, np.zeros((8, 16, 16, 3), np.float32))
    from ptq2tvm.data.checks import check_input_channels

    with pytest.raises(DataError, match=r"has 1 channel\(s\) \(shape \(8, 1, 16, 16\)\); pass --channels 3$"):
        check_input_channels(model, np.zeros((8, 1, 16, 16), np.float32), source="folder")
    with pytest.raises(DataError, match=r"has the fixed input shape \(\?, 3, 16, 16\), the calibration data has "
                                        r"shape \(8, 3, 20, 20\): give images of that size"):
        check_calibration(model, np.zeros((8, 3, 20, 20), np.float32))
    check_calibration(model, np.zeros((8, 3, 16, 16), np.float32))


def test_not_found_quotes_paths_with_spaces(project):
    from ptq2tvm.errors import not_found

    run = project / "runs" / "with space"
    assert str(not_found(run / "model.qgraph.npz", "integer graph file")).endswith(
        f"is not a run directory (no model.qgraph.npz): create one with `ptq2tvm quantize ... --out '{run}'`")
    run.mkdir(parents=True)
    tiny_integer_graph(8, 8).save(run / "model.qgraph.npz")
    assert str(not_found(run / "model.so", "compiled library")) == (
        f"compiled library {run / 'model.so'} not found: run `ptq2tvm compile '{run}'` first")
    plain = str(not_found(project / "runs" / "plain" / "model.so", "compiled library"))
    assert "'" not in plain and f"`ptq2tvm compile {project / 'runs' / 'plain'}`" in plain


def test_dangling_symlink_as_output(project):
    from ptq2tvm.outpaths import check_output_path

    os.symlink("nowhere/x", "dang")
    with pytest.raises(ArtifactError) as e:
        check_output_path("dang", "dir")
    assert str(e.value) == "--out dang: dang is a symbolic link to a missing path (nowhere/x)"
    with pytest.raises(ArtifactError, match=r"dang is a symbolic link to a missing path \(nowhere/x\)$"):
        check_output_path("dang/sub", "dir")
    assert str(check_output_path("dang", "file", "--json")) == "dang"     # replaced when written: fine


def test_model_file_imports_its_neighbours_and_torchscript_checkpoint(tmp_path):
    """A model file that imports a module next to it (`from layers import Block`) failed with "No module named
    'layers'"; a TorchScript archive given as --checkpoint got torch's paragraph about weights_only."""
    import sys

    (tmp_path / "layers_s16.py").write_text("import torch.nn as nn\nBlock = lambda: nn.Conv2d(1, 4, 3)\n")
    (tmp_path / "net_s16.py").write_text("import torch.nn as nn\nfrom layers_s16 import Block\n"
                                         "def build():\n    return nn.Sequential(Block(), nn.ReLU())\n")
    model = build_model(ModelSpec(f"{tmp_path / 'net_s16.py'}:build"))
    assert isinstance(model[0], nn.Conv2d) and str(tmp_path) not in sys.path
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    with pytest.raises(ArtifactError, match=r"scripted.pt is a TorchScript archive \(torch.jit.save\), not a "
                                            r"state_dict: save model.state_dict\(\)"):
        load_checkpoint(model, tmp_path / "scripted.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    load_checkpoint(model, tmp_path / "sd.pt")                       # a plain state_dict still loads
