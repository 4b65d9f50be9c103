"""kernels/: every x86 int8 kernel against the numpy integer contract (kernels.reference), bit for bit.

Seeded, small shapes; the whole file runs in well under two minutes on 2 cores. VNNI cases run when this CPU has
AVX-512 VNNI, AVX2 cases when it has AVX2 (the AVX2 code is built for mcpu=haswell, so it never contains VNNI).
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels import reference as R  # noqa: E402
from tvm.target import codegen  # noqa: E402

from ptq2tvm.bundle_runner import host_cpu_flags as _host_flags  # noqa: E402

HOST = K.host_target(num_cores=2)
HAS_VNNI = codegen.llvm_cpu_has_features(["avx512vnni"], HOST) and codegen.llvm_cpu_has_features(["avx512bw"], HOST)
HAS_AVX2 = codegen.llvm_cpu_has_features(["avx2"], HOST)
AVX2_TARGET = K.host_target(num_cores=2, mcpu="haswell")
HAS_AVXVNNI = "avx_vnni" in (_host_flags() or set())
VNNI_TARGETS = [pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")),
                pytest.param("avxvnni", marks=pytest.mark.skipif(not HAS_AVXVNNI, reason="no AVX-VNNI on this CPU"))]
ISAS = [pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")),
        pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU"))]


def _target(isa):
    return HOST if isa == "vnni" else AVX2_TARGET


def _requant_params(rng, acc, out_channels, spread=48.0, per_channel=True):
    """Per-channel (mult, shift) that map the accumulator's spread to about +-spread output steps, plus edge
    channels: the largest multiplier, shift 1 and shift 62."""
    m = rng.integers(1 << 29, 1 << 31, out_channels, dtype=np.int64)
    axes = tuple(i for i in range(acc.ndim) if i != 1)
    std = (acc.astype(np.float64).std(axis=axes) if per_channel else np.abs(acc).astype(np.float64).mean()) + 1.0
    sh = np.clip(np.round(np.log2(std * m / spread)), 1, 62).astype(np.int64)
    m[0] = (1 << 31) - 1
    if out_channels > 2:
        m[1], sh[1] = 3, 1
        sh[2] = 62
    return m.astype(np.int32), sh.astype(np.int32)


def _cap_shifts(m, sh, max_shift):
    """(m, shift) with every shift above ``max_shift`` (an int or per channel) lowered to it and its multiplier
    scaled down alike (about the same requant scale, a smaller multiplier): shifts below 32 for the lifted
    epilogues with outputs that are not all clamped."""
    over = np.maximum(sh.astype(np.int64) - max_shift, 0)
    return (m.astype(np.int64) >> over).astype(np.int32), np.minimum(sh, max_shift).astype(np.int32)


def lifted_caps(form, channels, seed=0):
    """Per-channel shift caps for a test of lifted ``form``: 26..32 ("lifted": no right shift), 26..35 with both
    sides of 32 present ("lifted+shift")."""
    caps = np.random.default_rng(seed).integers(26, 33 if form == "lifted" else 36, channels)
    if form != "lifted":
        caps[:2] = (27, 35)
    return caps


def lifted_form(sh):
    """The lifted epilogue form the builder picks for shifts ``sh`` (proved exact): no right shift where every
    shift is <= 32."""
    return "lifted" if int(np.max(sh)) <= 32 else "lifted+shift"


def _conv_lifted_bounds(cs, zr=7, qmax_in=255):
    """(lanes, const) of a :func:`_conv_case` for kernels.lifted_epilogue_exact (as ops.weighted computes them):
    the accumulator without its bias over every input code and the residual's code; |bias * m| + z_r * mr."""
    from ptq2tvm.fold.bounds import accumulator_range

    lo, hi = accumulator_range(cs["w"], np.zeros_like(cs["bias"]), qmax_in)
    const = [abs(int(b)) * int(m) + zr * int(mr) for b, m, mr in zip(cs["bias"], cs["m"], cs["mr"])]
    return [(np.maximum(-lo, hi), cs["m"]), (255, cs["mr"])], const


