"""Faults a breaker helper found in session 30 (each test fails before its fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.errors import UnsupportedModelError

X = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)


class BroadcastAdd(nn.Module):
    """y = b + mean(b) over (H, W): an (N, C, H, W) + (N, C, 1, 1) add; the .so read the small tensor out of bounds
    (48 of 48 elements wrong) while quantize, the fake-quant model and the reference executor broadcast."""

    def __init__(self, small_first: bool = False):
        super().__init__()
        self.conv, self.small_first = nn.Conv2d(3, 4, 3, padding=1), small_first

    def forward(self, x):
        b = self.conv(x)
        m = b.mean((2, 3), keepdim=True)
        return m + b if self.small_first else b + m


@pytest.mark.parametrize("small_first", [False, True])
def test_a_broadcasting_add_is_refused_by_name(small_first):
    from ptq2tvm.api import quantize

    with pytest.raises(UnsupportedModelError, match=r"add of tensors of different shapes .*\(broadcasting\)"):
        quantize(BroadcastAdd(small_first).eval(), X, progress=False)


def test_parity_exits_1_when_the_so_differs(monkeypatch, capsys):
    from ptq2tvm import cli

    monkeypatch.setattr(cli, "cmd_parity", lambda args: {"bit_exact_vs_reference": False, "mismatched_elements": 48,
                                                         "n_elements": 48})
    assert cli.main(["parity", "some_run"]) == 1
    assert "differs from the reference executor on 48 of 48" in capsys.readouterr().err


class LayerScale(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 4, 3, padding=1), kind
        self.g = nn.Parameter(torch.ones(1, 4, 8, 8))
        self.register_buffer("b", torch.ones(1, 4, 8, 8))

    def forward(self, x):
        y = self.conv(x)
        return y * self.g if self.kind == "param" else y + self.b if self.kind == "buffer" else y + torch.ones(
            1, 4, 8, 8)


@pytest.mark.parametrize("kind", ["param", "buffer", "constant"])
def test_a_parameter_buffer_or_constant_operand_is_refused_by_name(kind):
    """x * self.g (ConvNeXt-style layer scale) was a KeyError: 'g' traceback."""
    from ptq2tvm.api import quantize

    with pytest.raises(UnsupportedModelError, match=r"with the parameter / buffer / constant tensor '\w+'"):
        quantize(LayerScale(kind).eval(), X, progress=False)


class ReluFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(x))


def test_an_activation_on_the_network_input_compiles_bit_exact(tmp_path):
    """ReLU applied straight to the input was a KeyError: 'input' traceback in the tracer."""
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = to_integer(quantize(ReluFirst().eval(), X, progress=False))
    compile_so(graph, tmp_path / "r.so")
    q = graph.input.quantize(X[:1])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "r.so").run_int(q), run_reference(graph, q))


def test_a_float64_model_is_converted_with_a_note(capsys):
    from ptq2tvm.api import as_float32

    m = as_float32(ReluFirst().double(), "net.py:build")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert "note: net.py:build has float64 parameters: converted to float32" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["quantize", "--model", "resnet_small", "--mixed-precision", "--latency-batch", "0"],
    ["quantize", "--model", "resnet_small", "--recon-threads", "-1"],
    ["quantize", "--model", "resnet_small", "--hutchinson-samples", "0"],
    ["sensitivity", "RUN", "--samples", "-1"], ["sensitivity", "RUN", "--images", "0"],
    ["parity", "RUN", "--n", "-3"], ["eval", "RUN", "--n", "0"], ["parity", "RUN", "--per-layer-inputs", "-1"],
    ["quantize", "--model", "resnet_small", "--resize", "-3"], ["compile", "RUN", "--batch", "0"]])
def test_every_integer_option_is_checked_before_any_work(argv, tmp_path, capsys, monkeypatch):
    from ptq2tvm import cli

    monkeypatch.chdir(tmp_path)
    argv = [a.replace("RUN", str(tmp_path / "run")) for a in argv]
    assert cli.main(argv + ["--out", str(tmp_path / "q")] if argv[0] == "quantize" else argv) == 2
    err = capsys.readouterr().err
    option = next(a for a in argv if a.startswith("--") and a not in ("--model", "--mixed-precision"))
    assert err.count("\n") == 1 and f"{option} must be >= " in err, err
    assert list(tmp_path.iterdir()) == []          # nothing written, no folder made


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from conftest import quantized_small_run

    return quantized_small_run(tmp_path_factory.mktemp("own"), "r")


@pytest.mark.parametrize("argv, what", [
    (["compile", "{r}", "--out", "{r}/model.qgraph.npz"], "the run's model.qgraph.npz"),
    (["compile", "{r}", "--out", "{r}/run.so"], "the run's run.json"),          # its sidecar would be run.json
    (["parity", "{r}", "--json", "{r}/run.json"], "the run's run.json"),
    (["export", "{r}", "--format", "onnx", "--out", "{r}/fp32.pt"], "the run's fp32.pt"),
    (["quantize", "--model", "resnet_small", "--data", "{d}/x.npy", "--out", "{d}/r2", "--json", "{d}/x.npy"],
     "the calibration data")])
def test_an_output_option_never_replaces_the_runs_own_files_or_the_inputs(small_run, argv, what, capsys):
    from ptq2tvm import cli

    d, r = small_run, small_run / "r"
    before = {p.name: p.read_bytes() for p in list(r.iterdir()) + [d / "x.npy"] if p.is_file()}
    argv = [a.format(r=r, d=d) for a in argv]
    assert cli.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"would overwrite {what}" in err, err
    assert {p.name: p.read_bytes() for p in list(r.iterdir()) + [d / "x.npy"] if p.is_file()} == before
    assert not (d / "r2").exists()


def test_a_compile_out_ending_in_json_is_refused(small_run, capsys):
    from ptq2tvm import cli

    assert cli.main(["compile", str(small_run / "r"), "--out", str(small_run / "m.json"), "--no-progress"]) == 2
    assert "a library path ending in .json" in capsys.readouterr().err
    assert not (small_run / "m.json").exists()
