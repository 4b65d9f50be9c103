"""Bad input gets a clear error naming what is wrong, and leaves no partial file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptq2tvm.backend.compile import compile_graph, sidecar_path
from ptq2tvm.backend.runtime import CompiledModel
from ptq2tvm.errors import ArtifactError, DataError, InputShapeError, QuantConfigError
from ptq2tvm.fold.fold import fold_to_integer
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.ir.graph import IntegerGraph


@pytest.mark.parametrize("w,a,what,bad", [(1, 8, "w_bits", 1), (9, 8, "w_bits", 9), (8, 0, "a_bits", 0),
                                         (8, 16, "a_bits", 16)])
def test_bits_outside_2_to_8(tiny_model, tiny_data, w, a, what, bad):
    with pytest.raises(QuantConfigError, match=f"{what} must be an integer in 2..8, got {bad}"):
        quantize_rtn(tiny_model, tiny_data, QuantConfig(w, a), progress=False)


def test_empty_and_nan_calibration_data(tiny_model, tiny_data):
    with pytest.raises(DataError, match="empty"):
        quantize_rtn(tiny_model, tiny_data[:0], progress=False)
    bad = tiny_data.copy()
    bad[3, 0, 1, 1] = np.nan
    bad[7, 0, 2, 2] = np.inf
    with pytest.raises(DataError, match=r"2 NaN/Inf values in 2 image\(s\), first at index 3"):
        quantize_rtn(tiny_model, bad, progress=False)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        quantize_rtn(tiny_model, tiny_data[0], progress=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from conftest import TinyNet, randomize_bn
    import torch

    torch.manual_seed(0)
    data = np.random.default_rng(0).standard_normal((32, 1, 12, 12)).astype(np.float32)
    qm = quantize_rtn(randomize_bn(TinyNet()), data, QuantConfig(8, 8), progress=False)
    d = tmp_path_factory.mktemp("art")
    graph = fold_to_integer(qm)
    graph.save(d / "g.npz")
    qm.save(d / "fq.pt")
    compile_graph(graph, d / "m.so", batch=2)
    return d, graph


def test_wrong_input_shape_at_run_time(compiled):
    d, graph = compiled
    cm = CompiledModel(d / "m.so")
    with pytest.raises(InputShapeError, match=r"expects input \(N, 1, 12, 12\), got \(2, 3, 12, 12\)"):
        cm(np.zeros((2, 3, 12, 12), np.float32))
    with pytest.raises(InputShapeError, match="expected uint8"):
        cm.run_int(np.zeros((2, 1, 12, 12), np.float32))
    with pytest.raises(InputShapeError, match="NaN"):
        cm(np.full((1, 1, 12, 12), np.nan, np.float32))
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):          # one value among finite ones, any image of the batch
        y = x.copy()
        y[2, 0, 11, 5] = bad
        with pytest.raises(InputShapeError, match="NaN or Inf"):
            cm(y)
    y = x.copy()
    y[0, 0, 0, :2] = 3e38                          # huge but finite: runs (the check is not a sum that overflows)
    assert np.isfinite(cm(y)).all()


def test_corrupted_and_mismatched_artifacts(compiled, tmp_path):
    d, graph = compiled
    # truncated integer graph
    raw = (d / "g.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="trunc.npz"):
        IntegerGraph.load(tmp_path / "trunc.npz")
    # an array changed inside a valid zip -> checksum mismatch
    with np.load(d / "g.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["0/bias"] = arrays["0/bias"] + 1
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        IntegerGraph.load(tmp_path / "tampered.npz")
    # a .so that does not match its sidecar
    so = tmp_path / "m.so"
    so.write_bytes((d / "m.so").read_bytes() + b"\0")
    sidecar_path(so).write_text(sidecar_path(d / "m.so").read_text())
    with pytest.raises(ArtifactError, match="does not match its metadata"):
        CompiledModel(so)
    sidecar_path(so).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted metadata"):
        CompiledModel(so)
    with pytest.raises(ArtifactError, match="not found"):
        CompiledModel(tmp_path / "missing.so")
    # a library checked against another integer graph
    other = IntegerGraph.load(d / "g.npz")
    other.nodes[0].arrays["bias"] = other.nodes[0].arrays["bias"] + 1
    with pytest.raises(ArtifactError, match="not compiled from this integer graph"):
        CompiledModel(d / "m.so").check_graph(other)
    # fake-quant model files
    (tmp_path / "fq.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read fake-quant model"):
        QuantModel.load(tmp_path / "fq.pt")


def test_failed_compile_leaves_no_file(compiled, tmp_path, monkeypatch):
    d, graph = compiled
    import tvm

    def boom(*a, **k):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(tvm, "compile", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        compile_graph(graph, tmp_path / "x.so")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_file(compiled, tmp_path, monkeypatch):
    d, graph = compiled

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        graph.save(tmp_path / "g.npz")
    assert list(tmp_path.iterdir()) == []
    meta = json.loads(sidecar_path(d / "m.so").read_text())
    assert meta["input"]["shape"] == [1, 12, 12] and meta["batch"] == 2


def test_cli_warnings_are_one_line_and_the_handler_is_restored(tmp_path, capsys):
    """A dead-ReLU model's calibration warnings came out with Python's `file.py:158: RuntimeWarning:` prefix and the
    source line under it (one said torch/utils/_contextlib.py): the CLI prints its warnings as one line each."""
    import warnings

    from ptq2tvm.cli import _one_line_warning, main

    show = _one_line_warning("quantize")
    show(RuntimeWarning("calibration: the range of tensor 'mean' collapsed"), RuntimeWarning, "/x/torch/a.py", 124)
    show(DeprecationWarning("old"), DeprecationWarning, "/x/y.py", 7)
    assert capsys.readouterr().err.splitlines() == [
        "ptq2tvm quantize: warning: calibration: the range of tensor 'mean' collapsed",
        "ptq2tvm quantize: DeprecationWarning: old (/x/y.py:7)"]
    before = warnings.showwarning
    assert main(["compile", str(tmp_path / "missing")]) == 2
    assert warnings.showwarning is before


def test_int_input_codes_outside_the_input_grid_are_refused(tmp_path):
    """run_int with a 4-bit input: codes must lie in 0..15. The kernels' proved bounds (lifted epilogue, int16 sums)
    assume the input's grid, so a code of 16 or more would give wrong integers, not a saturated result; it is
    refused with the range. In-range codes run bit-exact."""
    from conftest import four_bit_input_graph
    from ptq2tvm.ir.reference import run_reference

    graph = four_bit_input_graph()
    c, h = 16, 6
    rng = np.random.default_rng(3)
    compile_graph(graph, tmp_path / "m.so", batch=1)
    cm = CompiledModel(tmp_path / "m.so")
    q = rng.integers(0, 16, (2, c, h, h)).astype(np.uint8)
    assert np.array_equal(cm.run_int(q), run_reference(graph, q))
    q[1, 3, 2, 2] = 16
    with pytest.raises(InputShapeError, match=r"input codes must lie in 0\.\.15 \(the input's 4-bit grid\), got up "
                                              r"to 16"):
        cm.run_int(q)