def _conv_case(rng, n, c, h, w, o, k, s, p, d=1, g=1, residual=False, int4=False, zx=3, zo=5, zr=7, lo=0, hi=255,
               extremes=True, w_bits=None, min_shift=1, max_shift=62):
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wlo, whi = K.layout.WEIGHT_RANGES[w_bits or (4 if int4 else 8)]
    wt = rng.integers(wlo, whi + 1, (o, c // g, k, k), dtype=np.int8)
    if extremes:   # saturating values at both ends: uint8 0/255 activations, int8 (int4) min/max weights
        x.reshape(-1)[::7] = 255
        x.reshape(-1)[3::11] = 0
        wt.reshape(-1)[::5] = wlo
        wt.reshape(-1)[2::6] = whi
        x[0, :, : max(1, h // 3), : max(1, w // 3)] = 255          # a corner of all-255 pixels
        wt[0] = wlo                                                 # a channel of all-min weights
        if o > 1:
            wt[-1] = whi
    bias = rng.integers(-(1 << 16), 1 << 16, o).astype(np.int32)
    acc = R.conv_acc(x, wt, bias, s, p, d, g, zx)
    m, sh = _requant_params(rng, acc, o)
    sh = np.maximum(sh, min_shift).astype(np.int32)     # 32: every shift >= 32 (the int32-clamp epilogue)
    m, sh = _cap_shifts(m, sh, max_shift)
    oh, ow = acc.shape[2:]
    r = rng.integers(0, 256, (n, o, oh, ow), dtype=np.uint8) if residual else None
    mr = (np.minimum(np.exp2(sh.astype(np.float64)) / 600.0, 2 ** 31 - 1)).astype(np.int64).astype(np.int32)
    ref = R.conv2d_requant(x, wt, bias, m, sh, r, mr, stride=s, padding=p, dilation=d, groups=g, input_zero_point=zx,
                           output_zero_point=zo, lo=lo, hi=hi, residual_zero_point=zr)
    return dict(x=x, w=wt, bias=bias, m=m, sh=sh, r=r, mr=mr, ref=ref)


CONV_CASES = {
    # name: (n, c, h, w, o, k, s, p, d, g, ic_block, residual, int4, extra)
    "3x3_s1": (1, 32, 12, 12, 32, 3, 1, 1, 1, 1, 16, False, False, {}),
    "3x3_s2_odd": (1, 16, 13, 13, 32, 3, 2, 1, 1, 1, 16, False, False, {}),
    "3x3_s1_batch2_clamp": (2, 16, 9, 9, 16, 3, 1, 1, 1, 1, 16, False, False, dict(lo=10, hi=200, zo=100)),
    "1x1_s1": (1, 48, 9, 9, 16, 1, 1, 0, 1, 1, 16, False, False, {}),
    "1x1_s2_downsample": (1, 32, 14, 14, 64, 1, 2, 0, 1, 1, 16, False, False, {}),
    "depthwise_3x3_s1": (1, 32, 10, 10, 32, 3, 1, 1, 1, 32, 16, False, False, {}),
    "depthwise_3x3_s2_res": (1, 48, 11, 11, 48, 3, 2, 1, 1, 48, 16, True, False, {}),
    "grouped_blocks": (1, 64, 8, 8, 64, 3, 1, 1, 1, 2, 16, False, False, {}),
    "grouped_expanded": (1, 24, 8, 8, 36, 3, 1, 1, 1, 3, 16, False, False, {}),
    "first_3ch_7x7_s2": (1, 3, 23, 23, 24, 7, 2, 3, 1, 1, 4, False, False, dict(zx=128)),
    "first_3ch_3x3": (1, 3, 16, 16, 16, 3, 1, 1, 1, 1, 4, False, False, {}),
    "dilated_3x3": (1, 16, 12, 12, 16, 3, 1, 2, 2, 1, 16, False, False, {}),
    "residual_3x3": (1, 32, 10, 10, 40, 3, 1, 1, 1, 1, 16, True, False, dict(zr=200)),
    "residual_1x1": (1, 16, 8, 8, 32, 1, 1, 0, 1, 1, 16, True, False, {}),
    "int4_3x3": (1, 32, 12, 12, 32, 3, 1, 1, 1, 1, 16, False, True, {}),
    "int4_3x3_s2_res": (1, 32, 12, 12, 48, 3, 2, 1, 1, 1, 16, True, True, {}),
    "int4_first_3ch": (1, 3, 16, 16, 16, 7, 2, 3, 1, 1, 4, False, True, {}),
    # int4 weights unpacked once per task of (output blocks, chunk of rows over all images): chunks cross images
    "int4_3x3_batch3_clamp": (3, 32, 7, 7, 48, 3, 1, 1, 1, 1, 16, False, True, dict(lo=3, hi=250, zo=90)),
    # 10 output blocks at 7x7: the per-task tile takes Q = 1 (10 tasks) over Q = 2 (5 tasks, 3 + 2 on 2 threads)
    "int4_1x1_7x7_10blocks_res": (1, 64, 7, 7, 160, 1, 1, 0, 1, 1, 16, True, True, {}),
    # 4 output blocks at 7x7: one task per group of Q = 2 blocks over all 49 pixels (not 7 one-row chunks)
    "int4_3x3_7x7_4blocks_res": (1, 64, 7, 7, 64, 3, 1, 1, 1, 1, 16, True, True, dict(zx=0)),
    # input zero point 0 (after a ReLU): the taps on the padding border are skipped where the tile spans a row
    "zp0_3x3_7x7": (1, 32, 7, 7, 32, 3, 1, 1, 1, 1, 16, False, False, dict(zx=0)),
    "zp0_3x3_s2_res": (1, 16, 13, 13, 32, 3, 2, 1, 1, 1, 16, True, False, dict(zx=0, zr=200)),
    "zp0_int4_5x5_batch3": (3, 32, 6, 6, 48, 5, 1, 2, 1, 1, 16, False, True, dict(zx=0, lo=3, hi=250, zo=90)),
    "zp0_dilated_12x12": (1, 16, 12, 12, 16, 3, 1, 2, 2, 1, 16, False, False, dict(zx=0)),
    "zp0_depthwise_3x3_7x7": (2, 32, 7, 7, 32, 3, 1, 1, 1, 32, 16, False, False, dict(zx=0)),
    "zp0_depthwise_3x3_s2_res": (1, 48, 13, 13, 48, 3, 2, 1, 1, 48, 16, True, False, dict(zx=0)),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_bit_exact(name, isa):
    n, c, h, w, o, k, s, p, d, g, icb, res, int4, extra = CONV_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    cs = _conv_case(rng, n, c, h, w, o, k, s, p, d, g, res, int4, **extra)
    zx = extra.get("zx", 3)
    xb = K.nchw_to_nchwc(cs["x"], icb, zx)
    wp = K.pack_conv_weight(cs["w"], g, ic_block=icb, isa=isa, int4=int4)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [xb, wp, *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, _target(isa), stride=s, padding=p, dilation=d,
                              groups=g, input_zero_point=zx, output_zero_point=extra.get("zo", 5),
                              lo=extra.get("lo", 0), hi=extra.get("hi", 255), residual_zero_point=extra.get("zr", 7),
                              isa=isa)
    got = K.nchwc_to_nchw(kern.run(*arrays), o)
    ref = cs["ref"]
    assert got.shape == ref.shape
    assert len(np.unique(ref)) > 16, "test data too degenerate"
    assert int((got != ref).sum()) == 0, f"{int((got != ref).sum())} mismatches of {ref.size}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c,h,w,o,k,s,p,int4", [(3, 32, 32, 32, 7, 2, 3, False), (3, 23, 21, 16, 7, 2, 3, False),
                                                (1, 16, 16, 16, 3, 1, 1, False), (3, 18, 32, 24, 3, 2, 1, True),
                                                (4, 12, 12, 16, 5, 1, 2, False)])
def test_first_conv_rows_bit_exact(isa, c, h, w, o, k, s, p, int4):
    """First conv on 1-4 channel input via the interleaved row layout (nchw_to_rows + conv2d_rows_requant)."""
    rng = np.random.default_rng(100 * c + 10 * k + h)
    cs = _conv_case(rng, 1, c, h, w, o, k, s, p, int4=int4, zx=29)
    target = _target(isa)
    lay = K.build_standalone(K.te_nchw_to_rows, [cs["x"]], target, kernel=k, stride=s, padding=p, pad_value=29)
    xr = lay.run(cs["x"])
    assert np.array_equal(xr, K.nchw_to_rows(cs["x"], k, s, p, 29))
    arrays = [xr, K.pack_rows_weight(cs["w"], isa=isa, int4=int4),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    kern = K.build_standalone(K.conv2d_rows_requant, arrays, target, in_channels=c, in_width=w, kernel=k, stride=s,
                              padding=p, input_zero_point=29, output_zero_point=5, isa=isa)
    got = K.nchwc_to_nchw(kern.run(*arrays), o)
    assert len(np.unique(cs["ref"])) > 16
    assert int((got != cs["ref"]).sum()) == 0


DEPTHWISE_TAPS_CASES = {
    # name: (n, c, h, w, k, s, p, dh, residual, extra)
    "3x3_s1": (1, 32, 10, 10, 3, 1, 1, 1, False, {}),
    "3x3_s2_odd_res": (1, 48, 11, 13, 3, 2, 1, 1, True, dict(zr=200)),
    "5x5_batch2_clamp": (2, 24, 9, 9, 5, 1, 2, 1, False, dict(lo=10, hi=200, zo=100)),
    "7x7_s2_vdilated": (1, 16, 15, 15, 7, 2, 3, 2, False, dict(zx=128)),
    "3x3_no_pad_1px_right": (1, 16, 6, 5, 3, 1, 0, 1, False, {}),
}


@pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("name", list(DEPTHWISE_TAPS_CASES))
def test_depthwise_taps_bit_exact(name):
    """Depthwise convs on the VNNI tap intrinsic (4 horizontal taps x 16 channels per vpdpbusd, vpermb transpose)."""
    n, c, h, w, k, s, p, dh, res, extra = DEPTHWISE_TAPS_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    cs = _conv_case(rng, n, c, h, w, c, k, s, p, (dh, 1), c, res, **extra)
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_depthwise_taps(cs["w"]), *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    kern = K.build_standalone(K.depthwise_taps_requant, arrays, HOST, kernel_width=k, stride=s, padding=p,
                              dilation=(dh, 1), input_zero_point=zx, output_zero_point=extra.get("zo", 5),
                              lo=extra.get("lo", 0), hi=extra.get("hi", 255), residual_zero_point=extra.get("zr", 7))
    got = K.nchwc_to_nchw(kern.run(*arrays), c)
    assert got.shape == cs["ref"].shape
    assert len(np.unique(cs["ref"])) > 16, "test data too degenerate"
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {cs['ref'].size}"
    assert kern.count_instructions("vpdpbusd") > 0 and kern.count_instructions("vpermb") > 0


def test_depthwise_taps_rejects_bad_input():
    w = np.ones((16, 1, 3, 3), np.int8)
    with pytest.raises(ValueError, match=r"\(C, 1, KH, KW\)"):
        K.pack_depthwise_taps(np.ones((16, 2, 3, 3), np.int8))
    with pytest.raises(ValueError, match="outside"):
        K.pack_depthwise_taps(w.astype(np.int16) * 200)
    x = np.zeros((1, 1, 8, 8, 16), np.uint8)
    params = K.pack_channel_params(np.zeros(16, np.int32), np.ones(16, np.int32), np.ones(16, np.int32))
    with pytest.raises(ValueError, match="horizontal dilation"):
        K.build_standalone(K.depthwise_taps_requant, [x, K.pack_depthwise_taps(w), *params], HOST, kernel_width=3,
                           dilation=(1, 2))
    with pytest.raises(ValueError, match="kernel width 5"):
        K.build_standalone(K.depthwise_taps_requant, [x, K.pack_depthwise_taps(w), *params], HOST, kernel_width=5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,o,residual,int4", [(1, 64, 37, False, False), (3, 100, 16, True, False),
                                                 (2, 30, 20, False, False), (1, 48, 40, False, True),
                                                 (2, 64, 24, True, True)])
def test_dense_bit_exact(isa, n, k, o, residual, int4):
    rng = np.random.default_rng(1000 + n * k + o)
    x = rng.integers(0, 256, (n, k), dtype=np.uint8)
    wlo, whi = (-8, 7) if int4 else (-128, 127)
    wt = rng.integers(wlo, whi + 1, (o, k), dtype=np.int8)
    x[0, :5] = 255
    x[-1, -3:] = 0
    wt[0] = wlo
    wt[-1] = whi
    zx = 9
    bias = (rng.integers(-1000, 1000, o) - zx * wt.astype(np.int64).sum(1)).astype(np.int32)
    acc = x.astype(np.int64) @ wt.astype(np.int64).T + bias
    m, sh = _requant_params(rng, acc, o, per_channel=False)
    r = rng.integers(0, 256, (n, o), dtype=np.uint8) if residual else None
    mr = np.full(o, 1 << 25, np.int32)
    ref = R.dense_requant(x, wt, bias, m, sh, r, mr, output_zero_point=128, residual_zero_point=3)
    params = K.pack_channel_params(bias, m, sh, mr)
    arrays = [x, K.pack_dense_weight(wt, isa=isa, int4=int4), *params[:3]]
    if residual:
        arrays += [r, params[3]]
    kern = K.build_standalone(K.dense_requant, arrays, _target(isa), out_features=o, input_zero_point=zx,
                              output_zero_point=128, residual_zero_point=3, isa=isa)
    got = kern.run(*arrays)
    assert len(np.unique(ref)) > 8
    assert int((got != ref).sum()) == 0


def _blocked(x, z=0):
    return K.nchw_to_nchwc(x, 16, z)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_maxpool(kernel, stride, padding):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, 24, 11, 11), dtype=np.uint8)
    x[:, :, :4, :4] = 0                                         # pad value 0 must never win wrongly
    ref = R.maxpool2d(x, kernel, stride, padding)
    kern = K.build_standalone(K.maxpool2d_nchwc, [_blocked(x)], HOST, kernel=kernel, stride=stride, padding=padding)
    assert int((K.nchwc_to_nchw(kern.run(_blocked(x)), 24) != ref).sum()) == 0


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 1, 1)])
def test_avgpool_requant(kernel, stride, padding):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (1, 20, 10, 10), dtype=np.uint8)
    z = 17
    m = rng.integers(1 << 29, 1 << 31, 20).astype(np.int32)
    sh = np.full(20, 33, np.int32)
    ref = R.avgpool2d_requant(x, m, sh, kernel, stride, padding, z, 4, 0, 255)
    mp, sp = K.pack_channel_params(m, sh, kinds="ms")
    arrays = [_blocked(x, z), mp, sp]
    kern = K.build_standalone(K.avgpool2d_nchwc_requant, arrays, HOST, kernel=kernel, stride=stride, padding=padding,
                              input_zero_point=z, output_zero_point=4)
    assert int((K.nchwc_to_nchw(kern.run(*arrays), 20) != ref).sum()) == 0


