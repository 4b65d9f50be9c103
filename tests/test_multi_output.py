"""Models with several outputs (a tuple or a dict of tensors: logits + a feature map) through every command:
quantize (fidelity per output), eval (top-1 of the first (N, classes) output), bench (every runtime times the whole
forward), bundle (reference outputs of every output; `run_model.py --check` / `--output` handle them all).

The model is a user file (net.py) with two factories: ``build_tuple`` returns (logits, feature map), ``build_dict``
returns {"feat": feature map, "logits": logits} (the classification output second, so eval must pick it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from conftest import run_cli as _cli  # noqa: E402
from ptq2tvm import cli  # noqa: E402
from ptq2tvm.errors import DataError  # noqa: E402

MODEL_PY = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.aux = nn.Conv2d(8, 3, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        f = self.stem(x)
        logits, feat = self.fc(self.body(f)), self.aux(f)
        if self.as_dict:
            return {"feat": feat, "logits": logits}
        return logits, feat


def build_tuple():
    return Net(False)


def build_dict():
    return Net(True)


def build_feat_only():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
'''
# blocks every module a deployment host does not have: the bundle runs on numpy + apache-tvm-ffi alone
NO_TORCH = ("import sys, runpy\nfor m in ('tvm', 'torch', 'ptq2tvm'): sys.modules[m] = None\n"
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _load(path: Path, factory: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mo_net", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, factory)()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """net.py, net.pt (seeded weights, BN statistics of the data) and data.npz: 48 images, labels = the FP32
    model's own top-1 (so FP32 top-1 is 100% exactly when the logits are the output scored)."""
    root = tmp_path_factory.mktemp("multi")
    (root / "net.py").write_text(MODEL_PY)
    torch.manual_seed(0)
    model = _load(root / "net.py", "build_tuple")
    x = np.random.default_rng(0).standard_normal((48, 1, 12, 12)).astype(np.float32)
    model.stem[1].momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    model.eval()
    torch.save(model.state_dict(), root / "net.pt")
    with torch.no_grad():
        labels = model(torch.from_numpy(x))[0].argmax(1).numpy()
    np.savez(root / "data.npz", images=x, labels=labels)
    return root




@pytest.fixture(scope="module", params=["tuple", "dict"])
def run(request, project):
    """quantize (fidelity on 16 held-out images) + compile, in the project directory."""
    import os

    kind = request.param
    old = os.getcwd()
    os.chdir(project)
    try:
        rc = cli.main(["quantize", "--model", f"net.py:build_{kind}", "--checkpoint", "net.pt", "--data", "data.npz",
                       "--calib-size", "32", "--fidelity-images", "16", "--out", f"runs/{kind}", "--no-progress",
                       "--json", f"q_{kind}.json"])
        assert rc == 0
        assert cli.main(["compile", f"runs/{kind}", "--no-progress"]) == 0
    finally:
        os.chdir(old)
    return kind, project, project / "runs" / kind


def test_quantize_reports_fidelity_per_output(run):
    import json

    kind, root, path = run
    fid = json.loads((root / f"q_{kind}.json").read_text())["fidelity"]
    names = [o["name"] for o in fid["outputs"]]
    want = ["feat", "logits"] if kind == "dict" else ["output 0", "output 1"]
    assert names == want
    by = {o["name"]: o for o in fid["outputs"]}
    logits, feat = (by["logits"], by["feat"]) if kind == "dict" else (by["output 0"], by["output 1"])
    assert logits["shape"] == [16, 4] and feat["shape"] == [16, 3, 6, 6]
    assert logits["top1_agreement"] >= 0.75 and feat["top1_agreement"] is None   # only (N, classes) has a top-1
    assert logits["sqnr_db"] > 15 and feat["sqnr_db"] > 15
    assert fid["sqnr_db"] == min(o["sqnr_db"] for o in fid["outputs"])
    assert fid["top1_agreement"] == logits["top1_agreement"]


def test_fidelity_summary_prints_one_line_per_output(project):
    from ptq2tvm.api import fidelity, quantize

    model = _load(project / "net.py", "build_dict")
    model.load_state_dict(torch.load(project / "net.pt"))
    x = np.load(project / "data.npz")["images"]
    qm = quantize(model.eval(), x[:32], progress=False)
    assert fidelity(model, qm, x[:16]).summary().startswith("fidelity vs FP32 (no labels; 16 images): 2 outputs")
    rep = fidelity(model, qm, x[32:], held_out=True)        # the API says "not used for calibration" when told so
    lines = rep.summary().splitlines()
    assert lines[0].startswith("fidelity vs FP32 (no labels; 16 images not used for calibration): 2 outputs")
    assert lines[1].startswith("  'feat'    (N, 3, 6, 6)  SQNR ") and "top-1" not in lines[1]
    assert lines[2].startswith("  'logits'  (N, 4)        SQNR ") and "top-1 agreement" in lines[2]
    assert len(lines) == 3 and not rep.low


