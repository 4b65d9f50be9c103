"""A new user's first hour, leftovers of the s8 trial (/work/notes/s8/newuser.md, finding 13 and the helpers'
reports): eval --json names the output it scored, low-fidelity advice that follows what the run did, one rule for
the ONNX weight container, channel hints that fit the data source, percentages that never round to 100, the bench
table's FP32 rows and model names, the mixed-precision headline and sizes, the reconstruction time line, short
checkpoint-mismatch errors, one name for the Hessian-trace estimator.

Runs on the user projects of test_firsthour2 (1-channel 16x16 net.py, data.npz, a PNG folder) and test_multi_output
(a model returning (logits, feature map) or a dict of them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from conftest import run_cli as _cli  # noqa: E402
from test_firsthour2 import proj  # noqa: E402,F401 - the fixture (1-channel 16x16 user project)
from test_multi_output import project  # noqa: E402,F401 - the fixture (two-output user project)


def _quantize(capsys, *argv):
    return _cli(capsys, "quantize", "--model", "net.py:build", "--checkpoint", "net.pt", "--calib-size", 16,
                "--no-progress", *argv)


# ---- 1: eval --json says which output top-1 was computed on ---------------------------------------------------
def test_eval_json_records_the_scored_output(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    rc, _, err = _cli(capsys, "quantize", "--model", "net.py:build_dict", "--checkpoint", "net.pt", "--data",
                      "data.npz", "--calib-size", 16, "--fidelity-images", 0, "--out", "runs/d3", "--no-progress")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "eval", "runs/d3", "--trust-code", "--json", "e.json", "--no-progress")
    assert rc == 0, err
    res = json.loads((project / "e.json").read_text())
    # build_dict returns {"feat": map, "logits": (N, 4)}: the logits, second in graph order, are scored
    assert res["scored_output"] == {"index": 1, "name": "logits", "n_outputs": 2}
    assert out.startswith("top-1 on ") and "FP32 100.00%" in out        # the printed line stays
    assert "top-1 of output 1 'logits' (N, 4)" in err


# ---- 2 + 8: the low-fidelity advice and the reconstruction time line fit the run ----------------------------
def test_low_fidelity_advice_follows_what_the_run_already_did():
    from ptq2tvm.fidelity_report import FidelityReport, low_fidelity_advice

    low = FidelityReport(n_images=16, held_out=True, sqnr_db=3.0, top1_agreement=0.5)
    assert "a reconstruction method (--method qdrop)" in low.summary()   # calibration only (the API's default)
    for method in ("qdrop", "brecq", "nwq"):
        text = low.summary(low_fidelity_advice(method, adaqtransform=False, iters=200, bits=(2, 4)))
        assert "(--method qdrop)" not in text and f"--method {method} already reconstructed" in text
        assert "more --iters (this run: 200)" in text and "--adaqtransform" in text and "--mixed-precision" in text
    text = low_fidelity_advice("qdrop", adaqtransform=True, iters=200, bits=(2, 4), mixed=True)
    assert "--adaqtransform" not in text and "--mixed-precision" not in text and "more bits" in text
    assert "more bits" not in low_fidelity_advice("rtn", bits=(8, 8))
    assert "block-wise --method qdrop" in low_fidelity_advice("adaround", iters=10, bits=(4, 4))
    # BRECQ at W4A4 on a SiLU + SE model: 46% against 81% for QDrop (a new-user helper); its advice names QDrop first
    assert low_fidelity_advice("brecq", iters=10, bits=(4, 4)).startswith(
        "--method brecq already reconstructed: try --method qdrop (BRECQ learns the roundings with FP activations")


def test_qdrop_run_gets_reconstruction_advice_and_no_other_models_rate(proj, capsys, monkeypatch):
    monkeypatch.chdir(proj)
    torch.manual_seed(0)
    rc, out, err = _quantize(capsys, "--data", "data.npz", "--w-bits", 2, "--a-bits", 2, "--no-first-last-8bit",
                             "--method", "qdrop", "--iters", 3, "--batch-size", 8, "--fidelity-images", 16,
                             "--out", "runs/q3")
    assert rc == 0, err
    assert "resnet_small" not in err and "depends on the model and input size" in err, err
    if "low fidelity" in out:          # W2A2 everywhere after 3 iterations: expected low
        assert "--method qdrop already reconstructed" in out and "(--method qdrop)" not in out, out


# ---- 3: one rule for the ONNX weight container -----------------------------------------------------------------
def test_onnx_entry_points_share_choose_weights_and_reject_unknown_containers():
    pytest.importorskip("onnxruntime")
    from conftest import tiny_integer_graph

    from ptq2tvm import onnx_parity
    from ptq2tvm.errors import ArtifactError
    from ptq2tvm.onnx_export import choose_weights

    assert not hasattr(onnx_parity, "resolve_weights")       # the duplicate of choose_weights is gone
    graph = tiny_integer_graph(8, 8)
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 12)).astype(np.float32)
    # before: 'int4' (or a typo) passed straight through and silently ran int8 weights
    with pytest.raises(ArtifactError, match="weights must be auto, int8 or uint8, got 'int4'"):
        onnx_parity.ort_output_codes(graph, x, weights="int4")
    with pytest.raises(ArtifactError, match="weights must be auto"):
        onnx_parity.run_onnx_parity(graph, x, weights="uint4", per_layer_inputs=0, progress=False)
    codes, _, export = onnx_parity.ort_output_codes(graph, x, weights="auto")
    assert codes.shape == (2, 10) and export.weights == choose_weights("auto")[0]


# ---- 4: the channel hint fits where the images came from ---------------------------------------------------
def test_channel_mismatch_hint_fits_the_data_source(proj, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(proj)
    rgb = np.random.default_rng(0).standard_normal((20, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    (tmp_path / "prep.py").write_text("import numpy as np\n\ndef rgb(img):\n"
                                      "    return np.asarray(img.convert('RGB'), np.float32).transpose(2, 0, 1) / 255\n")
    cases = {  # data source -> (extra options, what the hint must say, what it must not)
        "array": (("--data", tmp_path / "rgb.npy"), "convert the array's channels before saving it", "--channels"),
        "folder": (("--data", "imgs", "--channels", 3, "--input-size", 16), "pass --channels 1", "array"),
        "preprocess": (("--data", "imgs", "--preprocess", f"{tmp_path / 'prep.py'}:rgb"),
                       "the --preprocess function must return (1, H, W) arrays", "--channels"),
    }
    for source, (extra, want, never) in cases.items():
        rc, out, err = _quantize(capsys, *extra, "--fidelity-images", 0, "--out", tmp_path / source)
        assert rc == 2 and "expects 1-channel input" in err and want in err and never not in err, (source, err)
        assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err
    from ptq2tvm.data.checks import channel_hint

    assert "x.transpose(0, 3, 1, 2)" in channel_hint(3, 16, (4, 16, 16, 3), "array")   # channels-last still wins


# ---- 5: parity never prints 100.00% for a layer with mismatches ----------------------------------------------
def test_parity_percentages_do_not_round_up_to_100():
    from ptq2tvm.parity import LayerParity, ParityReport
    from ptq2tvm.units import percent

    assert (percent(0.99996), percent(1.0), percent(0.00004), percent(0.0), percent(0.29)) == \
        ("99.99", "100.00", "0.01", "0.00", "29.00")
    rep = ParityReport(n_inputs=4, bit_exact_vs_reference=True, mismatched_elements=0, n_elements=40,
                       exact_fraction_vs_fakequant=0.99999, max_abs_lsb_vs_fakequant=1,
                       top1_agreement_vs_fakequant=1.0, top1_agreement_vs_reference=1.0,
                       per_layer=[LayerParity("down.0", "conv2d", 1 - 4e-5, 1, 4e-5, {"0": 24999, "1": 1}, "W8 A8->A8"),
                                  LayerParity("fc", "dense", 1.0, 0, 0.0, {"0": 40}, "W8 A8->A8")],
                       per_layer_inputs=4)
    text = rep.summary()
    assert "99.99% exact" in text and "down.0 conv2d     W8 A8->A8  exact  99.99%" in text
    assert "fc     dense      W8 A8->A8  exact 100.00%" in text


# ---- 6: the bench table labels FP32 baselines FP32 and shows a model file by its name ---------------------------
def test_bench_table_fp32_rows_and_model_file_name():
    from ptq2tvm.bench.report import format_table, markdown_table
    from ptq2tvm.bench.runner import model_label

    name = model_label("/home/user/proj/net.py:build")
    assert name == "net.py:build" and model_label("resnet_small") == "resnet_small"
    assert model_label("/data/models/m.onnx") == "m.onnx"
    rows = [dict(model=name, input="1x16x16", batch=1, w_bits=4, a_bits=4, runtime=rt, median_ms=1.0, p10_ms=0.9,
                 p90_ms=1.1, threads=2, vpdpbusd_count=None)
            for rt in ("ptq2tvm", "torch_fp32", "ort_fp32", "ort_int8", "openvino_fp32", "ort_ptq2tvm_qdq")]
    lines = format_table(rows).splitlines()[2:]
    bits = {ln.split()[4]: ln.split()[3] for ln in lines}
    assert bits == {"ptq2tvm": "W4A4", "torch_fp32": "FP32", "ort_fp32": "FP32", "ort_int8": "W8A8",
                    "openvino_fp32": "FP32", "ort_ptq2tvm_qdq": "W4A4"}
    assert "| net.py:build | 1x16x16 | 1 | FP32 | torch_fp32 |" in markdown_table(rows)


# ---- 7 + 10: the mixed-precision headline counts layers per bit width; sizes agree or say why ----------------
def test_mixed_precision_headline_and_sizes(proj, capsys, monkeypatch):
    from ptq2tvm.units import size_text

    assert (size_text(980), size_text(9792), size_text(13_772_000), size_text(999_960)) == \
        ("980 B", "9.8 kB", "13.8 MB", "1.0 MB")
    monkeypatch.chdir(proj)
    rc, out, err = _quantize(capsys, "--data", "data.npz", "--fidelity-images", 0, "--mixed-precision",
                             "--size-budget", 0.5, "--hutchinson-samples", 2, "--json", "mp.json", "--out", "runs/mp3")
    assert rc == 0, err
    res = json.loads((proj / "mp.json").read_text())
    counts: dict[str, int] = {}
    for b in res["layer_bits"].values():
        counts[f"W{b['w_bits']}A{b['a_bits']}"] = counts.get(f"W{b['w_bits']}A{b['a_bits']}", 0) + 1
    assert len(counts) > 1, res["layer_bits"]                  # a budget of half of W8A8 mixes bit widths
    head = out.splitlines()[[i for i, ln in enumerate(out.splitlines()) if ln.startswith("quantized ")][0]]
    assert "W8A8 (" not in head and all(f"{k} x{v}" in head for k, v in counts.items()), head
    assert head.startswith("quantized net.py:build mixed ")
    info = json.loads((proj / "runs/mp3/run.json").read_text())
    assert info["bits"] == res["bits"] == head.split("quantized net.py:build ", 1)[1].split(" (", 1)[0]
    assert info["bits"].startswith("mixed ") and all(f"{k} x{v}" in info["bits"] for k, v in counts.items())
    plan = info["mixed_precision"]
    assert plan["units"] == {"latency": "s", "size": "bytes", "bops": "BOPs"}      # the figures' units, in the file
    size = plan["predicted"]["size"]
    assert f"size {size_text(size)} with channel padding" in out, out
    assert (f"stored weights {size_text(res['weight_bytes'])} in this CPU's default build at batch 1, channel "
            f"padding included" in out and f"the plan predicted {size_text(size)}" in out), out
    assert res["weight_bytes"] == size            # the plan's size is what the default build stores


# ---- 9: a checkpoint of another model: counts and the first few keys, not hundreds -------------------------
def test_checkpoint_mismatch_error_is_short_with_counts(tmp_path):
    import torch.nn as nn

    from ptq2tvm.api import load_checkpoint
    from ptq2tvm.errors import ArtifactError

    def net():
        return nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)) for _ in range(40)])

    torch.manual_seed(0)
    sd = {f"module.{k}": v for k, v in net().state_dict().items()}        # saved from DataParallel: 280 keys
    torch.save(sd, tmp_path / "dp.pt")
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(net(), tmp_path / "dp.pt")
    msg = str(e.value)
    assert "280 missing key(s) (0.0.weight, 0.0.bias, 0.1.weight, ... (277 more))" in msg, msg
    assert "280 unexpected key(s) (module.0.0.weight" in msg and "starts with 'module.'" in msg
    assert len(msg) < 600 and "\n" not in msg
    other = net()
    other[3][0] = nn.Conv2d(4, 4, 5)                                        # one shape differs
    torch.save(other.state_dict(), tmp_path / "shape.pt")
    with pytest.raises(ArtifactError, match=r"does not fit the model: 1 shape mismatch\(es\), checkpoint vs model "
                       r"\(3\.0\.weight \(4, 4, 5, 5\) vs \(4, 4, 3, 3\)\)$"):
        load_checkpoint(net(), tmp_path / "shape.pt")


# ---- 14: one name for the Hessian-trace estimator --------------------------------------------------------------
def test_trace_estimator_has_one_name_on_quantize_and_sensitivity(capsys):
    from ptq2tvm import cli

    p = cli.build_parser()
    for argv in (["sensitivity", "r", "--trace-estimator", "hutchinson"], ["sensitivity", "r", "--estimator",
                                                                          "hutchinson"],
                 ["quantize", "--trace-estimator", "hutchinson"]):
        assert p.parse_args(argv).trace_estimator == "hutchinson", argv
    assert p.parse_args(["sensitivity", "r"]).trace_estimator == "gauss-newton"
    sub = p._subparsers._group_actions[0].choices["sensitivity"]
    helptext = sub.format_help()
    assert "--trace-estimator" in helptext and "--estimator" not in helptext.replace("--trace-estimator", "")
