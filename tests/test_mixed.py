"""Mixed precision: the allocation ILP on a hand-checked problem, per-layer bits from the user (checked names),
sensitivity, and a mixed W4/W8 + A4/A8 graph bit-exact on both CPU backends and in the CUDA emulation."""

from __future__ import annotations

import dataclasses
import itertools
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


def test_ilp_optimum_does_not_depend_on_the_unit_of_the_sensitivities():
    """HiGHS stops at an absolute gap of 1e-6: sensitivities of 1e-9 (a Hessian trace of a small layer) once gave
    a plan 3x worse than the optimum. Against brute force over all 3^8 plans, at every scale."""
    rng = np.random.default_rng(0)
    sens = rng.random((8, 3)) * np.array([0.01, 1.0, 5.0]) * 10.0 ** rng.uniform(-4, 0, (8, 1))
    cost = rng.random((8, 3)) * np.array([4.0, 2.0, 1.0]) + 0.1
    budget = 0.55 * cost.sum() / 3
    plans = [ch for ch in itertools.product(range(3), repeat=8) if cost[range(8), ch].sum() <= budget]
    best = min(plans, key=lambda ch: sens[range(8), ch].sum())
    for scale in (1e6, 1.0, 1e-6, 1e-9, 1e-12):
        sol = solve_allocation(sens * scale, {"size": cost}, {"size": budget})
        assert tuple(sol.choice) == best, scale
        assert sol.objective == pytest.approx(scale * sens[range(8), best].sum(), rel=1e-9)
    # everything at the least sensitive candidate fits: that is the plan, however small the numbers
    tiny = np.array([[7e-15, 5.85e-11, 2e-10]] * 4)
    assert solve_allocation(tiny, {"size": cost[:4]}, {"size": cost[:4].sum()}).choice == [0, 0, 0, 0]
    # tied activation bits survive the final pass (candidates W8A8, W4A4; layers 0 and 1 read one tensor)
    sens2 = np.array([[0.0, 3e-12], [0.0, 1e-12], [0.0, 5e-12]])
    bops = np.array([[4.0, 1.0]] * 3)
    tied = solve_allocation(sens2, {"bops": bops}, {"bops": 9.0}, a_bits=[8, 4], tied=[[0, 1]])
    assert tied.choice == [1, 1, 0]


def test_ilp_plans_keep_budgets_in_seconds_and_sensitivities_over_many_decades():
    """Found by trying to break the solver: latency costs in seconds (layers of 2-22 us) gave plans up to 2.6% over
    the budget and a false "infeasible" (HiGHS accepts a row ~1e-7 over its limit), and sensitivities spanning 1e-15
    .. 1e3 gave plans up to 57x worse than the optimum. Vectorized brute force over all 4^6 plans per problem."""
    rng = np.random.default_rng(1)
    plans = np.array(list(itertools.product(range(4), repeat=6)))
    rows = np.arange(6)
    for trial in range(40):
        lat = (rng.random((6, 4)) + 0.1) * 2e-5
        sens = 10.0 ** rng.uniform(-15, 3, (6, 4)) if trial % 2 else rng.random((6, 4))
        lo_t, hi_t = lat.min(axis=1).sum(), lat.max(axis=1).sum()
        budget = float(lo_t + (0.01 if trial == 0 else rng.random()) * (hi_t - lo_t))
        totals = lat[rows, plans].sum(axis=1)
        objs = np.where(totals <= budget, sens[rows, plans].sum(axis=1), np.inf)
        sol = solve_allocation(sens, {"latency": lat}, {"latency": budget})
        assert sol.totals["latency"] <= budget * (1 + 1e-9), trial
        assert sol.objective <= objs.min() * (1 + 1e-6), (trial, sol.objective, objs.min())
    # a two-layer swap that no single move reaches: 1e-7 + 0 against 0 + 1e-8
    sens3 = np.array([[0.0, 1.0], [0.0, 1e-7], [0.0, 1e-8]])
    size3 = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert solve_allocation(sens3, {"size": size3}, {"size": 1.0}).choice == [0, 0, 1]


