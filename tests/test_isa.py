"""ISA dispatch and the AVX2 vpmaddubsw kernels: the exactness proof, bit-exact kernels and networks, the
instructions in the binaries, --target strings, and the CPU-feature check when a build is loaded.

AVX2 kernels run on any AVX2 host; the AVX-VNNI build is only compiled and disassembled here unless the host has
avx_vnni; AMX kernels: tests/test_amx.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels import reference as R  # noqa: E402
from tvm.target import codegen  # noqa: E402

from ptq2tvm.backend.isa import host_isa, parse_target_string, required_cpu_features  # noqa: E402
from ptq2tvm.bundle_runner import host_cpu_flags  # noqa: E402
from ptq2tvm.errors import TargetError  # noqa: E402

AVX2_TARGET = K.host_target(num_cores=2, mcpu="haswell")
HAS_AVX2 = codegen.llvm_cpu_has_features(["avx2"], K.host_target(num_cores=2))
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")


def test_u8s8_pairs_exact_bounds():
    """vpmaddubsw saturates a pair sum outside int16: 255 * (64 + 64) = 32640 fits, 255 * (65 + 64) does not."""
    def packed(w0, w1):
        w = np.zeros((16, 4, 1, 1), np.int8)
        w[3, 0], w[3, 1] = w0, w1
        return K.pack_conv_weight(w, 1, ic_block=4)

    assert K.u8s8_pairs_exact(packed(64, 64), 255)
    assert not K.u8s8_pairs_exact(packed(65, 64), 255)
    assert K.u8s8_pairs_exact(packed(-128, 0), 255)               # -32640
    assert not K.u8s8_pairs_exact(packed(-128, -1), 255)          # -32895 < -32768
    assert K.u8s8_pairs_exact(packed(127, -128), 255)             # opposite signs never saturate
    assert K.u8s8_pairs_exact(packed(127, 127), 127)              # 7-bit activations: any int8 pair
    assert not K.u8s8_pairs_exact(packed(127, 127), 255)
    w4 = np.random.default_rng(0).integers(-8, 8, (32, 16, 3, 3)).astype(np.int8)
    assert K.u8s8_pairs_exact(K.pack_conv_weight(w4, 1, 16, int4=True), 255)   # int4: always


def _conv_arrays(rng, w, c=32, h=10, o=32, k=3):
    x = rng.integers(0, 256, (1, c, h, h), dtype=np.uint8)
    x.reshape(-1)[::5] = 255
    bias = rng.integers(-(1 << 14), 1 << 14, o).astype(np.int32)
    m = rng.integers(1 << 29, 1 << 31, o, dtype=np.int64).astype(np.int32)
    sh = np.full(o, 38, np.int32)
    ref = R.conv2d_requant(x, w, bias, m, sh, None, None, stride=1, padding=1, dilation=1, groups=1,
                           input_zero_point=3, output_zero_point=5, lo=0, hi=255, residual_zero_point=0)
    return x, bias, m, sh, ref


@needs_avx2
@pytest.mark.parametrize("kind", ["int4", "w7", "w8_saturating"])
def test_ubsw_conv(kind):
    """Bit-exact when the weights are proved exact (int4; 7-bit); with int8 weights that can saturate, the same
    kernel forced onto vpmaddubsw is wrong: the proof is what keeps the AVX2 fast path exact."""
    rng = np.random.default_rng(1)
    lo, hi = {"int4": (-8, 7), "w7": (-64, 64), "w8_saturating": (-128, 127)}[kind]
    w = rng.integers(lo, hi + 1, (32, 32, 3, 3)).astype(np.int8)
    w.reshape(-1)[::7] = hi
    x, bias, m, sh, ref = _conv_arrays(rng, w)
    wp = K.pack_conv_weight(w, 1, 16, isa="vnni", int4=kind == "int4")
    assert K.u8s8_pairs_exact(wp, 255) == (kind != "w8_saturating")
    arrays = [K.nchw_to_nchwc(x, 16, 3), wp, *K.pack_channel_params(bias, m, sh)]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, stride=1, padding=1, input_zero_point=3,
                              output_zero_point=5, isa="vnni", ubsw_exact=True)
    got = K.nchwc_to_nchw(kern.run(*arrays), 32)
    bad = int((got != ref).sum())
    if kind == "w8_saturating":
        assert bad > 0
    else:
        assert bad == 0, f"{bad} mismatches"
    assert kern.count_instructions("vpmaddubsw") > 0 and kern.count_instructions("vpdpbusd") == 0


def test_u8s8_int16_group_bounds():
    """The int16 accumulator holds a group's sum when amax * (sum of a lane's positive weights) <= 32767 and
    amax * (sum of its negative ones) <= 32768 over the group; the largest dividing group is chosen, 0 when none."""
    def packed(cin, pos_per_block, neg_per_block=0, lane=5):
        w = np.zeros((16, cin, 1, 1), np.int8)
        for blk in range(cin // 16):
            w[lane, 16 * blk, 0, 0] = pos_per_block
            w[lane, 16 * blk + 1, 0, 0] = -neg_per_block
        return K.pack_conv_weight(w, 1, ic_block=16)

    assert K.u8s8_int16_group(packed(16, 127), 255) == 1 and K.u8s8_int16_group(packed(16, 127), 258) == 1
    assert K.u8s8_int16_group(packed(16, 127), 259) == 0              # 259 * 127 = 32893 > 32767
    assert K.u8s8_int16_group(packed(16, 0, 128), 256) == 1           # -32768 fits exactly
    assert K.u8s8_int16_group(packed(16, 0, 128), 257) == 0
    assert K.u8s8_int16_group(packed(64, 64), 255) == 2               # 2 blocks: 255 * 128 = 32640; 4: too much
    assert K.u8s8_int16_group(packed(64, 64, 64), 127) == 4           # 127 * 256 = 32512 on each side
    assert K.u8s8_int16_group(packed(48, 100), 127) == 1              # 3 blocks: only g = 1 divides and fits
    w4 = np.random.default_rng(0).integers(-8, 8, (32, 64, 3, 3)).astype(np.int8)
    g8 = K.u8s8_int16_group(K.pack_conv_weight(w4, 1, 16), 15)
    assert g8 == 4 and K.u8s8_int16_group(K.pack_conv_weight(w4, 1, 16, int4=True), 15) == g8
    with pytest.raises(ValueError, match="VNNI-layout conv weight"):
        K.u8s8_int16_group(K.pack_conv_weight(w4, 1, 16, isa="avx2"), 15)


@needs_avx2
@pytest.mark.parametrize("case", ["int8_w4", "int4", "int2_stride2", "residual", "grouped_flush", "overflow"])
def test_int16_accumulator_conv(case):
    """The int16-accumulator conv (vpmaddubsw + vpaddw, one vpmaddwd flush per group of input blocks) is bit-exact
    against the reference for every storage (int8, int4, int2 four per byte), stride 2, a fused residual and a
    group smaller than the reduction (flushes in the middle); forced onto weights the proof rejects it is wrong."""
    rng = np.random.default_rng(7)
    c, o, amax = 64, 32, 15
    lo, hi = {"int2_stride2": (-2, 1), "overflow": (100, 127), "grouped_flush": (3, 7)}.get(case, (-8, 7))
    w = rng.integers(lo, hi + 1, (o, c, 3, 3)).astype(np.int8)
    if case == "grouped_flush":
        w[:, ::5] *= -1           # mostly positive: a lane's sum over 4 blocks exceeds int16, over 2 it does not
    x = rng.integers(0, amax + 1, (2, c, 9, 9), dtype=np.uint8)
    x.reshape(-1)[::3] = amax
    stride = 2 if case == "int2_stride2" else 1
    bias = rng.integers(-(1 << 12), 1 << 12, o).astype(np.int32)
    m = rng.integers(1 << 29, 1 << 31, o, dtype=np.int64).astype(np.int32)
    sh = np.full(o, 32, np.int32)
    oh = (9 + 2 - 3) // stride + 1
    r = rng.integers(0, 256, (2, o, oh, oh), dtype=np.uint8) if case == "residual" else None
    mr = rng.integers(1 << 28, 1 << 30, o, dtype=np.int64).astype(np.int32) if case == "residual" else None
    ref = R.conv2d_requant(x, w, bias, m, sh, r, mr, stride=stride, padding=1, dilation=1, groups=1,
                           input_zero_point=2, output_zero_point=5, lo=0, hi=255, residual_zero_point=9)
    wp = K.pack_conv_weight(w, 1, 16, isa="vnni", int4=case == "int4", int2=case == "int2_stride2")
    group = K.u8s8_int16_group(wp, amax)
    if case == "overflow":
        assert group == 0
        group = 4
    elif case == "grouped_flush":
        assert group == 2
    else:
        assert group == 4
    arrays = [K.nchw_to_nchwc(x, 16, 2), wp, *K.pack_channel_params(bias, m, sh)]
    if r is not None:
        arrays += [K.nchw_to_nchwc(r, 16, 0), K.pack_channel_params(mr, kinds="m")[0]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, stride=stride, padding=1,
                              input_zero_point=2, output_zero_point=5, residual_zero_point=9, isa="vnni",
                              ubsw_exact=True, i16_group=group)
    bad = int((K.nchwc_to_nchw(kern.run(*arrays), o) != ref).sum())
    if case == "overflow":
        assert bad > 0
    else:
        assert bad == 0, f"{bad} mismatches"
    assert kern.count_instructions("vpaddw") > 0 and kern.count_instructions("vpmaddubsw") > 0


@needs_avx2
@pytest.mark.parametrize("amax,stride", [(15, 1), (15, 2), (255, 1)])
def test_depthwise_int16_bit_exact(amax, stride):
    """Depthwise taps multiplied and summed in int16 (vpmullw + vpaddw) where depthwise_int16_exact proves it: always
    for 4-bit inputs with 3x3 int8 weights; with 8-bit inputs only for small weights (a channel of large weights
    makes the proof fail). Bit-exact against the reference."""
    rng = np.random.default_rng(11)
    c, h = 48, 11
    w = rng.integers(-128, 128, (c, 1, 3, 3)).astype(np.int8) if amax == 15 else \
        rng.integers(-14, 15, (c, 1, 3, 3)).astype(np.int8)
    w[0, 0] = 127 if amax == 15 else 14                   # the extremes the proof must cover
    w[1, 0] = -128 if amax == 15 else -14
    x = rng.integers(0, amax + 1, (2, c, h, h), dtype=np.uint8)
    x.reshape(-1)[::4] = amax
    bias = rng.integers(-(1 << 10), 1 << 10, c).astype(np.int32)
    m = rng.integers(1 << 29, 1 << 31, c, dtype=np.int64).astype(np.int32)
    sh = np.full(c, 28 if amax == 15 else 31, np.int32)
    ref = R.conv2d_requant(x, w, bias, m, sh, None, None, stride=stride, padding=1, dilation=1, groups=c,
                           input_zero_point=amax // 3, output_zero_point=5, lo=0, hi=255, residual_zero_point=0)
    assert len(np.unique(ref)) > 16
    wp = K.pack_conv_weight(w, c, 16)
    assert K.depthwise_int16_exact(wp, amax)
    big = wp.copy()
    big[0, 0, 0, 3] = big[0, 0, 1, 3] = 127
    assert not K.depthwise_int16_exact(big, 255)            # 255 * (127 + 127 + ...) leaves int16
    arrays = [K.nchw_to_nchwc(x, 16, amax // 3), wp, *K.pack_channel_params(bias, m, sh)]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, stride=stride, padding=1, groups=c,
                              input_zero_point=amax // 3, output_zero_point=5, i16_group=1)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), c), ref)
    assert kern.count_instructions("vpmullw") > 0 and kern.count_instructions("vpmulld") == 0


def test_lifted_epilogue_exact_bounds():
    """kernels.layout.lifted_epilogue_exact at its edges: a lane value lifted by 32 - shift must stay below 2^31, the
    lifted int64 sum (lanes x multipliers + constant + 2^(shift-1)) below 2^63; shifts >= 32 lift nothing; shifts
    outside [1, 62] and empty layers are refused."""
    exact = K.lifted_epilogue_exact
    m = np.array([3], np.int32)
    assert exact(np.array([31]), [((1 << 30) - 1, m)])             # (2^30 - 1) << 1 < 2^31
    assert not exact(np.array([31]), [(1 << 30, m)])               # 2^30 << 1 = 2^31
    assert exact(np.array([32]), [((1 << 31) - 1, m)])             # no lift
    big = np.array([(1 << 31) - 1], np.int64)
    assert exact(np.array([31]), [(1 << 28, big)])                 # ~2^59 << 1
    assert not exact(np.array([31]), [(1 << 28, big)], const=1 << 62)
    assert exact(np.array([24]), [(1 << 22, big)])                 # 2^22 << 8 = 2^30, 2^53 << 8 = 2^61
    assert not exact(np.array([24]), [(1 << 22, big)], const=1 << 55)     # the bias term: 2^55 << 8 = 2^63
    assert exact(np.array([24, 40]), [(np.array([1 << 10, 1 << 30]), np.array([1 << 20, 1 << 30]))])
    assert not exact(np.array([0]), [(1, m)]) and not exact(np.array([], np.int32), [])


def test_shifts_allow_int32_epilogue():
    assert K.shifts_allow_int32_epilogue(np.array([32, 40, 62], np.int32))
    assert not K.shifts_allow_int32_epilogue(np.array([31, 40], np.int32))
    assert not K.shifts_allow_int32_epilogue(np.array([], np.int32))


@needs_avx2
@pytest.mark.parametrize("kind", ["dense_residual", "depthwise"])
def test_int32_epilogue_bit_exact(kind):
    """requant_expr(shift_ge32=True): high half of the int64 sum, int32 arithmetic shift and clamp. Bit-exact against
    the reference over outputs spread across [lo, hi] (shifts 32-40, multipliers in [2^29, 2^31), zero points, a
    fused residual) and at the extremes (shift 62, biases near +-2^30: every output clamped to lo or hi)."""
    rng = np.random.default_rng(13)
    c, h = 32, 9
    groups = c if kind == "depthwise" else 1
    w = rng.integers(-128, 128, (c, c // groups, 3, 3)).astype(np.int8)
    x = rng.integers(0, 256, (2, c, h, h), dtype=np.uint8)
    acc_scale = 128 * 100 * 3 * (np.sqrt(c // groups))
    m = rng.integers(1 << 29, 1 << 31, c, dtype=np.int64).astype(np.int32)
    sh = np.clip(np.round(np.log2(acc_scale * m / 100.0)), 32, 40).astype(np.int32)
    bias = rng.integers(-(1 << 12), 1 << 12, c).astype(np.int32)
    sh[:3], bias[:3] = 62, [(1 << 30) - 1, -(1 << 30), 0]        # extremes: the whole int64 range, clamped
    res = kind == "dense_residual"
    r = rng.integers(0, 256, (2, c, h, h), dtype=np.uint8) if res else None
    mr = (m // 2).astype(np.int32) if res else None
    ref = R.conv2d_requant(x, w, bias, m, sh, r, mr, stride=1, padding=1, dilation=1, groups=groups,
                           input_zero_point=7, output_zero_point=100, lo=3, hi=250, residual_zero_point=9)
    assert len(np.unique(ref)) > 64 and {3, 250} <= set(np.unique(ref).tolist())
    assert K.shifts_allow_int32_epilogue(sh)
    wp = K.pack_conv_weight(w, groups, 16, isa="avx2")
    arrays = [K.nchw_to_nchwc(x, 16, 7), wp, *K.pack_channel_params(bias, m, sh)]
    if res:
        arrays += [K.nchw_to_nchwc(r, 16, 9), K.pack_channel_params(mr, kinds="m")[0]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, stride=1, padding=1, groups=groups,
                              input_zero_point=7, output_zero_point=100, lo=3, hi=250, residual_zero_point=9,
                              isa="avx2", shift_ge32=True)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), c), ref)
    assert kern.count_instructions("vpsravd") > 0


@needs_avx2
def test_int32_epilogue_first_conv_rows_bit_exact():
    """The first conv on the row layout (3 channels, 7x7/2) with the int32-clamp epilogue."""
    rng = np.random.default_rng(17)
    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    w = rng.integers(-128, 128, (16, 3, 7, 7)).astype(np.int8)
    m = rng.integers(1 << 29, 1 << 31, 16, dtype=np.int64).astype(np.int32)
    xp = np.pad(x.astype(np.int64) - 9, ((0, 0), (0, 0), (3, 3), (3, 3)))
    acc_std = np.array([np.std([(xp[0, :, i:i + 7, j:j + 7] * w[o]).sum() for i in range(0, 32, 4)
                                for j in range(0, 32, 4)]) for o in range(16)])
    sh = np.clip(np.round(np.log2(acc_std * m / 60.0)), 32, 40).astype(np.int32)    # outputs spread over ~+-120
    bias = rng.integers(-(1 << 12), 1 << 12, 16).astype(np.int32)
    ref = R.conv2d_requant(x, w, bias, m, sh, None, None, stride=2, padding=3, dilation=1, groups=1,
                           input_zero_point=9, output_zero_point=5, lo=0, hi=255, residual_zero_point=0)
    assert len(np.unique(ref)) > 64
    arrays = [K.nchw_to_rows(x, 7, 2, 3, 9), K.pack_rows_weight(w, isa="avx2"), *K.pack_channel_params(bias, m, sh)]
    kern = K.build_standalone(K.conv2d_rows_requant, arrays, AVX2_TARGET, in_channels=3, in_width=32, kernel=7,
                              stride=2, padding=3, output_zero_point=5, isa="avx2", shift_ge32=True)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 16), ref)


def test_int16_accumulator_needs_the_proof_and_avx2():
    rng = np.random.default_rng(4)
    w = rng.integers(-8, 8, (16, 32, 3, 3)).astype(np.int8)
    arrays = [rng.integers(0, 16, (1, 2, 6, 6, 16), dtype=np.uint8), K.pack_conv_weight(w, 1, 16),
              *K.pack_channel_params(np.zeros(16, np.int32), np.ones(16, np.int32), np.ones(16, np.int32))]
    with pytest.raises(ValueError, match="i16_group"):           # not marked ubsw_exact
        K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, isa="vnni", i16_group=2)
    with pytest.raises(ValueError, match="i16_group"):           # 3 does not divide the 2 input blocks
        K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, isa="vnni", ubsw_exact=True, i16_group=3)
    vnni = K.host_target(num_cores=2, mcpu="icelake-server")
    with pytest.raises(ValueError, match="only on AVX2"):
        K.build_standalone(K.conv2d_nchwc_requant, arrays, vnni, isa="vnni", ubsw_exact=True, i16_group=2)


@needs_avx2
def test_ubsw_dense_and_rows_bit_exact():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (3, 70), dtype=np.uint8)
    w = rng.integers(-64, 65, (40, 70)).astype(np.int8)
    bias = rng.integers(-999, 999, 40).astype(np.int32)
    m = rng.integers(1 << 29, 1 << 31, 40, dtype=np.int64).astype(np.int32)
    sh = np.full(40, 36, np.int32)
    ref = R.dense_requant(x, w, bias, m, sh, output_zero_point=7)
    wp = K.pack_dense_weight(w, isa="vnni")
    assert K.u8s8_pairs_exact(wp, 255)
    arrays = [x, wp, *K.pack_channel_params(bias, m, sh)]
    kern = K.build_standalone(K.dense_requant, arrays, AVX2_TARGET, out_features=40, output_zero_point=7,
                              isa="vnni", ubsw_exact=True)
    assert np.array_equal(kern.run(*arrays), ref)
    # the first conv on the row layout (3 channels, 7x7/2)
    xi = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    wi = rng.integers(-64, 65, (16, 3, 7, 7)).astype(np.int8)
    b, mm, s = K.pack_channel_params(np.zeros(16, np.int32), np.full(16, 1 << 30, np.int32), np.full(16, 40, np.int32))
    ref = R.conv2d_requant(xi, wi, b[:16], mm[:16], s[:16], None, None, stride=2, padding=3, dilation=1, groups=1,
                           input_zero_point=9, output_zero_point=5, lo=0, hi=255, residual_zero_point=0)
    arrays = [K.nchw_to_rows(xi, 7, 2, 3, 9), K.pack_rows_weight(wi, isa="vnni"), b, mm, s]
    kern = K.build_standalone(K.conv2d_rows_requant, arrays, AVX2_TARGET, in_channels=3, in_width=32, kernel=7,
                              stride=2, padding=3, output_zero_point=5, isa="vnni", ubsw_exact=True)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 16), ref)


def test_unproved_vnni_kernel_refused_on_avx2():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (16, 16, 1, 1)).astype(np.int8)
    arrays = [rng.integers(0, 256, (1, 1, 4, 4, 16), dtype=np.uint8), K.pack_conv_weight(w, 1, 16),
              *K.pack_channel_params(np.zeros(16, np.int32), np.ones(16, np.int32), np.ones(16, np.int32))]
    with pytest.raises(ValueError, match="ubsw_exact"):
        K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, isa="vnni")


@pytest.mark.parametrize("w,a", [(4, 4)])
def test_network_isa_dispatch_bit_exact(tmp_path, w, a):
    """TinyNet on this host: every conv/dense on vpmaddubsw where proved exact (W4A4: all), vpmaddwd otherwise;
    bit-exact against the reference executor; the sidecar names the kernels' ISA and the CPU features."""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.bench.disasm import count_instructions
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(w, a)
    res = compile_so(graph, tmp_path / "m.so", batch=2)
    isa = K.target_isa(K.host_target())
    if host_isa() == "amx":     # its 8-bit stem (and every int8 stride-1 conv) runs AMX tiles (tests/test_amx.py)
        isa = "amx"
    assert res.meta["isa"] == isa and res.meta["backend"] == f"x86-nchw16c-{isa}"
    assert set(res.meta["cpu_features"]) <= (host_cpu_flags() or set(res.meta["cpu_features"]))
    q = np.random.default_rng(0).integers(0, graph.input.qmax + 1, (3, *graph.input.shape)).astype(np.uint8)
    cm = CompiledModel(res.so_path)
    assert cm.isa == isa
    assert np.array_equal(cm.run_int(q), run_reference(graph, q))
    q2 = q[::-1].copy()     # the cached input tensor is refilled, not reused stale
    assert np.array_equal(cm.run_int(q2[:2]), run_reference(graph, q2[:2]))
    if isa == "vnni":       # the TE convs with shifts below 32 (its residual convs: 29-34) requantize lifted
        assert res.meta["arithmetic_shortcuts"]["lifted_epilogue"] >= 1
    if isa == "avx2":
        n = count_instructions(res.so_path, ("vpmaddubsw", "vpmaddwd", "vpdpbusd"))
        assert n["vpdpbusd"] == 0 and n["vpmaddwd"] > 0 and (n["vpmaddubsw"] > 0) == (w <= 4)
        from ptq2tvm.backend.blocked_builder import build_blocked_module

        kinds = [K.kernel_kind(f) for f in build_blocked_module(graph, 2, "avx2")[0].functions.values()]
        dots = [k for k in kinds if k and k.startswith(("conv2d_nchwc_v", "conv2d_nchwc_a", "dense"))]
        low = [nd for nd in graph.nodes if nd.op in ("conv2d", "dense") and int(nd.attrs.get("w_bits", 8)) <= 4
               and not (nd.op == "conv2d" and nd.attrs["groups"] > 1)]
        # every <= 4-bit layer is proved exact (the 8-bit first/last layers of W4A4 may not be)
        assert sum(k.endswith("_vnni") for k in dots) >= len(low)
        # and the 3x3 / 1x1 convs with 4-bit inputs accumulate in int16 (kernels.u8s8_int16_group); the sidecar
        # counts the kernels that use each proved shortcut
        assert K.arithmetic_shortcuts(build_blocked_module(graph, 2, "avx2")[0])["int16_accumulator"] >= 1
        assert res.meta["arithmetic_shortcuts"]["int16_accumulator"] >= 1


