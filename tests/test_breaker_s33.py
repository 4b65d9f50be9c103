"""Session 33 breaker pass on the Python API: what it found, as tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import one_torch_thread  # noqa: F401  (fixture)


class SpatialGate(nn.Module):
    """CBAM-style spatial attention: features (N, C, H, W) times a one-channel gate (N, 1, H, W), or (N, 1, 1, 1)
    with ``pooled``; ``gate_first`` swaps the operands."""

    def __init__(self, channels: int, gate_first: bool = False, pooled: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, channels, 3)
        self.b = nn.Conv2d(1, 1, 3)
        self.gate_first, self.pooled = gate_first, pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.a(x), torch.sigmoid(self.b(x))
        if self.pooled:
            g = g.mean((2, 3), keepdim=True)
        return g * a if self.gate_first else a * g


@pytest.mark.parametrize("channels,gate_first,pooled,target", [
    (8, False, False, None), (8, True, False, None), (24, False, False, None), (24, True, True, None),
    (24, False, False, "x86-64-v3"), (8, False, True, "x86-64-v3")])
def test_one_channel_gate_multiply_is_bit_exact(tmp_path, channels, gate_first, pooled, target):
    """A multiply by a one-channel gate broadcast over C channels: the blocked kernel read the gate's padding lanes
    for channels 1..15 (15784 of 21632 output codes wrong, up to 50 codes off; the SE gate (N, C, 1, 1) and same-shape
    multiplies were right). Now every channel reads lane 0 of the gate: the .so equals the reference executor and
    the fake-quant model, on the AVX-512 (this host's default) and AVX2 kernels, with 1 or 2 channel blocks."""
    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 1, 20, 20)).astype(np.float32)
    test = rng.standard_normal((4, 1, 20, 20)).astype(np.float32)
    qm = quantize(SpatialGate(channels, gate_first, pooled).eval(), calib, QuantConfig(), progress=False)
    graph = to_integer(qm)
    mul = [n for n in graph.nodes if n.op == "mul"]
    assert len(mul) == 1 and sorted(graph.tensor(i).shape[0] for i in mul[0].inputs) == [1, channels]
    compile_so(graph, tmp_path / "m.so", batch=2, target=target)
    q = graph.input.quantize(test)
    got, want = CompiledModel(tmp_path / "m.so", threads=1).run_int(q), run_reference(graph, q)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} codes differ"
    fq = graph.outputs[0].quantize(qm(torch.from_numpy(test)).detach().numpy())
    assert np.array_equal(want, fq)


def test_one_channel_gate_multiply_in_cuda_emulation():
    """The CUDA build emits the same TE multiply as the x86 build (its arithmetic is checked above against the
    reference): with the one-channel gate's lane-0 indexing it still schedules for CUDA and runs in the CUDA
    emulation equal to the same PrimFunc compiled for this CPU."""
    from ptq2tvm.api import quantize, to_integer
    from ptq2tvm.backend.cuda_emulation import emulate_every_kernel
    from ptq2tvm.frontend.qmodel import QuantConfig

    torch.manual_seed(0)
    calib = np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)
    graph = to_integer(quantize(SpatialGate(24).eval(), calib, QuantConfig(), progress=False))
    checked = emulate_every_kernel(graph, batch=2, seed=3, only=lambda k: "mul" in k)
    assert checked, "no multiply kernel was emulated"