def test_kernel_class_follows_the_dot_product_the_builder_proves_exact():
    """The latency model times a W8 layer as the kernel the AVX2 build really runs: vpmaddubsw when the pair sums
    provably fit int16 (<= 7-bit weights or <= 7-bit inputs, checked with the builder's own proof), else vpmaddwd."""
    from kernels.layout import pack_conv_weight, u8s8_pairs_exact
    from ptq2tvm.mixed.latency import kernel_class

    assert kernel_class(8, 8, "avx2") == "int8" and kernel_class(8, 4, "avx2") == "int8ubsw"
    assert kernel_class(7, 8, "avx2") == "int8ubsw" and kernel_class(5, 8, "avx2") == "int8ubsw"
    assert kernel_class(8, 4, "vnni") == "int8" and kernel_class(7, 8, "avxvnni") == "int8"
    assert kernel_class(4, 4, "avx2") == "int4" and kernel_class(2, 8, "avx2", int2=True) == "int2"
    assert kernel_class(2, 8, "avx2") == "int4"
    rng = np.random.default_rng(0)
    w7 = rng.integers(-64, 64, (32, 16, 3, 3)).astype(np.int8)
    w8 = np.full((32, 16, 3, 3), -128, np.int8)
    assert u8s8_pairs_exact(pack_conv_weight(w7, isa="vnni"), 255)       # W7A8: exact
    assert u8s8_pairs_exact(pack_conv_weight(w8, isa="vnni"), 127)       # W8A7: exact
    assert not u8s8_pairs_exact(pack_conv_weight(w8, isa="vnni"), 255)   # W8A8: not


def test_layer_macs_with_and_without_the_padding_taps():
    """layer_macs counts output x (C_in / groups) x KH x KW; with skip_padding only the products on real input, which
    a conv of all-ones weights over an all-ones image counts independently (stride 2, groups, depthwise, 1x1)."""
    import torch.nn.functional as F

    from conftest import tiny_integer_graph
    from ptq2tvm.mixed.latency import layer_macs

    graph = tiny_integer_graph(8, 8)
    every, real = layer_macs(graph), layer_macs(graph, skip_padding=True)
    assert set(every) == set(real) == set(TINY_LAYERS)
    for n in graph.nodes:
        if n.op != "conv2d":
            continue
        w = n.arrays["weight"]
        c, h, wd = graph.tensor(n.inputs[0]).shape
        ones = F.conv2d(torch.ones(1, c, h, wd), torch.ones(w.shape, dtype=torch.float32), stride=n.attrs["stride"],
                        padding=n.attrs["padding"], dilation=n.attrs["dilation"], groups=n.attrs["groups"])
        assert tuple(ones.shape[1:]) == n.out.shape, n.name
        assert real[n.name] == int(ones.sum()), n.name
        assert every[n.name] == ones.numel() * int(np.prod(w.shape[1:])), n.name
        assert (real[n.name] < every[n.name]) == (max(n.attrs["padding"]) > 0), n.name
    assert real["fc"] == every["fc"] == 16 * 10
    # the stem: 3x3, padding 1 on 12x12: 34 of 36 taps per axis real
    assert real["stem"] * 36 * 36 == every["stem"] * 34 * 34


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