@needs_avx2
def test_w2_network_four_per_byte_bit_exact_on_avx2(tmp_path):
    """TinyNet W2A4 for the portable AVX2 target: every 2-bit conv/dense (3x3, 1x1 stride 2, the grouped conv
    expanded block-diagonally) stores four weights per byte and is bit-exact against the reference executor; the
    stored bytes of its packed layers are exactly half those of the W4A4 build (int8 layers unchanged), and the
    size the quantize summary reports (api.stored_weight_bytes) follows the target. The AVX-512 VNNI and AVX-VNNI
    builds store the same bytes and run bit-exact where the host has those ISAs. (``subbyte_storage="packed"``: the
    default keeps this tiny graph's low-reuse layers one weight per byte, test_int8_storage_of_low_reuse_layers.)"""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so, stored_weight_bytes
    from ptq2tvm.backend.blocked_builder import build_blocked_module
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    g2, g4 = tiny_integer_graph(2, 4), tiny_integer_graph(4, 4)
    res = compile_so(g2, tmp_path / "w2.so", batch=2, target="x86-64-v3", subbyte_storage="packed")
    assert res.meta["isa"] == "avx2"
    q = np.random.default_rng(3).integers(0, g2.input.qmax + 1, (2, *g2.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(g2, q))
    mod, stored2 = build_blocked_module(g2, 2, "avx2", subbyte_storage="packed")
    assert stored2 == res.meta["stored_weight_bytes"]
    packed = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
              and any(p.dtype == "uint8" and len(p.shape) in (3, 6) and int(p.shape[-1]) == 16 for p in f.params)}
    low = [n for n in g2.nodes if n.op in ("conv2d", "dense") and int(n.attrs["w_bits"]) <= 2
           and not (n.op == "conv2d" and n.arrays["weight"].shape[1] == 1 and n.attrs["groups"] > 1)]
    assert len(low) == 8 and {f"k_{n.name.replace('.', '_')}" for n in low} <= set(packed), packed.keys()
    _, stored4 = build_blocked_module(g4, 2, "avx2", subbyte_storage="packed")
    int4_bytes = sum(K.pack_conv_weight(n.arrays["weight"], n.attrs["groups"], 16, int4=True).nbytes for n in low)
    assert stored4 - stored2 == int4_bytes // 2 and stored2 < 0.6 * stored4, (stored2, stored4)
    a2, a4 = (stored_weight_bytes(g, "x86-64-v3", subbyte_storage="packed") for g in (g2, g4))
    assert a4 - a2 == sum(n.arrays["weight"].size for n in low) // 4          # 1/2 -> 1/4 byte per weight
    assert stored_weight_bytes(g2, "znver4", subbyte_storage="packed") == a2 and stored_weight_bytes(g4, "znver4", subbyte_storage="packed") == a4
    vnni2 = {}
    for isa in ("vnni", "avxvnni"):          # the same four-per-byte packing on the VNNI dot products
        vnni2[isa], v4 = (build_blocked_module(g, 2, isa, subbyte_storage="packed")[1] for g in (g2, g4))
        assert v4 - vnni2[isa] == int4_bytes // 2, isa
    flags = host_cpu_flags() or set()
    for mcpu, flag, isa in (("icelake-server", "avx512_vnni", "vnni"), ("alderlake", "avx_vnni", "avxvnni")):
        if flag in flags:                    # run where the host can
            built = compile_so(g2, tmp_path / f"w2_{mcpu}.so", batch=2, target=mcpu,
                               subbyte_storage="packed")
            assert built.meta["isa"] == isa and built.meta["stored_weight_bytes"] == vnni2[isa]
            assert np.array_equal(CompiledModel(built.so_path).run_int(q), run_reference(g2, q)), mcpu


