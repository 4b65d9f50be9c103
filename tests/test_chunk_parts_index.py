"""A slice of the tuple a chunk / split returns (``torch.cat(x.chunk(2, 1)[::-1], 1)``) is refused naming the node;
it was a raw TypeError from the tracer (``int()`` of a slice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import quantize
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig


class _Swap(nn.Module):
    def __init__(self, sliced: bool):
        super().__init__()
        self.a, self.o, self.sliced = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 4, 1), sliced

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.sliced:
            return self.o(torch.cat(y.chunk(2, 1)[::-1], 1))
        p, q = y.chunk(2, 1)
        return self.o(torch.cat([q, p], 1))


def test_slice_of_chunk_parts_is_a_named_refusal():
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="indexing the parts of a chunk"):
        quantize(_Swap(True).eval(), x, QuantConfig(8, 8), progress=False)
    quantize(_Swap(False).eval(), x, QuantConfig(8, 8), progress=False)      # the same swap, parts named: folds
