"""Reconstruction front end: AdaRound, units, QDrop, MRECG, AdaQTransform fold, loss curves, resume.

Small and seeded: TinyNet (tests/conftest.py), 32 calibration images, tens of iterations, one torch thread.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.fold.fold import fold_to_integer
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.frontend.quantizers import ActQuantizer, WeightQuantizer
from ptq2tvm.frontend.trace import trace_model
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.reconstruct import ReconSettings, block_units, discover_units, layer_units, reconstruct
from ptq2tvm.reconstruct.adaround import beta_at, harden_layer, reg_active, round_loss
from ptq2tvm.reconstruct.mrecg import (default_k, groups_from_pairs, log_diffs, modcap, mrecg_base_units, plan_mrecg,
                                       top_k_pairs)
from ptq2tvm.reconstruct.units import cut_positions

from conftest import fast_recon as fast, randomize_bn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- AdaRound ----------------------------------------------------------------------------------------------------
def test_adaround_beta_schedule_and_warmup():
    T = 1000
    assert beta_at(0, T) == 20.0 and beta_at(199, T) == 20.0          # held during the 20% warm-up
    assert not reg_active(199, T) and reg_active(200, T)
    assert beta_at(200, T) == pytest.approx(20.0)
    assert beta_at(600, T) == pytest.approx(11.0)                     # linear 20 -> 2 over [200, 1000]
    assert beta_at(1000, T) == pytest.approx(2.0)
    assert beta_at(5, 10, warmup=0.5, beta_start=10, beta_end=0) == pytest.approx(10.0)


def test_adaround_init_regulariser_and_hardening():
    torch.manual_seed(0)
    wq = WeightQuantizer(4, 3)
    w = torch.randn(3, 2, 3, 3)
    wq.init_scale(w)
    s = wq.scale.view(-1, 1, 1, 1)
    wq.init_adaround(w)
    # h(V) = frac(w/s): the soft-rounded weight reproduces w inside the range
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(wq.h(), frac.clamp(1e-6, 1 - 1e-6), atol=1e-5)
    inside = (torch.floor(w / s) >= wq.qmin) & (torch.floor(w / s) + 1 <= wq.qmax)
    assert torch.allclose(wq(w)[inside], w[inside], atol=1e-5)
    # regulariser: SUM(1 - |2h - 1|^beta), summed over all weights (not averaged)
    with torch.no_grad():
        wq.alpha.fill_(0.0)                     # sigmoid(0) = .5 -> h = .5 -> each term 1
    assert wq.round_reg(20.0).item() == pytest.approx(w.numel())
    with torch.no_grad():
        wq.alpha.fill_(10.0)                    # h = 1 -> each term 0
    assert wq.round_reg(2.0).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        wq.alpha.copy_(torch.where(torch.arange(w.numel()).view_as(w) % 2 == 0, 10.0, -0.3))
    h = wq.h()
    want = (1 - (2 * h - 1).abs().pow(3.0)).sum()
    assert wq.round_reg(3.0).item() == pytest.approx(want.item())

    class L(nn.Module):
        pass

    layer = L()
    layer.wq, layer.weight = wq, nn.Parameter(w.clone())
    assert float(round_loss([layer], 10, 100, 0.01)) == 0.0            # warm-up: off
    assert round_loss([layer], 60, 100, 0.01).item() == pytest.approx(
        0.01 * wq.round_reg(beta_at(60, 100)).item(), rel=1e-6)
    q_hard = torch.clamp(torch.floor(w / s) + (wq.alpha >= 0).float(), wq.qmin, wq.qmax)
    harden_layer(layer)
    assert wq.alpha is None and torch.equal(wq.integer(layer.weight.detach()), q_hard)


# ---- QDrop -------------------------------------------------------------------------------------------------------
def test_qdrop_keep_probability_and_reset(tiny_model, calib):
    q = ActQuantizer(3, nonneg=False)
    q.scale.data.fill_(0.37)
    q.zero_point.fill_(3)
    q.enabled = True
    x = torch.randn(200_000)
    full = q(x)
    for p in (0.5, 0.2):
        q.drop_prob, q.drop_generator = p, torch.Generator().manual_seed(1)
        out = q(x)
        differs = full != x                     # elements where quantization changes the value
        kept = (out == full) & differs
        assert kept.sum() / differs.sum() == pytest.approx(p, abs=0.01)
        assert torch.all((out == full) | (out == x))
    # unit input: mix of the cached quantized and FP tensors, quantized with probability p
    from ptq2tvm.reconstruct.recon import qdrop_mix

    xq, xf = torch.zeros(100_000), torch.ones(100_000)
    mixed = qdrop_mix(xq, xf, 0.5, torch.Generator().manual_seed(0))
    assert float((mixed == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((qdrop_mix(xq, xf, 0.8) == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    # after a QDrop reconstruction every quantizer is back to always-quantize
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), fast(method="qdrop", iters=10), progress=False)
    assert all(a.drop_prob is None and a.drop_generator is None and not a.lsq_grad_scale
               for a in qm.act_quant.values())
    assert all(a.enabled for a in qm.act_quant.values())
    assert all(layer.wq.alpha is None for layer in qm.layers.values())


# ---- units -------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = mid * 4
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.b1(self.c1(x)))
        y = self.relu(self.b2(self.c2(y)))
        return self.relu(self.b3(self.c3(y)) + idt)


def _ir(cin, cout, stride, t):
    hid = cin * t
    layers = []
    if t != 1:
        layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6()]
    layers += [nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
               nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout)]

    class IR(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(*layers)
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.skip else self.conv(x)

    return IR()


class MiniMBV2(nn.Module):
    """MobileNetV2 layout in miniature: stem, IR t=1 (no skip), IR s2, IR with skip, IR channel change, head, fc."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            _ir(8, 4, 1, 1), _ir(4, 6, 2, 6), _ir(6, 6, 1, 6), _ir(6, 8, 1, 6),
            nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MiniResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 1), Bottleneck(16, 4, 1))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, 2), Bottleneck(32, 8, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _kinds(units):
    return [(u.kind, len(u.layers)) for u in units]


def test_units_tinynet(tiny_model):
    g = trace_model(tiny_model, (1, 12, 12))
    blocks = block_units(g)
    assert [u.layers for u in blocks] == [
        ["stem"], ["block1.conv1", "block1.conv2"], ["block2.downsample.0", "block2.conv1", "block2.conv2"],
        ["ir.conv.0", "ir.conv.3", "ir.conv.6"], ["grouped"], ["fc"]]
    assert all(len(u.inputs) == 1 and len(u.outputs) == 1 for u in blocks)
    # units partition the graph
    body = [n.name for n in g.nodes if n.op != "input"]
    for units in (blocks, layer_units(g), discover_units(g, "network")):
        assert [x for u in units for x in u.nodes] == body
    lay = layer_units(g)
    assert len(lay) == 11
    conv2 = next(u for u in lay if u.layers == ["block1.conv2"])
    assert set(conv2.inputs) == {"block1.conv1", "pool"}       # a residual crosses the layer boundary
    conv1 = next(u for u in lay if u.layers == ["block1.conv1"])
    assert conv1.targets == ["block1.conv1"]                   # the passed-through tensor is not a loss target


def test_units_found_from_structure_not_names():
    torch.manual_seed(0)
    g = trace_model(randomize_bn(MiniMBV2()), (1, 16, 16))
    units = block_units(g)
    # stem, 4 inverted residual blocks (with and without skip), head 1x1, classifier
    assert _kinds(units) == [("layer", 1), ("block", 2), ("block", 3), ("block", 3), ("block", 3), ("layer", 1),
                             ("layer", 1)]
    # renaming every node does not change the partition
    ren = {n.name: f"n{i}" for i, n in enumerate(g.nodes)}
    for n in g.nodes:
        n.name = ren[n.name]
        n.inputs = [ren[i] for i in n.inputs]
        n.residual = ren[n.residual] if n.residual else None
    g.input_name, g.output_name = ren[g.input_name], ren[g.output_name]
    assert _kinds(block_units(g)) == _kinds(units)
    g2 = trace_model(randomize_bn(MiniResNet50()), (1, 16, 16))
    assert _kinds(block_units(g2)) == [("layer", 1), ("block", 4), ("block", 3), ("block", 4), ("block", 3),
                                       ("layer", 1)]
    assert cut_positions(g2)[-1] == len([n for n in g2.nodes if n.op != "input"]) - 1


def _zoo(name):
    models = pytest.importorskip("ptq2tvm.models")
    create = getattr(models, "create_model", None)
    if create is None:
        pytest.skip("ptq2tvm.models has no create_model yet")
    try:
        return create(name).eval()
    except Exception as e:                                   # not there yet (another helper is writing it)
        pytest.skip(f"ptq2tvm.models cannot build {name}: {e}")


@pytest.mark.parametrize("name,kinds,block_layers", [
    ("resnet18", ["layer"] + ["block"] * 8 + ["layer"], [2, 2, 3, 2, 3, 2, 3, 2]),
    ("mobilenet_v2", ["layer"] + ["block"] * 17 + ["layer", "layer"], [2] + [3] * 16),
    ("resnet50", ["layer"] + ["block"] * 16 + ["layer"], [4, 3, 3, 4, 3, 3, 3, 4, 3, 3, 3, 3, 3, 4, 3, 3]),
])
def test_units_on_zoo_graphs(name, kinds, block_layers):
    """ResNet-18: stem + 8 BasicBlocks + fc; MobileNetV2: stem + 17 InvertedResidual + head + classifier."""
    g = trace_model(_zoo(name), (3, 64, 64))
    units = block_units(g)
    assert [u.kind for u in units] == kinds
    assert [len(u.layers) for u in units if u.kind == "block"] == block_layers
    assert all(len(u.inputs) == 1 and len(u.outputs) == 1 for u in units)
    # MRECG (tests/test_fidelity.py has the rest): the authors' base units, their released merge lists, and ModCap
    qm = QuantModel(g, QuantConfig(2, 4))
    base = mrecg_base_units(g)
    settings = ReconSettings(method="qdrop")
    authors = plan_mrecg(qm, None, None, settings, 0.01, "mrecg-authors", [], False)
    mc = plan_mrecg(qm, None, None, settings, 0.01, "mrecg-modcap", [], False)
    merged = [grp for grp in authors["groups"] if len(grp) > 1]
    assert authors["groups"][-1] == [base[-1].name] and mc["groups"][-1] == [base[-1].name]   # never the last unit
    assert all(len(grp) <= 2 for grp in mc["groups"])                                        # ModCap: pairs only
    if name == "resnet18":
        # configs/qdrop/r18_2_4.yaml scheme [1, 2, (3, 3), (4, 4), 5, 6, 7, 8]
        assert [u.name for u in base] == [u.name for u in units] and authors["kinds"] == "SRRTRTRTRH"
        assert merged == [["layer1.1", "layer2.0"], ["layer2.1", "layer3.0"]] and authors["k"] == 2
        assert mc["groups"] == authors["groups"] and mc["k"] == 2                # log-ModCap reproduces them
        caps = mc["capacities"]
        assert caps[0] == pytest.approx(64 * 3 * 49 * 8 * 1.6) and caps[-1] == 512 * 1000 * 8   # stem: stride 2
        assert caps[7] == pytest.approx((512 * 256 * 9 + 512 * 256) * 2 * 1.6 + 512 * 512 * 9 * 2)
    if name == "resnet50":
        # configs/qdrop/r50_2_4.yaml scheme [1, 2, 3, (4, 4), 5, 6, (7, 7, 7), 8, 9, 10, (11, 11), 12, 13, 14]
        assert merged == [["layer1.2", "layer2.0"], ["layer2.3", "layer3.0", "layer3.1"], ["layer3.5", "layer4.0"]]
        assert authors["k"] == mc["k"] == 4
        assert [grp for grp in mc["groups"] if len(grp) > 1] == [["conv1", "layer1.0"], ["layer1.2", "layer2.0"],
                                                                 ["layer2.3", "layer3.0"], ["layer3.5", "layer4.0"]]
    if name == "mobilenet_v2":
        # base units fuse stem + features.1 and head + classifier (MQBench extract_block stacks <= 3 chain layers);
        # configs/qdrop/mbv2_2_4.yaml scheme [1, 2, (3, 3), 4, (5, 5), 6, (7, 7, 7), (8, 8, 8), 9, (10, 10), 11]
        assert len(base) == 18 and base[0].name == "features.0.0+features.1.conv"
        assert base[-1].name == "features.18.0+classifier.1"
        f = [[f"features.{i}.conv" for i in grp] for grp in [(3, 4), (6, 7), (9, 10, 11), (12, 13, 14), (16, 17)]]
        assert merged == f and authors["k"] == mc["k"] == 7
        assert sum(len(grp) - 1 for grp in mc["groups"]) == 7


# ---- MRECG -------------------------------------------------------------------------------------------------------
def test_modcap_numbers_and_topk(tiny_model, calib):
    qm = quantize_rtn(tiny_model, calib, QuantConfig(4, 4), progress=False)
    units = block_units(qm.graph)
    caps = [modcap(qm, u) for u in units]
    # stem 8*1*9 params at 8 bit (first layer); block1 2 x 576 at 4 bit; block2: 1x1 s2 (128) and 3x3 s2 (1152) get
    # alpha = 1.6, 3x3 s1 2304; inverted residual 512 + 288 + 512; grouped 576; fc 160 at 8 bit (last layer)
    want = [72 * 8, 2 * 576 * 4, (128 + 1152) * 4 * 1.6 + 2304 * 4, (512 + 288 + 512) * 4, 576 * 4, 160 * 8]
    assert caps == pytest.approx(want)
    diffs = log_diffs(caps)
    assert diffs == pytest.approx([math.log(a / b) ** 2 for a, b in zip(want, want[1:])])
    # ranked by log-ratio jumps: stem|block1 (x8), block1|block2, block2|ir; never the last pair (grouped|fc)
    assert top_k_pairs(diffs, 2) == [0, 1] and top_k_pairs(diffs, 2, disjoint=True) == [0, 2]
    assert top_k_pairs(diffs, 3) == [0, 1, 2] and top_k_pairs(diffs, 3, disjoint=True) == [0, 2]
    assert top_k_pairs(diffs, 5, exclude_last=False)[-1] == 4 and 4 not in top_k_pairs(diffs, 5)
    names = [u.name for u in units]
    assert groups_from_pairs(names, [0, 1, 2]) == [["stem", "block1", "block2", "ir.conv"], ["grouped"], ["fc"]]
    assert default_k(10) == 2 and default_k(18) == 4 and default_k(18, depthwise=True) == 7
    # MRECG base units: the two single layers at the end fuse (as MobileNetV2's head + classifier); k = round(0.4 x 4)
    _, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4),
                         fast(method="qdrop", granularity="mrecg-modcap", iters=8), progress=False)
    assert rep.mrecg["base_units"] == ["stem", "block1", "block2", "ir.conv", "grouped+fc"] and rep.mrecg["k"] == 2
    assert rep.mrecg["groups"] == [["stem", "block1"], ["block2", "ir.conv"], ["grouped+fc"]]
    assert [u["kind"] for u in rep.units] == ["merged", "merged", "block"]


