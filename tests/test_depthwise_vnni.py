"""The explicit-vector depthwise kernel (kernels/depthwise_vnni.py): bit-exact against the numpy integer contract
(kernels.reference) on the depthwise tap cases plus MobileNet shapes, every shift >= 32 (its int32-clamp epilogue).

Runs where the CPU has AVX-512 VNNI (and VBMI for vpermb); elsewhere the kernel is compiled for an Ice Lake server
target and disassembled, the run skipped with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels.depthwise_vnni import depthwise_vnni_out_shape, depthwise_vnni_primfunc  # noqa: E402
from test_kernels_x86 import (DEPTHWISE_TAPS_CASES, HAS_VNNI, HOST, _conv_case, _conv_lifted_bounds,  # noqa: E402
                              lifted_caps, lifted_form)

ICX = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
CASES = {**DEPTHWISE_TAPS_CASES,
         # name: (n, c, h, w, k, s, p, dh, residual, extra) -- MobileNetV2 shapes (scaled down), batch 2, odd widths
         "mbv2_3x3_s1_batch2": (2, 96, 14, 14, 3, 1, 1, 1, False, {}),
         "mbv2_3x3_s2_odd": (1, 144, 15, 15, 3, 2, 1, 1, False, dict(zo=0)),
         "3x3_w11_groups_clamped": (1, 16, 9, 11, 3, 1, 1, 1, True, {}),     # 11 columns: 8-pixel groups, clamped
         "3x3_one_column": (1, 16, 5, 1, 3, 1, 1, 1, False, {}),
         # 4-bit outputs narrowed four pixels at a time: 28 columns = 3 groups of 8 + one of 4 (residual), 7 = 4 + 3
         "3x3_w28_4bit_residual": (1, 32, 6, 28, 3, 1, 1, 1, True, dict(lo=0, hi=15, zo=2)),
         "3x3_w7_batch2_4bit_lo3": (2, 16, 7, 7, 3, 1, 1, 1, False, dict(lo=3, hi=15, zo=3))}


def _case(name, threads=5, epilogue="int32"):
    n, c, h, w, k, s, p, dh, res, extra = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    lifted = epilogue.startswith("lifted")
    cs = _conv_case(rng, n, c, h, w, c, k, s, p, (dh, 1), c, res, min_shift=32 if epilogue == "int32" else
                    24 if lifted else 1, max_shift=lifted_caps(epilogue, c) if lifted else 62, **extra)
    if lifted:      # the case needs it: shifts below 32, the builder's proof holds and picks this form
        assert cs["sh"].min() < 32 and K.lifted_epilogue_exact(cs["sh"], *_conv_lifted_bounds(cs, extra.get("zr", 7)))
        assert lifted_form(cs["sh"]) == epilogue
    zx = extra.get("zx", 3)
    params = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"], cs["mr"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, zx), K.pack_depthwise_taps(cs["w"]), *params[:3]]
    if res:
        arrays += [K.nchw_to_nchwc(cs["r"], 16, 0), params[3]]
    func = depthwise_vnni_primfunc("main", arrays[0].shape, arrays[1].shape, k, (s, s), (p, p), dh, zx,
                                   extra.get("zo", 5), extra.get("lo", 0), extra.get("hi", 255), extra.get("zr", 7),
                                   res, threads=threads,      # 5: row bands with short last bands
                                   epilogue=epilogue)
    return cs, arrays, func, (k, s, p, dh)


# shifts from 1 (shift 1 and 62 on edge channels): the int64 epilogue of vector_tir.paired_requant16; from 24: its
# lifted int32 forms (the accumulator and the rounding constants shifted left by 32 - shift, proved exact): shifts
# capped at 26..35 per channel (multipliers scaled down alike) with a right shift, at 26..32 without one
ANY_SHIFT = ["3x3_s2_odd_res", "5x5_batch2_clamp", "mbv2_3x3_s2_odd", "3x3_w28_4bit_residual"]


@pytest.mark.parametrize("name,threads,epilogue", [(name, 5, "int32") for name in CASES]
                         + [("mbv2_3x3_s2_odd", 1, "int32"), ("3x3_w11_groups_clamped", 2, "int32")]
                         + [(name, 3, form) for name in ANY_SHIFT for form in ("int64", "lifted+shift", "lifted")])
def test_depthwise_vnni_bit_exact(name, threads, epilogue, tmp_path):
    """Every case equals kernels.reference bit for bit: strides, vertical dilation, 5x5 / 7x7 kernels (two tap
    groups), residual, clamp (4-bit ones too), zero point 0, widths that end in groups of 8, 4 and 1-3 pixels, a
    one-column image; row bands for 1, 2 and 5 threads; shifts from 1 to 62 (the int64 and lifted epilogues) on
    some."""
    cs, arrays, func, (k, s, p, dh) = _case(name, threads, epilogue)
    c = cs["x"].shape[1]
    if not HAS_VNNI:
        from ptq2tvm.bench.disasm import count_instructions

        so = tmp_path / "k.so"
        tvm.compile(tvm.IRModule({"main": func}), target=ICX).export_library(str(so))
        n = count_instructions(so, ("vpdpbusd", "vpermb", "vpermt2b", "vpermi2b", "vpmuldq"))
        # the VBMI byte permute to channel-major: vpermb, or (a one-column image: the 4-pixel load reaches past
        # the padded row) LLVM's two-source vpermt2b / vpermi2b
        permutes = n["vpermb"] + n["vpermt2b"] + n["vpermi2b"]
        assert n["vpdpbusd"] > 0 and permutes > 0 and n["vpmuldq"] > 0, n
        pytest.skip("no AVX-512 VNNI on this CPU: compiled only")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    out_shape = depthwise_vnni_out_shape(arrays[0].shape, (k, k), (s, s), (p, p), dh)
    got = K.nchwc_to_nchw(K.StandaloneKernel(lib, out_shape, "uint8", func).run(*arrays), c)
    assert got.shape == cs["ref"].shape
    lo, hi = CASES[name][-1].get("lo", 0), CASES[name][-1].get("hi", 255)
    values = np.unique(cs["ref"])      # not degenerate: more than 16 values, or every value of a 4-bit clamp
    assert len(values) > 16 or (values.min(), values.max(), len(values)) == (lo, hi, hi - lo + 1), values
    assert int((got != cs["ref"]).sum()) == 0, f"{int((got != cs['ref']).sum())} mismatches of {cs['ref'].size}"


def test_depthwise_vnni_rejects_bad_weight():
    """A weight that does not match the input or the kernel width is a ValueError naming both shapes; so are a stride
    or dilation below 1 and negative padding (found by a fuzzing helper: stride 0 was a ZeroDivisionError, dilation 0
    and padding -1 built)."""
    for stride, pad, dil in [((0, 1), (1, 1), 1), ((1, 1), (1, 1), 0), ((1, 1), (-1, 0), 1)]:
        with pytest.raises(ValueError, match="strides >= 1, dilation >= 1 and padding >= 0"):
            depthwise_vnni_primfunc("f", (1, 2, 8, 8, 16), (2, 3, 1, 16, 4), 3, stride, pad, dil, 0, 0, 0, 255, 0,
                                    False)
    with pytest.raises(ValueError, match="does not match input"):
        depthwise_vnni_primfunc("f", (1, 2, 8, 8, 16), (1, 3, 1, 16, 4), 3, (1, 1), (1, 1), 1, 0, 0, 0, 255, 0, False)
    with pytest.raises(ValueError, match="kernel width 5"):
        depthwise_vnni_primfunc("f", (1, 2, 8, 8, 16), (2, 3, 1, 16, 4), 5, (1, 1), (1, 1), 1, 0, 0, 0, 255, 0, False)


@pytest.mark.parametrize("name,parallel", [("3x3_w11_groups_clamped", False), ("3x3_one_column", False),
                                           ("mbv2_3x3_s1_batch2", True), ("mbv2_3x3_s2_odd", True)])
def test_small_depthwise_runs_on_the_calling_thread(name, parallel):
    """A depthwise kernel of fewer than kernels.vector_tir.SERIAL_OUTPUTS (8 K) output elements runs its tasks in a
    serial loop (a parallel loop's start cost more than such a kernel's work: 0.61-0.72x the time at 3-4 K outputs on
    the Zen 4), a larger one in parallel; test_depthwise_vnni_bit_exact runs both kinds."""
    from kernels.vector_tir import SERIAL_OUTPUTS

    cs, arrays, func, (k, s, p, dh) = _case(name)
    outputs = int(np.prod(depthwise_vnni_out_shape(arrays[0].shape, (k, k), (s, s), (p, p), dh)))
    assert (outputs >= SERIAL_OUTPUTS) == parallel, outputs
    assert ("T.parallel" in func.script()) == parallel
