"""ONNX interop: the QDQ export run by ONNX Runtime against the reference executor, and ONNX models coming in."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TinyNet, randomize_bn
from conftest import tiny_integer_graph as _tiny_integer_graph

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ptq2tvm.errors import ArtifactError, UnsupportedModelError  # noqa: E402
from ptq2tvm.ir.reference import run_reference  # noqa: E402
from ptq2tvm.onnx_export import EXPORTERS, choose_weights, export_onnx  # noqa: E402
from ptq2tvm.onnx_parity import INTEGER_KERNELS, optimized_kernels, ort_session  # noqa: E402

_GRAPHS: dict = {}


def tiny_integer_graph(w: int, a: int):
    """conftest's seeded TinyNet graph, built once per bit setting (a deep copy each call: tests modify it)."""
    if (w, a) not in _GRAPHS:
        _GRAPHS[(w, a)] = _tiny_integer_graph(w, a)
    return copy.deepcopy(_GRAPHS[(w, a)])


X = np.random.default_rng(1).standard_normal((32, 1, 12, 12)).astype(np.float32) * 1.3


def _ort_codes(path, x, tmp_path):
    sess = ort_session(path, threads=1, optimized_path=tmp_path / "opt.onnx")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x}))), optimized_kernels(tmp_path / "opt.onnx")


def _compare_every_layer(graph, outs, max_lsb=1, min_exact=0.999):
    env = run_reference(graph, graph.input.quantize(X), return_all=True)
    assert set(env) == {k[len("codes:"):] for k in outs if k.startswith("codes:")}
    for name, ref in env.items():
        d = np.abs(outs[f"codes:{name}"].astype(np.int64) - ref)
        assert d.max() <= max_lsb and (d == 0).mean() >= min_exact, (name, (d == 0).mean(), d.max())
    out_t = graph.output
    deq = np.rint(outs["output"].astype(np.float64) / np.float32(out_t.scale)) + out_t.zero_point
    assert np.array_equal(deq.astype(np.int64), env[graph.output_name].astype(np.int64))


@pytest.mark.parametrize("w,a,weights,int4", [(8, 8, "auto", False), (8, 8, "uint8", False),
                                              (4, 4, "auto", False), (4, 4, "uint8", True)])
def test_export_checker_ort_matches_reference_every_op(tmp_path, w, a, weights, int4):
    graph = tiny_integer_graph(w, a)
    assert {n.op for n in graph.nodes} <= set(EXPORTERS)
    path = tmp_path / "m.onnx"
    rep = export_onnx(graph, path, weights=choose_weights(weights)[0], int4=int4, per_layer_outputs=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert rep.opset == (21 if int4 else 17) and model.opset_import[0].version == rep.opset
    ops_used = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Add", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Flatten"} <= ops_used
    # the exact integers: weights of the first conv are the IR's, bias = IR bias + z_x * sum(q_w)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # every initializer is read by a node (an unused one made ONNX Runtime print a warning on every load)
    assert set(inits) <= {name for n in model.graph.node for name in n.input}
    stem = graph.nodes[0]
    wq = inits[f"{stem.name}/weight"].astype(np.int64) - (128 if rep.weights == "uint8" else 0)
    assert np.array_equal(wq, stem.arrays["weight"])
    corr = stem.attrs["input_zero_point"] * stem.arrays["weight"].astype(np.int64).reshape(len(wq), -1).sum(1)
    assert np.array_equal(inits[f"{stem.name}/bias"], stem.arrays["bias"] + corr)
    if int4:
        four_bit = [n.name for n in graph.nodes if n.attrs.get("w_bits") == 4]
        assert four_bit and set(rep.int4_weights) | set(rep.int8_fallback) == set(four_bit)
        assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)
    if a < 8:
        assert rep.clips  # 4-bit activations in uint8 containers: an explicit Clip to [0, 15]
    outs, (counts, kernels) = _ort_codes(path, X, tmp_path)
    _compare_every_layer(graph, outs)
    if w == 8:  # ORT runs integer kernels on the W8A8 export
        assert counts.get("QLinearConv", 0) >= 5 and kernels["stem"] == "QLinearConv"
        assert sum(v for k, v in counts.items() if k in INTEGER_KERNELS) >= 6