def test_target_strings():
    from ptq2tvm.backend.compile import resolve_target

    assert parse_target_string("llvm -mcpu=znver4 -num-cores=2 -mattr=+avx2,+fma") == {
        "kind": "llvm", "mcpu": "znver4", "num-cores": 2, "mattr": ["+avx2", "+fma"]}
    assert resolve_target("llvm -mcpu=znver4 -num-cores=2")["mcpu"] == "znver4"
    assert resolve_target("x86-64-v3")["mcpu"] == "x86-64-v3"
    assert resolve_target("sapphirerapids")["mcpu"] == "sapphirerapids"
    assert resolve_target('{"kind": "llvm", "mcpu": "haswell"}') == {"kind": "llvm", "mcpu": "haswell"}
    for bad in ("nosuchcpu", "{not json", "llvm mcpu=znver4"):
        with pytest.raises(TargetError, match="target"):
            resolve_target(bad)
    # an unknown CPU inside a string, JSON or dict target: refused (LLVM only logs it and builds generic code)
    for bad in ("llvm -mcpu=notacpu", '{"kind": "llvm", "mcpu": "notacpu"}', {"kind": "llvm", "mcpu": "notacpu"}):
        with pytest.raises(TargetError, match="unknown CPU 'notacpu'"):
            resolve_target(bad)
    with pytest.raises(TargetError, match="-num-cores expects an integer, got 'abc'"):
        resolve_target("llvm -mcpu=znver4 -num-cores=abc")
    v3 = set(required_cpu_features(resolve_target("x86-64-v3")))
    assert {"avx2", "fma", "bmi2"} <= v3 and not any(f.startswith(("avx512", "amx")) for f in v3)
    spr = set(required_cpu_features(resolve_target("sapphirerapids")))
    assert {"amx_int8", "amx_tile", "avx512_vnni", "avx_vnni"} <= spr
    assert K.target_isa(tvm.target.Target(resolve_target("alderlake"))) == "avxvnni"
    assert K.target_isa(tvm.target.Target(resolve_target("x86-64-v3"))) == "avx2"
    assert host_isa({"avx2", "avx_vnni"}) == "avx_vnni" and host_isa({"avx2", "amx_int8", "amx_tile"}) == "amx"


