"""Mixed precision: the allocation ILP on a hand-checked problem, per-layer bits from the user (checked names),
sensitivity, and a mixed W4/W8 + A4/A8 graph bit-exact on both CPU backends and in the CUDA emulation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import TinyNet, randomize_bn
from ptq2tvm.errors import QuantConfigError
from ptq2tvm.mixed.ilp import solve_allocation
from ptq2tvm.mixed.layerbits import parse_layer_bits, resolve_layer_bits

TINY_LAYERS = ["stem", "block1.conv1", "block1.conv2", "block2.downsample.0", "block2.conv1", "block2.conv2",
               "ir.conv.0", "ir.conv.3", "ir.conv.6", "grouped", "fc"]
MIXED_SPEC = "block1.*=4/4,block2.conv2=4/8,ir.conv.0=8/4,ir.conv.6=2/4,grouped=4/8"


def test_ilp_toy_problem_hand_checked():
    # 3 layers x (W8, W4); W8 costs 4 bytes and no sensitivity, W4 costs 2 bytes and 1 / 5 / 2.
    sens = np.array([[0.0, 1.0], [0.0, 5.0], [0.0, 2.0]])
    size = np.array([[4.0, 2.0]] * 3)
    # budget 8 of 12: two layers must drop to W4; by hand the cheapest pair is {0, 2} (1 + 2 = 3 < 1 + 5 < 5 + 2)
    sol = solve_allocation(sens, {"size": size}, {"size": 8.0})
    assert sol.choice == [1, 0, 1] and sol.objective == pytest.approx(3.0) and sol.totals["size"] == 8.0
    assert solve_allocation(sens, {"size": size}, {"size": 10.0}).choice == [1, 0, 0]      # one layer: the 1
    assert solve_allocation(sens, {"size": size}, {"size": 12.0}).choice == [0, 0, 0]
    # two budgets at once: a latency where W4 of layer 0 is slower than W8 -> layer 0 must stay at W8
    lat = np.array([[1.0, 3.0], [1.0, 1.0], [1.0, 1.0]])
    sol = solve_allocation(sens, {"size": size, "lat": lat}, {"size": 10.0, "lat": 3.0})
    assert sol.choice == [0, 0, 1] and sol.objective == pytest.approx(2.0)
    # a disallowed candidate (NaN) is never chosen: layer 0 pinned to W8 -> {1, 2} at budget 8 (5 + 2)
    pinned = sens.copy()
    pinned[0, 1] = np.nan
    assert solve_allocation(pinned, {"size": size}, {"size": 8.0}).choice == [0, 1, 1]
    # tied activation bits: candidates W8A8, W8A4 (A4 cheaper in BOPs); layers 0 and 1 read one tensor
    sens2 = np.array([[0.0, 1.0], [0.0, 9.0], [0.0, 4.0]])
    bops = np.array([[4.0, 2.0]] * 3)
    free = solve_allocation(sens2, {"bops": bops}, {"bops": 10.0}, a_bits=[8, 4])
    assert free.choice == [1, 0, 0]
    tied = solve_allocation(sens2, {"bops": bops}, {"bops": 10.0}, a_bits=[8, 4], tied=[[0, 1]])
    assert tied.choice == [0, 0, 1] and tied.objective == pytest.approx(4.0)
    with pytest.raises(QuantConfigError, match=r"size budget 5: the smallest reachable total is 6"):
        solve_allocation(sens, {"size": size}, {"size": 5.0}, layer_names=["a", "b", "c"])


def test_layer_bits_spec_and_names_checked():
    assert parse_layer_bits("a=4/8, b.*=2") == [("a", 4, 8), ("b.*", 2, None)]
    w, a = resolve_layer_bits(MIXED_SPEC, TINY_LAYERS)
    assert w == {"block1.conv1": 4, "block1.conv2": 4, "block2.conv2": 4, "ir.conv.0": 8, "ir.conv.6": 2,
                 "grouped": 4}
    assert a["block1.conv1"] == 4 and a["grouped"] == 8
    with pytest.raises(QuantConfigError, match="'blok1.conv1' matches no conv/linear layer.*valid layer names: "
                       "stem, block1.conv1, block1.conv2"):
        resolve_layer_bits("blok1.conv1=4/8", TINY_LAYERS)
    for bad in ("stem=4/9", "stem", "stem=x/8", "=4"):
        with pytest.raises(QuantConfigError):
            parse_layer_bits(bad)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyNet()).eval()


def test_quant_config_rejects_unknown_layer_and_conflicting_inputs():
    from ptq2tvm.api import quantize
    from ptq2tvm.frontend.qmodel import QuantConfig

    x = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
    with pytest.raises(QuantConfigError, match=r"layer_w_bits: no conv/linear layer named 'block1.conv9'.*valid "
                       r"layer names: stem, block1.conv1"):
        quantize(_tiny(), x, QuantConfig(layer_w_bits={"block1.conv9": 4}), progress=False)
    # block2.conv1 and block2.downsample.0 read the same tensor: their input bits must agree
    with pytest.raises(QuantConfigError, match="read the same tensor 'block1.conv2' but ask for 4 and 8"):
        quantize(_tiny(), x, QuantConfig(layer_a_bits={"block2.conv1": 4, "block2.downsample.0": 8}), progress=False)


def _mixed_graph():
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig

    w, a = resolve_layer_bits(MIXED_SPEC, TINY_LAYERS)
    calib = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
    return to_integer(quantize(_tiny(), calib, QuantConfig(layer_w_bits=w, layer_a_bits=a), progress=False))


def test_mixed_graph_bits_and_bit_exact_on_both_cpu_backends(tmp_path):
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = _mixed_graph()
    bits = graph.meta["layer_bits"]
    assert bits["block1.conv1"] == dict(w_bits=4, a_bits=4, out_bits=4)       # its output: block1.conv2's input
    assert bits["block1.conv2"]["a_bits"] == 4 and bits["ir.conv.6"]["w_bits"] == 2
    assert bits["ir.conv.0"] == dict(w_bits=8, a_bits=4, out_bits=8) and bits["stem"]["w_bits"] == 8
    assert bits["fc"] == dict(w_bits=8, a_bits=8, out_bits=8)                  # first/last at 8 by default
    assert int(np.abs(graph.tensor("block1.conv1").qmax)) == 15                # block1.conv2's input: 4 bit
    q = np.random.default_rng(1).integers(0, graph.input.qmax + 1, (6, *graph.input.shape)).astype(np.uint8)
    ref = run_reference(graph, q)
    sizes = {}
    for schedule in ("auto", "plain"):
        res = compile_graph(graph, tmp_path / f"{schedule}.so", batch=3, schedule=schedule)
        assert res.meta["graph_meta"]["layer_bits"] == bits                    # the sidecar reports every layer
        assert np.array_equal(CompiledModel(res.so_path).run_int(q), ref), schedule
        sizes[schedule] = res.meta["stored_weight_bytes"]
    # packed int4 next to int8: the blocked build stores exactly what the per-layer size model predicts, less
    # than the same build with every weight int8
    from ptq2tvm.mixed.latency import measure_layer_costs

    costs = measure_layer_costs(graph, timed=False, progress=False)
    assert sizes["auto"] == costs.predict_bytes({n: b["w_bits"] for n, b in bits.items()})
    assert sizes["auto"] < costs.predict_bytes({n: 8 for n in bits}) - 2000


@pytest.mark.skipif(not __import__("kernels.cuda_emulator", fromlist=["x"]).available(),
                    reason="no g++ to run the CUDA emulation")
def test_mixed_graph_bit_exact_in_cuda_emulation():
    """Every kernel of the mixed graph's CUDA build (int4-unpacking dp4a convs next to int8 ones, 4-bit and 8-bit
    activations) run in the CUDA emulation equals the same PrimFunc compiled for this CPU."""
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel

    checked = emulate_every_kernel(_mixed_graph(), batch=2, seed=3)
    assert {"k_block1_conv1", "k_block2_conv2", "k_ir_conv_6", "k_grouped", "k_fc"} <= set(checked)


def test_sensitivity_and_allocation_on_tiny(tmp_path):
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.mixed.allocate import allocate
    from ptq2tvm.mixed.latency import measure_layer_costs
    from ptq2tvm.mixed.sensitivity import analyze_sensitivity, load_sensitivity, plot_sensitivity

    model = _tiny()
    calib = np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)
    rep = analyze_sensitivity(model, calib, hutchinson_samples=4, progress=False)
    assert rep.layer_names() == TINY_LAYERS
    for lay in rep.layers:
        c = lay.candidates
        # fewer bits, larger FP32-output error (the same calibrated quantizers, one layer at a time)
        assert c["W8A8"]["output_sqnr_db"] > c["W4A8"]["output_sqnr_db"] > c["W2A8"]["output_sqnr_db"]
        assert c["W8A8"]["output_sqnr_db"] > c["W8A4"]["output_sqnr_db"]
        if lay.trace_w > 0:       # the same trace times a larger weight error
            assert c["W2A8"]["omega_w"] > c["W4A8"]["omega_w"] > c["W8A8"]["omega_w"]
    assert next(lay for lay in rep.layers if lay.name == "block2.conv1").readers == 2
    rep.save(tmp_path / "s.json")
    again = analyze_sensitivity(model, calib, hutchinson_samples=4, progress=False, cache=tmp_path / "s.json")
    assert again.to_dict() == load_sensitivity(tmp_path / "s.json").to_dict()
    assert plot_sensitivity(rep, tmp_path / "s.png").stat().st_size > 10_000
    graph8 = to_integer(quantize(model, calib, QuantConfig(), progress=False))
    costs = measure_layer_costs(graph8, timed=False, progress=False)
    plan = allocate(rep, costs, graph8, {"size": "0.6", "bops": "0.5"})
    assert plan.fixed == ["fc", "stem"] and plan.bits["stem"] == [8, 8] and plan.bits["fc"] == [8, 8]
    assert plan.predicted["size"] <= 0.6 * plan.w8a8["size"] and plan.predicted["bops"] <= 0.5 * plan.w8a8["bops"]
    assert plan.bits["block2.conv1"][1] == plan.bits["block2.downsample.0"][1]      # tied input bits
    graph = to_integer(quantize(model, calib, plan.config(QuantConfig()), progress=False))
    assert {n: [b["w_bits"], b["a_bits"]] for n, b in graph.meta["layer_bits"].items()} == plan.bits
    res = compile_graph(graph, tmp_path / "m.so", batch=1)
    assert res.meta["stored_weight_bytes"] == plan.predicted["size"]         # the size model is the .so's bytes
    with pytest.raises(QuantConfigError, match="size budget"):
        allocate(rep, costs, graph8, {"size": "0.1"})
    with pytest.raises(QuantConfigError, match="latency budget needs measured"):
        allocate(rep, costs, graph8, {"latency": "0.9"})


def test_cli_layer_bits_typo_names_valid_layers(tmp_path, capsys):
    from ptq2tvm.cli import main
    from ptq2tvm.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "sd.pt"
    torch.save(create_model("resnet_small", in_channels=1, num_classes=10).state_dict(), ckpt)
    args = ["quantize", "--model", "resnet_small", "--model-kwargs", '{"in_channels": 1, "num_classes": 10}',
            "--checkpoint", str(ckpt), "--data", "digits", "--calib-size", "16", "--no-progress"]
    assert main([*args, "--layer-bits", "layer1.0.conv3=4/8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"'layer1.0.conv3' matches no conv/linear layer of this model; valid layer names: conv1, "
                     r"layer1.0.conv1, layer1.0.conv2, .*layer2.0.downsample.0, .*fc", err), err
    assert not (tmp_path / "x").exists()
    assert main([*args, "--layer-bits", "layer2.*=4/4,layer3.1.conv2=2", "--out", str(tmp_path / "r"),
                 "--json", str(tmp_path / "q.json")]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["layer_bits"]["layer2.1.conv2"] == dict(w_bits=4, a_bits=4, out_bits=8)   # read by layer3.0: 8
    assert info["layer_bits"]["layer3.1.conv2"]["w_bits"] == 2 and info["layer_bits"]["layer1.0.conv1"]["w_bits"] == 8
    assert json.loads((tmp_path / "q.json").read_text())["layer_bits"] == info["layer_bits"]
    assert main([*args, "--size-budget", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "need --mixed-precision" in capsys.readouterr().err
