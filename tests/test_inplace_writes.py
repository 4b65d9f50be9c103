"""In-place writes trace like the model runs them: torch.fx records ``y.relu_()``, ``F.relu(y, inplace=True)``,
``nn.ReLU(inplace=True)(y)``, ``y.mul_(g)`` as a node whose later readers still read ``y`` before the write, so
``y.relu_(); return self.conv(y)`` (the call's result unused, or ``y`` read again beside it) was quantized without the
ReLU / gate: fake-quant and .so silently 0.3-0.9 relative error off FP32. Readers after the write now read it; a
write through another view of the data (``y[:, :4].relu_()``, ``y.view(n, -1).relu_()``, ``y[:, 4:].add_(...)``,
``y[:, :4].zero_()``) that is read again is refused by name."""

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
        self.relu, self.relu6 = nn.ReLU(inplace=True), nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.fn(self, x)


def _unused(write):
    """``y = conv(x); write(y); return o(y)``: the write's result unused."""
    def fn(s, x):
        y = s.a(x)
        write(s, y)
        return s.o(y)
    return fn


def _alias(s, x):
    y = s.a(x)
    z = s.relu(y)            # z and y are one tensor
    return s.o(z) + s.o(y)


def _write_then_read_both(s, x):
    y = s.a(x)
    return s.o(F.relu(y, inplace=True) + y)


def _chain(s, x):
    y = s.a(x)
    y.relu_()
    y.mul_(torch.sigmoid(s.b(F.relu(s.a(x)))))
    return s.o(y)


CASES = {
    "method_relu_": _unused(lambda s, y: y.relu_()),
    "torch_relu_": _unused(lambda s, y: torch.relu_(y)),
    "F_relu_inplace": _unused(lambda s, y: F.relu(y, inplace=True)),
    "F_hardtanh_inplace": _unused(lambda s, y: F.hardtanh(y, 0.0, 6.0, inplace=True)),
    "F_silu_inplace": _unused(lambda s, y: F.silu(y, inplace=True)),
    "module_relu_inplace": _unused(lambda s, y: s.relu(y)),
    "module_relu6_inplace": _unused(lambda s, y: s.relu6(y)),
    "sigmoid_": _unused(lambda s, y: y.sigmoid_()),
    "mul_": _unused(lambda s, y: y.mul_(torch.sigmoid(s.b(y)))),
    "add_": _unused(lambda s, y: y.add_(s.b(y))),
    "alias_of_inplace_module": _alias,
    "write_then_read_both": _write_then_read_both,
    "chain": _chain,
}


@pytest.mark.parametrize("name", list(CASES))
def test_inplace_write_is_seen_by_later_readers(name):
    torch.manual_seed(0)
    assert fake_quant_w8a8_error(_Net(CASES[name]).eval()) < 0.05


@pytest.mark.parametrize("write", [
    lambda s, y: y[:, :4].relu_(),
    lambda s, y: y.view(y.size(0), -1).relu_(),
    lambda s, y: y[:, 4:].add_(y[:, :4]),
    lambda s, y: y[:, :4].zero_(),
], ids=["slice_relu_", "view_relu_", "slice_add_", "slice_zero_"])
def test_write_through_another_view_is_refused_by_name(write):
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="writes in place into data that 'a'"):
        quantize(_Net(_unused(write)).eval(), x, QuantConfig(8, 8), progress=False)


def test_inplace_write_whose_result_is_not_read_again_is_dead():
    """A write nobody reads afterwards changes nothing the model returns (and the tracer keeps no node for it)."""
    def fn(s, x):
        y = s.a(x)
        out = s.o(y)
        y.relu_()
        return out
    torch.manual_seed(0)
    assert fake_quant_w8a8_error(_Net(fn).eval()) < 0.05


def test_inplace_writes_trace_under_inference_mode():
    """Inference tensors have no version counter: the trace runs its shape pass outside inference mode."""
    from ptq2tvm.frontend.trace import trace_model

    with torch.inference_mode():
        graph = trace_model(_Net(CASES["method_relu_"]).eval(), (3, 8, 8))
    assert graph.node("a").act == (0.0, float("inf"))


def _part_written(split, write):
    """``p, q = split(conv(x)); p = write(s, p); return o(torch.cat([p, q], 1))``: a write into one part, the other
    part read afterwards."""
    def fn(s, x):
        p, q = split(s.a(x))
        p = write(s, p)
        return s.o(torch.cat([p, q], 1))
    return fn


@pytest.mark.parametrize("split", [
    lambda y: y.chunk(2, 1),
    lambda y: torch.split(y, [4, 4], 1),
    lambda y: (y[:, :4], y[:, 4:]),
], ids=["chunk", "split", "slices"])
@pytest.mark.parametrize("write", [
    lambda s, p: F.relu(p, inplace=True),
    lambda s, p: s.relu6(p),
    lambda s, p: p.relu_(),
], ids=["F_relu_inplace", "module_relu6_inplace", "relu_"])
def test_write_into_one_part_leaves_the_other_part_readable(split, write):
    """The parts of a chunk / split / two slices share their base's version counter, but a write into one part
    does not reach the other: it was refused as a write through another view ('writes in place into data that
    'getitem_1' shares'), a regression for ``p = F.relu6(y[:, :4], inplace=True)`` (which traced before)."""
    torch.manual_seed(0)
    model = _Net(_part_written(split, write)).eval()
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    qm = quantize(model, x, QuantConfig(8, 8), progress=False)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(x)).numpy(), qm(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_write_into_overlapping_part_is_still_refused():
    """Two slices that share channels: a write into one reaches the other."""
    def fn(s, x):
        y = s.a(x)
        p, q = y[:, :5], y[:, 3:]
        p.relu_()
        return s.o(torch.cat([p[:, :3], q], 1))
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="writes in place into data that 'getitem_1'"):
        quantize(_Net(fn).eval(), x, QuantConfig(8, 8), progress=False)


def test_write_through_data_is_refused_by_name():
    """``y.data`` is the same memory with a version counter of its own: ``y.data.clamp_(min=0)`` then ``o(y)`` was
    quantized without the clamp (0.68 relative error off FP32, silently)."""
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="writes in place into data that 'a'"):
        quantize(_Net(_unused(lambda s, y: y.data.clamp_(min=0))).eval(), x, QuantConfig(8, 8), progress=False)
