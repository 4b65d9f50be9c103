"""Activations spelled out with arithmetic (timm / MobileNetV3 repositories' hard_swish, YOLOv5's Hardswish and SiLU,
EfficientNet-PyTorch's Swish, GELU written with erf or tanh) trace as the one activation they compute: one exact
lookup table, the same quantized model as the native spelling (bit for bit), and the .so bit-exact. They were
refused ("add with a constant", "truediv: operation not supported") or cost a table, a multiply and one more
quantized tensor (x * sigmoid(x))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import HSigmoid  # the MobileNetV3 repositories' h_sigmoid
from ptq2tvm.api import quantize, to_integer
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.qmodel import QuantConfig


class HSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmoid = HSigmoid()

    def forward(self, x):
        return x * self.sigmoid(x)


def _timm_hard_swish(x):
    inner = F.relu6(x + 3.).div_(6.)
    return x.mul(inner)


SPELLINGS = {
    # name: (activation as written, the native activation it equals, the table's fn)
    "hswish_relu6": (lambda x: x * F.relu6(x + 3) / 6, F.hardswish, "hardswish"),
    "hswish_modules": (HSwish(), F.hardswish, "hardswish"),
    "hswish_hardtanh_yolov5": (lambda x: x * F.hardtanh(x + 3, 0.0, 6.0) / 6.0, F.hardswish, "hardswish"),
    "hswish_timm": (_timm_hard_swish, F.hardswish, "hardswish"),
    "hswish_clamp_method": (lambda x: x * (x + 3).clamp(min=0, max=6) * (1 / 6), F.hardswish, "hardswish"),
    "hsigmoid_relu6": (lambda x: F.relu6(x + 3.0) / 6.0, F.hardsigmoid, "hardsigmoid"),
    "hsigmoid_module": (HSigmoid(), F.hardsigmoid, "hardsigmoid"),
    "swish": (lambda x: x * torch.sigmoid(x), F.silu, "silu"),
    "swish_method": (lambda x: x.sigmoid() * x, F.silu, "silu"),
    "gelu_erf": (lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))), F.gelu, "gelu"),
    "gelu_tanh": (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3)))),
                  lambda x: F.gelu(x, approximate="tanh"), "gelu"),
    "mish": (lambda x: x * torch.tanh(F.softplus(x)), F.mish, "mish"),
}


class _Net(nn.Module):
    """conv -> activation -> conv, plus the activation's input added back (x read twice: by the activation region
    and by the residual add)."""

    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.act = act

    def forward(self, x):
        y = self.a(x)
        return self.c(self.b(self.act(y)) + y)


def _quantize(act):
    torch.manual_seed(0)
    model = _Net(act).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32) * 2
    return model, x, quantize(model, x, QuantConfig(8, 8), progress=False)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelled_out_activation_is_one_table_like_the_native_one(name):
    spelled, native, fn = SPELLINGS[name]
    model, x, qm = _quantize(spelled)
    _, _, qm_native = _quantize(native)
    graph = to_integer(qm)
    assert [n.op for n in graph.nodes] == [n.op for n in to_integer(qm_native).nodes]
    (lut,) = [n for n in graph.nodes if n.op == "lut"]
    assert lut.attrs["fn"] == fn
    t = torch.from_numpy(x)
    with torch.no_grad():
        ref, got, want = model(t), qm(t), qm_native(t)
    assert torch.equal(got, want)                              # the same quantized model as the native spelling
    assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 0.03


def test_spelled_hardswish_compiles_bit_exact(tmp_path):
    pytest.importorskip("tvm")
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    _, x, qm = _quantize(SPELLINGS["hswish_relu6"][0])
    graph = to_integer(qm)
    compile_so(graph, tmp_path / "m.so", batch=4)
    q = graph.input.quantize(x[:8])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "m.so").run_int(q), run_reference(graph, q))


@pytest.mark.parametrize("act, refused", [
    (lambda x: x * 0.5 + 1.0, "add with a constant"),                 # affine: no activation, refused as before
    (lambda x: F.relu6(x + 3.0) / 5.0, "truediv"),                     # almost hardsigmoid, but not it
    (lambda x: x * F.relu6(x + 2.0) / 6.0, "truediv"),
])
def test_arithmetic_that_is_no_activation_stays_refused(act, refused):
    with pytest.raises(UnsupportedModelError, match=refused):
        _quantize(act)


def test_in_place_hardswish_on_a_tensor_read_before_the_write():
    """``y.mul_(F.relu6(y + 3) / 6)`` (timm's hard_swish with inplace=True) where conv b read y before the write: the
    activation collapses (computed out of place), b still reads y and the sum reads the activation, like the model;
    the same quantized model as with F.hardswish."""
    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.inplace = inplace

        def forward(self, x):
            y = self.a(x)
            z = self.b(y)
            h = y.mul_(F.relu6(y + 3.0) / 6.0) if self.inplace else F.hardswish(y)
            return self.c(h + z)

    x = np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32) * 2
    out, ops = {}, {}
    for inplace in (True, False):
        torch.manual_seed(0)
        model = Net(inplace).eval()
        qm = quantize(model, x, QuantConfig(8, 8), progress=False)
        ops[inplace] = [(n.op, n.inputs) for n in to_integer(qm).nodes]
        with torch.no_grad():
            out[inplace] = qm(torch.from_numpy(x))
            ref = model(torch.from_numpy(x))
        assert float(torch.linalg.norm(out[inplace] - ref) / torch.linalg.norm(ref)) < 0.03
    assert ops[True] == ops[False] and ("lut", ["a"]) in ops[True]      # b reads a (before the write) and the lut
    assert torch.equal(out[True], out[False])


def test_legacy_onnx_hardswish_and_silu_are_one_table_each(tmp_path):
    """torch's exporter below opset 14 writes Hardswish as x * HardSigmoid(x) and SiLU as x * Sigmoid(x): imported,
    each is one lookup table again, named after its layer (h, s), the same quantized model as opset 17's."""
    import warnings

    from ptq2tvm.onnx_import import onnx_to_torch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o, self.h, self.s = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Hardswish(), nn.SiLU()

        def forward(self, x):
            return self.o(self.s(self.h(self.a(x))))

    torch.manual_seed(0)
    model = Net().eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    outs = {}
    for opset in (13, 17):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, torch.from_numpy(x[:1]), tmp_path / f"m{opset}.onnx", opset_version=opset,
                              dynamo=False)
        qm = quantize(onnx_to_torch(tmp_path / f"m{opset}.onnx"), x, QuantConfig(8, 8), progress=False)
        assert [(n.op, n.name, n.attrs.get("fn")) for n in to_integer(qm).nodes] == [
            ("conv2d", "a", None), ("lut", "h", "hardswish"), ("lut", "s", "silu"), ("conv2d", "o", None)]
        with torch.no_grad():
            outs[opset] = qm(torch.from_numpy(x))
    assert torch.equal(outs[13], outs[17])


