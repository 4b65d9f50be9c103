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


def test_quantize_summary_survives_a_build_that_cannot_count_its_bytes(tmp_path, capsys, monkeypatch):
    """quantize counts the stored bytes by setting up the default build (after the run is saved): a graph that build
    refuses gets the count before channel padding and a warning, not a traceback that hides the finished run."""
    import json

    from conftest import run_cli

    import ptq2tvm.api as api

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
    base = ["quantize", "--model", "resnet_small", "--data", tmp_path / "x.npy", "--calib-size", 8,
            "--fidelity-images", 0, "--w-bits", 4, "--a-bits", 4, "--no-progress"]

    def refuse(*a, **k):
        raise ValueError("no kernel for op 'mystery'\nsecond line")

    monkeypatch.setattr(api, "built_weight_bytes", refuse)
    rc, out, err = run_cli(capsys, *base, "--out", tmp_path / "r", "--json", tmp_path / "q.json")
    assert rc == 0, err
    assert ("could not be set up to count its stored weight bytes (ValueError: no kernel for op 'mystery'); the size "
            "below is before channel padding") in err and "second line" not in err
    assert "in this CPU's default build at batch 1, before channel padding (" in out, out
    from ptq2tvm.ir.graph import IntegerGraph

    graph = IntegerGraph.load(tmp_path / "r" / "model.qgraph.npz")
    assert json.loads((tmp_path / "q.json").read_text())["weight_bytes"] == api.stored_weight_bytes(graph)
