"""ONNX models from torch's default exporter (``torch.onnx.export(..., dynamo=True)``, the default since torch 2.9).

Two things a new user hit with it (torch 2.13): a LeNet-style ``torch.flatten(x, 1)`` / ``x.view(x.size(0), -1)`` of
an (N, C, H, W) map before a Linear comes out as a ``Reshape`` (a constant target with the example's batch baked in,
``-1`` for a dynamic batch, or without the exporter's optimizer a target computed by Shape / Squeeze / Concat nodes)
and was rejected as "'node_view' (Reshape)"; and layers were named after the exporter's node names (``node_Conv_86``,
``node_linear``), so ``--layer-bits 'pw.0=4/8'`` matched nothing. The flatten now imports as ``Flatten`` (any batch
size), any other Reshape is rejected with its shapes and the reason, and layers get their torch module paths (from the
weights' names and the ``pkg.torch.onnx.name_scopes`` metadata)."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_bn, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")

from ptq2tvm.errors import UnsupportedModelError  # noqa: E402


def _export(model: nn.Module, path, shape=(1, 1, 12, 12), opset: int = 17, dynamic_batch: bool = False,
            optimize: bool = True):
    """``torch.onnx.export(model, ..., dynamo=True)`` into ``path`` (quietly); skips the test, with the reason, where
    the dynamo exporter cannot run."""
    kw = dict(opset_version=opset, dynamo=True, optimize=optimize)
    if dynamic_batch:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("N")},)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(model.eval(), (torch.zeros(shape),), str(path), **kw)
    except (ImportError, torch.onnx.OnnxExporterError) as e:
        pytest.skip(f"torch's dynamo ONNX exporter fails in this environment: {type(e).__name__}: {e}")
    return path


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class LeNet(nn.Module):
    """conv -> relu -> pool -> conv -> relu -> flatten of the (N, 8, 4, 4) map -> linear -> relu -> linear."""

    def __init__(self, view: bool = False):
        super().__init__()
        self.view = view
        self.c1, self.c2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 8, 3)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.relu(self.c2(x))
        x = x.view(x.size(0), -1) if self.view else torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def _lenet(view: bool = False) -> LeNet:
    torch.manual_seed(0)
    return LeNet(view).eval()


@pytest.mark.parametrize("view, opset, batch, dynamic_batch, optimize", [
    (False, 17, 1, False, True),     # Reshape to the constant (1, 128): the example's batch baked in
    (True, 18, 2, False, True),      # view(N, -1) -> the constant (2, -1)
    (True, 18, 1, True, True),       # dynamic batch -> (-1, 128)
    (True, 17, 1, True, False),      # no graph optimizer: (N, -1) computed by Shape -> Squeeze -> Reshape -> Concat
])
def test_dynamo_flatten_of_a_feature_map_imports_as_flatten(tmp_path, tiny_data, view, opset, batch, dynamic_batch,
                                                            optimize):
    from ptq2tvm.frontend.trace import trace_model
    from ptq2tvm.onnx_import import onnx_to_torch

    model = _lenet(view)
    path = _export(model, tmp_path / "lenet.onnx", (batch, 1, 12, 12), opset, dynamic_batch, optimize)
    ops = _ops(path)
    assert "Reshape" in ops and "Flatten" not in ops, ops      # the exporter's spelling this test is about
    if not optimize:
        assert "Shape" in ops, ops
    gm = onnx_to_torch(path)
    x = torch.from_numpy(tiny_data[:5])                         # another batch size than the export's
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert [n.op for n in trace_model(gm, (1, 12, 12)).nodes] == [n.op for n in trace_model(model, (1, 12, 12)).nodes]


def test_dynamo_lenet_quantizes_to_the_torch_models_graph_and_compiles_bit_exact(tmp_path, tiny_data):
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference
    from ptq2tvm.onnx_import import onnx_to_torch

    model = _lenet()
    gm = onnx_to_torch(_export(model, tmp_path / "lenet.onnx"))
    g_onnx = to_integer(quantize(gm, tiny_data[:16], QuantConfig(8, 8), progress=False))
    g_torch = to_integer(quantize(model, tiny_data[:16], QuantConfig(8, 8), progress=False))
    assert [n.op for n in g_onnx.nodes] == [n.op for n in g_torch.nodes]
    weighted = [n.name for n in g_onnx.nodes if n.op in ("conv2d", "dense")]
    assert weighted == [n.name for n in g_torch.nodes if n.op in ("conv2d", "dense")] == ["c1", "c2", "fc1", "fc2"]
    q = g_onnx.input.quantize(tiny_data)
    assert np.array_equal(run_reference(g_onnx, q), run_reference(g_torch, q))   # same weights, same integers
    compile_so(g_onnx, tmp_path / "lenet.so")
    q1 = g_onnx.input.quantize(tiny_data[:1])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "lenet.so").run_int(q1), run_reference(g_onnx, q1))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Named(nn.Module):
    """Named submodules (Sequential indices, a custom block), BatchNorms the exporter folds into their convs (the
    folded Conv's metadata names the BatchNorm), functional ops in the root's forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Hardswish())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pw(self.block(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("opset", [17, 18])
def test_dynamo_layers_are_named_by_their_torch_module_paths(tmp_path, tiny_data, capsys, opset):
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.frontend.trace import trace_model
    from ptq2tvm.onnx_import import onnx_to_torch, prepare_onnx

    torch.manual_seed(0)
    model = randomize_bn(Named())
    path = _export(model, tmp_path / "named.onnx", opset=opset)
    gm = onnx_to_torch(path)
    x = torch.from_numpy(tiny_data[:4])
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    torch_nodes = trace_model(model, (1, 12, 12)).nodes
    onnx_nodes = trace_model(gm, (1, 12, 12)).nodes
    weighted = ["stem.0", "block.conv", "pw.0", "fc"]
    assert [n.name for n in onnx_nodes if n.op in ("conv", "linear")] == weighted
    assert [n.name for n in torch_nodes if n.op in ("conv", "linear")] == weighted
    layers = [v[2] for v in prepare_onnx(onnx.load(str(path)), path)[1].values()]
    assert len(set(layers)) == len(layers)
    meta = any(p.key == "pkg.torch.onnx.name_scopes" for n in onnx.load(str(path)).graph.node for p in n.metadata_props)
    if meta:   # the exporter kept its metadata: every layer of a module has its path (the SiLU's, the Hardswish's)
        assert {"block.act", "pw.1"} <= {n.name for n in onnx_nodes}, [n.name for n in onnx_nodes]
        assert not any(name.startswith("node_") for name in layers), layers
    qm = quantize(gm, tiny_data[:16], QuantConfig(8, 8, layer_w_bits={"pw.0": 4}, layer_a_bits={"pw.0": 8}),
                  progress=False)
    bits = {n.name: n.attrs.get("w_bits") for n in to_integer(qm).nodes}
    assert bits["pw.0"] == 4 and bits["block.conv"] == 8
    np.save(tmp_path / "x.npy", tiny_data[:16])                 # the new user's command line
    rc, out, err = run_cli(capsys, "quantize", "--model", path, "--data", tmp_path / "x.npy", "--calib-size", 16,
                           "--fidelity-images", 0, "--out", tmp_path / "run", "--no-progress",
                           "--layer-bits", "pw.0=4/8")
    assert rc == 0, err
    assert "W4A8 x1" in out, out


class BadReshape(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 4, 3)                          # (N, 4, 10, 10)
        self.fc = nn.Linear({"rows": 10, "samples": 100, "batch": 800}[kind], 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.kind == "rows":
            x = x.view(x.size(0), 40, 10)                       # (N, C*H, W)
        elif self.kind == "samples":
            x = x.reshape(-1, 100)                              # (N*C, H*W): the channels become samples
        else:
            x = x.reshape(1, -1)                                # (1, N*C*H*W): the batch folded into the features
        return self.fc(x)


@pytest.mark.parametrize("kind, batch, target", [("rows", 1, "(1, 40, 10)"), ("samples", 1, "(-1, 100)"),
                                                 ("batch", 2, "(1, -1)")])
def test_dynamo_reshape_other_than_the_flatten_is_rejected_with_the_reason(tmp_path, kind, batch, target):
    from ptq2tvm.onnx_import import onnx_to_torch

    path = _export(BadReshape(kind), tmp_path / "bad.onnx", (batch, 1, 12, 12))
    node = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Reshape")
    with pytest.raises(UnsupportedModelError, match=re.escape(
            f"'{node}' (Reshape): Reshape of a ({batch}, 4, 10, 10) tensor to {target}; only flattening the features "
            "of each sample into one dim, (N, C*H*W), is supported")):
        onnx_to_torch(path)


@pytest.mark.parametrize("target, allowzero, ok", [
    ([0, -1], 0, True),          # 0 copies the batch dim
    ([0, -1], 1, False),         # allowzero: a literal 0
    ([2, 36], 0, True),          # the batch of the example baked in
    ([-1, 36], 1, True),
    ([1, -1], 0, False),         # (1, 72): both samples in one row
    ([2, 4, 9], 0, False),
    ([4, 18], 0, False),
])
def test_reshape_targets_read_as_flatten(tmp_path, target, allowzero, ok):
    """Hand-made graphs: Relu -> Reshape(constant target) of a (2, 4, 3, 3) tensor."""
    from onnx import TensorProto, helper

    from ptq2tvm.onnx_import import onnx_to_torch

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "shape"], ["y"], name="flat", allowzero=allowzero)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(target))],
        [helper.make_tensor("shape", TensorProto.INT64, [len(target)], target)])
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    if not ok:
        with pytest.raises(UnsupportedModelError, match=re.escape(
                f"'flat' (Reshape): Reshape of a (2, 4, 3, 3) tensor to {tuple(target)}".replace(",)", ")"))):
            onnx_to_torch(path)
        return
    gm = onnx_to_torch(path)
    x = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(0))      # any batch size
    with torch.no_grad():
        torch.testing.assert_close(gm(x), torch.relu(x).flatten(1))