def test_adaq_layers_int4_and_the_int8_fallback(tmp_path, tiny_model, tiny_data):
    """AdaQTransform's xi (folded into the dyadic multiplier, so into the float weight scale) and eta (int32 bias)
    export exactly, with INT4 weights; a 4-bit layer whose integers leave [-8, 7] stays int8 (reported)."""
    from ptq2tvm.errors import QuantConfigError
    from ptq2tvm.fold.fold import fold_to_integer
    from ptq2tvm.frontend.calibrate import quantize_rtn
    from ptq2tvm.frontend.qmodel import QuantConfig

    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(4, 4), progress=False).enable_adaq()
    g = torch.Generator().manual_seed(3)
    for layer in qm.layers.values():
        c = layer.xi.numel()
        with torch.no_grad():
            layer.xi.copy_(0.05 + 1.9 * torch.rand(c, generator=g))   # xi in (0.05, 1.95): far from 1
            layer.eta.copy_(0.05 * torch.randn(c, generator=g))
    graph = fold_to_integer(qm)
    assert graph.meta["adaqtransform"]
    rep = export_onnx(graph, tmp_path / "m.onnx", weights="uint8", int4=True, per_layer_outputs=True)
    assert not rep.int8_fallback and len(rep.int4_weights) >= 6
    outs, _ = _ort_codes(tmp_path / "m.onnx", X, tmp_path)
    _compare_every_layer(graph, outs)
    # an IR 4-bit layer with a +8 (outside INT4) keeps int8 containers, and stays exact
    node = next(n for n in graph.nodes if n.name == "grouped")
    node.arrays["weight"] = node.arrays["weight"].copy()
    node.arrays["weight"].flat[0] = 8
    rep = export_onnx(graph, tmp_path / "m2.onnx", weights="uint8", int4=True, per_layer_outputs=True)
    assert rep.int8_fallback == ["grouped"]
    outs, _ = _ort_codes(tmp_path / "m2.onnx", X, tmp_path)
    _compare_every_layer(graph, outs)
    with torch.no_grad():  # xi < 0 never reaches the exporter: the fold refuses it, naming the layer
        next(iter(qm.layers.values())).xi[0] = -1.0
    with pytest.raises(QuantConfigError, match="xi must be finite and > 0"):
        fold_to_integer(qm)


def test_export_errors_write_nothing(tmp_path):
    graph = tiny_integer_graph(8, 8)
    graph.nodes[3].op = "frobnicate"
    with pytest.raises(ArtifactError, match=r"frobnicate.*'block1.conv2'"):
        export_onnx(graph, tmp_path / "m.onnx")
    graph = tiny_integer_graph(8, 8)
    graph.nodes[0].arrays["bias"] = np.full_like(graph.nodes[0].arrays["bias"], 2**31 - 1)
    with pytest.raises(ArtifactError, match="'stem'.*overflows int32"):
        export_onnx(graph, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- ONNX in --------------------------------------------------------------------------------------------------
def _torch_to_onnx(model, path, shape=(1, 1, 12, 12)):
    from ptq2tvm.bench.baselines import export_onnx as torch_export

    return torch_export(model, np.zeros(shape, np.float32), path)


def test_onnx_model_in_matches_torch_and_folds_to_the_same_integers(tmp_path, tiny_model, tiny_data):
    from ptq2tvm.api import ModelSpec, build_model, quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.onnx_import import onnx_to_torch

    path = _torch_to_onnx(tiny_model, tmp_path / "tiny.onnx")
    gm = onnx_to_torch(path)
    assert "torchvision" not in sys.modules
    x = torch.from_numpy(tiny_data)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), tiny_model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert type(build_model(ModelSpec(str(path)))).__name__ == "GraphModule"
    g_onnx = to_integer(quantize(gm, tiny_data[:8], QuantConfig(8, 8), progress=False))
    g_torch = to_integer(quantize(tiny_model, tiny_data[:8], QuantConfig(8, 8), progress=False))
    assert [n.op for n in g_onnx.nodes] == [n.op for n in g_torch.nodes]
    assert [n.name for n in g_onnx.nodes][:4] == ["stem", "pool", "block1.conv1", "block1.conv2"]
    for a, b in zip(g_onnx.nodes, g_torch.nodes):  # BN folded by torch's exporter vs by ptq2tvm: same integers
        if "weight" in a.arrays:
            assert (a.arrays["weight"] != b.arrays["weight"]).mean() < 0.01
    q = g_onnx.input.quantize(tiny_data)
    agree = (run_reference(g_onnx, q).argmax(1) == run_reference(g_torch, q).argmax(1)).mean()
    assert agree >= 0.95


