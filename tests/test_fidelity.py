"""Fidelity to the papers (issue 17): NWQ's loss and schedules, MRECG's authors' merges on the small models, and
AdaQTransform's xi kept positive so the fold never negates (int4) integer weights.

The MRECG merges on the full ResNet-18 / ResNet-50 / MobileNetV2 graphs are checked in
tests/test_reconstruct.py::test_units_on_zoo_graphs (which traces them once).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ptq2tvm.errors import QuantConfigError
from ptq2tvm.fold.fold import fold_to_integer
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.frontend.trace import trace_model
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.reconstruct import ReconSettings, reconstruct
from ptq2tvm.reconstruct.adaq import XI_MIN
from ptq2tvm.reconstruct.mrecg import mrecg_base_units, plan_mrecg, unit_kinds
from ptq2tvm.reconstruct.nwq import ar_points, mix_at, nwq_loss, tau_at

from conftest import fast_recon as fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- NWQ ---------------------------------------------------------------------------------------------------------
def test_nwq_loss_on_a_hand_checked_toy():
    # logits: N = 2, 3 classes; errors (1, 0, -2) and (0, 1, 1): per-row sums 5 and 2 -> mean 3.5
    out_q = torch.tensor([[1.0, 2.0, 1.0], [0.0, 1.0, 4.0]])
    out_fp = torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    # one block feature (N=2, C=2, H=1, W=2): squared errors summed over C, mean over N*H*W = 4 positions
    fq = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]], [[[0.0, 0.0]], [[3.0, 0.0]]]])
    ff = torch.zeros_like(fq)
    # positions: (n0,w0): 1, (n0,w1): 4, (n1,w0): 9, (n1,w1): 0 -> mean 3.5; a second block with error 1 everywhere
    # on one channel: 1. AR = 0.5 * mean(3.5, 1.0) = 1.125
    gq = torch.ones(2, 1, 1, 2)
    gf = torch.zeros(2, 1, 1, 2)
    rec, ar = nwq_loss(out_q, out_fp, [fq, gq], [ff, gf], ar_weight=0.5)
    assert float(rec) == pytest.approx(3.5) and float(ar) == pytest.approx(1.125)
    rec0, ar0 = nwq_loss(out_q, out_fp, [fq], [ff], ar_weight=0.0)
    assert float(rec0) == pytest.approx(3.5) and float(ar0) == 0.0
    # schedules: tau geometric 1 -> 0.01 (0.1 half-way), keep-quantized probability linear 0.5 -> 1
    assert tau_at(0, 101, 1.0, 0.01) == pytest.approx(1.0) and tau_at(50, 101, 1.0, 0.01) == pytest.approx(0.1)
    assert tau_at(100, 101, 1.0, 0.01) == pytest.approx(0.01)
    assert mix_at(0, 101, 0.5) == 0.5 and mix_at(50, 101, 0.5) == pytest.approx(0.75) and mix_at(100, 101, 0.5) == 1


def test_nwq_reconstructs_with_and_without_adaq(tiny_model, calib):
    pts = ar_points(quantize_rtn(tiny_model, calib, QuantConfig(4, 4), progress=False))
    assert pts == ["stem", "block1.conv2", "block2.conv2", "ir.conv.6", "grouped"]   # every block output but the last
    for adaq in (False, True):
        qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), fast(method="nwq", adaqtransform=adaq, iters=40,
                                                                          lr_adaq=0.05), progress=False)
        c = rep.curves["nwq/network"]
        assert rep.stages == ["nwq"] and [u["kind"] for u in rep.units] == ["network"]
        assert c["final_loss"] < c["initial_loss"] and c["changed_roundings"] > 0
        assert c["beta"][0] == pytest.approx(1.0) and c["beta"][-1] == pytest.approx(0.01)   # tau annealed
        assert all(layer.wq.alpha is None and layer.wq.tau is None for layer in qm.layers.values())  # hardened
        g = fold_to_integer(qm)
        ref = run_reference(g, g.input.quantize(calib))
        with torch.no_grad():
            fq = qm(torch.from_numpy(calib)).numpy()
        diff = np.abs(ref.astype(np.int64) - (np.rint(fq / g.output.scale) + g.output.zero_point))
        assert (diff == 0).mean() > 0.85 and diff.max() <= 4
        if adaq:
            assert rep.adaq["xi_min"] >= XI_MIN and (rep.adaq["xi_min"] != 1.0 or rep.adaq["xi_max"] != 1.0)
    with pytest.raises(QuantConfigError, match="method 'nwq'"):
        ReconSettings(method="nwq", granularity="block").validate()
    with pytest.raises(QuantConfigError, match="NWQ settings"):
        ReconSettings(method="nwq", nwq_tau_end=2.0).validate()


def test_nwq_honours_the_time_budget(tiny_model, calib):
    """NWQ used to ignore --time-budget (one network-wise unit, its length fixed up front). A budget already spent
    shortens the run to the floor and the schedules still end annealed."""
    from ptq2tvm.reconstruct.recon import DEADLINE_CHECK_EVERY

    s = fast(method="nwq", iters=400, time_budget=1e-3, min_iters=15)
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)
    c = rep.curves["nwq/network"]
    assert c["planned_iters"] == 400 and c["iters"] == DEADLINE_CHECK_EVERY + 15 and "shortened" in c["deadline"]
    assert c["it"][-1] == c["iters"] - 1 and c["beta"][-1] == pytest.approx(0.01)      # tau annealed to its end
    assert all(layer.wq.alpha is None and layer.wq.tau is None for layer in qm.layers.values())
    free = reconstruct(tiny_model, calib, QuantConfig(4, 4), fast(method="nwq", iters=30), progress=False)[1]
    assert free.curves["nwq/network"]["iters"] == 30 and "deadline" not in free.curves["nwq/network"]


# ---- MRECG on the Fashion-MNIST models ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,kinds,merged", [
    ("resnet_small", "SRRTRTRH", [["layer1.1", "layer2.0"], ["layer2.1", "layer3.0"]]),
    ("mobilenet_v2_small", "STRTRTRTH", [["features.3.conv", "features.4.conv"], ["features.5.conv", "features.6.conv"],
                                         ["features.7.conv", "features.8.conv"]]),
])
def test_mrecg_authors_rule_on_small_models(name, kinds, merged):
    """No released list for these: the authors' rule (each transition block with the residual block before it)."""
    from ptq2tvm.models import create_model

    g = trace_model(create_model(name).eval(), (1, 28, 28))
    base = mrecg_base_units(g)
    assert unit_kinds(g, base) == kinds
    plan = plan_mrecg(QuantModel(g, QuantConfig(2, 4)), None, None, ReconSettings(), 0.01, "mrecg-authors", [], False)
    assert plan["source"].startswith("rule") and [grp for grp in plan["groups"] if len(grp) > 1] == merged
    k1 = plan_mrecg(QuantModel(g, QuantConfig(2, 4)), None, None, ReconSettings(mrecg_k=1), 0.01, "mrecg-authors",
                    [], False)
    assert k1["k"] == 1 and [grp for grp in k1["groups"] if len(grp) > 1] == merged[:1]


