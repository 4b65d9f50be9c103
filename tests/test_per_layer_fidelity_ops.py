"""quantize --per-layer on user-written models (YOLOv5 / MobileNetV3 / EfficientNet-PyTorch spellings, session 35):
every op that rounds onto a new grid is a row."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ptq2tvm.api import fidelity, quantize
from ptq2tvm.data import CalibrationData
from ptq2tvm.frontend.qmodel import QuantConfig


class _SiLU(nn.Module):  # YOLOv5 utils/activations.py
    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)


class _SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = _SiLU()
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(8, 4, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.act(self.conv(x))
        y = torch.cat((self.b1(y), self.b2(y)), 1)
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1))


def test_per_layer_fidelity_lists_activation_tables_gates_and_concats():
    """quantize --per-layer listed only conv / linear / add: a 4-bit SiLU table (the biggest SQNR drop of a YOLOv5-style
    net at W4A4: 23.8 -> 11.0 dB) was charged to the next conv; its lookup table, the SE multiply and the concat are
    layers of their own."""
    torch.manual_seed(0)
    m = _SENet().eval()
    x = np.random.default_rng(0).normal(size=(48, 1, 8, 8)).astype(np.float32)
    qm = quantize(m, CalibrationData(x[:32]), QuantConfig(w_bits=4, a_bits=4), progress=False)
    rep = fidelity(m, qm, x[32:], per_layer=True)
    got = {(p.name, p.op) for p in rep.per_layer}
    assert ("act", "lut") in got
    assert {"conv", "b1", "b2", "se", "fc"} <= {n for n, _ in got}
    assert {op for _, op in got} >= {"lut", "mul", "concat"}
    assert "per layer" in rep.summary() and "  act  " in rep.summary()
