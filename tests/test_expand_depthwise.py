"""The fused inverted-residual kernel (kernels/expand_depthwise.py): 1x1 expand + requant + depthwise + requant in one
kernel, bit-exact against the numpy integer contract (kernels.reference) of the two convs one after the other.

Runs where the CPU has AVX-512 VNNI; elsewhere compiled for an Ice Lake server target, the run skipped with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels.depthwise_vnni import depthwise_vnni_out_shape  # noqa: E402
from kernels.expand_depthwise import expand_depthwise_primfunc  # noqa: E402
from ptq2tvm.fold.bounds import accumulator_range  # noqa: E402
from test_kernels_x86 import HAS_VNNI, HOST, _cap_shifts, _requant_params, lifted_caps, lifted_form  # noqa: E402

ICX = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
# name: (n, cin, mid, h, w, k, s, p, residual, threads, extra)
CASES = {
    "mbv2_features2_like": (1, 16, 96, 12, 12, 3, 2, 1, False, 2, {}),
    "mbv2_s1_residual_batch2": (2, 24, 144, 10, 10, 3, 1, 1, True, 5, {}),
    "odd_sizes_5x5": (1, 20, 40, 9, 13, 5, 1, 2, False, 3, dict(z_mid=7)),
    "relu6_clamp_s2_odd": (3, 32, 48, 11, 11, 3, 2, 1, False, 1, dict(mid_lo=3, mid_hi=200)),
    "one_column": (1, 16, 48, 24, 1, 3, 1, 1, False, 2, {}),
    "int4_expand": (2, 16, 64, 14, 14, 3, 2, 1, False, 2, dict(int4=True)),
    "int4_expand_two_blocks_res": (1, 32, 48, 9, 9, 3, 1, 1, True, 3, dict(int4=True)),
    # W4A4: a [0, 15] mid clamp narrowed four pixels at a time; 14 columns = 8 + 4 + 2
    "w4a4_mid_clamp_w14": (2, 16, 32, 6, 14, 3, 1, 1, True, 2, dict(int4=True, z_mid=1, mid_hi=15)),
    # shifts from 1 (edge channels 1 and 62) in both stages: the int64 epilogue
    "any_shift_res": (1, 16, 48, 8, 12, 3, 1, 1, True, 3, dict(min_shift=1, z_mid=4)),
    "any_shift_int4_s2": (2, 16, 32, 9, 9, 3, 2, 1, False, 2, dict(min_shift=1, int4=True, mid_hi=15)),
    # shifts from 24 in the lifted int32 forms (accumulator and rounding constants shifted left by 32 - shift
    # first; proved exact for the case): per-channel caps of 26..32 (no right shift) or 26..35 per stage
    "lifted_res": (1, 16, 48, 8, 12, 3, 1, 1, True, 3, dict(min_shift=24, z_mid=4, epilogue="lifted",
                                                           forms=("lifted", "lifted+shift"))),
    "lifted_int4_s2": (2, 16, 32, 9, 9, 3, 2, 1, False, 2, dict(min_shift=24, int4=True, mid_hi=15,
                                                                 epilogue="lifted", forms=("lifted", "lifted"))),
}


def _case(name):
    n, cin, mid, h, w, k, s, p, res, threads, extra = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    z_mid, mid_lo, mid_hi = extra.get("z_mid", 0), extra.get("mid_lo", 0), extra.get("mid_hi", 255)
    x = rng.integers(0, 256, (n, cin, h, w), dtype=np.uint8)
    int4 = extra.get("int4", False)
    w1 = rng.integers(-8, 8, (mid, cin, 1, 1), dtype=np.int8) if int4 else \
        rng.integers(-128, 128, (mid, cin, 1, 1), dtype=np.int8)
    b1 = rng.integers(-(1 << 14), 1 << 14, mid).astype(np.int32)
    m1, s1 = _requant_params(rng, R.conv_acc(x, w1, b1), mid)
    min_shift = extra.get("min_shift", 32)       # below 32: the int64 epilogue (vector_tir.paired_requant16)
    s1 = np.maximum(s1, min_shift).astype(np.int32)
    caps = [lifted_caps(f, mid, 1) for f in extra["forms"]] if "forms" in extra else (62, 62)
    m1, s1 = _cap_shifts(m1, s1, caps[0])
    y = R.conv2d_requant(x, w1, b1, m1, s1, output_zero_point=z_mid, lo=mid_lo, hi=mid_hi)
    w2 = rng.integers(-128, 128, (mid, 1, k, k), dtype=np.int8)
    b2 = rng.integers(-(1 << 14), 1 << 14, mid).astype(np.int32)
    m2, s2 = _requant_params(rng, R.conv_acc(y, w2, b2, s, p, 1, mid, z_mid), mid)
    s2 = np.maximum(s2, min_shift).astype(np.int32)
    m2, s2 = _cap_shifts(m2, s2, caps[1])
    oh, ow = R.conv_acc(y, w2, b2, s, p, 1, mid, z_mid).shape[2:]
    r = rng.integers(0, 256, (n, mid, oh, ow), dtype=np.uint8) if res else None
    mr = (np.minimum(np.exp2(s2.astype(np.float64)) / 600.0, 2 ** 31 - 1)).astype(np.int64).astype(np.int32)
    ref = R.conv2d_requant(y, w2, b2, m2, s2, r, mr if res else None, stride=s, padding=p, groups=mid,
                           input_zero_point=z_mid, output_zero_point=5, lo=0, hi=255, residual_zero_point=7)
    p1, p2 = K.pack_channel_params(b1, m1, s1), K.pack_channel_params(b2, m2, s2, mr)
    w1p = K.pack_conv_weight(w1, groups=1, ic_block=16, isa="vnni", int4=int4)
    w2p = K.pack_depthwise_taps(w2)
    xb = K.nchw_to_nchwc(x, 16, 0)
    arrays = [xb, w1p, *p1[:3], w2p, *p2[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(r, 16, 0), p2[3]]
    lifted = extra.get("epilogue") == "lifted"
    forms = tuple("int32" if int(sh.min()) >= 32 else lifted_form(sh) if lifted else "int64" for sh in (s1, s2))
    if lifted:      # the case needs it: shifts below 32, and the builder's proof holds
        lo1, hi1 = accumulator_range(w1, np.zeros_like(b1), 255)
        lo2, hi2 = accumulator_range(w2, np.zeros_like(b2), mid_hi)
        assert forms == extra["forms"], forms
        assert K.lifted_epilogue_exact(s1, [(np.maximum(-lo1, hi1), m1)],
                                       [abs(int(b)) * int(m) for b, m in zip(b1, m1)])
        assert K.lifted_epilogue_exact(s2, [(np.maximum(-lo2, hi2), m2), (255, mr)],
                                       [abs(int(b)) * int(m) + 7 * int(r) for b, m, r in zip(b2, m2, mr)])
    func = expand_depthwise_primfunc("main", xb.shape, w1p.shape, w2p.shape, k, (s, s), (p, p), 1, z_mid, mid_lo,
                                     mid_hi, 5, 0, 255, 7, res, threads=threads, int4=int4, epilogue=forms)
    out_shape = depthwise_vnni_out_shape((n, w1p.shape[0], h, w, 16), (k, k), (s, s), (p, p))
    return ref, y, arrays, func, out_shape, mid


@pytest.mark.parametrize("name", list(CASES))
def test_expand_depthwise_bit_exact(name, tmp_path):
    """Fused 1x1 + depthwise equals the two reference convs: stride 1 / 2, 3x3 / 5x5, partial channel blocks (20 and
    40 channels), residual, a mid clamp (a 4-bit one too) and zero point, batch 1-3, row bands for 1-5 threads,
    widths ending in groups of 8, 4 and 1-3 pixels, a one-column image; int4 expand weights (two per byte, unpacked
    per iteration)."""
    ref, mid, arrays, func, out_shape, c = _case(name)
    mid_hi = CASES[name][-1].get("mid_hi", 255)     # a 4-bit mid clamp has at most 16 values: most of them
    assert len(np.unique(mid)) > min(16, mid_hi // 2) and len(np.unique(ref)) > 16, "test data too degenerate"
    if not HAS_VNNI:
        so = tmp_path / "k.so"
        tvm.compile(tvm.IRModule({"main": func}), target=ICX).export_library(str(so))
        pytest.skip("no AVX-512 VNNI on this CPU: compiled only")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    got = K.nchwc_to_nchw(K.StandaloneKernel(lib, out_shape, "uint8", func).run(*arrays), c)
    assert int((got != ref).sum()) == 0, f"{int((got != ref).sum())} mismatches of {ref.size}"