def test_global_avgpool_requant():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (2, 40, 7, 7), dtype=np.uint8)
    x[0, 0] = 255
    x[1, 1] = 0
    m = rng.integers(1 << 29, 1 << 31, 40).astype(np.int32)
    sh = np.full(40, 36, np.int32)
    ref = R.global_avgpool_requant(x, m, sh, 100, 3, 0, 255)
    mp, sp = K.pack_channel_params(m, sh, kinds="ms")
    arrays = [_blocked(x, 100), mp, sp]
    kern = K.build_standalone(K.global_avgpool_nchwc_requant, arrays, HOST, input_zero_point=100,
                              output_zero_point=3)
    assert int((K.nchwc_to_nchw(kern.run(*arrays), 40) != ref).sum()) == 0


def test_add_requant_and_clamp():
    rng = np.random.default_rng(10)
    a = rng.integers(0, 256, (1, 32, 9, 9), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 32, 9, 9), dtype=np.uint8)
    ma = rng.integers(1 << 29, 1 << 31, 32).astype(np.int32)
    mb = rng.integers(1 << 29, 1 << 31, 32).astype(np.int32)
    sh = np.full(32, 31, np.int32)
    ref = R.add_requant(a, b, ma, mb, sh, (5, 250), 128, 2, 253)
    mpa, mpb, sp = K.pack_channel_params(ma, mb, sh, kinds="mms")
    arrays = [_blocked(a), _blocked(b), mpa, mpb, sp]
    kern = K.build_standalone(K.add_requant_nchwc, arrays, HOST, zero_points=(5, 250), output_zero_point=128, lo=2,
                              hi=253)
    got = K.nchwc_to_nchw(kern.run(*arrays), 32)
    assert int((got != ref).sum()) == 0
    kern = K.build_standalone(K.clamp_nchwc, [_blocked(a)], HOST, lo=20, hi=99)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(_blocked(a)), 32), np.clip(a, 20, 99))


def test_layout_ops_roundtrip():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (2, 3, 10, 10), dtype=np.uint8)
    to = K.build_standalone(K.te_nchw_to_nchwc, [x], HOST, block=4, pad_value=77)
    xb = to.run(x)
    assert np.array_equal(xb, K.nchw_to_nchwc(x, 4, 77))
    y = rng.integers(0, 256, (2, 2, 5, 5, 16), dtype=np.uint8)
    back = K.build_standalone(K.te_nchwc_to_nchw, [y], HOST, channels=20)
    assert np.array_equal(back.run(y), K.nchwc_to_nchw(y, 20))
    g = rng.integers(0, 256, (2, 3, 1, 1, 16), dtype=np.uint8)
    flat = K.build_standalone(K.nchwc_flatten, [g], HOST, channels=40)
    assert np.array_equal(flat.run(g), K.nchwc_to_nchw(g, 40).reshape(2, 40))


def test_packing_roundtrip():
    rng = np.random.default_rng(12)
    w = rng.integers(-8, 8, (32, 16, 3, 3), dtype=np.int8)
    p8 = K.pack_conv_weight(w, 1, 16, isa="vnni")
    p4 = K.pack_conv_weight(w, 1, 16, isa="vnni", int4=True)
    assert p4.dtype == np.uint8 and p4.nbytes * 2 == p8.nbytes
    assert np.array_equal(K.unpack_int4(p4), p8.reshape(*p8.shape[:5], 64))
    with pytest.raises(ValueError):
        K.pack_conv_weight(w * 2, 1, 16, int4=True)
    assert K.conv_weight_mode(64, 64, 64) == "depthwise"
    assert K.conv_weight_mode(64, 64, 2) == "grouped"
    assert K.conv_weight_mode(36, 24, 3) == "expanded"


# ---- int2: 2-bit weights four per byte, on every x86 dot product ----
def test_int2_packing_roundtrip_and_range():
    rng = np.random.default_rng(21)
    for o, c in ((32, 16), (37, 5), (3, 7)):                   # odd output / input channel counts are zero-padded
        w = rng.integers(-2, 2, (o, c, 3, 3), dtype=np.int8)
        w[0] = -2
        w[-1] = 1
        for isa in ("vnni", "avx2"):
            p8 = K.pack_conv_weight(w, 1, 16, isa=isa)
            p2 = K.pack_conv_weight(w, 1, 16, isa=isa, int2=True)
            p4 = K.pack_conv_weight(w, 1, 16, isa=isa, int4=True)
            assert p2.dtype == np.uint8 and p2.shape[-1] == 16 and p2.nbytes * 4 == p8.nbytes == p4.nbytes * 2
            blocks = p8.reshape(*p8.shape[:5], 64)
            assert np.array_equal(K.unpack_int2(p2), blocks) and np.array_equal(K.unpack_int4(p4), blocks)
    # byte j holds elements j, j+16, j+32, j+48 in bits 0-1, 2-3, 4-5, 6-7 (two's complement fields)
    e = np.tile(np.array([-2, -1, 0, 1], np.int8).repeat(16), 1)
    assert K.layout._pack_crumbs(e).tolist() == [0b01001110] * 16
    wd = rng.integers(-2, 2, (20, 30), dtype=np.int8)           # K = 30: padded to 32
    pd = K.pack_dense_weight(wd, isa="vnni", int2=True)
    assert pd.shape == (2, 8, 16)
    assert np.array_equal(K.unpack_int2(pd), K.pack_dense_weight(wd, isa="vnni").reshape(2, 8, 64))
    pr = K.pack_rows_weight(rng.integers(-2, 2, (16, 3, 7, 7), dtype=np.int8), isa="vnni", int2=True)
    assert pr.shape == (1, 1, 7, 1, 6, 16)
    assert K.u8s8_pairs_exact(pr, 255)
    bad = w.copy()
    bad[1, 2, 0, 1] = 2
    with pytest.raises(ValueError, match=r"conv weights \(3, 7, 3, 3\) hold 2, outside \[-2, 1\]: they cannot be "
                                         r"packed as int2"):
        K.pack_conv_weight(bad, 1, 16, int2=True)
    with pytest.raises(ValueError, match=r"linear weights \(20, 30\) hold -3, outside \[-2, 1\]"):
        K.pack_dense_weight(np.where(wd == -2, -3, wd).astype(np.int8), int2=True)
    with pytest.raises(ValueError, match="exclusive"):
        K.pack_conv_weight(w, 1, 16, int4=True, int2=True)
    with pytest.raises(ValueError, match="int2 packing is not supported for depthwise"):
        K.pack_conv_weight(rng.integers(-2, 2, (32, 1, 3, 3), dtype=np.int8), 32, 16, int2=True)


INT2_CONV_CASES = {
    # name: (n, c, h, w, o, k, s, p, d, g, ic_block, residual, extra)
    "int2_3x3": (1, 32, 12, 12, 32, 3, 1, 1, 1, 1, 16, False, {}),
    "int2_3x3_s2_res_odd_out": (1, 32, 11, 11, 40, 3, 2, 1, 1, 1, 16, True, {}),
    "int2_grouped_blocks": (1, 64, 8, 8, 64, 3, 1, 1, 1, 2, 16, False, {}),
    "int2_grouped_expanded": (1, 24, 8, 8, 36, 3, 1, 1, 1, 3, 16, False, {}),
    "int2_first_3ch": (1, 3, 16, 16, 16, 7, 2, 3, 1, 1, 4, False, dict(zx=128)),
    "int2_batch3_clamp": (3, 32, 7, 7, 48, 3, 1, 1, 1, 1, 16, False, dict(lo=3, hi=250, zo=90)),
}


def _int2_conv(name, layout, options=None, target=None):
    n, c, h, w, o, k, s, p, d, g, icb, res, extra = INT2_CONV_CASES[name]
    cs = _conv_case(np.random.default_rng(sum(map(ord, name))), n, c, h, w, o, k, s, p, d, g, res, w_bits=2, **extra)
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    wp = K.pack_conv_weight(cs["w"], g, ic_block=icb, isa="vnni" if layout == "ubsw" else "avx2", int2=True)
    arrays = [K.nchw_to_nchwc(cs["x"], icb, zx), wp, *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target or AVX2_TARGET, options=options, stride=s,
                              padding=p, dilation=d, groups=g, input_zero_point=zx, output_zero_point=extra.get("zo", 5),
                              lo=extra.get("lo", 0), hi=extra.get("hi", 255), residual_zero_point=extra.get("zr", 7),
                              isa="vnni" if layout == "ubsw" else "avx2", ubsw_exact=layout == "ubsw")
    return cs, K.nchwc_to_nchw(kern.run(*arrays), o), kern


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("layout", ["ubsw", "avx2"])
@pytest.mark.parametrize("name", list(INT2_CONV_CASES))
def test_int2_conv_bit_exact_avx2(name, layout):
    """Four weights per byte, unpacked in the kernel (2-bit sign extension) on both AVX2 dot products: vpmaddubsw
    on the VNNI layout (what the network build uses: int2 weights are always proved exact) and vpmaddwd."""
    cs, got, kern = _int2_conv(name, layout)
    assert len(np.unique(cs["w"])) == 4 and len(np.unique(cs["ref"])) > 16, "test data too degenerate"
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {got.size}"
    if name == "int2_3x3":
        assert kern.count_instructions("vpmaddubsw" if layout == "ubsw" else "vpmaddwd") > 0


