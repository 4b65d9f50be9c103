"""The requantizing ops without a multiply-accumulate (concat, add, average pool, mul) are bit-exact between the
fake-quant model and the integer network, ties included.

Calibration writes every scale as ``max |x| * (1 - k/100) / qmax``; a concat's output has the max of the input that
holds it, so that input's ``s_i / s_out`` is a ratio of small integers (mixnet: 17/14, 1303829336 >> 30). Real
arithmetic then puts the codes 7, 21, 35, ... exactly on a half; the float32 fake-quant path landed on the half and
rounded it to even, the integer network (float32 scales: 17/14 - 2e-8) just below it: 1 LSB on 0.63% of the concat's
outputs (``ptq2tvm parity``: cat 99.37%, network output 93.40% exact). The same happens for an add (s_a / s_out and
s_b / s_out both such ratios, or the other input 0) and an average pool (s_in / s_out = 1 on a 2x2 window: every sum
2 mod 4 is a tie).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import quantize, to_integer
from ptq2tvm.data import CalibrationData
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.parity import to_grid


class CatAddPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.cat([F.relu(self.c1(x)), F.relu(self.c2(x))], 1)
        x = F.relu(self.c3(x))
        x = x + F.relu(self.c4(x))
        x = F.avg_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    images = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(CatAddPool().eval(), CalibrationData(calib), QuantConfig(w_bits=8, a_bits=8), progress=False)
    qm.eval()
    aq = qm.act_quant

    def scale(name):
        return float(aq[qm.key(name)].scale.detach())

    def set_scale(name, v):
        aq[qm.key(name)].scale.data.fill_(v)

    # scales as calibration writes them (hi * (1 - k/100) / 255, stored float32), on ratios of small integers
    hi = scale("c1") * 255
    set_scale("c1", hi * 0.85 / 255)
    set_scale("cat", hi * 0.70 / 255)            # concat: s_c1 / s_cat = 17/14 (the mixnet case)
    hx = scale("c3") * 255
    set_scale("c3", hx * 0.85 / 255)
    set_scale("c4", hx * 0.85 / 255)
    set_scale("add", hx * 0.70 / 255)            # add: both 17/14
    set_scale("avg_pool2d", scale("add"))        # 2x2 average pool: s_in / s_out = 1
    set_scale("mean", scale("avg_pool2d") / 0.7)  # global average pool: 0.7 / 64
    return qm, images


def _local_diffs(qm, graph, images):
    """Per node, fed the integer network's inputs: the fake-quant node's output on the integer grid minus the integer
    node's output (ptq2tvm.fuzz.local_lsb's method)."""
    ref = run_reference(graph, graph.input.quantize(images), return_all=True)
    tensors = {graph.input.name: graph.input, **{n.name: n.out for n in graph.nodes}}
    env = {k: torch.from_numpy(tensors[k].dequantize(v)) for k, v in ref.items()}
    fnodes = {n.name: n for n in qm.graph.nodes}
    out = {}
    with torch.no_grad():
        for node in graph.nodes:
            y = qm._run_node(fnodes[node.name], env).numpy()
            out[node.name] = (node.op, to_grid(y, node.out) - ref[node.name].astype(np.int64), ref)
    return out


def test_requant_ops_match_the_integer_network_on_ties():
    qm, images = _model()
    graph = to_integer(qm)
    cat = next(n for n in graph.nodes if n.op == "concat")
    m, n = int(cat.arrays["multiplier"][0]), int(cat.arrays["shift"][0])
    assert n == 30 and abs(m - 17 / 14 * 2 ** 30) < 100      # 17/14 up to the float32 scales (mixnet: 1303829336)
    diffs = _local_diffs(qm, graph, images)
    ref = diffs["cat"][2]
    ties = np.isin(ref["c1"].astype(np.int64) % 14, [7])
    assert ties.sum() > 100                     # the inputs do hit the ties 7, 21, 35, ...
    ops = {}
    for name, (op, d, _) in diffs.items():
        if op in ("concat", "add", "avgpool2d", "mul"):
            ops[op] = ops.get(op, 0) + 1
            assert np.count_nonzero(d) == 0, f"{name} ({op}): {np.count_nonzero(d)} of {d.size} elements differ"
    assert ops == {"concat": 1, "add": 1, "avgpool2d": 2}


def test_whole_network_matches_the_reference():
    qm, images = _model()
    graph = to_integer(qm)
    ref = run_reference(graph, graph.input.quantize(images), return_all=True)
    with torch.no_grad():
        fq = qm(torch.from_numpy(images), return_all=True)
    for node in graph.nodes:
        d = to_grid(fq[node.name].numpy(), node.out) - ref[node.name].astype(np.int64)
        if node.op in ("concat", "add", "avgpool2d"):
            assert np.count_nonzero(d) == 0, f"{node.name}: {np.count_nonzero(d)} of {d.size} differ"


def test_float_path_and_gradients_are_kept():
    qm, images = _model()
    x = torch.from_numpy(images[:4])
    # activations off: the exact path is off, the float model is unchanged
    qm.set_quant(weights=False, acts=False)
    with torch.no_grad():
        env = qm(x, return_all=True)
    assert torch.equal(env["cat"], torch.cat([env["c1"], env["c2"]], 1))
    # activations on: a straight-through gradient reaches the input and the learnable scales (LSQ)
    qm.set_quant(weights=True, acts=True)
    xg = x.clone().requires_grad_(True)
    qm(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    for name in ("cat", "add", "avg_pool2d"):
        g = qm.act_quant[qm.key(name)].scale.grad
        assert g is not None and torch.isfinite(g)
