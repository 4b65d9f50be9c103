"""The op template: every registered op family runs through trace -> fake-quant -> fold -> reference -> both CPU
backends (blocked x86 kernels and plain TE), bit-exact, on small models built to hit its edge cases.

Adding an op: add a model that uses it to ``OP_MODELS`` (and its ops to ``covers``); ``test_every_op_is_covered``
fails until then.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptq2tvm.api import compile_so, to_integer
from ptq2tvm.backend.runtime import CompiledModel
from ptq2tvm.errors import UnsupportedModelError
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.frontend.trace import trace_model
from ptq2tvm.ir.reference import run_reference
from ptq2tvm.ops import FLOAT_OPS, IR_OPS, LUT_FUNCTIONS, lut_table
from ptq2tvm.parity import fakequant_outputs, to_grid


def _conv(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, s, k // 2)


class LutChain(nn.Module):
    """Every lookup-table nonlinearity, as modules and functional calls, each between two convs."""

    def __init__(self):
        super().__init__()
        mods = [nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Hardsigmoid(), nn.Tanh(), nn.GELU(),
                nn.LeakyReLU(0.1), nn.ELU(0.7), nn.Mish(), nn.Softplus()]
        self.acts = nn.ModuleList(mods)
        self.convs = nn.ModuleList([_conv(3, 18)] + [_conv(18, 18, 1) for _ in range(len(mods) + 3)])
        self.fc = nn.Linear(18, 5)

    def forward(self, x):
        x = self.convs[0](x)
        for i, act in enumerate(self.acts):
            x = self.convs[i + 1](act(x))
        x = self.convs[-3](F.silu(x))
        x = self.convs[-2](torch.sigmoid(x))
        x = self.convs[-1](F.gelu(x, approximate="tanh")).tanh()
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    """MobileNetV3 / EfficientNet block: SE gate (N, C, 1, 1) x (N, C, H, W), a same-shape mul, max pool ceil_mode
    on an odd map, a global mean with keepdim."""

    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 20)
        self.dw = nn.Conv2d(20, 20, 3, 1, 1, groups=20)
        self.se_reduce = nn.Conv2d(20, 6, 1)
        self.se_expand = nn.Conv2d(6, 20, 1)
        self.gate = _conv(20, 20, 1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = _conv(20, 7, 1)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = F.relu(self.dw(x))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x * s
        x = x * torch.sigmoid(self.gate(x))
        x = self.pool(x)
        return self.head(x).mean([2, 3])


class ConcatShuffle(nn.Module):
    """ShuffleNetV2 unit (chunk, concat, view/transpose channel shuffle), concat of very different scales and odd
    channel counts, a channel slice."""

    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 22)
        self.branch = nn.Sequential(nn.Conv2d(11, 11, 1), nn.ReLU(), nn.Conv2d(11, 11, 3, 1, 1, groups=11),
                                    nn.Conv2d(11, 11, 1), nn.ReLU())
        self.big = _conv(3, 13)
        with torch.no_grad():
            self.big.weight.mul_(12.0)
        self.fuse = _conv(35, 17, 1)
        self.fuse2 = _conv(30, 9, 1)
        self.fc = nn.Linear(5 * 8 * 8, 4)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y1, y2 = y.chunk(2, dim=1)
        y = torch.cat((y1, self.branch(y2)), dim=1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        b = self.big(x)
        z = self.fuse(torch.cat([y, b], 1))          # NCHW input (the shuffle) + blocked input
        z = self.fuse2(torch.cat([z, b], 1))[:, 3:8]  # both inputs blocked: the NCHW16c concat kernel
        return self.fc(z.reshape(z.size(0), -1))


class PyramidSR(nn.Module):
    """FPN-style top-down path (nearest upsample + add) with several outputs, and the super-resolution tail
    (PixelShuffle), PixelUnshuffle, F.interpolate by a factor."""

    def __init__(self):
        super().__init__()
        self.c1 = _conv(3, 16)
        self.c2 = _conv(16, 24, 3, 2)
        self.lat1 = _conv(16, 12, 1)
        self.lat2 = _conv(24, 12, 1)
        self.out1 = _conv(12, 12)
        self.sr = _conv(12, 12)
        self.shuffle = nn.PixelShuffle(2)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.tail = _conv(12, 3)

    def forward(self, x):
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        p2 = self.lat2(f2)
        p1 = F.relu(self.lat1(f1)) + F.interpolate(p2, scale_factor=2, mode="nearest")
        p1 = self.out1(p1)
        sr = self.shuffle(self.sr(p1))                     # (N, 3, 16, 16)
        back = self.tail(self.unshuffle(sr))               # (N, 3, 8, 8)
        up = nn.functional.interpolate(back, size=(16, 16))
        return {"p1": p1, "p2": p2, "sr": up}


class FunctionalWeights(nn.Module):
    """Conv and linear layers written as F.conv2d / F.linear over the module's own parameters (no nn.Conv2d /
    nn.Linear), with and without bias."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 16, 1, 1, generator=g) * 0.3)
        self.fc_w = nn.Parameter(torch.randn(10, 8 * 4 * 4, generator=g) * 0.1)
        self.fc_b = nn.Parameter(torch.randn(10, generator=g) * 0.1)
        self.head_w = nn.Parameter(torch.randn(5, 10, generator=g) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.w2))
        x = F.relu(F.linear(torch.flatten(x, 1), self.fc_w, self.fc_b))
        return F.linear(x, self.head_w)


