"""The first conv + max pool kernel (kernels/stem_pool.py): the pool taken on the int32 accumulators, bit-exact
against the numpy integer contract (kernels.reference) of the conv, its requantization and the pool one after the
other; where the builder uses it.

Runs where the CPU has AVX-512 VNNI; elsewhere compiled for an Ice Lake server target, the run skipped with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels import reference as R  # noqa: E402
from test_kernels_x86 import HAS_VNNI, HOST, _requant_params  # noqa: E402

ICX = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
# name: (n, c, h, w, o, conv (k, s, p), pool (k, s, p), threads, extra)
CASES = {
    # ResNet's stem and pool (64 channels: two groups of two blocks), a narrower image
    "resnet_stem": (1, 3, 40, 40, 64, (7, 2, 3), (3, 2, 1), 2, {}),
    # 3 blocks (one block per group), a 13-column conv output (a 7-pixel tile and a 6-pixel one), input and output
    # zero points, a clamp, bands of pool rows for 3 threads (their first rows recompute the shared conv row)
    "odd_sizes_zero_points_bands": (2, 3, 30, 26, 48, (7, 2, 3), (3, 2, 1), 3, dict(z=3, lo=3, hi=200, zx=5)),
    # one channel, 3x3/1, a 2x2/2 pool without padding; shifts from 1: the int64 epilogue
    "gray_pool2_any_shift": (1, 1, 28, 28, 16, (3, 1, 1), (2, 2, 0), 2, dict(min_shift=1, epilogue="int64")),
    # a pool of stride 1 (each pool row has two conv rows of the row above) and one of stride 3 > kernel 2 (conv
    # rows no pool row reads)
    "pool_stride1_overlap": (1, 4, 20, 20, 32, (5, 2, 2), (3, 1, 1), 2, {}),
    "pool_stride3_sparse": (2, 2, 24, 24, 16, (3, 1, 1), (2, 3, 0), 1, {}),
    # other register tiles: 8 pixels x 1 block, 4 pixels x 4 blocks (a 3-pixel tail)
    "tile_8x1": (1, 3, 32, 32, 32, (7, 2, 3), (3, 2, 1), 2, dict(tile=(8, 1))),
    "tile_4x4_tail": (1, 3, 22, 22, 64, (7, 2, 3), (3, 2, 1), 2, dict(tile=(4, 4))),
}


def _build(rng, n, c, h, w, o, conv, pool, threads, extra):
    """(reference output, requantized conv output, kernel arguments, PrimFunc, out shape) of one geometry: conv
    ``(k, s, p)``, pool ``(k, s, p)``, random data from ``rng``; ``extra``: z, lo, hi, zx (input zero point),
    min_shift (below 32: shifts that need the int64 epilogue), epilogue, tile."""
    (k, s, p), (pk, ps, pp) = conv, pool
    z, lo, hi, zx = extra.get("z", 0), extra.get("lo", 0), extra.get("hi", 255), extra.get("zx", 0)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    bias = rng.integers(-(1 << 14), 1 << 14, o).astype(np.int32)
    acc = R.conv_acc(x, wt, bias, s, p, 1, 1, zx)
    m, sh = _requant_params(rng, acc, o)
    sh = np.maximum(sh, extra.get("min_shift", 32)).astype(np.int32)
    out = R.conv2d_requant(x, wt, bias, m, sh, stride=s, padding=p, input_zero_point=zx, output_zero_point=z,
                           lo=lo, hi=hi)
    ref = R.maxpool2d(out, pk, ps, pp)
    rows = K.nchw_to_rows(x, (k, k), (s, s), (p, p), zx)
    wp = K.pack_rows_weight(wt, isa="vnni")
    geometry = dict(in_channels=c, in_width=w, kernel=(k, k), stride=(s, s), padding=(p, p), pool_kernel=(pk, pk),
                    pool_stride=(ps, ps), pool_padding=(pp, pp))
    func = K.rows_conv_maxpool_primfunc("main", rows.shape, wp.shape, **geometry, output_zero_point=z, lo=lo, hi=hi,
                                        threads=threads, epilogue=extra.get("epilogue", "int32"),
                                        **({"tile": extra["tile"]} if "tile" in extra else {}))
    out_shape = K.rows_conv_maxpool_out_shape(rows.shape, wp.shape, **geometry)
    return ref, out, [rows, wp, *K.pack_channel_params(bias, m, sh)[:3]], func, out_shape


def _case(name):
    n, c, h, w, o, conv, pool, threads, extra = CASES[name]
    return _build(np.random.default_rng(sum(map(ord, name))), n, c, h, w, o, conv, pool, threads, extra)


def _run(func, arrays, out_shape, channels: int) -> np.ndarray:
    """The kernel built for this host and run on ``arrays``; the output back in NCHW with ``channels``."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    return K.nchwc_to_nchw(K.StandaloneKernel(lib, out_shape, "uint8", func).run(*arrays), channels)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_conv_maxpool_bit_exact(name, tmp_path):
    """The fused kernel equals conv -> requantize -> max pool: ResNet's stem and pool, 1-4 input channels, 3x3 to
    7x7 convs of stride 1 / 2, pools 2x2 / 3x3 of stride 1-3 with and without padding, batch 1-2, 1-3 blocks,
    zero points and a clamp, row bands for 1-3 threads, tiles with a tail, the int32 and int64 epilogues."""
    ref, conv, arrays, func, out_shape = _case(name)
    assert len(np.unique(conv)) > 32 and len(np.unique(ref)) > 16, "test data too degenerate"
    assert out_shape[2:4] == ref.shape[2:] and out_shape[1] * 16 >= ref.shape[1]
    if not HAS_VNNI:
        tvm.compile(tvm.IRModule({"main": func}), target=ICX).export_library(str(tmp_path / "k.so"))
        pytest.skip("no AVX-512 VNNI on this CPU: compiled only")
    got = _run(func, arrays, out_shape, ref.shape[1])
    assert int((got != ref).sum()) == 0, f"{int((got != ref).sum())} mismatches of {ref.size}"