@pytest.mark.parametrize("isa", VNNI_TARGETS)
@pytest.mark.parametrize("name", list(INT2_CONV_CASES))
def test_int2_conv_bit_exact_vnni(name, isa, tmp_path):
    """Four weights per byte on the AVX-512 VNNI (zmm) and AVX-VNNI (ymm) dot products: the same unpack as on AVX2,
    bit-exact (run where the CPU has that ISA)."""
    target = HOST if isa == "vnni" else K.host_target(num_cores=2, mcpu="alderlake")
    cs, got, kern = _int2_conv(name, "ubsw", target=target)
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {got.size}"
    if name == "int2_3x3":
        from ptq2tvm.bench.disasm import count_by_width

        widths = count_by_width(kern.export(str(tmp_path / "k.so")), "vpdpbusd")
        assert widths.get("zmm" if isa == "vnni" else "ymm", 0) > 0, widths


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
def test_int2_conv_unpacked_per_step_bit_exact():
    """The tuning option that unpacks each weight vector inside the reduction (unpack_at='step')."""
    cs, got, _ = _int2_conv("int2_3x3_s2_res_odd_out", "ubsw", dict(unpack_at="step"))
    assert int((got != cs["ref"]).sum()) == 0


INT2_DENSE_TARGETS = [
    pytest.param("ubsw", "avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")),
    pytest.param("avx2", "avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")),
    pytest.param("ubsw", "vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")),
    pytest.param("ubsw", "avxvnni", marks=pytest.mark.skipif(not HAS_AVXVNNI, reason="no AVX-VNNI on this CPU"))]


@pytest.mark.parametrize("layout,target_isa", INT2_DENSE_TARGETS)
def test_int2_dense_and_rows_bit_exact(layout, target_isa):
    """int2 dense and first-conv (rows layout) kernels on each dot product: AVX2 (vpmaddubsw on the VNNI layout,
    vpmaddwd), AVX-512 VNNI, AVX-VNNI."""
    target = {"avx2": AVX2_TARGET, "vnni": HOST}.get(target_isa) or K.host_target(num_cores=2, mcpu="alderlake")
    rng = np.random.default_rng(22)
    isa = "vnni" if layout == "ubsw" else "avx2"
    for n, k, o in ((1, 30, 20), (3, 64, 37)):
        x = rng.integers(0, 256, (n, k), dtype=np.uint8)
        wt = rng.integers(-2, 2, (o, k), dtype=np.int8)
        x[0, :5], wt[0], wt[-1] = 255, -2, 1
        bias = rng.integers(-1000, 1000, o).astype(np.int32)
        acc = x.astype(np.int64) @ wt.astype(np.int64).T + bias
        m, sh = _requant_params(rng, acc, o, per_channel=False)
        ref = R.dense_requant(x, wt, bias, m, sh, output_zero_point=128)
        arrays = [x, K.pack_dense_weight(wt, isa=isa, int2=True), *K.pack_channel_params(bias, m, sh)]
        kern = K.build_standalone(K.dense_requant, arrays, target, out_features=o, output_zero_point=128,
                                  isa=isa, ubsw_exact=layout == "ubsw" and target_isa == "avx2")
        assert len(np.unique(ref)) > 8 and np.array_equal(kern.run(*arrays), ref), (n, k, o)
    cs = _conv_case(rng, 1, 3, 18, 32, 24, 3, 2, 1, w_bits=2, zx=29)       # first conv, row layout
    xr = K.nchw_to_rows(cs["x"], 3, 2, 1, 29)
    arrays = [xr, K.pack_rows_weight(cs["w"], isa=isa, int2=True),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    kern = K.build_standalone(K.conv2d_rows_requant, arrays, target, in_channels=3, in_width=32, kernel=3,
                              stride=2, padding=1, input_zero_point=29, output_zero_point=5, isa=isa,
                              ubsw_exact=layout == "ubsw" and target_isa == "avx2")
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 24), cs["ref"])


@pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")
def test_vnni_kernel_uses_vpdpbusd():
    rng = np.random.default_rng(13)
    cs = _conv_case(rng, 1, 32, 8, 8, 32, 3, 1, 1)
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 3), K.pack_conv_weight(cs["w"]),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, HOST, padding=1, input_zero_point=3, output_zero_point=5)
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])
    assert kern.count_instructions("vpdpbusd") > 0
    assert kern.count_instructions("vpmaddubsw") == 0        # the saturating fallback must never appear


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
def test_avx2_kernel_uses_vpmaddwd_only():
    rng = np.random.default_rng(14)
    cs = _conv_case(rng, 1, 32, 8, 8, 32, 3, 1, 1)
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 3), K.pack_conv_weight(cs["w"], isa="avx2"),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, padding=1, input_zero_point=3,
                              output_zero_point=5, isa="avx2")
    assert kern.count_instructions("vpmaddwd") > 0
    assert kern.count_instructions("vpdpbusd") == 0
    assert kern.count_instructions("vpmaddubsw") == 0
    # the pad stage widens the input to uint16, so the inner loop broadcasts ready int16 pairs: no byte shuffles
    assert "uint16" in kern.func.script() and kern.count_instructions("vpshufb") == 0
    assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("layout", ["avx2", "ubsw", "depthwise"])
def test_zero_border_taps_skipped_only_where_exact(layout):
    """With input zero point 0 the padding border adds nothing, and the 7x7 kernel (tile = whole row) predicates
    its dot products on the tap reading inside the image (kernels.border): bit-exact, for the vpmaddwd, the
    vpmaddubsw and the depthwise kernels. With zero point 3 the border taps add 3 * w and stay; at 12x12 (tile
    narrower than the row) nothing is skipped."""
    def build(hw, zx):
        rng = np.random.default_rng(hw + zx)
        g = 32 if layout == "depthwise" else 1
        cs = _conv_case(rng, 2, 32, hw, hw, 32, 3, 1, 1, g=g, zx=zx, w_bits=4 if layout == "ubsw" else None)
        isa = "vnni" if layout == "ubsw" else "avx2"
        arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_conv_weight(cs["w"], g, isa=isa),
                  *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
        kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, padding=1, input_zero_point=zx,
                                  output_zero_point=5, groups=g, isa=isa, ubsw_exact=layout == "ubsw")
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])
        return "T.where(" in kern.func.script()

    assert build(7, 0), "border taps not skipped at 7x7 with zero point 0"
    assert not build(7, 3), "border taps skipped although the border holds the zero point 3"
    assert not build(12, 0)


@pytest.mark.parametrize("hw,stride,skipped", [(14, 1, True), (28, 2, True), (72, 1, False)])
def test_vnni_zero_border_skipped_where_it_pays(hw, stride, skipped):
    """AVX-512 VNNI kernels whose register tile is narrower than the output row (7 of 14 columns here) skip the
    zero-border taps when those are >= 2% of the products (kernels.border.border_tap_fraction: 9.3% at 14x14, 4.7%
    for 28x28 / 2), with runtime column tests; at 72x72 (1.8%) they do not. Bit-exact where the host has AVX-512
    VNNI (compiled for a VNNI CPU everywhere else). Where the border is skipped the kernel reads its input directly:
    no zero-point-padded copy (kernels.border.read_through_border)."""
    rng = np.random.default_rng(hw + stride)
    c = 32 if hw < 72 else 16
    cs = _conv_case(rng, 1, c, hw, hw, c, 3, stride, 1, zx=0)
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 0), K.pack_conv_weight(cs["w"]),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, stride=stride, padding=1, input_zero_point=0,
                              output_zero_point=5)
    out_w = (hw + 2 - 3) // stride + 1
    tile = K.schedule.choose_conv_tile(1, c // 16, out_w, out_w, isa="vnni")
    assert tile.P < out_w, tile          # the case this test is about: a tile narrower than the row
    assert ("T.where(" in kern.func.script()) == skipped
    assert ('sblock("pad")' in kern.func.script()) != skipped
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), c), cs["ref"])


@pytest.mark.parametrize("tile,tensorized", [((7, 2), True), ((8, 2), False)])
def test_narrow_tile_with_border_tests_keeps_the_tensorized_epilogue(tile, tensorized):
    """A conv whose tile is narrower than the row skips the zero border with runtime column tests; with up to
    kernels.schedule.TENSORIZED_NARROW_MAX_ACC (14) accumulators, as in the (7, 2) tile the hand schedule picks at
    56x56, its requantize (+ residual) epilogue stays tensorized (block ``out_o``); a 16-accumulator tile keeps the
    vectorized epilogue (LLVM had left such a tile in memory, 2x slower). Bit-exact with the residual, shifts on both
    sides of 32 and saturating inputs where the host has AVX-512 VNNI."""
    rng = np.random.default_rng(71)
    cs = _conv_case(rng, 2, 32, 56, 56, 32, 3, 1, 1, zx=0, residual=True, min_shift=20, max_shift=45)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 0), K.pack_conv_weight(cs["w"]), *params[:3],
              K.nchw_to_nchwc(cs["r"], 16, 7), params[3]]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, options={"tile": K.ConvTile(*tile)},
                              padding=1, input_zero_point=0, output_zero_point=5, residual_zero_point=7)
    script = kern.func.script()
    assert "T.where(" in script and 'sblock("pad")' not in script     # runtime border tests, input read in place
    assert ('sblock("out_o")' in script) == tensorized
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])
    assert K.schedule.choose_conv_tile(1, 4, 56, 56, isa="vnni") == K.ConvTile(7, 2)