def test_mrecg_loss_metric_probe(tiny_model, calib):
    _, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4),
                         fast(method="qdrop", granularity="mrecg-loss", iters=10, mrecg_probe_iters=5, mrecg_k=1),
                         progress=False)
    m = rep.mrecg
    assert m["metric"] == "loss" and m["probe_iters"] == 5 and len(m["capacities"]) == 5
    assert len(m["merged_pairs"]) == 1
    i = m["merged_pairs"][0]
    assert m["diffs"][i] == max(m["diffs"][:-1])          # the pair holding the last unit is never a candidate
    assert not any(k.startswith("probe:") for k in rep.curves)


# ---- AdaQTransform fold -------------------------------------------------------------------------------------------
def test_adaq_fold_random_xi_is_bit_exact(tmp_path, tiny_model, tiny_data):
    from ptq2tvm.backend.compile import compile_graph
    from ptq2tvm.backend.runtime import CompiledModel

    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(4, 4), progress=False).enable_adaq()
    g = torch.Generator().manual_seed(3)
    for name, layer in qm.layers.items():
        c = layer.xi.numel()
        with torch.no_grad():
            layer.xi.copy_(0.7 + 0.6 * torch.rand(c, generator=g))
            layer.eta.copy_(0.05 * torch.randn(c, generator=g))
    x = torch.from_numpy(tiny_data)
    with torch.no_grad():
        fq = qm(x).numpy()
    graph = fold_to_integer(qm)
    assert graph.meta["adaqtransform"]
    ref = run_reference(graph, graph.input.quantize(tiny_data))
    fq_int = np.rint(fq / graph.output.scale) + graph.output.zero_point
    diff = np.abs(ref.astype(np.int64) - fq_int)
    assert (diff == 0).mean() > 0.9 and diff.max() <= 3
    compile_graph(graph, tmp_path / "m.so", batch=4)
    cm = CompiledModel(tmp_path / "m.so")
    q = graph.input.quantize(tiny_data[:10] * 1.5)
    assert np.array_equal(cm.run_int(q), run_reference(graph, q))
    # identity AdaQTransform folds to exactly the plain graph's arrays
    plain = fold_to_integer(quantize_rtn(tiny_model, tiny_data, QuantConfig(4, 4), progress=False))
    ident = fold_to_integer(quantize_rtn(tiny_model, tiny_data, QuantConfig(4, 4), progress=False).enable_adaq())
    for a, b in zip(plain.nodes, ident.nodes):
        assert a.arrays.keys() == b.arrays.keys()
        assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_adaq_save_load_roundtrip(tmp_path, tiny_model, calib):
    qm = quantize_rtn(tiny_model, calib, QuantConfig(4, 4), progress=False).enable_adaq()
    with torch.no_grad():
        for layer in qm.layers.values():
            layer.xi.mul_(1.1)
            layer.eta.add_(0.01)
    q2 = QuantModel.load(qm.save(tmp_path / "fq.pt"))
    assert all(layer.adaq for layer in q2.layers.values())
    x = torch.from_numpy(calib)
    with torch.no_grad():
        assert torch.equal(qm(x), q2(x))
    assert fold_to_integer(q2).digest() == fold_to_integer(qm).digest()


