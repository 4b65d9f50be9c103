"""Arguments computed from tensor shapes trace like their constant spelling: ``F.avg_pool2d(x, x.size()[2:])`` (a
global pool), ``F.max_pool2d(x, kernel_size=x.size(2))``, ``F.adaptive_avg_pool2d(x, x.shape[-1] // 2)``,
``x[:, :x.shape[1] // 2]``, ``x.split(c // 2, dim=1)``, ``x.flatten(x.dim() - 3)``, ``x.mean([x.ndim - 2, x.ndim - 1])``.
They raised a raw TypeError from the op handlers (``'Node' object is not subscriptable``, ``slice indices must be
integers``) or refused the split. A value computed from the batch size is not taken as a constant, and a handler
that cannot read an argument is one line naming the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import fake_quant_w8a8_error  # noqa: E402
from ptq2tvm.api import quantize
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig


class _Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.o, self.fc, self.fn = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 4, 1), nn.Linear(8, 5), fn

    def forward(self, x):
        return self.fn(self, self.a(x))


def _halves(s, y):
    c = y.shape[1]
    return s.o(torch.cat([y[:, c // 2:], y[:, :c // 2]], 1))


def _split(s, y):
    a, b = y.split(y.size(1) // 2, dim=1)
    return s.o(torch.cat([b, a], 1))


CASES = {
    "avg_pool_size_slice": lambda s, y: s.fc(F.avg_pool2d(y, y.size()[2:]).flatten(1)),
    "avg_pool_size3": lambda s, y: s.fc(F.avg_pool2d(y, y.size(3)).view(y.size(0), -1)),
    "avg_pool_shape_kw": lambda s, y: s.fc(F.avg_pool2d(y, kernel_size=y.shape[-2:]).flatten(1)),
    "max_pool_size_kw": lambda s, y: s.fc(F.max_pool2d(y, kernel_size=y.size(2)).flatten(1)),
    "adaptive_computed": lambda s, y: s.o(F.adaptive_avg_pool2d(y, y.shape[-1] // 2)),
    "channel_halves": _halves,
    "split_computed": _split,
    "flatten_computed": lambda s, y: s.fc(y.mean((2, 3), keepdim=True).flatten(start_dim=y.dim() - 3)),
    "mean_ndim": lambda s, y: s.fc(y.mean(dim=[y.ndim - 2, y.ndim - 1])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shape_computed_arguments_trace_and_match_fp32(name):
    torch.manual_seed(0)
    assert fake_quant_w8a8_error(_Net(CASES[name]).eval()) < 0.05


def test_batch_size_is_not_taken_as_a_constant():
    """``y[:, :y.size(0)]`` keeps 1 channel at batch 1 and 4 at batch 4: refused by name, not baked in."""
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=r"getitem \(getitem\): cannot read its arguments"):
        quantize(_Net(lambda s, y: s.o(y[:, :y.size(0)].expand(-1, 8, -1, -1))).eval(), x, QuantConfig(8, 8),
                 progress=False)