@pytest.fixture(scope="module")
def mixed_graph():
    """TinyNet with MIXED_SPEC's bits (W2/W4/W8, A4/A8), folded once for the tests of this file."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig

    w, a = resolve_layer_bits(MIXED_SPEC, TINY_LAYERS)
    calib = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
    return to_integer(quantize(_tiny(), calib, QuantConfig(layer_w_bits=w, layer_a_bits=a), progress=False))


def test_mixed_graph_bits_and_bit_exact_on_both_cpu_backends(tmp_path, mixed_graph):
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = mixed_graph
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
def test_mixed_graph_bit_exact_in_cuda_emulation(mixed_graph):
    """The kernels of the mixed graph's CUDA build that differ by bits - an int4-unpacking dp4a conv reading a
    4-bit and one reading an 8-bit tensor, and an int8 dense - run in the CUDA emulation equal the same PrimFuncs
    compiled for this CPU. (Activation bits change only clamp constants; every other kernel kind is checked by
    tests/test_cuda.py; one g++ build per kernel is what this test costs.)"""
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel

    bits = mixed_graph.meta["layer_bits"]
    assert (bits["block1.conv1"]["w_bits"], bits["block1.conv1"]["a_bits"]) == (4, 4)
    assert (bits["block2.conv2"]["w_bits"], bits["block2.conv2"]["a_bits"]) == (4, 8)
    assert (bits["fc"]["w_bits"], bits["fc"]["a_bits"]) == (8, 8)
    wanted = {"k_block1_conv1", "k_block2_conv2", "k_fc"}
    checked = emulate_every_kernel(mixed_graph, batch=2, seed=3, only=wanted.__contains__)
    assert set(checked) == wanted


def test_sensitivity_and_allocation_on_tiny(tmp_path):
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.backend.compile import build_module, resolve_target
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
    # the size model is what the .so stores (compile_graph's stored_weight_bytes comes from this build; the .so
    # itself is checked against the same model in test_mixed_graph_bits_and_bit_exact_on_both_cpu_backends)
    _, _, stored = build_module(graph, 1, resolve_target(None), "auto")
    assert stored == plan.predicted["size"]
    with pytest.raises(QuantConfigError, match=r"--size-budget 0.1: no bit allocation fits .* \(0.10x W8A8\); the "
                       r"cheapest plan is predicted at .* kB with channel padding \(0\.[1-9]\dx W8A8\)$"):
        allocate(rep, costs, graph8, {"size": "0.1"})
    # a latency budget below what the fixed part alone takes: the message is in ms, names the budget as given and
    # the cheapest plan as a whole-network latency (layers + the kernels no bit width changes)
    timed = dataclasses.replace(costs, seconds={n: {c: 1e-4 for c in ("int8", "int8ubsw", "int4", "int2")}
                                                for n in costs.stored_bytes}, other_seconds=2e-4, overhead_seconds=0.0)
    cheapest = 1e3 * (1e-4 * len(TINY_LAYERS) + 2e-4)
    with pytest.raises(QuantConfigError, match=rf"--latency-budget 0.5ms: no bit allocation fits 0.5 ms \(0.38x "
                       rf"W8A8\); the cheapest plan is predicted at {cheapest:.4g} ms \(1.00x W8A8\); 0.2 ms of it "
                       r"outside the conv/linear layers"):
        allocate(rep, timed, graph8, {"latency": "0.5ms"})
    with pytest.raises(QuantConfigError, match="latency budget needs measured"):
        allocate(rep, costs, graph8, {"latency": "0.9"})
    # two budgets each reachable alone but not together (int4 / int2 kernels slower than int8 here, so W8A8 latency
    # rules out the smaller weights): one line in the budgets' own units (it printed the solver's seconds and bytes)
    slow_low_bits = dataclasses.replace(timed, seconds={n: {"int8": 1e-4, "int8ubsw": 1e-4, "int4": 3e-4,
                                                            "int2": 3e-4} for n in costs.stored_bytes})
    allocate(rep, slow_low_bits, graph8, {"latency": "1.0"})
    allocate(rep, slow_low_bits, graph8, {"size": "0.6"})
    with pytest.raises(QuantConfigError, match=r"^no bit allocation meets --latency-budget 1.0 \([\d.]+ ms, 1.00x "
                       r"W8A8\) and --size-budget 0.6 \([\d.]+ kB with channel padding, 0.60x W8A8\) together "
                       r"\(each alone is reachable; layers that read the same tensor share activation bits\): relax "
                       r"one of them$"):
        allocate(rep, slow_low_bits, graph8, {"latency": "1.0", "size": "0.6"})


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
    pairs = [f"W{b['w_bits']}A{b['a_bits']}" for b in info["layer_bits"].values()]   # the one-line label, counted here
    assert info["bits"].startswith("W8A8 with --layer-bits: ") and "W2A8 x1" in info["bits"]
    assert f"W4A4 x{pairs.count('W4A4')}" in info["bits"] and pairs.count("W4A4") >= 3
    assert json.loads((tmp_path / "q.json").read_text())["bits"] == info["bits"]
    assert main([*args, "--size-budget", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "need --mixed-precision" in capsys.readouterr().err


def test_layer_latency_calibrated_to_whole_network_and_cache_drift(tmp_path):
    """Per-layer kernel times are measured against the whole W8A8 network in the same process: the all-int8
    prediction is that network's time; a plan's prediction = it + per-layer deltas; a cache whose reference the
    re-timed network no longer matches (the host's load changed) is measured again, one that does is reused."""
    import json as _json

    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.mixed.latency import measure_layer_costs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    calib = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    graph = to_integer(quantize(model, calib, QuantConfig(), progress=False))
    cache = tmp_path / "latency_cache.json"
    c1 = measure_layer_costs(graph, cache=cache, rounds=1, progress=False)
    # int8, int4, int2 (2-bit weights four per byte: every x86 ISA) and on AVX2 int8ubsw (int8 on vpmaddubsw)
    classes = 4 if c1.isa == "avx2" else 3
    assert c1.packs_int2
    assert all(("int8ubsw" in v) == (c1.isa == "avx2") for v in c1.seconds.values())
    n_kernels = 3 * classes + len(c1.other_kernels)    # 3 layers x classes + the pool/flatten kernels once
    assert c1.cache_status == "measured" and c1.measured == n_kernels and c1.cached == 0 and c1.other_kernels
    assert set(c1.seconds) == {"0", "2", "6"} and all(t > 0 for v in c1.seconds.values() for t in v.values())
    assert c1.reference_seconds > 0 and c1.statistic == "min"
    all8 = {n: 8 for n in c1.seconds}
    assert c1.predict_seconds(all8) == pytest.approx(c1.reference_seconds, rel=1e-12)
    mixed = {**all8, "2": 4}
    assert c1.predict_seconds(mixed) == pytest.approx(
        c1.reference_seconds + c1.seconds["2"]["int4"] - c1.seconds["2"]["int8"], rel=1e-12)
    # a W8 layer reading 4-bit activations is timed as the kernel the AVX2 build runs for it (vpmaddubsw, exact)
    low = {**all8, "6": 8}
    want = c1.seconds["2"]["int8ubsw" if c1.isa == "avx2" else "int8"] - c1.seconds["2"]["int8"]
    assert c1.predict_seconds(low, a_bits={"2": 4}) == pytest.approx(c1.reference_seconds + want, rel=1e-12)
    # re-anchored on a W8A8 time measured later: scaled by its ratio
    assert c1.predict_seconds(mixed, reference_seconds=2 * c1.reference_seconds) == \
        pytest.approx(2 * c1.predict_seconds(mixed), rel=1e-12)
    saved = _json.loads(cache.read_text())
    assert len(saved["kernels"]) == n_kernels and len(saved["references"]) == 1
    # a reference 1e6x off what the network takes now: every kernel measured again, the cache rewritten (so far
    # off that no load on the test host can bring the re-timed network within the default 10% drift)
    saved["references"] = {k: 1e6 * v for k, v in saved["references"].items()}
    cache.write_text(_json.dumps(saved))
    c2 = measure_layer_costs(graph, cache=cache, rounds=1, progress=False)
    assert c2.cache_status.startswith("remeasured (reference drifted x0.0") and c2.measured == n_kernels, \
        c2.cache_status
    ref2 = _json.loads(cache.read_text())["references"]
    assert list(ref2.values()) == [c2.reference_seconds]
    # within the drift tolerance (an unbounded one: on a busy 2-core host TVM's spinning 2-thread pool has timed this
    # tiny network 180x slower than a moment before, and the reuse logic is what is tested here): reused as they are
    c3 = measure_layer_costs(graph, cache=cache, rounds=1, progress=False, drift=1e12)
    assert c3.cache_status == "cached" and c3.measured == 0 and c3.cached == n_kernels and c3.seconds == c2.seconds


class _TwoHeads(torch.nn.Module):
    """logits + a feature map (``outputs="both"``), or logits only with the feature head computed and dropped
    (``outputs="logits"``: a dead layer, as in ``return self.forward_both(x)[0]``)."""

    def __init__(self, outputs: str):
        super().__init__()
        self.outputs = outputs
        self.stem = torch.nn.Conv2d(1, 8, 3, 1, 1)
        self.body = torch.nn.Conv2d(8, 16, 3, 2, 1)
        self.aux = torch.nn.Conv2d(16, 4, 1)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        f = torch.relu(self.body(torch.relu(self.stem(x))))
        logits = self.fc(torch.flatten(self.gap(f), 1))
        aux = self.aux(f)
        return (logits, aux) if self.outputs == "both" else logits


def test_dead_layers_are_removed_and_mixed_precision_runs_on_them_and_on_two_outputs():
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.frontend.trace import trace_model
    from ptq2tvm.mixed.allocate import allocate
    from ptq2tvm.mixed.latency import measure_layer_costs
    from ptq2tvm.mixed.sensitivity import analyze_sensitivity

    torch.manual_seed(0)
    calib = np.random.default_rng(1).standard_normal((16, 1, 12, 12)).astype(np.float32)
    one = _TwoHeads("logits").eval()
    graph = trace_model(one, (1, 12, 12))
    assert graph.dead_layers == ["aux"] and "aux" not in [n.name for n in graph.nodes]
    with pytest.warns(UserWarning, match="reach no output .*: aux"):
        graph8 = to_integer(quantize(one, calib, QuantConfig(), progress=False))
    assert "aux" not in [n.name for n in graph8.nodes]
    rep = analyze_sensitivity(one, calib, hutchinson_samples=2, progress=False)      # crashed on the dead layer
    assert sorted(rep.layer_names()) == ["body", "fc", "stem"]

    both = _TwoHeads("both").eval()
    both.load_state_dict(one.state_dict())
    for estimator in ("gauss-newton", "hutchinson"):
        rep2 = analyze_sensitivity(both, calib, hutchinson_samples=2, progress=False, estimator=estimator)
        lay = {x.name: x for x in rep2.layers}
        assert lay["aux"].trace_w > 0 and lay["fc"].trace_w > 0 and lay["body"].trace_w > 0
        assert all(np.isfinite(c["output_sqnr_db"]) for x in rep2.layers for c in x.candidates.values())
    graph2 = to_integer(quantize(both, calib, QuantConfig(), progress=False))
    plan = allocate(rep2, measure_layer_costs(graph2, timed=False, progress=False), graph2, {"size": "0.8"})
    assert sorted(plan.fixed) == ["aux", "fc", "stem"]       # first layer + the last layer of each output