# ---- reconstruction ----------------------------------------------------------------------------------------------
def _int_out(qm, x):
    g = fold_to_integer(qm)
    return g, run_reference(g, g.input.quantize(x))


def test_layerwise_adaround_lowers_unit_loss_and_folds(tiny_model, calib):
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(3, 4), fast(method="adaround", iters=120), progress=False)
    curves = [c for c in rep.curves.values()]
    assert len(curves) == 11 and rep.granularity == "layer" and rep.lam == pytest.approx(0.1)  # depthwise in TinyNet
    init = sum(c["initial_loss"] for c in curves)
    final = sum(c["final_loss"] for c in curves)
    assert final < init
    assert sum(c["final_loss"] <= c["initial_loss"] * 1.02 for c in curves) >= 9
    assert sum(c["changed_roundings"] for c in curves) > 0
    assert rep.iters_per_s > 0 and rep.iterations == 11 * 120
    g, ref = _int_out(qm, calib)
    with torch.no_grad():
        fq = qm(torch.from_numpy(calib)).numpy()
    diff = np.abs(ref.astype(np.int64) - (np.rint(fq / g.output.scale) + g.output.zero_point))
    assert (diff == 0).mean() > 0.85 and diff.max() <= 4


def test_brecq_two_stage_and_network_with_adaq(tiny_model, calib, tmp_path):
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), fast(method="brecq", iters=20, iters_act=10),
                          progress=False)
    assert rep.stages == ["weights", "acts"] and len(rep.curves) == 12
    assert all(c["iters"] == 10 for k, c in rep.curves.items() if k.startswith("acts/"))
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4),
                          fast(method="network", adaqtransform=True, iters=30), progress=False)
    assert [u["kind"] for u in rep.units] == ["network"] and rep.adaq["channels"] > 0
    assert rep.adaq["xi_min"] != 1.0 or rep.adaq["xi_max"] != 1.0      # xi learned
    g, ref = _int_out(qm, calib)
    assert g.meta["adaqtransform"]
    j, p = rep.save(tmp_path)
    table = json.loads(j.read_text())
    assert table["stages"]["joint"][0]["unit"] == "network" and p.stat().st_size > 1000


