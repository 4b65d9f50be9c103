"""Weighted layers (conv / linear, fused residual add and clamp) of the fake-quant model compute the integer graph's
codes exactly when no gradient flows (``QuantModel._integer_weighted``).

The float path (``F.conv2d`` of ``w_q * s_w * xi`` by ``x_q * s_x`` in float32, then ``round(y / s_out)``) puts
values within float32 error of a .5 boundary on the other side from the integer network's int32 accumulator, dyadic
multiplier and half-up rounding: with AdaQTransform (xi, eta learned per channel) a W4A4 QDrop run had one conv 1 LSB
off on rare elements and an SE gate spread it to 26 LSB at the output (parity 99.80% exact). Now the integer codes of
the input, the fold's own int32 bias and dyadic multipliers (``ptq2tvm.fold.fold.weighted_bias`` /
``weighted_multipliers``) and RHU give the integer network's codes; with a gradient the float path runs as before
(reconstruction's speed and gradients are unchanged).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import quantize, to_integer
from ptq2tvm.data import CalibrationData
from ptq2tvm.frontend import qmodel as qmodel_mod
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.parity import to_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ResLin(nn.Module):
    """A conv with a fused residual add + ReLU, a conv without activation (asymmetric output: its reader has a zero
    point), a depthwise conv, a ReLU6 linear and a last linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.c2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.lin = nn.Conv2d(16, 24, 1)
        self.dw = nn.Conv2d(24, 24, 3, 2, 1, groups=24)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.c2(F.relu(self.c1(x))))     # c2: conv + residual + ReLU, fused
        x = self.lin(x)                                  # no activation: asymmetric, read with its zero point
        x = F.relu(self.dw(x))
        x = F.relu6(self.fc1(x.mean((2, 3))))
        return self.fc2(x)


def _adaq_model(w_bits: int, a_bits: int, **cfg):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 12, 12)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(ResLin().eval(), CalibrationData(calib), QuantConfig(w_bits=w_bits, a_bits=a_bits, **cfg),
                      progress=False)
    qm.eval().enable_adaq()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():              # learned-looking xi / eta: every channel's grid moved off the calibrated one
        for layer in qm.layers.values():
            c = layer.xi.numel()
            layer.xi.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
            layer.eta.copy_(0.1 * torch.randn(c, generator=g) * layer.bias.detach().abs().mean())
    return qm


def _diffs(qm, images):
    graph = to_integer(qm)
    ref = run_reference(graph, graph.input.quantize(images), return_all=True)
    with torch.no_grad():
        fq = qm(torch.from_numpy(images), return_all=True)
    return {node.name: (node.op, to_grid(fq[node.name].numpy(), node.out) - ref[node.name].astype(np.int64))
            for node in graph.nodes}


def _images(n=400, seed=2):
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


@pytest.mark.parametrize("w_bits,a_bits,cfg", [
    (4, 4, {}),
    (8, 8, {}),
    (4, 4, dict(layer_w_bits={"c2": 8, "fc1": 8}, layer_a_bits={"c2": 8}, first_last_8bit=False)),
], ids=["w4a4", "w8a8", "mixed"])
def test_every_layer_equals_the_integer_network(w_bits, a_bits, cfg):
    qm = _adaq_model(w_bits, a_bits, **cfg)
    diffs = _diffs(qm, _images())
    ops = set()
    for name, (op, d) in diffs.items():
        ops.add(op)
        assert np.count_nonzero(d) == 0, (f"{name} ({op}): {np.count_nonzero(d)} of {d.size} codes differ, "
                                          f"max {abs(d).max()}")
    assert {"conv2d", "dense"} <= ops
    fused = [n for n in to_integer(qm).nodes if n.op == "conv2d" and len(n.inputs) == 2]
    assert [n.name for n in fused] == ["c2"]


def test_the_float_path_was_not_exact():
    """The test above fails on the float path (what the model computed before): rare 1-LSB differences."""
    qm = _adaq_model(4, 4)
    qm.exact_weighted = False
    total = sum(np.count_nonzero(d) for op, d in _diffs(qm, _images()).values())
    assert total > 0