class TwoHeads(torch.nn.Module):
    """Logits + a per-pixel map: the multi-output shape users export (a classifier with an auxiliary head)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.aux = torch.nn.Conv2d(8, 2, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1)), self.aux(h)


def test_onnx_model_with_two_outputs_comes_in_named_and_compiles_bit_exact(tmp_path, tiny_data, capsys):
    """An ONNX graph with two outputs was refused ('ptq2tvm takes single-input, single-output models'), though the
    README says every command handles models with several outputs. It now returns {ONNX output name: tensor}."""
    import json

    from ptq2tvm import cli
    from ptq2tvm.onnx_import import onnx_to_torch

    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = tmp_path / "two.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(path), input_names=["x"],
                      output_names=["logits", "seg"], dynamo=False)
    gm = onnx_to_torch(path)
    x = torch.from_numpy(tiny_data[:4])
    with torch.no_grad():
        got, want = gm(x), model(x)
    assert list(got) == ["logits", "seg"]
    for k, w in zip(got, want):
        np.testing.assert_allclose(got[k].numpy(), w.numpy(), rtol=1e-4, atol=1e-5)
    np.save(tmp_path / "data.npy", tiny_data)
    run = tmp_path / "run"
    assert cli.main(["quantize", "--model", str(path), "--data", str(tmp_path / "data.npy"), "--calib-size", "16",
                     "--fidelity-images", "8", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'logits'  (N, 4)" in out and "'seg'     (N, 2, 12, 12)" in out, out
    assert cli.main(["compile", str(run), "--no-progress"]) == 0
    assert cli.main(["parity", str(run), "--data", str(tmp_path / "data.npy"), "--n", "8", "--per-layer-inputs", "0",
                     "--no-progress", "--json", str(tmp_path / "p.json")]) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["bit_exact_vs_reference"] and p["scored_output"].startswith("output 0 'logits'"), p


class OpsNet(torch.nn.Module):
    """The ops users bring besides conv / BN / ReLU, as torch exports them: SiLU (Sigmoid + Mul), a squeeze-excitation
    gate (GlobalAveragePool, HardSigmoid, Mul), HardSwish, nearest Resize x2, Concat, LeakyRelu, Tanh."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.se_reduce, self.se_expand = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        F = torch.nn.functional
        h = F.silu(self.stem(x))
        h = h * F.hardsigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        u = F.interpolate(F.hardswish(self.down(h)), scale_factor=2, mode="nearest")
        c = torch.cat([h, F.leaky_relu(u, 0.1)], 1)
        return self.fc(torch.tanh(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_in_reads_silu_se_resize_concat_and_compiles_bit_exact(tmp_path, tiny_data, exporter):
    """These ONNX ops were all refused by name ('give the PyTorch model for those'); a new-user helper's model
    (SiLU, squeeze-excitation, Resize, Concat, two outputs) could only come in through torch."""
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.onnx_import import onnx_to_torch

    torch.manual_seed(0)
    model = OpsNet().eval()
    path = tmp_path / "ops.onnx"
    if exporter == "dynamo":
        _dynamo_export(model, path, (1, 1, 12, 12))
    else:
        torch.onnx.export(model, (torch.zeros(1, 1, 12, 12),), str(path), dynamo=False)
    gm = onnx_to_torch(path)
    x = torch.from_numpy(tiny_data)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    graph = to_integer(quantize(gm, tiny_data[:16], QuantConfig(8, 8), progress=False))
    assert {"lut", "mul", "upsample", "concat"} <= {n.op for n in graph.nodes}
    compile_so(graph, tmp_path / "ops.so")
    q = graph.input.quantize(tiny_data[:1])
    np.testing.assert_array_equal(CompiledModel(tmp_path / "ops.so").run_int(q), run_reference(graph, q))


def test_onnx_in_names_the_forms_of_these_ops_it_cannot_read(tmp_path):
    import onnx
    from onnx import helper

    from ptq2tvm.onnx_import import onnx_to_torch

    class Up(torch.nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.conv, self.mode = torch.nn.Conv2d(1, 4, 3, padding=1), mode

        def forward(self, x):
            return torch.nn.functional.interpolate(self.conv(x), scale_factor=2, mode=self.mode) * 3.0

    torch.onnx.export(Up("bilinear").eval(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "bil.onnx"), dynamo=False)
    with pytest.raises(UnsupportedModelError, match=r"\(Resize\): Resize mode 'linear' \(only 'nearest'"):
        onnx_to_torch(tmp_path / "bil.onnx")
    torch.onnx.export(Up("nearest").eval(), (torch.zeros(1, 1, 8, 8),), str(tmp_path / "mulc.onnx"), dynamo=False)
    # x * 3.0: a Mul by a one-number constant imports (GELU / Mish spelled out need it) and the tracer refuses it
    from ptq2tvm.api import quantize

    with pytest.raises(UnsupportedModelError, match=r"\(mul\): mul with a constant \(only tensor mul tensor\)"):
        quantize(onnx_to_torch(tmp_path / "mulc.onnx"), np.zeros((4, 1, 8, 8), np.float32), progress=False)
    model = onnx.load(str(tmp_path / "mulc.onnx"))             # a half-pixel nearest Resize picks floor(x / 2) too
    for n in model.graph.node:
        if n.op_type == "Resize":
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("mode", "nearest"),
                                helper.make_attribute("coordinate_transformation_mode", "align_corners")])
    onnx.save(model, str(tmp_path / "ac.onnx"))
    with pytest.raises(UnsupportedModelError, match=r"coordinate_transformation_mode 'align_corners'"):
        onnx_to_torch(tmp_path / "ac.onnx")


def test_onnx_in_errors_name_the_node_or_file(tmp_path):
    from ptq2tvm.onnx_import import onnx_to_torch

    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.exp(self.conv(x)).mean((2, 3)))

    path = _torch_to_onnx(Bad().eval(), tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedModelError, match=r"'/Exp' \(Exp\)"):
        onnx_to_torch(path)
    good = _torch_to_onnx(randomize_bn(TinyNet()), tmp_path / "good.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="trunc.onnx"):
        onnx_to_torch(tmp_path / "trunc.onnx")
    with pytest.raises(ArtifactError, match="not found"):
        onnx_to_torch(tmp_path / "missing.onnx")
    # weights in an external data file (torch.onnx writes model.onnx.data for big models) left behind on a copy
    import onnx

    (tmp_path / "ext").mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "good.onnx")), str(tmp_path / "ext" / "m.onnx"),
                    save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert isinstance(onnx_to_torch(tmp_path / "ext" / "m.onnx"), torch.nn.Module)   # together: fine
    (tmp_path / "ext" / "m.onnx").rename(tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match=r"m\.onnx: its weights \(tensor '.+'\) are stored in the external data "
                                            r"file m\.onnx\.data, which is not next to it"):
        onnx_to_torch(tmp_path / "m.onnx")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptq2tvm", *args], capture_output=True, text=True, timeout=600)


