"""The ONNX export's requantization: float32 multipliers fitted to the dyadic ones (ptq2tvm.onnx_requant), checked
by enumerating every accumulator value, and the integer-op form (ConvInteger + int64) bit-exact in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_integer_graph

pytest.importorskip("onnxruntime")

from ptq2tvm.ir.reference import run_reference  # noqa: E402
from ptq2tvm.onnx_export import build_onnx  # noqa: E402
from ptq2tvm.onnx_parity import run_onnx_parity  # noqa: E402
from ptq2tvm.onnx_requant import dyadic_round, fit_weight_scales, ort_round  # noqa: E402


@pytest.mark.parametrize("z,lo,hi", [(0, 0, 255), (121, 0, 255), (0, 0, 15)])
def test_fit_counts_every_differing_accumulator(z, lo, hi):
    """The fit's mismatch count (from the accumulators near a rounding boundary only) equals a brute-force count
    over every accumulator value of the range, for the chosen and for the nearest float32 multiplier."""
    rng = np.random.default_rng(5)
    m = rng.integers(1 << 30, 1 << 31, size=24)
    n = rng.integers(36, 41, size=24)
    s_x, s_y = np.float32(0.0173), np.float32(0.0291)
    acc_lo, acc_hi = np.full(24, -60_000), np.full(24, 60_000)
    fit = fit_weight_scales(m, n, s_x, s_y, acc_lo, acc_hi, z, lo, hi)
    nearest = fit_weight_scales(m, n, s_x, s_y, acc_lo, acc_hi, z, lo, hi, ulps=0)
    acc = np.arange(-60_000, 60_001, dtype=np.int64)
    for c in range(24):
        ref = np.clip(dyadic_round(acc, int(m[c]), int(n[c])) + z, lo, hi)
        for f in (fit, nearest):
            assert f.multiplier[c] == (s_x * f.scale[c]) / s_y   # ORT's QLinearConv formula
            got = np.clip(ort_round(acc, f.multiplier[c], z, 255) + z, lo, hi)
            assert int((got != ref).sum()) == int(f.mismatches[c]), c
    assert fit.mismatches.sum() <= nearest.mismatches.sum() and fit.exact_channels >= 12
    assert fit.mismatches.sum() < nearest.mismatches.sum() or nearest.mismatches.sum() == 0


@pytest.mark.parametrize("w,a", [(8, 8), (4, 4)])
def test_integer_requant_inexact_is_bit_exact_in_ort(w, a):
    """integer_requant='inexact': every conv/dense is QLinearConv with a provably exact float32 multiplier or
    ConvInteger/MatMulInteger + the int64 requantization; ORT equals the reference on every element of every layer,
    and its float32 output equals the reference's dequantized codes bit for bit."""
    graph = tiny_integer_graph(w, a)
    x = np.random.default_rng(2).standard_normal((16, 1, 12, 12)).astype(np.float32) * 1.3
    rep = run_onnx_parity(graph, x, None, weights="uint8", per_layer_inputs=16, threads=1, progress=False,
                          integer_requant="inexact")
    assert rep.exact_fraction == 1.0 and rep.output_float_exact_fraction == 1.0
    assert all(p.exact_fraction == 1.0 and p.local_exact_fraction == 1.0 for p in rep.per_layer)
    assert rep.float_kernels == 0 and rep.integer_requant_layers
    kernels = {p.ort_kernel for p in rep.per_layer if p.op in ("conv2d", "dense")}
    assert kernels & {"ConvInteger->int64", "MatMulInteger->int64"}
    assert all(f["mismatching_accumulators"] == 0 for f in rep.requant_fit.values())
    _, xrep = build_onnx(graph, weights="uint8", integer_requant="none")
    assert not xrep.integer_layers  # the pure QDQ form is still there


def test_integer_requant_handles_negative_residual_terms():
    """The int64 requantization with a residual zero point > 0 (negative (q_r - z_r)), a negative bias and an output
    zero point > 0: the offset keeps the Div's dividend >= 0, so ORT's truncating Div is the floor."""
    graph = tiny_integer_graph(8, 8)
    res = [nd for nd in graph.nodes if nd.op == "conv2d" and len(nd.inputs) > 1][0]
    res.attrs["residual_zero_point"] = 200
    res.attrs["output_zero_point"] = 90
    res.arrays["bias"] = (res.arrays["bias"].astype(np.int64) - 5000).astype(np.int32)
    x = np.random.default_rng(4).standard_normal((16, 1, 12, 12)).astype(np.float32) * 1.3
    env = run_reference(graph, graph.input.quantize(x), return_all=True)
    assert (env[res.name] == 0).any()  # the lower clamp is reached: negative sums
    rep = run_onnx_parity(graph, x, None, weights="uint8", per_layer_inputs=16, threads=1, progress=False,
                          integer_requant="residual")
    layer = next(p for p in rep.per_layer if p.name == res.name)
    assert layer.local_exact_fraction == 1.0 and layer.ort_kernel == "ConvInteger->int64"