def test_portable_and_foreign_builds(tmp_path, capsys):
    """--target x86-64-v3 runs on any AVX2 host (here, bit-exact); a build for a CPU with features this host lacks
    (AVX-VNNI: alderlake) contains {vex} vpdpbusd on ymm and is refused at load, by CompiledModel and by the bundle
    runner, with the missing features named (instead of dying of SIGILL)."""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.bench.disasm import count_by_width
    from ptq2tvm.bundle_runner import main as bundle_main
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(8, 8)
    q = np.random.default_rng(1).integers(0, 256, (1, *graph.input.shape)).astype(np.uint8)
    flags = host_cpu_flags() or set()
    if "avx2" in flags:
        v3 = compile_so(graph, tmp_path / "v3.so", batch=1, target="x86-64-v3")
        assert v3.meta["isa"] == "avx2" and "avx512f" not in v3.meta["cpu_features"]
        assert np.array_equal(CompiledModel(v3.so_path).run_int(q), run_reference(graph, q))
    adl = compile_so(graph, tmp_path / "adl.so", batch=1, target="alderlake")
    assert adl.meta["isa"] == "avxvnni" and "avx_vnni" in adl.meta["cpu_features"]
    widths = count_by_width(adl.so_path, "vpdpbusd")
    assert widths.get("ymm", 0) > 0 and widths.get("zmm", 0) == 0
    if "avx_vnni" in flags:     # runnable here: bit-exact instead of refused
        assert np.array_equal(CompiledModel(adl.so_path).run_int(q), run_reference(graph, q))
        return
    with pytest.raises(TargetError, match="avx_vnni"):
        CompiledModel(adl.so_path)
    assert bundle_main(["--so", str(adl.so_path), "--random", "1"]) == 2
    assert "avx_vnni" in capsys.readouterr().err
    meta = json.loads(adl.meta_path.read_text())
    assert meta["target"]["mcpu"] == "alderlake"


