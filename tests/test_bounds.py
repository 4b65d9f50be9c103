"""Static integer bounds of every op (ptq2tvm.fold.bounds.check_graph_bounds, issue 11): the fold and the compiler
prove them or refuse naming the node and the bound; the mul multiplier fit is exact."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import to_integer
from ptq2tvm.errors import QuantConfigError
from ptq2tvm.fold.bounds import INT32_MAX, check_graph_bounds
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.graph import QTensor
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.parity import fakequant_outputs, to_grid


class EveryComputingOp(nn.Module):
    """conv (+ fused residual), SE gate (broadcast mul), same-shape mul, LUT, concat of very different scales,
    average pool, global mean, standalone add, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1)
        self.res = nn.Conv2d(6, 6, 3, 1, 1)
        self.se1, self.se2 = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.big = nn.Conv2d(3, 5, 1)
        with torch.no_grad():
            self.big.weight.mul_(300.0)
        self.fc = nn.Linear(11, 4)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(self.res(y) + y)
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y * F.silu(y)
        y = y + torch.tanh(y)
        z = torch.cat([y, self.big(x)], 1)
        z = F.avg_pool2d(z, 2)
        return self.fc(z.mean((2, 3)))


def _images(seed: int, n: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    qm = quantize_rtn(EveryComputingOp().eval(), _images(0), QuantConfig(8, 8), progress=False)
    return to_integer(qm)


def test_every_computing_node_gets_its_bounds_proven(graph):
    proven = check_graph_bounds(graph)
    ops = {n.name: n.op for n in graph.nodes}
    assert {ops[k] for k in proven} >= {"conv2d", "dense", "mul", "lut", "add", "concat", "avgpool2d"}
    for name, b in proven.items():
        if "int32" in b:
            assert -(1 << 31) <= b["int32"][0] <= b["int32"][1] <= INT32_MAX, name
        if "int64" in b:
            assert 0 < b["int64"] < 1 << 63, name
    mul = [n for n in graph.nodes if n.op == "mul"]
    for n in mul:       # |q_a - z_a| |q_b - z_b| <= 255^2 at 8 bits
        assert 0 < proven[n.name]["int32"][1] <= 255 * 255
    pool = next(n for n in graph.nodes if n.op == "avgpool2d" and n.attrs["kernel"] == [2, 2])
    assert proven[pool.name]["int32"] == (0, 4 * 255)
    lut = next(n for n in graph.nodes if n.op == "lut")
    assert proven[lut.name]["index"] == (0, graph.tensor(lut.inputs[0]).qmax)


def _tampered(graph, op: str):
    g = copy.deepcopy(graph)
    return g, next(n for n in g.nodes if n.op == op)


def test_avgpool_window_sum_beyond_int32_is_refused_naming_the_node_and_the_largest_window(graph):
    """A global average over a 2903x2903 map of 8-bit codes: 8,427,409 x 255 > 2^31 - 1 in the int32 window sum."""
    g, pool = _tampered(graph, "avgpool2d")
    pool.attrs["kernel"] = [2903, 2903]
    with pytest.raises(QuantConfigError) as e:
        check_graph_bounds(g)
    msg = str(e.value)
    assert f"avgpool '{pool.name}'" in msg and "2903x2903" in msg and "8421504 elements" in msg, msg
    pool.attrs["kernel"] = [2900, 2900]     # 8,410,000 x 255 fits
    assert check_graph_bounds(g)[pool.name]["int32"] == (0, 2900 * 2900 * 255)


def test_mul_product_beyond_int32_is_refused(graph):
    """A graph file whose mul inputs claim 16-bit codes (tampered): (2^16 - 1)^2 does not fit the int32 product."""
    g, mul = _tampered(graph, "mul")
    for node in g.nodes:
        if node.name in mul.inputs:
            t = node.out
            node.out = QTensor(t.name, t.shape, t.scale, 0, 16)
            node.attrs["hi"] = (1 << 16) - 1
    with pytest.raises(QuantConfigError, match=rf"mul '{mul.name}': the int32 product .* outside int32"):
        check_graph_bounds(g)


def test_concat_requant_beyond_int64_is_refused(graph):
    g, cat = _tampered(graph, "concat")
    cat.arrays["multiplier"] = np.array([1 << 40, 1 << 62], dtype=np.int64)
    with pytest.raises(QuantConfigError, match=rf"concat '{cat.name}': the int64 requantization .* >= 2\^63"):
        check_graph_bounds(g)


def test_lut_index_outside_the_table_is_refused_at_fold_and_compile(graph, tmp_path):
    """A 16-entry table (4-bit input grid) read by 8-bit codes would read past the table in the plain TVM kernel."""
    from ptq2tvm.api import compile_so

    g, lut = _tampered(graph, "lut")
    lut.arrays["table"] = lut.arrays["table"][:16].copy()
    with pytest.raises(QuantConfigError, match=rf"lut '{lut.name}': its input '.*' has 8-bit codes \(up to 255\) "
                                               r"but the table has 16 entries"):
        check_graph_bounds(g)
    with pytest.raises(QuantConfigError, match=f"lut '{lut.name}'"):
        compile_so(g, tmp_path / "m.so", schedule="plain")
    assert not list(tmp_path.iterdir())


def test_lut_table_values_outside_the_output_grid_are_refused(graph, tmp_path):
    """A table entry is an output code: an entry above the node's clamp (255 in a 4-bit tensor) would reach a consumer
    whose bounds (e.g. the lifted epilogue's proof) assume codes <= 15 (found by review: 1024 of 1024 outputs of a
    1x1 int4 conv after such a table wrong). Refused at compile, nothing written."""
    from ptq2tvm.api import compile_so

    g, lut = _tampered(graph, "lut")
    lut.attrs["hi"] = int(lut.arrays["table"].max()) - 1        # a clamp narrower than what the table returns
    with pytest.raises(QuantConfigError, match=rf"lut '{lut.name}': its table holds codes .* outside its output "
                                               r"range \[\d+, \d+\]"):
        check_graph_bounds(g)
    with pytest.raises(QuantConfigError, match=f"lut '{lut.name}'"):
        compile_so(g, tmp_path / "m.so", schedule="plain")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("op", ["conv2d", "avgpool2d"])
def test_input_zero_point_outside_the_input_grid_is_refused(graph, op):
    """A conv's / pool's padding value is its input zero point, a code of its input: one above qmax_in (a graph
    edited by hand) padded a 3x3 conv's border with a value its bounds never saw (found by review: 448 of 1024
    outputs wrong with the lifted epilogue)."""
    g, node = _tampered(graph, op)
    qmax = next(n.out for n in g.nodes if n.name == node.inputs[0]).qmax if node.inputs[0] != g.input.name \
        else g.input.qmax
    node.attrs["input_zero_point"] = qmax + 1
    with pytest.raises(QuantConfigError, match=rf"{op} '{node.name}': input zero point {qmax + 1} \(its padding "
                                               r"value\) is outside its input's"):
        check_graph_bounds(g)


class DisjointProduct(nn.Module):
    """relu(f(x)) * relu(-f(x)): 0 on every input, while each factor has a range of ~1e3."""

    def __init__(self, gain: float):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.weight.mul_(gain)
            self.a.bias.mul_(gain)
            self.b.weight.copy_(-self.a.weight)
            self.b.bias.copy_(-self.a.bias)

    def forward(self, x):
        return self.c(F.relu(self.a(x)) * F.relu(self.b(x)))


def test_mul_whose_product_collapses_folds_exactly():
    """Found by the fuzzer's mul entry: fit_requant_scales bounded the mul multiplier by max(s_a, s_b) / s_out, but
    it is s_a s_b / s_out; with both factors' scales ~4 the fold refused 'requantization multiplier 2.5e+09 is too
    large'. Now the product is used: it folds, the output is the constant of the last conv, = fake-quant."""
    from ptq2tvm.api import quantize

    torch.manual_seed(0)
    model = DisjointProduct(1e3).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = quantize(model, x, QuantConfig(8, 8), progress=False)
        g = to_integer(qm)
    mul = next(n for n in g.nodes if n.op == "mul")
    assert mul.arrays["multiplier"].max() < 1 << 31 and int(mul.arrays["shift"].min()) >= 1
    q = g.input.quantize(x)
    ref = run_reference(g, q)
    fq = to_grid(fakequant_outputs(qm, x), g.output)
    assert np.abs(ref.astype(int) - fq).max() <= 1
    with torch.no_grad():
        fp = model(torch.from_numpy(x)).numpy()     # = the bias of c everywhere
    np.testing.assert_allclose(g.output.dequantize(ref), fp, atol=2 * g.output.scale)