@pytest.mark.parametrize("zx,stride,dilation", [(0, 1, 1), (0, 2, 1), (0, 1, 2), (5, 1, 1)])
def test_skipped_border_reads_the_input_directly(zx, stride, dilation):
    """A conv whose zero-border taps are skipped (input zero point 0) reads its input in place, at the shifted
    coordinates, instead of a padded copy (kernels.border.read_through_border): no 'pad' stage, no read of it, and
    the reference's integers (padding 2 on a 9x9 input, stride / dilation 2 included). A border of zero point 5 is
    not skipped and keeps the padded copy."""
    rng = np.random.default_rng(90 + zx + stride + dilation)
    cs = _conv_case(rng, 2, 32, 9, 9, 32, 3, stride, 2, d=dilation, zx=zx, residual=True, zr=0)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_conv_weight(cs["w"]), *params[:3],
              K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, stride=stride, padding=2, dilation=dilation,
                              input_zero_point=zx, output_zero_point=5, residual_zero_point=0)
    script = kern.func.script()
    assert ('sblock("pad")' in script) == (zx != 0) and ("pad[" in script) == (zx != 0)
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])


@pytest.mark.parametrize("ge32,residual,k,zx", [(False, False, 1, 3), (True, False, 1, 3), (False, True, 3, 3),
                                                 (True, True, 1, 3), (False, False, 3, 0)])
def test_vnni_tensorized_epilogue_bit_exact(ge32, residual, k, zx):
    """AVX-512 VNNI conv kernels requantize each 16-channel block with the tensorized paired epilogue
    (kernels/epilogue_intrin.py): the reference's integers for shifts anywhere in [1, 62] (int64 form) and for
    shifts >= 32 (int32 form), with a fused residual (zero point 200), a clamp and saturating inputs; the tensorized
    output block 'out_o' keeps the kernel's annotations. The 3x3 conv over a zero border has a tile narrower than
    the row (runtime border tests) of 12 accumulators: tensorized too (at most 14,
    test_narrow_tile_with_border_tests_keeps_the_tensorized_epilogue). Compiled for a VNNI CPU everywhere, run where
    the host has AVX-512 VNNI."""
    from kernels.border import output_annotations

    rng = np.random.default_rng(40 + k + 2 * ge32 + 4 * residual + zx)
    hw, c, o = (20, 32, 48) if k == 3 else (9, 40, 48)
    cs = _conv_case(rng, 1, c, hw, hw, o, k, 1, k // 2, residual=residual, zx=zx, zo=17, zr=200, lo=4, hi=250,
                    min_shift=32 if ge32 else 1)
    assert int(cs["sh"].min()) < 32 or ge32
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_conv_weight(cs["w"]), *params[:3]]
    if residual:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, padding=k // 2, input_zero_point=zx,
                              output_zero_point=17, lo=4, hi=250, residual_zero_point=200, shift_ge32=ge32,
                              in_channels=c)
    script = kern.func.script()
    assert "ptq2tvm_requant16" in str(kern.func) or 'sblock("out_o")' in script
    assert ("T.where(" in script) == (zx == 0)          # the runtime border tests
    assert output_annotations(kern.func)[K.ops.KERNEL_ATTR] == "conv2d_nchwc_vnni"
    if HAS_VNNI:
        got = K.nchwc_to_nchw(kern.run(*arrays), o)
        assert len(np.unique(cs["ref"])) > 16 and np.array_equal(got, cs["ref"])


@pytest.mark.parametrize("form,residual,k", [("lifted", True, 1), ("lifted+shift", True, 3),
                                             ("lifted+shift", False, 1), ("lifted", False, 3)])
def test_vnni_tensorized_epilogue_lifted_bit_exact(form, residual, k):
    """The tensorized TE epilogue in the lifted form (``lifted``, the builder's proof of
    kernels.layout.lifted_epilogue_exact): accumulator, residual codes and rounding constants shifted left by
    max(32 - shift, 0) (`vpsllvd`, no int64 `vpsravq`), then the int32 form; the reference's integers for shifts
    28-32 ("lifted") and 28-36 ("lifted+shift", both sides of 32), with a residual, a clamp and zero points, outputs
    spread over the range. Compiled for a VNNI CPU everywhere, run where the host has AVX-512 VNNI."""
    rng = np.random.default_rng(70 + k + 3 * residual + (form == "lifted"))
    hw, c, o = 9, 48, 32
    x = rng.integers(0, 256, (1, c, hw, hw), dtype=np.uint8)
    w = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    m = rng.integers(1 << 20, 1 << 23, o, dtype=np.int64).astype(np.int32)
    acc = R.conv_acc(x, w, np.zeros(o, np.int32), 1, k // 2, 1, 1, 3)
    spread = np.log2(np.maximum(acc.std(axis=(0, 2, 3)), 1.0) * m.astype(np.float64) / 40.0)
    hi_shift = 32 if form == "lifted" else 36
    sh = np.clip(np.round(spread), 28, hi_shift).astype(np.int32)
    sh[:2] = [28, hi_shift]
    bias = rng.integers(-(1 << 12), 1 << 12, o).astype(np.int32)
    r = rng.integers(0, 256, (1, o, hw, hw), dtype=np.uint8) if residual else None
    mr = (m // 3).astype(np.int32) if residual else None
    ref = R.conv2d_requant(x, w, bias, m, sh, r, mr, stride=1, padding=k // 2, dilation=1, groups=1,
                           input_zero_point=3, output_zero_point=90, lo=2, hi=253, residual_zero_point=11)
    assert len(np.unique(ref)) > 64
    lanes = [(np.abs(acc).max(axis=(0, 2, 3)) + 1, m)] + ([(255, mr)] if residual else [])
    assert K.lifted_epilogue_exact(sh, lanes, np.abs(bias.astype(np.int64) * m) + (11 * mr if residual else 0))
    params = K.pack_channel_params(bias, m, sh, mr if residual else m)
    arrays = [K.nchw_to_nchwc(x, 16, 3), K.pack_conv_weight(w), *params[:3]]
    if residual:
        arrays += [K.nchw_to_nchwc(r, 16, 0), params[3]]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, padding=k // 2, input_zero_point=3,
                              output_zero_point=90, lo=2, hi=253, residual_zero_point=11, lifted=form)
    assert "ptq2tvm_requant16" in str(kern.func) or 'sblock("out_o")' in kern.func.script()
    assert kern.count_instructions("vpsllvd") > 0 and kern.count_instructions("vpsravq") == 0
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), o), ref)
    with pytest.raises(ValueError, match="lifted must be"):
        K.build_standalone(K.conv2d_nchwc_requant, arrays, target, padding=k // 2, shift_ge32=True, lifted=form)


def test_lifted_epilogue_intrinsics_register_again_from_their_names():
    """Tuning records name the epilogue intrinsics their traces tensorize with; the lifted forms' names parse back
    to the same intrinsic (kernels.register_named_epilogues), like the int32 / int64 ones."""
    from kernels.epilogue_intrin import register_named_epilogues, register_requant16_intrinsic

    names = [register_requant16_intrinsic(5, 0, 255, False, 7, "local", lifted)
             for lifted in (None, "lifted", "lifted+shift")] + [register_requant16_intrinsic(5, 0, 255, True, None)]
    assert len(set(names)) == 4
    assert register_named_epilogues(" ".join(names)) == sorted(names)
    with pytest.raises(ValueError, match="lifted must be"):
        register_requant16_intrinsic(5, 0, 255, True, None, "global", "lifted")


@pytest.mark.parametrize("lo_hi", [(29, 29), (0, 0), (255, 255)])
def test_constant_clamp_keeps_the_vectorized_epilogue(lo_hi):
    """A clamp with lo == hi (a constant output, e.g. from an edited integer graph) folds to a constant that the
    tensorized epilogue cannot match: the kernel keeps the vectorized epilogue and still builds, bit-exact (found by
    fuzzing: it raised ScheduleError)."""
    rng = np.random.default_rng(sum(lo_hi))
    x = rng.integers(0, 256, (1, 16, 6, 6), dtype=np.uint8)
    w = rng.integers(-128, 128, (16, 16, 1, 1), dtype=np.int8)
    bias, m, sh = np.zeros(16, np.int32), np.full(16, 1 << 30, np.int32), np.full(16, 40, np.int32)
    arrays = [K.nchw_to_nchwc(x), K.pack_conv_weight(w), *K.pack_channel_params(bias, m, sh)]
    target = HOST if HAS_VNNI else K.host_target(num_cores=2, mcpu="znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, output_zero_point=5, lo=lo_hi[0], hi=lo_hi[1])
    assert 'sblock("out_o")' not in kern.func.script()
    if HAS_VNNI:
        ref = R.conv2d_requant(x, w, bias, m, sh, output_zero_point=5, lo=lo_hi[0], hi=lo_hi[1])
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 16), ref)