@needs_avx2
def test_int16_accumulator_fuzz():
    """Hypothesis (derandomized) over conv shapes, strides, dilations, groups, residuals, weight storage (int8 with
    small values, int4, int2) and input ranges: whenever the proofs allow the int16 accumulator (and the int32
    epilogue), the kernel equals the reference."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(seed=st.integers(0, 2 ** 31 - 1), groups=st.sampled_from([1, 2]), cin=st.sampled_from([16, 32, 48]),
           cout=st.sampled_from([16, 32]), k=st.sampled_from([1, 3, 5]), s=st.sampled_from([1, 2]),
           d=st.sampled_from([1, 2]), amax=st.sampled_from([3, 15, 63]), bits=st.sampled_from([2, 4, 8]),
           res=st.booleans(), shift=st.integers(28, 38))
    def check(seed, groups, cin, cout, k, s, d, amax, bits, res, shift):
        rng = np.random.default_rng(seed)
        d = d if k > 1 else 1
        cin, cout, p = cin * groups, cout * groups, k // 2
        lo, hi = {2: (-2, 1), 4: (-8, 7), 8: (-32, 31)}[bits]
        w = rng.integers(lo, hi + 1, (cout, cin // groups, k, k)).astype(np.int8)
        h = int(rng.integers(d * (k - 1) + 1, 14))
        x = rng.integers(0, amax + 1, (2, cin, h, h), dtype=np.uint8)
        zx, oh = int(rng.integers(0, amax + 1)), (h + 2 * p - d * (k - 1) - 1) // s + 1
        bias = rng.integers(-(1 << 12), 1 << 12, cout).astype(np.int32)
        m = rng.integers(1 << 29, 1 << 31, cout, dtype=np.int64).astype(np.int32)
        sh = np.full(cout, shift, np.int32)
        r = rng.integers(0, 256, (2, cout, oh, oh), dtype=np.uint8) if res else None
        mr = rng.integers(1 << 28, 1 << 30, cout, dtype=np.int64).astype(np.int32) if res else None
        ref = R.conv2d_requant(x, w, bias, m, sh, r, mr, stride=s, padding=p, dilation=d, groups=groups,
                               input_zero_point=zx, output_zero_point=7, lo=0, hi=255, residual_zero_point=3)
        wp = K.pack_conv_weight(w, groups, 16, isa="vnni", int4=bits == 4, int2=bits == 2)
        g = K.u8s8_int16_group(wp, amax)
        hypothesis.assume(g > 0 and K.u8s8_pairs_exact(wp, amax))
        arrays = [K.nchw_to_nchwc(x, 16, zx), wp, *K.pack_channel_params(bias, m, sh)]
        if res:
            arrays += [K.nchw_to_nchwc(r, 16, 0), K.pack_channel_params(mr, kinds="m")[0]]
        kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, stride=s, padding=p, dilation=d,
                                  groups=groups, input_zero_point=zx, output_zero_point=7, residual_zero_point=3,
                                  isa="vnni", ubsw_exact=True, i16_group=g,
                                  shift_ge32=K.shifts_allow_int32_epilogue(sh))
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), cout), ref)

    check()


def test_kernel_isa_labels_use_the_host_isa_vocabulary():
    """Benchmark rows named the .so's ISA 'vnni' next to ORT's 'avx512_vnni' for the same instructions."""
    from ptq2tvm.backend.isa import isa_label

    assert [isa_label(k) for k in ("vnni", "avxvnni", "avx2", "amx", "dp4a", "generic")] == [
        "avx512_vnni", "avx_vnni", "avx2", "amx", "dp4a", "generic"]
