"""``QuantConfig.first_layer_output_bits``: the first layer's output (what the second layer reads) stays 8-bit with
``first_last_8bit`` (BRECQ's convention); None restores a_bits; old fake-quant files load with their own bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.api import to_integer
from ptq2tvm.errors import QuantConfigError
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.ir.reference import run_reference


class _Stem(nn.Module):
    """conv -> Hardswish -> depthwise conv -> ReLU -> maxpool -> conv -> pool -> linear: a MobileNetV3-like stem."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.act1 = nn.Hardswish()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.pool(self.relu(self.dw(self.act1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv3(y), 1), 1))


def _bits(qm: QuantModel) -> dict[str, int]:
    return {k.replace("__", "."): q.bits for k, q in qm.act_quant.items()}


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (16, 1, 8, 8)).astype(np.float32)


def test_first_layer_output_is_8bit_and_none_restores_a_bits(calib, tmp_path):
    torch.manual_seed(0)
    model = _Stem().eval()
    qm = quantize_rtn(model, calib, QuantConfig(w_bits=4, a_bits=4), progress=False)
    bits = _bits(qm)
    # conv1's point (also the table's input) and the Hardswish table's output: what the depthwise conv reads
    assert bits["conv1"] == 8 and bits["act1"] == 8
    assert bits["dw"] == 4 and bits["conv3"] == 4              # later layers' outputs keep a_bits
    graph = to_integer(qm)
    assert graph.meta["layer_bits"]["dw"]["a_bits"] == 8          # the second layer reads 8 bits
    q = graph.input.quantize(calib[:4])
    assert np.array_equal(run_reference(graph, q).shape, (4, 3))

    old = quantize_rtn(model, calib, QuantConfig(w_bits=4, a_bits=4, first_layer_output_bits=None), progress=False)
    assert _bits(old)["act1"] == 4 and _bits(old)["conv1"] == 8    # conv1: the table's 8-bit input (lut_input_bits)
    off = QuantModel(qm.graph, QuantConfig(w_bits=4, a_bits=4, first_last_8bit=False, lut_input_bits=None))
    assert _bits(off)["act1"] == 4 and _bits(off)["conv1"] == 4

    # a file saved before the field existed (no key in its config) loads with a_bits at the first layer's output
    path = old.save(tmp_path / "old.pt")
    blob = torch.load(path, weights_only=True)
    del blob["config"]["first_layer_output_bits"]
    torch.save(blob, path)
    loaded = QuantModel.load(path)
    assert _bits(loaded)["act1"] == 4
    assert _bits(QuantModel.load(qm.save(tmp_path / "new.pt")))["act1"] == 8


def test_first_layer_output_through_relu_and_pool():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv2(self.pool(torch.relu(self.conv1(x))))
            return self.fc(y.mean((2, 3)))

    from ptq2tvm.frontend.trace import trace_model

    g = trace_model(Net().eval(), (1, 9, 9))
    bits = _bits(QuantModel(g, QuantConfig(w_bits=4, a_bits=4)))
    assert bits["conv1"] == 8 and bits["conv2"] == 4
    assert _bits(QuantModel(g, QuantConfig(w_bits=4, a_bits=4, first_layer_output_bits=6)))["conv1"] == 6
    with pytest.raises(QuantConfigError, match="first_layer_output_bits"):
        QuantConfig(first_layer_output_bits=0).validate()
