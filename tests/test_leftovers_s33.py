"""Session 33: leftovers of session 32 (a module called twice and --layer-bits, ...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ptq2tvm.errors import QuantConfigError
from ptq2tvm.mixed.layerbits import repeated_call_of, resolve_layer_bits


class SharedBlock(nn.Module):
    """``blk`` runs twice on its own output: two layers (``blk``, ``blk#1``) with one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blk = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.blk(x))
        x = torch.relu(self.blk(x))
        return self.fc(x.mean((2, 3)))


NAMES = ["stem", "blk", "blk#1", "fc"]


def test_repeated_call_names():
    assert repeated_call_of("blk#1") == "blk" and repeated_call_of("a.b#12") == "a.b"
    assert repeated_call_of("blk") is None and repeated_call_of("blk#x") is None and repeated_call_of("#") is None


def test_module_name_sets_every_call_and_a_call_name_overrides():
    assert resolve_layer_bits("blk=4/8", NAMES) == ({"blk": 4, "blk#1": 4}, {"blk": 8, "blk#1": 8})
    # the call's own name wins over its module's name in either order, and over globs
    for spec in ("blk=4,blk#1=8", "blk#1=8,blk=4", "b*=2,blk#1=8,blk=4"):
        assert resolve_layer_bits(spec, NAMES)[0] == {"blk": 4, "blk#1": 8}, spec
    assert resolve_layer_bits("blk#1=2", NAMES)[0] == {"blk#1": 2}
    assert resolve_layer_bits("blk*=2", NAMES)[0] == {"blk": 2, "blk#1": 2}
    with pytest.raises(QuantConfigError, match=r"'blk#2' matches no conv/linear layer.*blk#1"):
        resolve_layer_bits("blk#2=4", NAMES)


def test_layer_bits_reach_both_calls_in_the_integer_graph():
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.mixed.cli import _layer_names

    torch.manual_seed(0)
    model = SharedBlock().eval()
    images = np.random.default_rng(0).random((16, 1, 12, 12), dtype=np.float32)
    names = _layer_names(model, images)
    assert names == NAMES
    w, a = resolve_layer_bits("blk=4/4", names)
    qm = quantize(model, images, QuantConfig(layer_w_bits=w, layer_a_bits=a), method="rtn", progress=False)
    bits = to_integer(qm).meta["layer_bits"]
    calls = [n for n in bits if n == "blk" or repeated_call_of(n) == "blk"]
    assert len(calls) == 2, bits
    assert all(bits[n]["w_bits"] == 4 and bits[n]["a_bits"] == 4 for n in calls), bits
    assert bits["stem"]["w_bits"] == 8 and bits["fc"]["w_bits"] == 8