def test_rows_conv_maxpool_refuses_bad_arguments():
    """Each error names the argument: a pool padding as large as its kernel (a window of padding only), a weight
    packed for another kernel size, an unknown epilogue form, a clamp outside [0, 255]."""
    rows, wp = (1, 26, 64 * 3), (4, 1, 7, 1, 6, 16, 4)
    geo = dict(in_channels=3, in_width=20, kernel=(7, 7), stride=(2, 2), padding=(3, 3), pool_kernel=(3, 3),
               pool_stride=(2, 2), pool_padding=(1, 1))
    shape = K.nchw_to_rows(np.zeros((1, 3, 20, 20), np.uint8)).shape
    K.rows_conv_maxpool_primfunc("ok", shape, wp, **geo, output_zero_point=0, lo=0, hi=255)
    with pytest.raises(ValueError, match="padding"):
        K.rows_conv_maxpool_primfunc("f", shape, wp, **{**geo, "pool_padding": (3, 1)}, output_zero_point=0, lo=0,
                                     hi=255)
    with pytest.raises(ValueError, match="do not match"):
        K.rows_conv_maxpool_primfunc("f", shape, (4, 1, 5, 1, 4, 16, 4), **geo, output_zero_point=0, lo=0, hi=255)
    with pytest.raises(ValueError, match="do not match"):
        K.rows_conv_maxpool_primfunc("f", rows, wp, **geo, output_zero_point=0, lo=0, hi=255)
    with pytest.raises(ValueError, match="epilogue"):
        K.rows_conv_maxpool_primfunc("f", shape, wp, **geo, output_zero_point=0, lo=0, hi=255, epilogue="int16")
    with pytest.raises(ValueError, match="clamp"):
        K.rows_conv_maxpool_primfunc("f", shape, wp, **geo, output_zero_point=0, lo=0, hi=300)


def _kinds(mod) -> list[str]:
    return [str(f.attrs.get("ptq2tvm_kernel", "")) for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None]


