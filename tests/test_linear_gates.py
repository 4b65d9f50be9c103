"""Squeeze-excitation gates written with Linear layers (the classic SENet code, the d-li14 MobileNetV3's SELayer:
pool -> view(b, c) -> Linear / ReLU / Linear / Sigmoid or h_sigmoid -> view(b, c, 1, 1) -> x * y or
x * y.expand_as(x)) trace as 1x1 convs at the Linear layers' paths: the same quantized model, bit for bit, as the
conv-written gate with the same weights, and the .so bit-exact. The reshape back to (N, C, 1, 1) was refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import HSigmoid
from ptq2tvm.api import quantize, to_integer
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig


class LinearSE(nn.Module):
    def __init__(self, c, gate, expand):
        super().__init__()
        self.avg_pool, self.expand = nn.AdaptiveAvgPool2d(1), expand
        self.fc = nn.Sequential(nn.Linear(c, c // 4), nn.ReLU(inplace=True), nn.Linear(c // 4, c), gate)

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * (y.expand_as(x) if self.expand else y)


class ConvSE(nn.Module):
    """The same gate written with 1x1 convs (timm style), weights copied from a LinearSE."""

    def __init__(self, lin: LinearSE):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        convs = []
        for m in lin.fc:
            if isinstance(m, nn.Linear):
                conv = nn.Conv2d(m.in_features, m.out_features, 1)
                conv.weight.data = m.weight.data.view(m.out_features, m.in_features, 1, 1).clone()
                conv.bias.data = m.bias.data.clone()
                convs.append(conv)
            else:
                convs.append(m)
        self.fc = nn.Sequential(*convs)

    def forward(self, x):
        return x * self.fc(self.avg_pool(x))


class Net(nn.Module):
    def __init__(self, se):
        super().__init__()
        self.a, self.se, self.o = nn.Conv2d(3, 16, 3, padding=1), se, nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.o(self.se(F.relu(self.a(x))))


@pytest.mark.parametrize("gate, fn", [(HSigmoid(), "hardsigmoid"), (nn.Sigmoid(), "sigmoid")], ids=["h_sigmoid",
                                                                                                    "sigmoid"])
@pytest.mark.parametrize("expand", [False, True], ids=["x_times_y", "expand_as"])
def test_linear_se_is_the_conv_se(gate, fn, expand):
    torch.manual_seed(0)
    model = Net(LinearSE(16, gate, expand)).eval()
    twin = Net(ConvSE(model.se)).eval()
    twin.a, twin.o = model.a, model.o
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    qm, qt = (quantize(m, x, QuantConfig(8, 8), progress=False) for m in (model, twin))
    nodes = to_integer(qm).nodes
    assert [(n.op, n.name) for n in nodes] == [("conv2d", "a"), ("avgpool2d", "se.avg_pool"), ("conv2d", "se.fc.0"),
                                               ("conv2d", "se.fc.2"), ("lut", "se.fc.3"), ("mul", "mul"),
                                               ("conv2d", "o")]
    assert nodes[4].attrs["fn"] == fn
    t = torch.from_numpy(x)
    with torch.no_grad():
        got, want, ref = qm(t), qt(t), model(t)
    assert torch.equal(got, want)
    assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 0.03


def test_linear_se_compiles_bit_exact(tmp_path):
    pytest.importorskip("tvm")
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    graph = to_integer(quantize(Net(LinearSE(16, HSigmoid(), True)).eval(), x, QuantConfig(8, 8), progress=False))
    compile_so(graph, tmp_path / "m.so", batch=4)
    q = graph.input.quantize(x[:8])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "m.so").run_int(q), run_reference(graph, q))


def test_a_reshape_to_n_c_1_1_of_another_kind_stays_refused():
    """A Linear layer also called elsewhere, or a (N, C) tensor that did not come from a (N, C, 1, 1) map, is not
    rewritten: the reshape is refused by name as before."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc, self.o = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            g = self.fc(self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1)))        # called twice
            return self.o(y * torch.sigmoid(g).view(-1, 8, 1, 1))

    x = np.random.default_rng(0).standard_normal((8, 3, 6, 6)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=r"view"):
        quantize(Shared().eval(), x, QuantConfig(8, 8), progress=False)