def test_cli_export_parity_and_onnx_model_errors(tmp_path, tiny_model, tiny_data):
    from ptq2tvm.api import ModelSpec, RunDir, quantize, save_run, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig

    np.save(tmp_path / "data.npy", tiny_data)
    qm = quantize(tiny_model, tiny_data[:16], QuantConfig(8, 8), progress=False)
    run = save_run(RunDir(tmp_path / "run"), tiny_model, None, qm, to_integer(qm), data=str(tmp_path / "data.npy"))
    r = _cli("export", str(run.path), "--out", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "x.json"))
    assert r.returncode == 0, r.stderr
    assert "onnx.checker passed" in r.stdout and (tmp_path / "m.onnx").is_file()
    r = _cli("parity", str(run.path), "--onnx", "--per-layer-inputs", "16", "--no-progress",
             "--onnx-integer-requant", "inexact", "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["n_inputs"] == 64 and p["exact_fraction"] == 1.0 and p["output_float_exact_fraction"] == 1.0
    assert p["integer_kernels"] >= 6 and len(p["per_layer"]) == 15
    for layer in p["per_layer"]:  # integer_requant=inexact: every layer bit-exact in ORT (docs/onnx.md)
        assert layer["local_exact_fraction"] == 1.0 and layer["exact_fraction"] == 1.0, layer
    # no float conv left: convs with a residual add (and any with an inexact float multiplier) are ConvInteger
    assert "ConvInteger->int64" in {layer["ort_kernel"] for layer in p["per_layer"]}
    assert p["float_kernels"] == 0 and p["integer_requant_layers"]
    # a corrupted ONNX model: one clear line, no run directory
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 10)
    out = tmp_path / "never"
    r = _cli("quantize", "--model", str(tmp_path / "bad.onnx"), "--data", str(tmp_path / "data.npy"),
             "--out", str(out), "--no-progress")
    assert r.returncode == 2 and "bad.onnx" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_bench_row_runs_our_export_in_ort(tmp_path):
    from ptq2tvm.onnx_parity import ort_qdq_runner

    graph = tiny_integer_graph(8, 8)
    run = ort_qdq_runner(graph, tmp_path / "q.onnx", threads=1)
    ref = graph.output.dequantize(run_reference(graph, graph.input.quantize(X)))
    assert np.array_equal(run(X), ref) and run.kernels["QLinearConv"] >= 5
    assert run.weights == choose_weights("auto")[0]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_model_through_onnx_compiles_bit_exact(tmp_path, name):
    from ptq2tvm.api import ModelSpec, build_model, compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.models import create_model

    from ptq2tvm.frontend.trace import trace_model

    torch.manual_seed(0)
    model = randomize_bn(create_model(name, num_classes=10))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    gm = build_model(ModelSpec(str(_torch_to_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32)))))
    with torch.no_grad():
        a, b = gm(torch.from_numpy(x)), model(torch.from_numpy(x))
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
    ops = [n.op for n in trace_model(gm, (3, 32, 32)).nodes]
    ops_torch = [n.op for n in trace_model(model, (3, 32, 32)).nodes]
    assert ops == ops_torch  # the same fused graph as from the torch module (BN folded by the exporter)
    if name == "resnet18":  # quantizing the 11M weights is slow here; ResNet-18 compiles in the 224 benchmark
        return
    graph = to_integer(quantize(gm, x, QuantConfig(8, 8), progress=False))
    assert graph.nodes[0].name == "features.0.0"
    q = graph.input.quantize(x[:2])
    compile_so(graph, tmp_path / "m.so", batch=1)  # ReLU6 from Clip, depthwise, adds without ReLU
    assert np.array_equal(CompiledModel(tmp_path / "m.so").run_int(q), run_reference(graph, q))