def test_collapsed_activations_are_named_after_their_module():
    """An h_swish module at self.act is the layer 'act'; arithmetic written inline in a block's forward keeps fx's
    node name (not the block's, which also holds its conv)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y * F.relu6(y + 3) / 6

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.act, self.block, self.head = nn.Conv2d(3, 8, 1), HSwish(), Block(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.block(self.act(self.stem(x))))

    x = np.random.default_rng(0).standard_normal((8, 3, 6, 6)).astype(np.float32)
    qm = quantize(Net().eval(), x, QuantConfig(8, 8), progress=False)
    names = [(n.op, n.name) for n in to_integer(qm).nodes]
    assert names[:3] == [("conv2d", "stem"), ("lut", "act"), ("conv2d", "block.conv")]
    assert names[3][0] == "lut" and names[3][1] not in ("block", "act", "block.conv")


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_gelu_mish_and_gelu_tanh_come_in_as_one_table_each(tmp_path, dynamo):
    """ONNX has no GELU / Mish before opset 20 / 18: the exporters write Div / Erf / Add / Mul (GELU), Mul / Pow /
    Tanh (its tanh approximation) and Softplus / Tanh / Mul (Mish), with one-number constants. Imported, each is one
    lookup table of the right function, and the quantized model equals the PyTorch model's (bit for bit)."""
    import warnings

    from ptq2tvm.onnx_import import onnx_to_torch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.g, self.t, self.m = nn.GELU(), nn.GELU(approximate="tanh"), nn.Mish()

        def forward(self, x):
            return self.o(self.m(self.b(self.t(self.g(self.a(x))))))

    torch.manual_seed(0)
    model = Net().eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.from_numpy(x[:1]), tmp_path / "m.onnx", dynamo=dynamo,
                          **({} if dynamo else {"opset_version": 17}))
    qm = quantize(onnx_to_torch(tmp_path / "m.onnx"), x, QuantConfig(8, 8), progress=False)
    assert [(n.op, n.attrs.get("fn"), n.attrs.get("params")) for n in to_integer(qm).nodes] == [
        ("conv2d", None, None), ("lut", "gelu", {"approximate": "none"}), ("lut", "gelu", {"approximate": "tanh"}),
        ("conv2d", None, None), ("lut", "mish", {}), ("conv2d", None, None)]
    native = quantize(model, x, QuantConfig(8, 8), progress=False)
    with torch.no_grad():
        got, want, ref = qm(torch.from_numpy(x)), native(torch.from_numpy(x)), model(torch.from_numpy(x))
    assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 0.03
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-3


