"""Functional and method calls whose tensors / leading arguments are passed by keyword trace like their positional
spelling: ``F.conv2d(input=x, weight=w, padding=1)``, ``torch.sigmoid(input=x)``, ``torch.add(input=a, other=b)``,
``F.avg_pool2d(input=x, kernel_size=2)``, ``torch.mean(input=x, dim=...)``, ``F.pixel_shuffle(input=x, ...)``,
``x.split(split_size=4, dim=1)``, ``x.transpose(dim0=1, dim1=2)`` (a channel shuffle). They raised raw IndexError /
TypeError from the tracer (``node.args[0]``), or refused a valid channel shuffle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import fake_quant_w8a8_error


class _Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.o, self.fn = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), fn
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        return self.o(self.fn(self, self.a(x)))


CASES = {
    "conv2d": lambda s, x: F.conv2d(input=x, weight=s.w, padding=1),
    "sigmoid": lambda s, x: torch.sigmoid(input=x),
    "tanh": lambda s, x: torch.tanh(input=x),
    "gelu": lambda s, x: F.gelu(input=x),
    "add": lambda s, x: torch.add(input=x, other=F.relu(x)),
    "mul": lambda s, x: torch.mul(input=x, other=torch.sigmoid(x)),
    "avg_pool2d": lambda s, x: F.avg_pool2d(input=x, kernel_size=2),
    "mean": lambda s, x: x * torch.mean(input=x, dim=(2, 3), keepdim=True),
    "pixel_shuffle": lambda s, x: F.pixel_unshuffle(F.pixel_shuffle(input=x, upscale_factor=2), 2),
    "channel_shuffle": lambda s, x: F.channel_shuffle(input=x, groups=2),
    "split_method": lambda s, x: torch.cat([x.split(split_size=4, dim=1)[1], x[:, :4]], 1),
    "split_computed_size": lambda s, x: torch.cat([x.split(x.size(1) // 2, dim=1)[1], x[:, :4]], 1),
    "chunk_computed_count": lambda s, x: torch.cat([x.chunk(chunks=x.shape[1] // 4, dim=1)[1], x[:, 4:]], 1),
    "transpose_method": lambda s, x: x.view(x.size(0), 2, 4, 8, 8).transpose(dim0=1, dim1=2).reshape(x.size(0), 8, 8, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_keyword_arguments_trace_and_fold(name):
    torch.manual_seed(0)
    assert fake_quant_w8a8_error(_Net(CASES[name]).eval()) < 0.05