def test_registry_ops_export_exact(tmp_path):
    """Every op of the op registry's test models (lut, mul, concat, slice, channel shuffle, upsample, pixel
    (un)shuffle, several outputs) through ORT: each layer within 1 LSB of the reference, the outputs exact."""
    t = pytest.importorskip("test_ops", reason="the op registry (tests/test_ops.py) is not in this checkout")
    from ptq2tvm.fold.fold import fold_to_integer
    from ptq2tvm.onnx_parity import run_onnx_parity

    seen: set[str] = set()
    for name in t.OP_MODELS:
        _, qm = t._quantize(name, 4, 4)
        graph = fold_to_integer(qm)
        seen |= {n.op for n in graph.nodes}
        rep = run_onnx_parity(graph, t._images(2, 16), None, weights="uint8", per_layer_inputs=16, threads=1,
                              progress=False)
        assert rep.max_abs_lsb <= 1 and rep.exact_fraction >= 0.99, name
        assert all(p.local_max_abs_lsb <= 1 and p.local_exact_fraction >= 0.99 for p in rep.per_layer), name
    assert seen >= {"lut", "mul", "concat", "slice", "channel_shuffle", "upsample", "pixel_shuffle",
                    "pixel_unshuffle"} and seen <= set(EXPORTERS)