def test_border_tap_fraction_counts_taps_on_the_border():
    from kernels.border import border_tap_fraction

    # 3x3, stride 1, pad 1 at 7x7: per axis 2 of the 21 (position, tap) pairs read the border
    assert border_tap_fraction([7, 7, 1, 1, 1, 1, 1, 1], (3, 3)) == pytest.approx(1 - (19 / 21) ** 2)
    # stride 2, 28 -> 14: only the first output row / column reads the top / left border (1 of 42 pairs)
    assert border_tap_fraction([28, 28, 1, 1, 2, 2, 1, 1], (3, 3)) == pytest.approx(1 - (41 / 42) ** 2)
    # padding only along the width: a 5x1 kernel (dilation 2) reads no border row, but 4 of its 10 output columns
    # read only the 2 + 2 padded ones; a 1x5 kernel: 6 of its 6 x 5 column pairs are on the border
    assert border_tap_fraction([10, 6, 0, 2, 1, 1, 2, 1], (5, 1)) == pytest.approx(0.4)
    assert border_tap_fraction([10, 6, 0, 2, 1, 1, 1, 1], (1, 5)) == pytest.approx(6 / 30)


def test_vnni_kernel_rejected_on_avx2_target():
    rng = np.random.default_rng(15)
    cs = _conv_case(rng, 1, 16, 6, 6, 16, 3, 1, 1)
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 3), K.pack_conv_weight(cs["w"], isa="vnni"),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    with pytest.raises(ValueError, match="VNNI"):
        K.build_standalone(K.conv2d_nchwc_requant, arrays, AVX2_TARGET, padding=1)