# ---- AdaQTransform: xi stays positive, int4 storage and exactness survive --------------------------------------
def test_formerly_negative_xi_keeps_int4_bytes_and_exactness(tmp_path, tiny_model, calib, monkeypatch):
    import ptq2tvm.reconstruct.recon as recon
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel

    settings = fast(method="qdrop", adaqtransform=True, iters=30, lr_adaq=0.3)
    # without the projection this run drives xi negative (what used to negate the integer weights in the fold)
    with monkeypatch.context() as mp:
        mp.setattr(recon, "project_xi", lambda layers, xi_min=XI_MIN: None)
        qm_free, rep_free = reconstruct(tiny_model, calib, QuantConfig(4, 4), settings, progress=False)
    assert rep_free.adaq["negative_xi"] > 0
    with pytest.raises(QuantConfigError, match=r"layer '.*': AdaQTransform scale xi must be finite and > 0"):
        fold_to_integer(qm_free)

    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), settings, progress=False)
    assert rep.adaq["negative_xi"] == 0 and rep.adaq["xi_min"] >= XI_MIN
    graph = fold_to_integer(qm)
    ident = QuantModel.load(qm.save(tmp_path / "fq.pt"))       # the same integers with xi = 1, eta = 0
    with torch.no_grad():
        for layer in ident.layers.values():
            layer.xi.fill_(1.0)
            layer.eta.zero_()
    plain = fold_to_integer(ident)
    from ptq2tvm.backend.blocked_builder import _BlockedBuilder

    n4 = 0
    for a, b in zip(graph.nodes, plain.nodes):
        if "weight" in a.arrays:
            assert np.array_equal(a.arrays["weight"], b.arrays["weight"]), a.name
            bits = a.attrs["w_bits"]
            assert a.arrays["weight"].min() >= -(1 << (bits - 1)) and a.arrays["weight"].max() < (1 << (bits - 1))
            if bits <= 4:                                      # every 4-bit layer keeps packed int4 storage
                assert _BlockedBuilder.int4(a), a.name
                n4 += 1
    assert n4 >= 5
    r1 = compile_so(graph, tmp_path / "xi.so", batch=4)
    compile_so(plain, tmp_path / "plain.so", batch=4)
    side1 = json.loads((tmp_path / "xi.json").read_text())
    side2 = json.loads((tmp_path / "plain.json").read_text())
    assert side1["stored_weight_bytes"] == side2["stored_weight_bytes"]
    assert r1.meta["stored_weight_bytes"] == side1["stored_weight_bytes"]
    cm = CompiledModel(tmp_path / "xi.so")
    q = graph.input.quantize(calib[:8])
    assert np.array_equal(cm.run_int(q), run_reference(graph, q))