def test_recon_rows_of_an_accuracy_table_w2a2(tmp_path, tiny_model, tiny_data):
    """benchmarks/onnx_parity.py --recon-results, on one fake accuracy-table row: its checkpoint (a W2A2 fake-quant
    model: 2-bit weights in 8-bit containers, 2-bit activations as exact clamps) is found, folded, exported and run by
    ORT, whose top-1 equals the reference executor's; rows without a .so top-1 or a finished checkpoint are skipped
    with the reason."""
    import importlib.util
    from pathlib import Path

    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.sweep import key_dir

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("onnx_parity_bench", root / "onnx_parity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    acc = bench._accuracy_module()

    qm = quantize(tiny_model, tiny_data, QuantConfig(2, 2), progress=False)
    graph = to_integer(qm)
    labels = np.random.default_rng(2).integers(0, 10, len(X))
    ref = run_reference(graph, graph.input.quantize(X))
    ref_top1 = float((ref.argmax(1) == labels).mean())
    row = dict(model="tinynet", method="qdrop", granularity="block", adaqtransform=False, w_bits=2, a_bits=2, seed=0,
               iters=10, n_calib=len(tiny_data), eval_images=len(X), so_top1=ref_top1)
    ckpt_root = tmp_path / "table_ckpt"
    d = ckpt_root / key_dir(acc.row_key(row))
    d.mkdir(parents=True)
    assert bench.recon_checkpoint(row, ckpt_root)[1].startswith("no checkpoint")
    (d / "state.json").write_text(json.dumps(dict(finished=False, model="model-0001.pt")))
    assert "not finished" in bench.recon_checkpoint(row, ckpt_root)[1]
    assert "no .so top-1" in bench.recon_checkpoint(dict(row, so_top1=None), ckpt_root)[1]
    qm.save(d / "model-0001.pt")
    (d / "state.json").write_text(json.dumps(dict(finished=True, model="model-0001.pt")))
    path, why = bench.recon_checkpoint(row, ckpt_root)
    assert why == "" and path == d / "model-0001.pt"

    res = bench.recon_row(row, path, X, labels, compare_images=16, per_layer_inputs=8, weights="uint8")
    assert res["method"] == "qdrop" and res["compared_images"] == 16 and res["per_layer_inputs"] == 8
    assert res["per_layer_layers"] == len(graph.nodes) and len(res["per_layer"]) <= len(graph.nodes)
    assert res["max_abs_lsb"] <= 1 and res["exact_fraction"] >= 0.99
    assert res["correct_so"] == round(ref_top1 * len(X)) and res["within_0_1"] is (res["correct_ort"] == res["correct_so"])
    assert res["ort_top1"] == float((ref.argmax(1) == labels).mean()) or res["exact_fraction"] < 1.0
    fc = res["full_check"]   # every image against the bit-exact integer_requant='inexact' export
    assert fc["inexact_equals_reference"] and fc["inexact_top1"] == ref_top1 and fc["inexact_equals_reference_on"] >= 32
    assert fc["top1_changed"] <= fc["images_differing"] == len(fc["differing_images"])
    if res["exact_fraction"] == 1.0:  # the first 16 images equal the reference: only the others can differ
        assert all(i >= 16 for i in fc["differing_images"])
    two = res["containers"]["weight_bits"]["2"]
    assert two["layers"] >= 5 and -2 <= two["min"] and two["max"] <= 1 and res["containers"]["int4_initializers"] == 0
    assert 2 in res["containers"]["activation_bits"] and res["integer_kernels"].get("QLinearConv", 0) >= 1
    md = bench.recon_markdown(dict(results="t.json", ckpt_root=str(ckpt_root), commands=["cmd"],
                                   machine=dict(cpu="x", cores=2, vnni=False, ort="1", loadavg=0.0),
                                   policy=dict(weights="uint8", integer_requant="none"), rows=[res],
                                   skipped=[dict(key="k", reason="no checkpoint")]))
    assert "| tinynet | W2A2 | qdrop | 0 |" in md and "`k`: no checkpoint" in md


def _dynamo_export(model, path, shape):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):       # the exporter prints its progress
        torch.onnx.export(model.eval(), (torch.zeros(shape),), str(path), dynamo=True)
    return path


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_dynamo_exported_models_come_back_in(tmp_path, name):
    """torch.onnx.export's default (dynamo) exporter writes global average pooling as ReduceMean over (H, W) and the
    flatten as a Reshape to (1, features) with the example's batch baked in: both import as the pool / flatten the
    tracer knows, and the model runs at any batch size."""
    from ptq2tvm.frontend.trace import trace_model
    from ptq2tvm.models import create_model
    from ptq2tvm.onnx_import import onnx_to_torch

    torch.manual_seed(0)
    model = randomize_bn(create_model(name, num_classes=10)).eval()
    path = _dynamo_export(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    import onnx

    assert {"ReduceMean", "Reshape"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    gm = onnx_to_torch(path)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        a, b = gm(x), model(x)
    assert a.shape == (4, 10) and float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
    assert [n.op for n in trace_model(gm, (3, 32, 32)).nodes] == [n.op for n in trace_model(model, (3, 32, 32)).nodes]


def test_dynamo_reduce_mean_over_channels_is_still_rejected_by_name(tmp_path):
    from ptq2tvm.onnx_import import onnx_to_torch

    class ChannelMean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(1, keepdim=True)

    path = _dynamo_export(ChannelMean(), tmp_path / "c.onnx", (1, 1, 8, 8))
    with pytest.raises(UnsupportedModelError, match=r"(?s)unsupported ONNX node.*\(ReduceMean\)"):
        onnx_to_torch(path)