def test_resume_after_interruption_matches_uninterrupted(tiny_model, calib, tmp_path, monkeypatch):
    import ptq2tvm.reconstruct.recon as recon

    s = fast(method="qdrop", adaqtransform=True, iters=15)
    qm_ref, rep_ref = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False)

    real = recon.optimize_unit
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recon, "optimize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False, checkpoint_dir=tmp_path / "ck")
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert len(state["done"]) == 2
    monkeypatch.setattr(recon, "optimize_unit", real)
    qm, rep = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False, checkpoint_dir=tmp_path / "ck")
    assert rep.resumed_units == 2 and len(rep.curves) == len(rep_ref.curves)
    assert fold_to_integer(qm).digest() == fold_to_integer(qm_ref).digest()
    for k in rep_ref.curves:
        assert rep.curves[k]["final_loss"] == pytest.approx(rep_ref.curves[k]["final_loss"], rel=1e-6)
    # a finished checkpoint only replays
    qm3, rep3 = reconstruct(tiny_model, calib, QuantConfig(4, 4), s, progress=False, checkpoint_dir=tmp_path / "ck")
    assert rep3.resumed_units == len(rep_ref.curves) and rep3.iterations == rep_ref.iterations
    assert fold_to_integer(qm3).digest() == fold_to_integer(qm_ref).digest()
    # a checkpoint of other settings is refused
    from ptq2tvm.errors import ArtifactError

    with pytest.raises(ArtifactError):
        reconstruct(tiny_model, calib, QuantConfig(4, 4), fast(method="qdrop", iters=16), progress=False,
                    checkpoint_dir=tmp_path / "ck")


def test_settings_validation():
    from ptq2tvm.errors import QuantConfigError

    for bad in (dict(method="foo"), dict(granularity="x"), dict(iters=0), dict(drop_prob=0.0),
                dict(method="network", granularity="block"), dict(warmup=1.0)):
        with pytest.raises(QuantConfigError):
            ReconSettings(**bad).validate()
    assert ReconSettings(method="brecq").resolved_granularity == "block"
    assert ReconSettings(method="adaround").resolved_granularity == "layer"
    assert math.isclose(ReconSettings().drop_prob, 0.5)
