"""Model intake: tracing, BN folding, fusion, and the errors for unsupported models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel
from ptq2tvm.frontend.trace import trace_model


def test_folded_graph_matches_the_model(tiny_model, tiny_data):
    g = trace_model(tiny_model, (1, 12, 12))
    fp = QuantModel(g, QuantConfig()).set_quant(False, False)
    x = torch.from_numpy(tiny_data)
    with torch.no_grad():
        assert torch.allclose(fp(x), tiny_model(x), atol=1e-5)
    assert not any(n.op in ("bn", "identity", "act") for n in g.nodes)


def test_fusion_decisions(tiny_model):
    g = trace_model(tiny_model, (1, 12, 12))
    by = {n.name: n for n in g.nodes}
    assert by["stem"].act == (0.0, float("inf"))                       # conv+bn+relu -> one conv
    assert by["block1.conv2"].residual == "pool"                       # add fused into the main-branch conv
    assert by["block1.conv2"].act == (0.0, float("inf"))              # relu after the add
    assert by["block2.conv2"].residual == "block2.downsample.0"       # deeper branch fused, shortcut quantized
    assert by["ir.conv.6"].residual == "block2.conv2" and by["ir.conv.6"].act is None   # MBV2: signed output
    assert by["ir.conv.3"].attrs["groups"] == 32 and by["ir.conv.3"].act == (0.0, 6.0)
    assert by["grouped"].act == (-1.0, 2.0)
    assert by["gap"].op == "avgpool" and by["gap"].attrs["kernel"] == (4, 4)  # 12 -> 6 -> 3 -> 4
    # the fused producer runs after both of its inputs exist
    order = [n.name for n in g.nodes]
    for n in g.nodes:
        for i in n.data_inputs:
            assert order.index(i) < order.index(n.name), (n.name, i)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.PReLU()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.up(self.act(self.conv(x)))
        x = torch.softmax(x, 1)
        return self.fc(x.mean([2, 3]))


def test_unsupported_layers_are_all_listed_by_name():
    with pytest.raises(UnsupportedModelError) as e:
        trace_model(Unsupported(), (1, 8, 8))
    msg = str(e.value)
    assert "3 unsupported" in msg
    for name in ("act (PReLU)", "up (Upsample): upsampling mode 'bilinear'", "softmax"):
        assert name in msg


def test_batchnorm_that_cannot_be_folded_becomes_a_depthwise_conv():
    """A BN that follows no conv it could fold into (after a ReLU, DenseNet's pre-activation BN) is the per-channel
    affine map it is: a depthwise 1x1 conv, same float output."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    m[2].running_mean.uniform_(-1, 1)
    m[2].running_var.uniform_(0.5, 2)
    g = trace_model(m, (1, 8, 8))
    bn = g.node("2")
    assert bn.op == "conv" and bn.attrs["groups"] == 4 and tuple(bn.weight.shape) == (4, 1, 1, 1)
    x = torch.randn(3, 1, 8, 8)
    from ptq2tvm.frontend.qmodel import QuantConfig, QuantModel

    qm = QuantModel(g, QuantConfig()).set_quant(weights=False, acts=False)
    torch.testing.assert_close(qm(x), m(x), rtol=1e-5, atol=1e-5)


def test_untraceable_model():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModelError, match="torch.fx cannot trace"):
        trace_model(Dynamic(), (1, 4, 4))


def test_wrong_input_shape_for_model():
    with pytest.raises(UnsupportedModelError, match=r"does not run on an input of shape \(1, 3, 12, 12\)"):
        trace_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 2)), (3, 12, 12))