@pytest.mark.parametrize("isa", ISAS)
def test_relax_network_schedule_module(isa, tmp_path):
    """A tiny network built with BlockBuilder.emit_te, scheduled by schedule_module, compiled by tvm.compile's
    default pipeline and run in the Relax VM: bit-exact, and the .so contains vpdpbusd (VNNI)."""
    from tvm import relax

    target = _target(isa)
    rng = np.random.default_rng(16)
    n, h = 1, 32
    x = rng.integers(0, 256, (n, 3, h, h), dtype=np.uint8)

    def qp(o, shift):
        return (rng.integers(-(1 << 16), 1 << 16, o).astype(np.int32),
                rng.integers(1 << 28, 1 << 31, o, dtype=np.int64).astype(np.int32), np.full(o, shift, np.int32))

    w1 = rng.integers(-128, 128, (24, 3, 7, 7), dtype=np.int8)
    b1, m1, s1 = qp(24, 44)
    w2 = rng.integers(-128, 128, (24, 24, 3, 3), dtype=np.int8)
    b2, m2, s2 = qp(24, 44)
    mr2 = np.full(24, 1 << 30, np.int32)
    wd = rng.integers(-128, 128, (10, 24), dtype=np.int8)
    bd, md, sd = qp(10, 42)
    mg, sg = np.full(24, 1 << 30, np.int32), np.full(24, 36, np.int32)
    y = R.conv2d_requant(x, w1, b1, m1, s1, stride=2, padding=3, input_zero_point=7, output_zero_point=3, lo=3)
    y = R.maxpool2d(y, 3, 2, 1)
    y = R.conv2d_requant(y, w2, b2, m2, s2, y, mr2, padding=1, input_zero_point=3, output_zero_point=0,
                         residual_zero_point=3)
    y = R.global_avgpool_requant(y, mg, sg, 0, 2)
    ref = R.dense_requant(y.reshape(n, 24), wd, bd, md, sd, output_zero_point=1)

    def c(a):
        return relax.const(np.ascontiguousarray(a))

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((n, 3, h, h), "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            t = bb.emit_te(K.te_nchw_to_nchwc, xv, block=K.FIRST_BLOCK, pad_value=7)
            t = bb.emit_te(K.conv2d_nchwc_requant, t, c(K.pack_conv_weight(w1, 1, K.FIRST_BLOCK, isa=isa)),
                           *map(c, K.pack_channel_params(b1, m1, s1)), stride=2, padding=3, input_zero_point=7,
                           output_zero_point=3, lo=3, isa=isa)
            t = bb.emit_te(K.maxpool2d_nchwc, t, kernel=3, stride=2, padding=1)
            p2 = K.pack_channel_params(b2, m2, s2, mr2)
            t = bb.emit_te(K.conv2d_nchwc_requant, t, c(K.pack_conv_weight(w2, isa=isa)), *map(c, p2[:3]), t,
                           c(p2[3]), padding=1, input_zero_point=3, output_zero_point=0, residual_zero_point=3,
                           isa=isa)
            t = bb.emit_te(K.global_avgpool_nchwc_requant, t, *map(c, K.pack_channel_params(mg, sg, kinds="ms")),
                           output_zero_point=2)
            t = bb.emit_te(K.nchwc_flatten, t, channels=24)
            t = bb.emit_te(K.dense_requant, t, c(K.pack_dense_weight(wd, isa=isa)),
                           *map(c, K.pack_channel_params(bd, md, sd)), out_features=10, output_zero_point=1, isa=isa)
            out = bb.emit_output(t)
        bb.emit_func_output(out)
    mod = K.schedule_module(bb.get(), target)
    scheduled = [gv.name_hint for gv, f in mod.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs]
    assert len(scheduled) == 7
    ex = tvm.compile(mod, target)
    so = str(tmp_path / "net.so")
    ex.export_library(so)
    vm = relax.VirtualMachine(tvm.runtime.load_module(so), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    assert np.array_equal(got, ref)
    import subprocess

    dis = subprocess.run(["objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    n_vnni = dis.count("vpdpbusd")
    if isa == "vnni":
        assert n_vnni > 0
    else:
        assert n_vnni == 0
    assert "vpmaddubsw" not in dis


def _no_workspace_cases():
    """(name, TE function, arrays, mcpu, attrs) of one kernel of every x86 schedule family, each with parallel loops
    (num_cores=2); the values do not matter (compiled, never run). Sub-byte weights are left out: their unpacked
    copy (kilobytes) is allocated once per parallel task on purpose (``unpack_at="task"``), a few per call."""
    z = np.zeros
    x16 = z((1, 2, 14, 14, 16), np.uint8)
    w8 = z((32, 32, 3, 3), np.int8)
    params = K.pack_channel_params(z(32, np.int32), np.ones(32, np.int32), np.full(32, 40, np.int32))
    dw = K.pack_conv_weight(z((32, 1, 3, 3), np.int8), groups=32)
    dense = [z((2, 64), np.uint8), None, *params]
    conv = K.conv2d_nchwc_requant
    cases = [
        ("conv vpmaddwd", conv, [x16, K.pack_conv_weight(w8, isa="avx2"), *params], "haswell", dict(padding=1)),
        ("conv vpmaddubsw", conv, [x16, K.pack_conv_weight(w8, isa="vnni"), *params], "haswell",
         dict(padding=1, isa="vnni", ubsw_exact=True, shift_ge32=True)),
        ("conv int16 accumulator", conv, [x16, K.pack_conv_weight(w8, isa="vnni"), *params], "haswell",
         dict(padding=1, isa="vnni", ubsw_exact=True, i16_group=1)),
        ("depthwise int16", conv, [x16, dw, *params], "haswell", dict(padding=1, i16_group=1)),
        ("depthwise int32", conv, [x16, dw, *params], "haswell", dict(padding=1)),
        ("conv vpdpbusd zmm", conv, [x16, K.pack_conv_weight(w8), *params], "znver4", dict(padding=1)),
        ("conv vpdpbusd ymm", conv, [x16, K.pack_conv_weight(w8), *params], "alderlake", dict(padding=1)),
        ("depthwise taps", K.depthwise_taps_requant, [x16, K.pack_depthwise_taps(z((32, 1, 3, 3), np.int8)),
                                                     *params], "znver4", dict(kernel_width=3, padding=1)),
        ("dense vpmaddwd", K.dense_requant, [dense[0], K.pack_dense_weight(z((32, 64), np.int8), isa="avx2"),
                                             *params], "haswell", dict(out_features=32, isa="avx2")),
        ("dense vpdpbusd", K.dense_requant, [dense[0], K.pack_dense_weight(z((32, 64), np.int8)), *params],
         "znver4", dict(out_features=32)),
        ("avgpool", K.avgpool2d_nchwc_requant, [x16, *params[1:]], "haswell", dict(kernel=2, stride=2)),
        ("global avgpool", K.global_avgpool_nchwc_requant, [x16, *params[1:]], "haswell", {}),
        ("maxpool", K.maxpool2d_nchwc, [x16], "haswell", dict(kernel=3, stride=2, padding=1)),
    ]
    return [pytest.param(fn, arrays, mcpu, attrs, id=name) for name, fn, arrays, mcpu, attrs in cases]


@pytest.mark.parametrize("fn,arrays,mcpu,attrs", _no_workspace_cases())
def test_kernels_make_no_workspace_allocations(fn, arrays, mcpu, attrs):
    """Accumulator tiles and the dot-product intrinsics' temporaries live on the stack (LLVM keeps them in
    registers), never in TVMBackendAllocWorkspace memory allocated inside a parallel loop. TVM 0.27 lowers every "local"-scope buffer, and every named
    value inside a tensorized intrinsic body, to a workspace alloc/free pair at the top of the enclosing parallel-loop
    body: once per parallel iteration (~0.3 us each; 1x1 convs ran 1.3-1.9x slower for it, benchmarks/results/
    alloc_fix_ab.md). Compiled for each ISA here, run nowhere."""
    kern = K.build_standalone(fn, arrays, K.host_target(num_cores=2, mcpu=mcpu), **attrs)
    assert kern.parallel_workspace_allocations() == 0


# 1x1 convs whose real input channels end inside the last 16-channel block: the reduction runs over the real
# 4-channel steps only (kernels.ops CHUNKED_REDUCTION_ATTR); name: (n, c, h, w, o, s, residual, int4, extra)
PARTIAL_BLOCK_CASES = {
    "mbv2_24_to_144": (1, 24, 9, 9, 144, 1, False, False, {}),
    "40_to_32_res_batch2": (2, 40, 6, 7, 32, 1, True, False, dict(zr=200)),
    "8_to_16_one_block": (1, 8, 5, 5, 16, 1, False, False, dict(lo=3, hi=250, zo=90)),
    "20_to_24_s2": (1, 20, 11, 11, 24, 2, False, False, {}),
    "int4_24_to_48": (1, 24, 7, 7, 48, 1, False, True, dict(zx=0)),
    "4_to_32_one_step": (1, 4, 6, 6, 32, 1, False, False, {}),          # a reduction loop of extent 1
    "int4_40_to_32_unpack_per_step": (1, 40, 7, 7, 32, 1, True, True, dict(unpack_at="step")),
}
# (packing, schedule ISA, ubsw_exact): the int32 vpmaddubsw (W7A8 / int4 on AVX2), vpmaddwd (W8A8 on AVX2), VNNI
PARTIAL_BLOCK_KERNELS = [
    pytest.param("vnni", "avx2", True, id="ubsw", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")),
    pytest.param("avx2", "avx2", False, id="vpmaddwd",
                 marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")),
    pytest.param("vnni", "vnni", False, id="vnni",
                 marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU")),
]


@pytest.mark.parametrize("packing,isa,ubsw", PARTIAL_BLOCK_KERNELS)
@pytest.mark.parametrize("name", list(PARTIAL_BLOCK_CASES))
def test_partial_block_1x1_skips_padding_bit_exact(name, packing, isa, ubsw):
    """A 1x1 conv over 24 / 40 / 8 / 20 real channels of 32 / 48 / 16 / 32 blocked ones reduces over its real
    4-channel steps (the annotation says how many) and equals kernels.reference bit for bit."""
    n, c, h, w, o, s, res, int4, extra = PARTIAL_BLOCK_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    w_bits = 4 if (int4 or ubsw) else 8     # <= 4-bit weights: vpmaddubsw is proved exact
    extra = dict(extra)
    options = {"unpack_at": extra.pop("unpack_at")} if "unpack_at" in extra else None
    cs = _conv_case(rng, n, c, h, w, o, 1, s, 0, w_bits=w_bits, residual=res, int4=int4, **extra)
    zx = extra.get("zx", 3)
    xb = K.nchw_to_nchwc(cs["x"], 16, zx)
    wp = K.pack_conv_weight(cs["w"], 1, ic_block=16, isa=packing, int4=int4)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [xb, wp, *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, _target(isa), options=options, stride=s,
                              input_zero_point=zx,
                              output_zero_point=extra.get("zo", 5), lo=extra.get("lo", 0), hi=extra.get("hi", 255),
                              residual_zero_point=extra.get("zr", 7), isa=packing, ubsw_exact=ubsw, in_channels=c)
    from kernels.border import output_annotations

    assert int(output_annotations(kern.func)[K.ops.CHUNKED_REDUCTION_ATTR]) == -(-c // 4)
    got = K.nchwc_to_nchw(kern.run(*arrays), o)
    assert len(np.unique(cs["ref"])) > 16, "test data too degenerate"
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {cs['ref'].size}"


@pytest.mark.parametrize("in_channels", [33, 16, 8, 0])
def test_in_channels_that_do_not_fit_the_blocks_are_refused(in_channels):
    """More channels than the blocks hold, or so few that a whole block would go unread (a caller's mistake that
    would drop real channels silently), raise ValueError naming the value."""
    x = tvm.te.placeholder((1, 2, 4, 4, 16), "uint8")
    wp = tvm.te.placeholder((2, 2, 1, 1, 4, 16, 4), "int8")
    consts = [tvm.te.placeholder((32,), "int32") for _ in range(3)]
    with pytest.raises(ValueError, match=f"in_channels={in_channels} does not fit the input's 2 blocks of 16 channels"):
        K.conv2d_nchwc_requant(x, wp, *consts, in_channels=in_channels)


@pytest.mark.parametrize("n,int4,cores,zx", [(1, False, 2, 0), (2, False, 1, 3), (1, True, 2, 0), (3, True, 2, 3)])
def test_weight_prefetch_bit_exact(n, int4, cores, zx):
    """AVX-512 VNNI convs whose tile spans the output row prefetch the next output-block group's weights
    (kernels/prefetch.py; int4 weights unpacked per task: the packed ones): prefetcht0 in the kernel, the task loop
    marked, and the reference's integers (batch 1-3, one or two threads, zero border skipped or not). Compiled for a
    VNNI CPU everywhere, run where the host has AVX-512 VNNI."""
    from kernels.border import output_annotations
    from kernels.prefetch import PREFETCH_ATTR, TASK_LOOP_ATTR

    rng = np.random.default_rng(60 + n + 2 * int4 + cores + zx)
    c, hw, o = 64, 7, 96
    cs = _conv_case(rng, n, c, hw, hw, o, 3, 1, 1, int4=int4, zx=zx, zo=9, residual=True, zr=0)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_conv_weight(cs["w"], 1, 16, int4=int4), *params[:3],
              K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    target = K.host_target(num_cores=cores, mcpu=None if HAS_VNNI else "znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, padding=1, input_zero_point=zx,
                              output_zero_point=9, residual_zero_point=0, in_channels=c)
    tasks_per_group, groups, group_bytes = (int(v) for v in output_annotations(kern.func)[PREFETCH_ATTR])
    tile = K.schedule.choose_conv_tile(n, o // 16, hw, hw) if not int4 else None
    assert groups * group_bytes == arrays[1].nbytes and (int4 or tasks_per_group == hw // tile.R)
    assert TASK_LOOP_ATTR in kern.func.script() and kern.count_instructions("prefetcht0") > 0
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), o), cs["ref"])


def test_weight_prefetch_only_where_measured():
    """No prefetch where it was measured to hurt: a tile narrower than the output row (runtime border tests: LLVM
    then spilled the accumulators) and AVX2 builds."""
    rng = np.random.default_rng(7)
    cs = _conv_case(rng, 1, 32, 28, 28, 32, 3, 1, 1, zx=0)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])
    x = K.nchw_to_nchwc(cs["x"], 16, 0)
    narrow = K.build_standalone(K.conv2d_nchwc_requant, [x, K.pack_conv_weight(cs["w"]), *params],
                                K.host_target(2, "znver4"), options={"tile": K.ConvTile(7, 2)}, padding=1,
                                input_zero_point=0, output_zero_point=5)
    avx2 = K.build_standalone(K.conv2d_nchwc_requant, [x, K.pack_conv_weight(cs["w"], isa="avx2"), *params],
                              K.host_target(2, "znver3"), padding=1, input_zero_point=0, output_zero_point=5,
                              isa="avx2")
    for kern in (narrow, avx2):
        assert "weight_prefetch" not in kern.func.script() and kern.count_instructions("prefetcht0") == 0


# one-output-pixel convs (squeeze-excitation 1x1 convs, 1x1 classifiers at batch 1), (n, c, o, int4, residual):
# the serial rule (kernels.schedule.runs_serial: under 16 K multiply-adds, or under 128 K with under 16 K weights)
# and default_unpack_at ("step" with the int8 tiles where n * oh * ow == 1, else "task")
ONE_PIXEL_CASES = {
    "se_squeeze_int4_serial": (1, 96, 16, True, False),     # 96 x 16 = 1.5 K MACs: serial, step
    "se_expand_int4_res": (1, 240, 240, True, True),        # 57.6 K: parallel, step, 15 blocks -> Q = 3
    "se_int8_serial": (1, 64, 32, False, False),            # 2 K: serial, no unpack
    "int4_batch2_task": (2, 240, 240, True, False),         # 2 pixels, 115 K, 57.6 K weights: parallel, per task
    "batch3_int8_small_weights": (3, 96, 96, False, False),  # 27.6 K, 9.2 K weights: serial
}


@pytest.mark.parametrize("macs, pixels, serial", [
    (15_000, 1, True), (57_600, 1, False),              # one pixel: the weights stream, parallel from 16 K
    (24_576, 49, True), (100_352, 49, True),            # 1x1/2 16 -> 32, 32 -> 64 at 14x14 (28x28 ResNet, batch 1)
    (110_592, 49, True), (131_071, 8, True),            # 1x1 96 -> 24 at 7x7; weights 16383 x 8
    (131_072, 49, False), (301_056, 196, False),        # from 128 K: parallel
    (122_880, 4, False),                                # 30 K weights: they stream, parallel
])
def test_runs_serial_rule(macs, pixels, serial):
    """Conv / dense kernels under 16 K multiply-adds, or under 128 K with under 16 K weights (multiply-adds per output
    pixel), run on the calling thread (standalone on the Zen 4 such kernels ran 0.37-0.69x their parallel time)."""
    assert K.schedule.runs_serial(macs, pixels) is serial


@pytest.mark.parametrize("name", list(ONE_PIXEL_CASES))
def test_one_pixel_convs_serial_and_step_unpack_bit_exact(name):
    """Tiny convs run on the calling thread (no parallel loop), larger ones in parallel; int4 convs with one output
    pixel unpack each weight vector inside the reduction with the int8 register tile (the schedule equals the one
    built with those options given explicitly), others once per task; all equal kernels.reference bit for bit."""
    n, c, o, int4, res = ONE_PIXEL_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    cs = _conv_case(rng, n, c, 1, 1, o, 1, 1, 0, int4=int4, residual=res, zx=0, zo=4, zr=3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, 0), K.pack_conv_weight(cs["w"], 1, 16, int4=int4), *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    target = K.host_target(num_cores=2, mcpu=None if HAS_VNNI else "znver4")
    attrs = dict(input_zero_point=0, output_zero_point=4, residual_zero_point=3, in_channels=c)
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, **attrs)
    script = kern.func.script()
    serial = K.schedule.runs_serial(n * c * o, n)
    assert ("T.parallel" in script) != serial, name
    assert serial == name.endswith(("_serial", "_small_weights")), name
    if int4:
        unpack_at = K.schedule.default_unpack_at(n, o // 16, 1, 1, "vnni")
        assert unpack_at == ("step" if n == 1 else "task")
        threads = 1 if serial else 2
        tile = (K.schedule.choose_conv_tile(n, o // 16, 1, 1, threads=threads) if unpack_at == "step"
                else K.schedule.balanced_task_tile(n, o // 16, 1, 1, threads=threads))
        explicit = K.build_standalone(K.conv2d_nchwc_requant, arrays, target,
                                      options={"unpack_at": unpack_at, "tile": tile}, **attrs)
        assert explicit.func.script() == script
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), o), cs["ref"])


@pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this CPU: the one-pixel schedules are run, not only built")
def test_small_convs_random_shapes_bit_exact():
    """Hypothesis draws (seeded, derandomized) around the one-pixel and serial rules: batch 1-3, 1-300 input and
    1-300 output channels (partial blocks included), 1x1 or 2x2 maps, int8 or int4 weights, with or without a
    residual; each kernel equals kernels.reference bit for bit and is parallel exactly when it has 16 K multiply-adds
    or more and, under 128 K, 16 K weights (multiply-adds per output pixel) or more."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.integers(1, 3), st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 2]),
                      st.booleans(), st.booleans())
    def check(n, c, o, hw, int4, res):
        rng = np.random.default_rng(n * 100003 + c * 307 + o * 7 + hw)
        cs = _conv_case(rng, n, c, hw, hw, o, 1, 1, 0, int4=int4, residual=res, zx=0, zo=6, zr=2, extremes=o > 1)
        params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
        arrays = [K.nchw_to_nchwc(cs["x"], 16, 0), K.pack_conv_weight(cs["w"], 1, 16, int4=int4), *params[:3]]
        if res:
            arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
        kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, K.host_target(num_cores=2),
                                  input_zero_point=0, output_zero_point=6, residual_zero_point=2, in_channels=c)
        (_, cb, _, _, _), ob = arrays[0].shape, -(-o // 16)
        reduction = -(-c // 4) * 4 if c <= 16 * cb - 4 else 16 * cb      # the real 4-channel steps (partial blocks)
        macs, pixels = n * hw * hw * ob * 16 * reduction, n * hw * hw
        parallel = macs >= 1 << 14 and (macs >= 1 << 17 or macs >= (1 << 14) * pixels)
        assert ("T.parallel" in kern.func.script()) == parallel, (n, c, o, hw)
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), o), cs["ref"]), (n, c, o, hw, int4, res)

    check()


@pytest.mark.parametrize("tasks_per_group,iterations,group_lines", [(7, 32, 2304), (1, 224, 1152), (14, 16, 72),
                                                                    (3, 5, 1), (2, 8, 17)])
def test_prefetch_lines_cover_the_next_group_once(tasks_per_group, iterations, group_lines):
    """The prefetches of one group's tasks reach every line of the next group's slice, and none beyond it."""
    from kernels.prefetch import per_iteration_lines, prefetch_line

    k = per_iteration_lines(group_lines, tasks_per_group, iterations)
    lines = [prefetch_line(p, i, j, iterations, k, group_lines)
             for p in range(tasks_per_group) for i in range(iterations) for j in range(k)]
    assert set(lines) == set(range(group_lines))
    assert k * tasks_per_group * iterations < group_lines + tasks_per_group * iterations     # no whole spare round


def test_prefetch_pass_refuses_a_kernel_without_its_structure():
    """A kernel marked for prefetching whose loops do not have the expected form raises (instead of silently
    losing the prefetch)."""
    from kernels.prefetch import PREFETCH_ATTR, prefetch_next_weights

    rng = np.random.default_rng(8)
    cs = _conv_case(rng, 1, 16, 7, 7, 16, 3, 1, 1)
    arrays = [K.nchw_to_nchwc(cs["x"]), K.pack_conv_weight(cs["w"]),
              *K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])]
    unscheduled = K.build_standalone(K.conv2d_nchwc_requant, arrays, K.host_target(2, "znver4"), schedule=False,
                                     padding=1, input_zero_point=3, output_zero_point=5)
    with pytest.raises(ValueError, match="0 blocks acc_update_o"):
        prefetch_next_weights(unscheduled.func, {PREFETCH_ATTR: [7, 1, 9216]})
    narrow = K.build_standalone(K.conv2d_nchwc_requant, arrays, K.host_target(2, "znver4"),
                                options={"tile": K.ConvTile(1, 1)}, padding=1, input_zero_point=3, output_zero_point=5)
    with pytest.raises(ValueError, match="no task loop \\(conv_task_loop\\)"):
        prefetch_next_weights(narrow.func, {PREFETCH_ATTR: [7, 1, 9216]})


@pytest.mark.parametrize("isa", ["vnni", "ubsw"])
def test_read_through_with_unequal_padding_and_sizes(isa):
    """The in-place input read shifts rows by pad_h and columns by pad_w: a 3x5 kernel with padding (1, 2) on a 7x11
    input (9x5 for AVX2, whose border skip needs a whole-row tile of <= 7 pixels; a swap of the two paddings would
    read the wrong pixels), on the AVX-512 VNNI kernel and on the AVX2 vpmaddubsw one (int4 weights), both without
    the padded copy and equal to the reference where the host runs them."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (1, 32, 7, 11) if isa == "vnni" else (1, 32, 9, 5), dtype=np.uint8)
    lo_w, hi_w = K.layout.WEIGHT_RANGES[8 if isa == "vnni" else 4]
    w = rng.integers(lo_w, hi_w + 1, (32, 32, 3, 5), dtype=np.int8)
    bias = rng.integers(-(1 << 12), 1 << 12, 32).astype(np.int32)
    m, sh = _requant_params(rng, R.conv_acc(x, w, bias, 1, (1, 2)), 32)
    ref = R.conv2d_requant(x, w, bias, m, sh, padding=(1, 2), output_zero_point=5)
    layout = "vnni"
    packed = K.pack_conv_weight(w, 1, 16, isa=layout, int4=isa != "vnni")
    arrays = [K.nchw_to_nchwc(x, 16, 0), packed, *K.pack_channel_params(bias, m, sh)]
    target = (HOST if HAS_VNNI else K.host_target(2, "znver4")) if isa == "vnni" else AVX2_TARGET
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, padding=(1, 2), input_zero_point=0,
                              output_zero_point=5, isa=layout, ubsw_exact=isa != "vnni")
    assert 'sblock("pad")' not in kern.func.script()
    if (HAS_VNNI if isa == "vnni" else HAS_AVX2):
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), ref)


def test_weight_prefetch_of_a_slice_smaller_than_a_line():
    """A group whose packed weights are smaller than a cache line (1x1 conv over 4 channels, int4: 32 bytes per
    output block) gets one prefetch per iteration and builds (it raised "A SeqStmt of length 1 is prohibited" in
    whole-network W2A2 builds before)."""
    rng = np.random.default_rng(12)
    cs = _conv_case(rng, 1, 4, 7, 7, 32, 1, 1, 0, int4=True)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])
    arrays = [K.nchw_to_nchwc(cs["x"], 4, 3), K.pack_conv_weight(cs["w"], 1, 4, int4=True), *params]
    assert arrays[1].nbytes // 2 < 64
    target = HOST if HAS_VNNI else K.host_target(2, "znver4")
    kern = K.build_standalone(K.conv2d_nchwc_requant, arrays, target, input_zero_point=3, output_zero_point=5)
    assert kern.count_instructions("prefetcht0") > 0
    if HAS_VNNI:
        assert np.array_equal(K.nchwc_to_nchw(kern.run(*arrays), 32), cs["ref"])
