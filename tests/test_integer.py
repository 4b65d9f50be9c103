"""Fold, dyadic multipliers, the reference executor, and the .so: exact integers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptq2tvm.backend.compile import compile_graph
from ptq2tvm.backend.runtime import CompiledModel
from ptq2tvm.fold.dyadic import dyadic_multipliers
from ptq2tvm.fold.fold import fold_to_integer
from ptq2tvm.frontend.calibrate import quantize_rtn
from ptq2tvm.frontend.qmodel import QuantConfig
from ptq2tvm.ir.graph import IntegerGraph
from ptq2tvm.ir.reference import conv_accumulate, requantize, run_reference
from ptq2tvm.parity import run_parity


def test_dyadic_multipliers_are_accurate_and_share_a_shift():
    M = np.array([[0.5, 1e-4, 3.7e-3, 0.9999999], [0.25, 2e-5, 1e-9, 0.1]])
    m, n = dyadic_multipliers(M, "t")
    assert m.dtype == np.int32 and n.dtype == np.int32
    assert m[0, 0] == 1 << 30 and n[0] == 31                   # 0.5 = 2^30 * 2^-31
    top = m.max(axis=0)
    assert np.all((top >= 1 << 30) & (top < 1 << 31))         # the larger term keeps 31 bits
    approx = m.astype(np.float64) * np.ldexp(1.0, -n.astype(np.int64))[None, :]
    assert np.all(np.abs(approx[0] - M[0]) <= M[0] * 2.0 ** -30)
    assert np.all((n >= 1) & (n <= 62))


def test_requantize_rounds_half_up_and_clamps():
    acc = np.array([[3, -3, 5, -5, 1000, -1000]], dtype=np.int64).reshape(1, 6)
    # multiplier 2^30, shift 31 -> acc / 2: 1.5 -> 2, -1.5 -> -1, 2.5 -> 3, -2.5 -> -2
    m = np.full(6, 1 << 30, np.int32)
    out = requantize([(acc, m)], np.full(6, 31, np.int32), zero_point=10, lo=0, hi=255)
    assert out.tolist() == [[12, 9, 13, 8, 255, 0]]


def test_conv_accumulate_matches_torch_exactly():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 8, 9, 9)).astype(np.uint8)
    w = rng.integers(-128, 128, (8, 2, 3, 3)).astype(np.int8)
    acc = conv_accumulate(x, w, np.zeros(8, np.int32), [2, 2], [1, 1], [1, 1], 4, pad_value=37)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=37)
    want = torch.nn.functional.conv2d(torch.from_numpy(xp), torch.from_numpy(w.astype(np.float64)), stride=2,
                                      groups=4).numpy()
    assert np.array_equal(acc, want.astype(np.int64))


@pytest.mark.parametrize("w_bits,a_bits,first_last,schedule", [
    (8, 8, True, "auto"), (4, 4, True, "auto"), (2, 2, False, "auto"), (3, 5, True, "auto"), (8, 8, True, "plain"),
    (4, 4, False, "plain")])
def test_so_is_bit_exact_with_the_reference(tmp_path, tiny_model, tiny_data, w_bits, a_bits, first_last, schedule):
    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(w_bits, a_bits, first_last), progress=False)
    graph = fold_to_integer(qm)
    if first_last:
        assert graph.nodes[0].attrs["w_bits"] == 8 and graph.nodes[-1].attrs["w_bits"] == 8
    assert all(int(n.arrays["weight"].min()) >= -(1 << (w_bits - 1)) for n in graph.nodes[1:-1] if "weight" in n.arrays)
    graph = IntegerGraph.load(graph.save(tmp_path / "g.npz"))
    res = compile_graph(graph, tmp_path / "m.so", batch=3, schedule=schedule)
    assert res.meta["backend"].startswith("plain" if schedule == "plain" else "x86")
    cm = CompiledModel(tmp_path / "m.so")
    x = np.random.default_rng(5).standard_normal((10, 1, 12, 12)).astype(np.float32) * 2  # beyond the calib range
    q = graph.input.quantize(x)
    want = run_reference(graph, q)
    assert np.array_equal(cm.run_int(q), want)
    # the reused input tensor and the DLPack output views: every call's arrays are its own (a later call with other
    # inputs leaves them unchanged), float in -> the same integers dequantized
    first = cm.run_batch(q[:3])
    y = cm(x[3:6])
    assert np.array_equal(first, want[:3]) and np.array_equal(y, graph.output.dequantize(want[3:6]))
    rep = run_parity(graph, cm, qm, x, per_layer_inputs=10, progress=False)
    assert rep.bit_exact_vs_reference and rep.mismatched_elements == 0
    assert len(rep.per_layer) == len(graph.nodes)


def test_integer_graph_tracks_fakequant(tiny_model, tiny_data):
    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(8, 8), progress=False)
    graph = fold_to_integer(qm)
    ref = run_reference(graph, graph.input.quantize(tiny_data))
    with torch.no_grad():
        fq = qm(torch.from_numpy(tiny_data)).numpy()
    fq_int = np.rint(fq / graph.output.scale) + graph.output.zero_point
    diff = np.abs(ref.astype(np.int64) - fq_int)
    assert (diff == 0).mean() > 0.999 and diff.max() <= 1   # int32 bias simulated: only tie-rounding differs


def test_fakequant_save_load_roundtrip(tmp_path, tiny_model, tiny_data):
    from ptq2tvm.frontend.qmodel import QuantModel

    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(4, 4), progress=False)
    q2 = QuantModel.load(qm.save(tmp_path / "fq.pt"))
    x = torch.from_numpy(tiny_data)
    with torch.no_grad():
        assert torch.equal(qm(x), q2(x))
    assert fold_to_integer(q2).digest() == fold_to_integer(qm).digest()


def test_fakequant_bias_rounds_like_the_fold_at_float32_ties(tiny_model, tiny_data):
    """A bias whose b / (s_w * s_x) is just below k + 0.5 in float64 but exactly k + 0.5 in float32 (learned scales
    drift onto such boundaries): the fake-quant model must pick the fold's integer, not float32's."""
    qm = quantize_rtn(tiny_model, tiny_data, QuantConfig(8, 8), progress=False)
    node = next(n for n in qm.graph.nodes if n.op == "conv")
    layer, s_x = qm.layer(node.name), qm.act_quantizer(node.inputs[0]).scale.detach()
    s_w = layer.wq.scale.detach()
    acc32 = (s_w * s_x).numpy()
    acc64 = s_w.double().numpy() * float(s_x)
    bias = layer.bias.detach().numpy().copy()
    found = []
    for c in range(len(bias)):
        for k in range(1, 400):
            b = np.float32((k + 0.5) * acc64[c])
            for _ in range(40):
                if np.float32(b / acc32[c]) == np.float32(k + 0.5) and np.float64(b) / acc64[c] < k + 0.5:
                    bias[c] = b
                    found.append((c, k))
                    break
                b = np.nextafter(b, np.float32(-np.inf))
            if found and found[-1][0] == c:
                break
    assert len(found) >= 2, "no float32 tie found for this seed"
    with torch.no_grad():
        layer.bias.copy_(torch.from_numpy(bias))
    graph = fold_to_integer(qm)
    inode = next(n for n in graph.nodes if n.name == node.name)
    z_x = int(inode.attrs["input_zero_point"])
    for c, k in found:      # the fold's bias (plus back its zero-point term): float64 says just below the tie -> k
        assert int(inode.arrays["bias"][c]) + z_x * int(inode.arrays["weight"][c].astype(np.int64).sum()) == k
    x = torch.zeros((1, *node.weight.shape[1:2], 8, 8))
    with torch.no_grad():
        y = layer(x, s_x)
    for c, k in found:
        assert float(y[0, c, 4, 4] / torch.from_numpy(acc32)[c]) == pytest.approx(k, abs=1e-3)