def test_eval_scores_the_first_classification_output(run, capsys, monkeypatch):
    from ptq2tvm import model_outputs

    monkeypatch.setattr(model_outputs, "_printed", set())   # the note is said once per process; other tests ran eval
    kind, root, path = run
    rc, out, err = _cli(capsys, "eval", path, "--trust-code", "--no-progress")
    assert rc == 0, err
    # labels are the FP32 logits' own top-1: 100% exactly iff the logits are what was scored
    assert "FP32 100.00%" in out, out
    which = "output 1 'logits'" if kind == "dict" else "output 0"
    assert f"top-1 of {which} (N, 4)" in err, err


def test_eval_without_a_classification_output_is_one_line(project, capsys, tmp_path):
    from ptq2tvm.api import top1_torch

    model = _load(project / "net.py", "build_feat_only").eval()
    x = np.load(project / "data.npz")["images"][:4]
    with pytest.raises(DataError, match=r"no output of the model is \(N, classes\): .*\(N, 2, 12, 12\)"):
        top1_torch(model, x, np.zeros(4, np.int64))


def test_bench_times_every_runtime_on_all_outputs(run, capsys):
    import json

    from ptq2tvm.bench.baselines import torch_fp32_runner
    from ptq2tvm.api import load_fp32

    kind, root, path = run
    rc, out, err = _cli(capsys, "bench", path, "--repeats", 1, "--warmup", 0, "--calls-per-turn", 1, "--threads", 1,
                        "--trust-code", "--no-progress", "--out-dir", root / f"bench_{kind}")
    assert rc == 0, err
    rows = json.loads((root / f"bench_{kind}" / "latency.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    runtimes = {r["runtime"] for r in rows}
    assert {"ptq2tvm", "torch_fp32", "ort_fp32", "ort_int8", "ort_ptq2tvm_qdq"} <= runtimes
    # the saved results say what ran and on what machine, how loaded (not only the printed warning)
    assert {r["runtime"]: r["precision"] for r in rows}["torch_fp32"] == "FP32"
    assert all(isinstance(r["loadavg_1min"], float) and r["cpu"] for r in rows)
    md = (root / f"bench_{kind}" / "latency.md").read_text()
    assert "logical CPUs, 1 thread(s) per runtime; 1-minute load average" in md
    assert "wrote " in out and "latency.json" in out
    # every runner returns every output, in the integer graph's order
    fp32 = load_fp32(path / "fp32.pt", trust_code=True)
    x = np.load(root / "data.npz")["images"][:1]
    outs = torch_fp32_runner(fp32, 1)(x)
    assert [o.shape for o in outs] == ([(1, 3, 6, 6), (1, 4)] if kind == "dict" else [(1, 4), (1, 3, 6, 6)])


def test_bench_times_the_so_given_at_its_batch(run, capsys):
    """``bench --so``: a .so compiled with another batch is timed, and every runtime runs that batch (latency.md names
    the file); a missing file, a folder, a sidecar or an empty path is one line saying which."""
    import json

    kind, root, path = run
    if kind != "tuple":
        pytest.skip("one output structure is enough for --so")
    so = path / "model_b3.so"
    rc, _, err = _cli(capsys, "compile", path, "--batch", 3, "--out", so, "--no-progress")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "bench", path, "--so", so, "--repeats", 1, "--warmup", 0, "--calls-per-turn", 1,
                        "--threads", 1, "--no-ort-int8", "--trust-code", "--no-progress", "--out-dir", root / "bench_b3")
    assert rc == 0, err
    rows = json.loads((root / "bench_b3" / "latency_model_b3.json").read_text())    # model.so's stay latency.*
    assert {r["batch"] for r in rows} == {3} and len(rows) >= 3
    assert [r["so"] for r in rows if r["runtime"] == "ptq2tvm"] == ["model_b3.so"]
    assert f"The .so: {so} (batch 3)" in (root / "bench_b3" / "latency_model_b3.md").read_text()
    assert (root / "bench_b3" / "latency_model_b3.png").is_file() and not (root / "bench_b3" / "latency.json").exists()
    for bad, says in ((path / "nope.so", "nope.so not found: compile it with `ptq2tvm compile"),
                      (path, "is a directory, not a compiled library"),
                      (path / "model_b3.json", "is a metadata sidecar, not a compiled library"),
                      ("", "the .so path is empty")):
        rc, out, err = _cli(capsys, "bench", path, "--so", bad, "--trust-code", "--no-progress")
        assert rc != 0 and says in err and "Traceback" not in err, (bad, err)


def test_bench_onnx_runners_return_every_output(run, tmp_path):
    from ptq2tvm.api import load_fp32
    from ptq2tvm.bench.baselines import export_onnx, ort_fp32_runner, torch_fp32_runner
    from ptq2tvm.bench.openvino_rt import openvino_available, openvino_runner

    kind, root, path = run
    fp32 = load_fp32(path / "fp32.pt", trust_code=True)
    x = np.load(root / "data.npz")["images"][:2]
    onnx_path = export_onnx(fp32, x, tmp_path / "m.onnx")
    want = torch_fp32_runner(fp32, 1)(x)
    runners = [ort_fp32_runner(onnx_path, 1)] + ([openvino_runner(onnx_path, 1)] if openvino_available() else [])
    for r in runners:
        got = r(x)
        assert isinstance(got, list) and len(got) == 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("onnx", [False, True], ids=["so", "onnx"])
def test_parity_scores_top1_on_the_classification_output(run, capsys, onnx):
    """parity's "top-1 agreement" of a two-output model was the fraction of exact elements (99.80% of 397 images,
    which no count of images gives); it is now the argmax agreement of the first (N, classes) output, named."""
    import json

    kind, root, path = run
    js = root / f"parity_{kind}_{onnx}.json"
    assert cli.main(["parity", str(path), "--data", str(root / "data.npz"), "--per-layer-inputs", "0",
                     "--no-progress", "--json", str(js)] + (["--onnx"] if onnx else [])) == 0
    out = capsys.readouterr().out
    p = json.loads(js.read_text())
    n = p["n_inputs"]
    agree = p["top1_agreement_vs_reference"] if onnx else p["top1_agreement_vs_fakequant"]
    assert agree is not None and abs(agree * n - round(agree * n)) < 1e-9, p       # a share of the images
    if not onnx:
        assert p["scored_output"] == ("output 1 'logits' (fc)" if kind == "dict" else "output 0 (fc)"), p
        assert f"({p['scored_output']})" in out, out
        assert p["so_top1"] == p["reference_top1"] and p["so_top1"] is not None


def test_parity_of_a_model_without_a_classification_output_reports_no_top1(project, tmp_path, capsys):
    import json

    run = tmp_path / "feat"
    assert cli.main(["quantize", "--model", f"{project / 'net.py'}:build_feat_only", "--data",
                     str(project / "data.npz"), "--calib-size", "16", "--fidelity-images", "0", "--out", str(run),
                     "--no-progress"]) == 0
    assert cli.main(["compile", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["parity", str(run), "--data", str(project / "data.npz"), "--n", "8", "--per-layer-inputs", "0",
                     "--no-progress", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["bit_exact_vs_reference"] and p["top1_agreement_vs_fakequant"] is None and "top-1" not in out, out


def test_bundle_checks_and_writes_every_output(run, tmp_path):
    from ptq2tvm.ir.graph import IntegerGraph
    from ptq2tvm.ir.reference import run_reference

    kind, root, path = run
    out = tmp_path / "deploy"
    assert cli.main(["bundle", str(path), "--out", str(out)]) == 0
    graph = IntegerGraph.load(path / "model.qgraph.npz")
    ref = np.load(out / "check_output.npz")
    assert list(ref.files) == graph.output_names
    want = run_reference(graph, np.load(out / "check_input.npy"))
    for name, w in zip(graph.output_names, want):
        assert np.array_equal(ref[name], w)

    def runner(*argv):
        return subprocess.run([sys.executable, "-c", NO_TORCH, str(out / "run_model.py"), *map(str, argv)],
                              capture_output=True, text=True, cwd=tmp_path)

    r = runner("--check")
    n = sum(w.size for w in want)
    assert r.returncode == 0 and f"bit-exact (0 of {n} output elements differ, 8 inputs)" in r.stdout, r.stderr
    # a flipped element in the second output is found
    bad = {k: ref[k] for k in ref.files}
    last = graph.output_names[1]
    bad[last] = bad[last].copy()
    bad[last].reshape(-1)[0] ^= 1
    np.savez(out / "check_output.npz", **bad)
    r = runner("--check")
    assert r.returncode == 1 and f"MISMATCH (1 of {n} output elements differ" in r.stdout and last in r.stdout
    # float in, every output out (.npz, one array per output), each equal to the reference's dequantized codes
    x = np.load(root / "data.npz")["images"][:3]
    np.save(tmp_path / "x.npy", x)
    r = runner("--input", tmp_path / "x.npy", "--output", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npz")
    names = ["feat", "logits"] if kind == "dict" else graph.output_names    # a dict model's own keys
    assert list(y.files) == names
    ref = run_reference(graph, graph.input.quantize(x))
    for t, name, w in zip(graph.outputs, names, ref):
        np.testing.assert_array_equal(y[name], t.dequantize(w))
    cls = [n for n, w in zip(names, ref) if w.ndim == 2][0]
    line = f"{cls!r} (N, 4) top-1:" if kind == "dict" else f"{cls} (N, 4) top-1:"     # a dict model's keys quoted
    assert line in r.stdout, r.stdout
    r = runner("--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert r.returncode == 2 and "several outputs" in r.stderr and ".npz" in r.stderr, r.stderr
