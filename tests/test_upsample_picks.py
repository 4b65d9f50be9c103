"""Nearest upsampling is taken as a repeat by the integer factor of its shapes only where torch picks those pixels:
a non-integer scale_factor whose output happens to be a whole multiple (2x2 by 3.01 -> 6x6, 'nearest-exact' by 2.2:
4 -> 8) picks other pixels in torch, and was folded as the repeat (fake-quant and .so silently off FP32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import quantize
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig


class _Up(nn.Module):
    def __init__(self, up):
        super().__init__()
        self.a, self.up, self.o = nn.Conv2d(3, 8, 3, 1, 1), up, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.o(self.up(F.relu(self.a(x))))


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _quantize(up, hw):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((8, 3, *hw)).astype(np.float32)
    model = _Up(up).eval()
    return model, x, quantize(model, x, QuantConfig(8, 8), progress=False)


@pytest.mark.parametrize("up, hw", [
    (nn.Upsample(scale_factor=3.01), (2, 2)),
    (_Fn(lambda x: F.interpolate(x, scale_factor=3.01)), (2, 2)),
    (_Fn(lambda x: F.interpolate(x, scale_factor=10 / 3)), (2, 2)),            # 2 -> 6, torch picks 0,0,0,0,1,1
    (_Fn(lambda x: F.interpolate(x, scale_factor=2.2, mode="nearest-exact")), (4, 4)),
], ids=["module_3.01", "interpolate_3.01", "interpolate_10/3", "nearest_exact_2.2"])
def test_non_integer_scale_that_picks_other_pixels_is_refused(up, hw):
    with pytest.raises(UnsupportedModelError, match="does not repeat each pixel"):
        _quantize(up, hw)


@pytest.mark.parametrize("up, hw", [
    (nn.Upsample(scale_factor=3), (2, 2)),
    (nn.Upsample(scale_factor=2.2), (3, 3)),              # 3 -> 6: torch's 2x path, the repeat
    (_Fn(lambda x: F.interpolate(x, size=(6, 9))), (2, 3)),
    (_Fn(lambda x: F.interpolate(x, size=x.shape[-1] * 2)), (4, 4)),    # a computed size
    (_Fn(lambda x: F.interpolate(x, scale_factor=x.shape[-1] // 2, mode="nearest-exact")), (4, 4)),
], ids=["module_3", "module_2.2_to_2x", "size", "computed_size", "computed_scale"])
def test_integer_repeats_still_fold_and_match_fp32(up, hw):
    model, x, qm = _quantize(up, hw)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(x)).numpy(), qm(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