def test_wide_reduction_beyond_float32_is_exact():
    """8-bit codes times 8-bit weights over 2,304 terms: partial sums beyond 2^24 (the float32 conv is split into
    input-channel chunks that stay exact, or runs in float64)."""
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 256, 3, 1, 1)
            self.b = nn.Conv2d(256, 8, 3, 1, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))

    torch.manual_seed(0)
    m = Wide().eval()
    with torch.no_grad():
        m.b.weight.copy_(torch.rand_like(m.b.weight) * 0.1)      # same-sign weights: |sum| reaches the bound
        m.a.bias.fill_(1.0)
    rng = np.random.default_rng(0)
    calib = np.abs(rng.standard_normal((16, 3, 8, 8))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(m, CalibrationData(calib), QuantConfig(w_bits=8, a_bits=8), progress=False)
    qm.eval().enable_adaq()
    layer = qm.layer("b")
    q_w = layer.wq.integer(layer.weight.detach()).detach()
    assert float(q_w.abs().sum((1, 2, 3)).max()) * 255 > 1 << 24
    x = np.abs(rng.standard_normal((64, 3, 8, 8))).astype(np.float32) * 3
    for name, (op, d) in _diffs(qm, x).items():
        assert np.count_nonzero(d) == 0, f"{name}: {np.count_nonzero(d)} differ"


def test_gradient_mode_keeps_the_float_path():
    """With a gradient (reconstruction) the layer runs its float path as before: same values and gradients as with
    the exact path switched off; without one, the exact values."""
    qm = _adaq_model(4, 4)
    x = torch.from_numpy(_images(8))
    for p in qm.parameters():
        p.requires_grad_(True)
    y = qm(x)
    y.sum().backward()
    grads = {k: p.grad.clone() for k, p in qm.named_parameters() if p.grad is not None}
    qm.zero_grad(set_to_none=True)
    qm.exact_weighted = False
    y0 = qm(x)
    y0.sum().backward()
    assert torch.equal(y, y0)
    assert grads.keys() == {k for k, p in qm.named_parameters() if p.grad is not None} and grads
    assert all(torch.equal(grads[k], p.grad) for k, p in qm.named_parameters() if p.grad is not None)
    with torch.no_grad():
        float_path = qm(x)
        qm.exact_weighted = True
        exact = qm(x)
    s = float(qm.act_quant[qm.key("fc2")].scale.detach())
    assert torch.allclose(exact, float_path, atol=3 * s)          # the same model, up to the rare 1-LSB differences


def test_falls_back_to_the_float_path_off_the_grid(monkeypatch):
    """Weights or activations unquantized, QDrop passing elements in float, soft AdaRound weights, an observing
    quantizer: the integer form is undefined, the float path runs."""
    qm = _adaq_model(4, 4)
    x = torch.from_numpy(_images(4))
    calls = []
    orig = qmodel_mod.QuantModel._integer_weighted

    def spy(self, n, env):
        out = orig(self, n, env)
        calls.append(out is not None)
        return out

    def run():
        calls.clear()
        with torch.no_grad():
            qm(x)
        return list(calls)

    monkeypatch.setattr(qmodel_mod.QuantModel, "_integer_weighted", spy)
    assert run() == [True] * 7                        # stem, c1, c2, lin, dw, fc1, fc2
    qm.set_quant(weights=False, acts=True)
    assert run() == [False] * 7
    qm.set_quant(weights=True, acts=True)
    layer = qm.layer("c1")
    layer.wq.init_adaround(layer.weight)
    assert run() == [True, False] + [True] * 5        # soft AdaRound weights: float
    layer.wq.soft = False
    assert run() == [True] * 7                        # hard AdaRound integers: exact
    layer.wq.clear_adaround()
    q = qm.act_quant[qm.key("c2")]
    q.drop_prob = 0.5
    assert run() == [True, True, False, False, True, True, True]      # c2 writes the QDrop tensor, lin reads it
    q.drop_prob = None
    q.observing = True
    assert run() == [True, True, False] + [True] * 4                  # calibration observes the float output
    q.observing = False


def test_float64_path_is_exact(monkeypatch):
    """Where no exact float32 conv is available (a GPU, a CPU conv backend that transforms the operands), the
    accumulation runs in float64 and the requantization in int64: the same codes."""
    monkeypatch.setattr(qmodel_mod, "_direct_fp32_conv", lambda *a: False)
    qm = _adaq_model(4, 4)
    for name, (op, d) in _diffs(qm, _images(200)).items():
        assert np.count_nonzero(d) == 0, f"{name}: {np.count_nonzero(d)} differ"


def test_constants_cache_follows_every_write(monkeypatch):
    """The layer's integer constants are computed once and reused while nothing they depend on changed; a write of
    any kind (in place under no_grad, through ``.data`` (which no version counter sees), a new tensor, AdaRound
    hardening, other weight bits, other input / output steps, another device string) is seen at the next forward:
    the exact path keeps equalling the integer network after each."""
    qm = _adaq_model(4, 4)
    images = _images(64)
    x = torch.from_numpy(images)
    computed = []
    orig = qmodel_mod.QLayer._compute_integer_constants

    def spy(self, *a, **k):
        computed.append(a[5])                        # the layer's name
        return orig(self, *a, **k)

    monkeypatch.setattr(qmodel_mod.QLayer, "_compute_integer_constants", spy)

    def forward_computes():
        computed.clear()
        with torch.no_grad():
            qm(x)
        return sorted(computed)

    def exact():
        for name, (op, d) in _diffs(qm, images).items():
            assert np.count_nonzero(d) == 0, f"{name}: {np.count_nonzero(d)} differ"

    assert len(forward_computes()) == 7
    assert forward_computes() == []                  # cached: nothing recomputed
    c1, lin = qm.layer("c1"), qm.layer("lin")
    c1.weight.data.mul_(1.07)                        # .data: c1.weight._version does not move
    assert forward_computes() == ["c1"]
    exact()
    with torch.no_grad():
        lin.bias.add_(0.05 * lin.bias.abs().mean())
    assert forward_computes() == ["lin"]
    exact()
    lin.xi.data[3] *= 1.5
    lin.eta.data = lin.eta.data + 0.01               # a new tensor under the parameter
    c1.wq.scale.data[0] *= 1.1
    assert forward_computes() == ["c1", "lin"]
    exact()
    c1.wq.init_adaround(c1.weight)
    c1.wq.soft = False                               # hard AdaRound integers
    assert "c1" in forward_computes()
    exact()
    c1.wq.alpha.data.neg_()                          # other rounding decisions
    assert "c1" in forward_computes()
    exact()
    c1.wq.clear_adaround()
    q = qm.act_quant[qm.key("c1")]                   # c1's output step: c1 and its reader c2
    q.scale.data *= 1.25
    assert forward_computes() == ["c1", "c2"]
    exact()


@pytest.mark.parametrize("parts", [1, 3])
def test_float32_requantization_equals_int64_ties_included(parts):
    """:func:`_requant_f32` (float32, elements near a tie redone in int64) equals :func:`_requant_int64` on every
    element, on multipliers that make exact ties frequent (m = 2^30: RHU of odd sums / 2) and on random ones."""
    from ptq2tvm.frontend.qmodel import IntegerConstants, _f32_requant_constants, _requant_f32, _requant_int64

    rng = np.random.default_rng(parts)
    c_out, vmax, rvmax = 8, 15, 255
    q_w = rng.integers(-8, 8, (c_out, 16 * parts, 3, 3))
    bias = rng.integers(-3000, 3000, c_out).astype(np.float64)
    m = np.concatenate([[1 << 30, 1 << 30, 3 << 28], rng.integers(1 << 30, 1 << 31, c_out - 3)]).astype(np.int64)
    n = np.array([36, 38, 37, 38, 40, 41, 37, 39], dtype=np.int64)
    mr = rng.integers(1 << 26, 1 << 29, c_out).astype(np.int64)
    mr[0] = 1 << 30                                                 # residual ties too
    f32 = _f32_requant_constants(q_w, bias, m, mr, n, vmax, rvmax, parts)
    assert f32 is not None

    def t(v, dtype=torch.int64):
        return torch.from_numpy(np.asarray(v)).to(dtype)

    c = IntegerConstants(t(q_w, torch.float32), [(0, 1)] * parts, t(bias), t(m), t(n),
                         t(np.left_shift(np.int64(1), n - 1)), t(mr), (*(t(v, torch.float32) for v in f32[:3]), f32[3]))
    bound = vmax * np.abs(q_w).reshape(c_out, -1).sum(axis=1) // parts
    acc = [t(rng.integers(-bound, bound + 1, (64, 12, 12, c_out)).transpose(0, 3, 1, 2).copy()) for _ in range(parts)]
    acc[0][:, :, :4] //= 64                                            # small values: more ties near zero
    r = t(rng.integers(-rvmax, rvmax + 1, (64, c_out, 12, 12)), torch.float32)
    q32 = _requant_f32([a.to(torch.float32) for a in acc], c, r)
    q64 = _requant_int64(sum(acc), c, r)
    assert torch.equal(q32.to(torch.int64), q64)
    # exact ties (v = 2^(n-1) mod 2^n) occurred: round(t) alone (half to even) gets half of them wrong
    v = (sum(acc) + t(bias).view(1, -1, 1, 1)) * t(m).view(1, -1, 1, 1) + r.to(torch.int64) * t(mr).view(1, -1, 1, 1)
    nn_ = t(n).view(1, -1, 1, 1)
    ties = (v & ((1 << nn_) - 1)) == (1 << (nn_ - 1))
    assert int(ties.sum()) > 100