def test_builder_fuses_the_stem_and_its_pool(tmp_path, monkeypatch):
    """TinyNet (1-channel 3x3 stem, ReLU, 3x3/2 max pool) at W8A8 built for AVX-512 VNNI: the stem and the pool
    are one kernel and no pool kernel is left; not with AMX (the AMX row-layout conv stays), nor without fusion,
    nor with the shortcuts off, nor where a multiplier is negative (the requantization would not be monotonic);
    on a VNNI host the .so equals the reference executor."""
    import copy

    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.blocked_builder import BASELINE_KERNELS_ENV, _BlockedBuilder, build_blocked_module
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(8, 8)
    pairs = _BlockedBuilder(graph, "vnni").stem_pool_pairs()
    assert [(p, c.name) for p, c in pairs.items()] == [("pool", "stem")], pairs
    kinds = _kinds(build_blocked_module(graph, 2, "vnni")[0])
    assert kinds.count(K.STEM_POOL_KIND) == 1 and "pool_nchwc" not in kinds, kinds
    assert _BlockedBuilder(graph, "vnni", amx=True).stem_pool_pairs() == {}
    assert _BlockedBuilder(graph, "vnni", fuse=False).stem_pool_pairs() == {}
    negative = copy.deepcopy(graph)
    stem = next(nd for nd in negative.nodes if nd.name == "stem")
    stem.arrays["multiplier"] = stem.arrays["multiplier"].copy()
    stem.arrays["multiplier"][0] = -1
    assert _BlockedBuilder(negative, "vnni").stem_pool_pairs() == {}
    monkeypatch.setenv(BASELINE_KERNELS_ENV, "1")
    assert K.STEM_POOL_KIND not in _kinds(build_blocked_module(graph, 2, "vnni")[0])
    monkeypatch.delenv(BASELINE_KERNELS_ENV)
    if not HAS_VNNI:
        pytest.skip("no AVX-512 VNNI on this CPU: built only")
    res = compile_so(graph, tmp_path / "m.so", batch=3)
    q = np.random.default_rng(0).integers(0, graph.input.qmax + 1, (3, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(graph, q))


def test_rows_conv_maxpool_random_geometries(tmp_path):
    """Hypothesis draws (seeded, derandomized) of the kernel's whole geometry: channels 1-4, conv kernel 1-7, stride
    1-3, padding, 8-80 output channels (partial blocks), pool kernel 1-4 / stride 1-3 / padding, zero points, a
    clamp, threads 1-4, tiles of 1-8 pixels x 1 / 2 / 4 blocks, both epilogue forms; each equals the reference."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def geometry(draw):
        c, k, s = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
        p = draw(st.integers(0, k // 2))
        h, w = draw(st.integers(max(k, 3), 24)), draw(st.integers(max(k, 3), 24))
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        pk = draw(st.integers(1, min(4, oh, ow)))
        pp = draw(st.integers(0, pk // 2))
        return dict(n=draw(st.integers(1, 2)), c=c, h=h, w=w, o=draw(st.sampled_from([8, 16, 24, 48, 80])), k=k, s=s,
                    p=p, pk=pk, ps=draw(st.integers(1, 3)), pp=pp, z=draw(st.integers(0, 20)),
                    lo=draw(st.integers(0, 10)), hi=draw(st.integers(100, 255)), zx=draw(st.integers(0, 10)),
                    epilogue=draw(st.sampled_from(["int32", "int64"])), threads=draw(st.integers(1, 4)),
                    tile=(draw(st.integers(1, 8)), draw(st.sampled_from([1, 2, 4]))), seed=draw(st.integers(0, 99)))

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @hypothesis.given(geometry())
    def check(g):
        extra = {key: g[key] for key in ("z", "lo", "hi", "zx", "epilogue", "tile")}
        extra["min_shift"] = 32 if g["epilogue"] == "int32" else 1
        ref, _, arrays, func, out_shape = _build(np.random.default_rng(g["seed"]), g["n"], g["c"], g["h"], g["w"],
                                                 g["o"], (g["k"], g["s"], g["p"]), (g["pk"], g["ps"], g["pp"]),
                                                 g["threads"], extra)
        if not HAS_VNNI:
            tvm.compile(tvm.IRModule({"main": func}), target=ICX)
            return
        got = _run(func, arrays, out_shape, g["o"])
        assert got.shape == ref.shape and np.array_equal(got, ref), g

    check()


def test_stem_and_pool_of_one_output_row_compile_bit_exact(tmp_path):
    """A one-channel signal (N, 1, 1, W) through a conv + ReLU + square MaxPool2d(3, 2, 1): the pool's output has
    one row. Fused, TVM's CompactBufferAllocation sized the kernel's ring of conv rows by the pool-row loop variable
    ('variable v has been used before definition!' at compile, every AVX-512 VNNI target); the builder keeps the two
    kernels there, and the .so equals the reference executor."""
    import torch
    import torch.nn as nn

    from ptq2tvm.api import compile_so, quantize, to_integer
    from ptq2tvm.backend.blocked_builder import _BlockedBuilder
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, (1, 9), (1, 2), (0, 4)), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(16, 4, 1)).eval()
    x = np.random.default_rng(0).standard_normal((8, 1, 1, 100)).astype(np.float32)
    graph = to_integer(quantize(model, x, QuantConfig(8, 8), progress=False))
    res = compile_so(graph, tmp_path / "m.so", batch=3, target=None if HAS_VNNI else "icelake-server")
    assert _BlockedBuilder(graph, "vnni").stem_pool_pairs() == {}
    if not HAS_VNNI:
        pytest.skip("no AVX-512 VNNI on this CPU: compiled only")
    q = np.random.default_rng(1).integers(0, graph.input.qmax + 1, (5, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(graph, q))