OP_MODELS = {
    "lut": (LutChain, {"lut", "conv", "linear", "avgpool", "flatten"}),
    "se": (SqueezeExcite, {"mul", "maxpool", "avgpool", "conv", "lut", "flatten"}),
    "concat": (ConcatShuffle, {"concat", "slice", "channel_shuffle", "conv", "linear", "flatten"}),
    "pyramid": (PyramidSR, {"upsample", "add", "pixel_shuffle", "pixel_unshuffle", "conv"}),
    "functional": (FunctionalWeights, {"conv", "linear", "flatten"}),
}


def _images(seed: int, n: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)


def _quantize(name: str, w_bits: int = 8, a_bits: int = 8):
    torch.manual_seed(0)
    model = OP_MODELS[name][0]().eval()
    return model, quantize_rtn(model, _images(1), QuantConfig(w_bits=w_bits, a_bits=a_bits), progress=False)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def test_every_op_is_covered():
    covered = set().union(*(c for _, c in OP_MODELS.values()))
    real = {name for name, d in FLOAT_OPS.items() if d.kind != "trace"} - {"clamp"}
    assert real <= covered, f"ops without a model in the template: {sorted(real - covered)}"
    assert set(IR_OPS) >= {"conv2d", "dense", "lut", "mul", "concat", "upsample"}


@pytest.mark.parametrize("name", list(OP_MODELS))
def test_trace_finds_the_ops(name):
    model, covers = OP_MODELS[name][0](), OP_MODELS[name][1]
    g = trace_model(model.eval(), (3, 8, 8))
    assert covers <= {n.op for n in g.nodes}


@pytest.mark.parametrize("name,bits", [("lut", (8, 8)), ("se", (8, 8)), ("concat", (8, 8)), ("pyramid", (8, 8)),
                                       ("se", (4, 4)), ("concat", (4, 4)), ("functional", (8, 8))])
def test_reference_matches_fakequant_and_float(name, bits):
    """The integer graph computes the fake-quant model: every output within 1 LSB, nearly all exact; the fake-quant
    model stays close to FP32 at 8 bits."""
    model, qm = _quantize(name, *bits)
    graph = to_integer(qm)
    x = _images(2, 32)
    ref = _as_list(run_reference(graph, graph.input.quantize(x)))
    fq = _as_list(fakequant_outputs(qm, x))
    for r, f, t in zip(ref, fq, graph.outputs):
        d = np.abs(r.astype(int) - to_grid(f, t).astype(int))
        assert d.max() <= 1, (name, t.name, d.max())
        assert (d == 0).mean() >= 0.97, (name, t.name, (d == 0).mean())
    if bits == (8, 8):
        with torch.no_grad():
            fp = model(torch.from_numpy(x))
        fp = list(fp.values()) if isinstance(fp, dict) else _as_list(fp)
        for a, b in zip(fq, fp):
            b = b.numpy()
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.15, (name, np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(OP_MODELS))
@pytest.mark.parametrize("schedule", ["auto", "plain"])
def test_so_bit_exact_both_backends(name, schedule, tmp_path):
    _, qm = _quantize(name, 4 if name == "concat" else 8, 4 if name == "concat" else 8)
    graph = to_integer(qm)
    compile_so(graph, tmp_path / "m.so", batch=2, schedule=schedule)
    cm = CompiledModel(tmp_path / "m.so")
    rng = np.random.default_rng(3)
    q = np.concatenate([graph.input.quantize(_images(4, 6)),
                        rng.integers(0, graph.input.qmax + 1, (5, 3, 8, 8)).astype(np.uint8)])
    got, ref = _as_list(cm.run_int(q)), _as_list(run_reference(graph, q))
    assert len(got) == len(graph.output_names)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and np.array_equal(g, r), (name, schedule, int((g != r).sum()))
    floats = _as_list(cm(_images(5, 3)))
    assert [f.shape[1:] for f in floats] == [tuple(t.shape) for t in graph.outputs]


def test_multi_output_structure_is_kept():
    _, qm = _quantize("pyramid")
    out = qm(torch.from_numpy(_images(6, 2)))
    assert isinstance(out, dict) and list(out) == ["p1", "p2", "sr"]
    assert tuple(out["sr"].shape) == (2, 3, 16, 16)
    graph = to_integer(qm)
    assert graph.meta["output_structure"] == ["dict", ["p1", "p2", "sr"]]


