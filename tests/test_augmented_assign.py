"""``y += z`` / ``y *= g`` trace as the in-place writes the model runs: torch.fx's Proxy has no ``__iadd__``, so
Python fell back to ``y = y + z`` and a second name of the same tensor (``skip = y; y += z; return conv(skip)``, or
``y`` kept in a list) read the value before the write: fake-quant and .so silently ~0.2 relative error off FP32."""

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
        self.a, self.b, self.o, self.fn = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 4, 1), fn
        self.o2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.fn(self, x)


def _skip_alias(s, x):
    y = s.a(x)
    skip = y
    y += s.b(y)                  # skip is y: both hold the sum
    return s.o(F.relu(skip)) + s.o(y)


def _list_alias(s, x):
    y = s.a(x)
    feats = [y]
    y += s.b(F.relu(y))
    return s.o2(torch.cat(feats + [y], 1))


def _gate_alias(s, x):
    y = s.a(x)
    keep = y
    y *= torch.sigmoid(s.b(y))
    return s.o(keep + y)


def _shape_arith(s, x):
    y = F.max_pool2d(F.relu(s.a(x)), 2)
    size = y.shape[-1]
    size *= 2                    # an augmented assignment on a Python int, not a tensor
    return s.o(F.interpolate(y, size=size) + s.b(F.relu(s.a(x))))


def _plain(s, x):
    y = s.b(F.relu(s.a(x)))
    y += s.a(x)
    return s.o(F.relu(y))


@pytest.mark.parametrize("fn", [_skip_alias, _list_alias, _gate_alias, _shape_arith, _plain],
                         ids=["skip_alias", "list_alias", "gate_alias", "shape_arith", "plain"])
def test_augmented_assignment_is_seen_through_every_name(fn):
    torch.manual_seed(0)
    assert fake_quant_w8a8_error(_Net(fn).eval()) < 0.05


def test_augmented_assignment_by_one_is_dropped():
    def fn(s, x, scale=1.0):
        y = s.a(x)
        y *= scale
        return s.o(y)

    class Net(_Net):
        def forward(self, x, scale=1.0):
            return fn(self, x, scale)

    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    quantize(Net(fn).eval(), x, QuantConfig(8, 8), progress=False)


def test_unsupported_augmented_assignment_is_named():
    def fn(s, x):
        y = s.a(x)
        y -= s.b(y)
        return s.o(y)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=r"isub \(isub\): operation not supported"):
        quantize(_Net(fn).eval(), x, QuantConfig(8, 8), progress=False)
