"""Shared fixtures: small seeded models exercising every supported layer kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn


class Block(nn.Module):
    """torchvision-style BasicBlock (in-place add, downsample)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class InvRes(nn.Module):
    """MobileNetV2-style inverted residual: signed block output, depthwise conv, ReLU6, add without ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU6(), nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class TinyNet(nn.Module):
    """Every supported layer kind in ~10k parameters: 1x12x12 input."""

    def __init__(self, in_ch: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 8, 3, 1, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block1 = Block(8, 8, 1)
        self.block2 = Block(8, 16, 2)
        self.ir = InvRes(16)
        self.grouped = nn.Conv2d(16, 16, 3, 1, 1, groups=4)
        self.ht = nn.Hardtanh(-1.0, 2.0)
        self.avg = nn.AvgPool2d(2, 1, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.stem(x))))
        x = self.ir(self.block2(self.block1(x)))
        x = self.avg(self.ht(self.grouped(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(self.drop(x))


class HSigmoid(nn.Module):
    """The MobileNetV3 repositories' ``h_sigmoid`` module: ``ReLU6(inplace=True)(x + 3) / 6``, Hardsigmoid spelled
    out (tests of the tracer's recognition of spelled-out activations)."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.relu(x + 3) / 6


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyNet())


@pytest.fixture
def tiny_data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test (restored after): reconstruction tests are deterministic per thread
    count and faster with one thread on the shared 2 cores. Use as ``pytestmark = pytest.mark.usefixtures(...)``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def calib() -> np.ndarray:
    """32 seeded N(0, 1) calibration images of the TinyNet's 1x12x12 input."""
    return np.random.default_rng(0).standard_normal((32, 1, 12, 12)).astype(np.float32)


def fast_recon(**kw):
    """ReconSettings for a seconds-long reconstruction in a test (40 iterations, batch 16, seed 0, 1 thread)."""
    from ptq2tvm.reconstruct import ReconSettings

    base = dict(iters=40, batch_size=16, seed=0, threads=1, chunk=64)
    base.update(kw)
    return ReconSettings(**base)


def tiny_integer_graph(w_bits: int, a_bits: int, in_ch: int = 1, hw: tuple[int, int] = (12, 12)):
    """The seeded TinyNet (``in_ch`` input channels, ``hw`` input size), calibrated on 8 seeded images and folded to
    an integer graph (w_bits/a_bits)."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    model = randomize_bn(TinyNet(in_ch=in_ch)).eval()
    calib = np.random.default_rng(0).standard_normal((8, in_ch, *hw)).astype(np.float32)
    return to_integer(quantize(model, calib, QuantConfig(w_bits, a_bits), progress=False))


def four_bit_input_graph(c: int = 16, h: int = 6):
    """A one-conv integer graph (3x3, ``c`` -> ``c`` channels, ``h`` x ``h``) whose input is 4-bit (codes 0..15), its
    seeded int4-range weights requantized to 8-bit outputs: for the checks of input codes against the input's bits."""
    from ptq2tvm.ir.graph import IntegerGraph, IntNode, QTensor

    rng = np.random.default_rng(3)
    inp = QTensor("x", (c, h, h), 0.1, 0, 4)
    out = QTensor("conv0", (c, h, h), 0.1, 128, 8)
    conv = IntNode("conv0", "conv2d", ["x"], out,
                   dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, input_zero_point=0,
                        output_zero_point=128, lo=0, hi=255),
                   dict(weight=rng.integers(-8, 8, (c, c, 3, 3)).astype(np.int8), bias=np.zeros(c, np.int32),
                        multiplier=np.full(c, 1 << 20, np.int32), shift=np.full(c, 27, np.int32)))
    return IntegerGraph(inp, [conv], ["conv0"], {})


def fake_quant_w8a8_error(model, shape=(8, 3, 8, 8)) -> float:
    """Relative L2 error of ``model``'s W8A8 fake-quant output against its FP32 output on seeded normal images of
    ``shape`` (calibrated on the same images): the check that a traced spelling computes what the model computes."""
    from ptq2tvm.api import quantize
    from ptq2tvm.frontend.qmodel import QuantConfig

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qm = quantize(model, x, QuantConfig(8, 8), progress=False)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(x)).numpy(), qm(torch.from_numpy(x)).numpy()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def quantized_small_run(folder, out_name: str):
    """``folder`` (a Path) with ``x.npy`` (16 seeded 1x12x12 images) and an RTN W8A8 ``resnet_small`` run quantized
    from 8 of them by the CLI into ``folder / out_name`` (no fidelity pass); -> ``folder``. For module-scoped
    fixtures of tests that need any run to compile / refuse."""
    from ptq2tvm import cli

    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    assert cli.main(["quantize", "--model", "resnet_small", "--data", str(folder / "x.npy"), "--calib-size", "8",
                     "--fidelity-images", "0", "--out", str(folder / out_name), "--no-progress"]) == 0
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``ptq2tvm.cli.main(argv)`` (arguments str()-ed) -> (exit status, stdout, stderr) of that call alone."""
    from ptq2tvm import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err