@pytest.mark.parametrize("act", [
    lambda x: F.hardtanh(x, -1500.0, 1500.0) * torch.sigmoid(x),        # SiLU only while |x| <= 1500
    lambda x: x.clamp(-65504.0, 65504.0) * F.relu6(x + 3.0) / 6.0,     # a float16 guard: Hardswish only inside it
], ids=["hardtanh_1500_silu", "float16_guard_hardswish"])
def test_bound_beyond_the_dense_grid_is_no_activation(act):
    """A clamp bound far out changes the region's value everywhere beyond it: a grid of a few points out to 1e3 took
    ``F.hardtanh(x, -1500, 1500) * torch.sigmoid(x)`` for SiLU, and on activations beyond 1500 the quantized model
    was 0.69 relative error off FP32, silently (traced op by op before: hardtanh, sigmoid table, multiply)."""
    from ptq2tvm.frontend.pointwise import collapse_pointwise_activations
    from ptq2tvm.frontend.trace import _symbolic_trace, functionalize_inplace, propagate_shapes

    class M(nn.Module):
        def forward(self, x):
            return act(x)

    gm = _symbolic_trace(M())
    propagate_shapes(gm, (4, 5, 5))
    functionalize_inplace(gm)
    assert collapse_pointwise_activations(gm) == []

    torch.manual_seed(0)
    model = _Net(act).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32) * 3000
    try:
        qm = quantize(model, x, QuantConfig(8, 8), progress=False)
    except UnsupportedModelError:
        return                                                # refused op by op (torch.clamp): not silently wrong
    t = torch.from_numpy(x)
    with torch.no_grad():
        ref, got = model(t), qm(t)
    assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 0.05


def test_each_part_is_evaluated_once(monkeypatch):
    """Every collapse starts the search over; the regions that are no activation were evaluated again after each
    one: time quadratic in the model (200 spelled Hardswish each followed by a ReLU-of-Hardtanh region took 33 s
    to trace, 1 s without those regions)."""
    from ptq2tvm.frontend import pointwise
    from ptq2tvm.frontend.trace import trace_model

    class Deep(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(k))

        def forward(self, x):
            y = self.stem(x)
            for conv in self.convs:
                y = conv(y)
                y = y * F.relu6(y + 3) / 6                 # collapses to hardswish
                y = F.relu(F.hardtanh(y, -1.0, 5.0))       # a region that is no activation (traced op by op)
            return y

    calls = []
    evaluate = pointwise._evaluate
    monkeypatch.setattr(pointwise, "_evaluate", lambda *a: calls.append(1) or evaluate(*a))
    k = 30
    graph = trace_model(Deep(k).eval(), (3, 6, 6))
    assert sum(n.op == "lut" for n in graph.nodes) == k
    assert len(calls) < 12 * k, len(calls)      # a few parts per region, each once (was 1485 at k = 30)