# ---- lookup tables: edge cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", sorted(LUT_FUNCTIONS))
def test_lut_table_matches_float64_definition(fn):
    s_in, z_in, s_out, z_out = 0.05, 131, 0.02, 40
    table = lut_table(fn, {}, s_in, z_in, 8, s_out, z_out, 0, 255)
    x = torch.tensor(s_in * (np.arange(256) - z_in), dtype=torch.float64)
    y = LUT_FUNCTIONS[fn][0](x).numpy()
    want = np.clip(np.rint(y / s_out) + z_out, 0, 255)
    assert table.dtype == np.uint8 and table.shape == (256,)
    # float64 torch and numpy may differ in the last ulp: only at exact .5 ties could a code differ
    assert np.abs(table.astype(int) - want.astype(int)).max() <= 1
    assert (table == want).mean() >= 0.99


def test_lut_table_saturates_and_rounds_half_even():
    # sigmoid at x = 0 is 0.5: with s_out = 1/255... code 127.5 -> 128 (half to even: 128 is even)
    t = lut_table("sigmoid", {}, 1.0, 0, 4, 1 / 255, 0, 0, 255)
    assert t[0] == 128
    # large inputs saturate at the top code; hardsigmoid below -3 is exactly 0
    t = lut_table("hardsigmoid", {}, 1.0, 8, 4, 1 / 15, 0, 0, 15)
    assert t[0] == 0 and t[15] == 15 and t[8] == 8   # x=0 -> 0.5 -> 7.5 -> 8 (even)
    # a clamp (fused ReLU6-like bounds) limits the codes
    t = lut_table("silu", {}, 0.5, 8, 4, 0.25, 4, 3, 12)
    assert t.min() >= 3 and t.max() <= 12


def test_lut_input_gets_eight_bits_at_w4a4():
    _, qm = _quantize("lut", 4, 4)
    g = qm.graph
    luts = [n for n in g.nodes if n.op == "lut"]
    for n in luts:
        assert qm.act_quantizer(n.inputs[0]).bits == 8      # the table's input grid
        assert qm.act_quant[qm.key(n.name)].bits in (4, 8)   # its output: a_bits (8 when read by the classifier)


def test_unsupported_ops_are_refused_cleanly():
    class Transformerish(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _conv(3, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            x = self.conv(x).permute(0, 2, 3, 1)
            x = self.norm(x)
            return x.softmax(-1).sum()

    with pytest.raises(UnsupportedModelError) as e:
        trace_model(Transformerish(), (3, 8, 8))
    msg = str(e.value)
    for part in ("norm (LayerNorm)", "permute", "softmax"):
        assert part in msg, msg
    assert "KeyError" not in msg and "tensor_meta" not in msg


# ---- reconstruction and the CUDA build see the new structures ---------------------------------------------------
@pytest.mark.parametrize("name,granularity", [("se", "block"), ("concat", "block"), ("pyramid", "mrecg-modcap")])
def test_reconstruction_with_new_ops_stays_exact(name, granularity):
    """QDrop + AdaQTransform (a few iterations) over SE gates, concat/shuffle branches and a multi-output pyramid:
    units cover every node, every output is a loss target, and the folded graph still equals the fake-quant model."""
    from ptq2tvm.api import quantize
    from ptq2tvm.reconstruct.recon import ReconSettings
    from ptq2tvm.reconstruct.units import discover_units

    torch.manual_seed(0)
    model = OP_MODELS[name][0]().eval()
    qm0 = quantize_rtn(model, _images(1), QuantConfig(w_bits=4, a_bits=4), progress=False)
    units = discover_units(qm0.graph, "block")
    assert sorted(n for u in units for n in u.nodes) == sorted(n.name for n in qm0.graph.nodes if n.op != "input")
    assert set(qm0.graph.output_names) <= {t for u in units for t in u.targets}
    settings = ReconSettings(granularity=granularity, adaqtransform=True, iters=6, batch_size=8, seed=0)
    qm = quantize(model, _images(1), QuantConfig(w_bits=4, a_bits=4), method="qdrop", progress=False,
                  settings=settings)
    assert all(layer.adaq for layer in qm.layers.values())
    graph = to_integer(qm)
    x = _images(7, 16)
    for r, f, t in zip(_as_list(run_reference(graph, graph.input.quantize(x))), _as_list(fakequant_outputs(qm, x)),
                       graph.outputs):
        d = np.abs(r.astype(int) - to_grid(f, t).astype(int))
        assert d.max() <= 1 and (d == 0).mean() >= 0.97, (name, t.name)


@pytest.mark.parametrize("name", ["se", "pyramid", "concat"])
def test_new_op_kernels_bit_exact_in_cuda_emulation(name):
    """Every kernel of the CUDA build (one thread per output for the new element-wise kernels) run in the CUDA
    emulation equals the same PrimFunc compiled for this CPU."""
    from kernels import cuda_emulator
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel

    if not cuda_emulator.available():
        pytest.skip("no g++ to run the CUDA emulation")
    _, qm = _quantize(name)
    graph = to_integer(qm)
    new = {"k_" + "".join(c if c.isalnum() else "_" for c in n.name) for n in graph.nodes
           if n.op in ("lut", "mul", "concat", "upsample", "add") or "padding_end" in n.attrs}
    checked = emulate_every_kernel(graph, batch=1, seed=1, only=lambda k: k in new)
    assert checked and set(checked) <= new
