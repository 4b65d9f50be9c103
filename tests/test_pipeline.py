"""End to end on real models and real data: zoo models at 224x224, digits accuracy, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ptq2tvm.api import compile_so, quantize, to_integer, top1_so, top1_torch
from ptq2tvm.backend.runtime import CompiledModel
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.reference import run_reference


@pytest.mark.parametrize("name,bits", [("resnet18", (8, 8)), ("mobilenet_v2", (4, 4)), ("mnasnet1_0", (8, 8))])
def test_zoo_224_compiles_bit_exact(tmp_path, name, bits):
    from ptq2tvm.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    graph = to_integer(quantize(model, calib, QuantConfig(*bits), progress=False))
    res = compile_so(graph, tmp_path / "m.so", batch=1)
    if res.meta["backend"] == "x86-nchw16c-vnni":
        from ptq2tvm.bench.disasm import count_instructions

        assert count_instructions(tmp_path / "m.so", ("vpdpbusd",))["vpdpbusd"] > 0
    q = graph.input.quantize(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    out = CompiledModel(tmp_path / "m.so").run_int(q)
    assert out.shape == (1, 1000)
    assert np.array_equal(out, run_reference(graph, q))


@pytest.fixture(scope="module")
def digits():
    from ptq2tvm.data import calibration_set, load_dataset
    from ptq2tvm.train import train_builtin

    model, info = train_builtin("resnet_small", dataset="digits", progress=False)
    return model, load_dataset("digits", split="test"), calibration_set("digits", 256, seed=0)


@pytest.mark.parametrize("w,a,min_top1", [(8, 8, 0.95), (4, 4, 0.90)])
def test_digits_accuracy_and_parity(tmp_path, digits, w, a, min_top1):
    model, test, calib = digits
    fp32 = top1_torch(model, test.images, test.labels)
    assert fp32 > 0.95
    qm = quantize(model, calib, QuantConfig(w, a), progress=False)
    graph = to_integer(qm)
    compile_so(graph, tmp_path / "m.so", batch=32)
    cm = CompiledModel(tmp_path / "m.so")
    so = top1_so(cm, test.images, test.labels)
    fq = top1_torch(qm, test.images, test.labels)
    assert so >= min_top1
    assert abs(so - fq) <= 0.003            # at most 1 of 360 images
    if w == 8:
        assert fp32 - so <= 0.01
    q = graph.input.quantize(test.images)
    assert np.array_equal(cm.run_int(q), run_reference(graph, q))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptq2tvm", *args], capture_output=True, text=True, timeout=600)


def test_cli_end_to_end(tmp_path, digits):
    run = tmp_path / "run"
    r = _cli("quantize", "--data", "digits", "--w-bits", "4", "--a-bits", "8", "--calib-size", "128",
             "--out", str(run), "--json", str(tmp_path / "q.json"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q.json").read_text())["w_bits"] == 4
    assert _cli("compile", str(run), "--batch", "8").returncode == 0
    r = _cli("parity", str(run), "--json", str(tmp_path / "p.json"), "--per-layer-inputs", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["bit_exact_vs_reference"] is True and p["mismatched_elements"] == 0 and p["n_inputs"] == 360
    assert p["top1_agreement_vs_fakequant"] >= 0.997 and p["max_abs_lsb_vs_fakequant"] <= 1
    assert "BIT-EXACT" in r.stdout and len(p["per_layer"]) > 10
    r = _cli("eval", str(run), "--json", str(tmp_path / "e.json"))
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["so_top1"] > 0.9 and e["n"] == 360
    r = _cli("compile", str(run), "--batch", "8", "--out", str(tmp_path / "tuned.so"), "--tune-trials", "2",
             "--no-progress", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["tuning"]["measured"] > 0 and (tmp_path / "tuned.tuning" / "database_tuning_record.json").is_file()
    assert "tuning records" in r.stdout
    r = _cli("bundle", str(run), "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    assert "lib/libtvm_runtime.so" in json.loads((tmp_path / "b.json").read_text())["files"]
    for cmd in ("quantize", "compile", "parity", "eval", "bench", "bundle", "train", "demo"):
        h = _cli(cmd, "--help")
        assert h.returncode == 0 and "--json" in h.stdout


def test_cli_errors_are_clear_and_leave_nothing(tmp_path):
    r = _cli("quantize", "--data", "digits", "--w-bits", "9", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "w_bits must be an integer in 2..8, got 9" in r.stderr
    assert not (tmp_path / "x").exists()
    r = _cli("compile", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "is not a run directory (no model.qgraph.npz)" in r.stderr
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((4, 1, 8, 8), np.nan, np.float32))
    r = _cli("quantize", "--model", "resnet_small", "--model-kwargs", '{"in_channels": 1, "num_classes": 10}',
             "--data", str(bad), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "NaN" in r.stderr
    assert not (tmp_path / "y").exists()


def test_cli_reconstruction_and_resume(tmp_path, digits):
    run = tmp_path / "rq"
    args = ("quantize", "--data", "digits", "--w-bits", "2", "--a-bits", "4", "--method", "qdrop", "--adaqtransform",
            "--iters", "200", "--calib-size", "256", "--out", str(run), "--json", str(tmp_path / "q.json"),
            "--no-progress")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["method"] == "qdrop" and q["adaqtransform"] is True and q["granularity"] == "block"
    assert (run / "recon_loss.png").stat().st_size > 0 and (run / "recon_loss.json").is_file()
    assert "interrupted" not in r.stdout + r.stderr
    assert not (run / "recon_checkpoint").exists()    # checkpoints go once the run succeeded (resume: test_firsthour)
    assert _cli("compile", str(run)).returncode == 0
    r = _cli("parity", str(run), "--json", str(tmp_path / "p.json"), "--per-layer-inputs", "0", "--no-progress")
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["bit_exact_vs_reference"] and p["so_top1"] > 0.85 and abs(p["so_top1"] - p["fakequant_top1"]) <= 0.003
