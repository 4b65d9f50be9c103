"""AMX-INT8 conv kernels (kernels/amx.py): bit-exact against the numpy integer contract, their dispatch inside a
network build, the per-process tile-state request and the refusal of AMX builds on hosts without AMX.

Kernels and networks *run* only where this CPU has AMX-INT8 (amx_int8 + amx_tile in /proc/cpuinfo); everywhere else
they are compiled for a Sapphire Rapids target and disassembled (tdpbusd, ldtilecfg), and the run is skipped with
that reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402

from ptq2tvm.backend.isa import host_isa  # noqa: E402

HAS_AMX = host_isa() == "amx"     # kernels and networks run only then; elsewhere they are built, the run skipped
SPR_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
SPR = tvm.target.Target(SPR_TARGET)

# name: (n, c, h, w, o, k, s, p, residual, extra); every case runs both schemes where it can: "taps" (ic_block 16,
# stride 1, KW <= 4) and "c64" (ic_block 64, the pad stage regroups the input)
AMX_CASES = {
    "3x3_12x12": (1, 32, 12, 12, 32, 3, 1, 1, False, {}),
    "3x3_7x7_wide": (1, 64, 7, 7, 64, 3, 1, 1, False, {}),            # 4 M tiles over the flattened padded rows
    "3x3_tiny_3x3": (1, 32, 3, 3, 32, 3, 1, 1, False, {}),              # fewer than 16 rows: one short tile
    "3x3_batch2_res_odd_ob": (2, 16, 9, 9, 48, 3, 1, 1, True, {}),      # 3 output blocks: one N tile
    "3x3_clamp": (1, 16, 10, 13, 32, 3, 1, 1, False, dict(lo=10, hi=200, zo=100)),
    "2x2_pad0": (1, 32, 20, 17, 48, 2, 1, 0, False, {}),
    "4x4_pad2": (1, 16, 11, 11, 32, 4, 1, 2, False, {}),                # KW = 4: a full 64-byte tile row (taps)
    "1x1": (1, 48, 9, 9, 48, 1, 1, 0, False, {}),
    "1x1_144ch": (1, 144, 10, 10, 32, 1, 1, 0, True, {}),               # 3 64-channel blocks, the last one part
    "1x1_clamp_4rows": (2, 32, 6, 6, 48, 1, 1, 0, True, dict(lo=10, hi=200, zo=100)),   # four rows at a time
    "3x3_zx0": (1, 32, 14, 14, 32, 3, 1, 1, True, dict(zx=0)),
    "3x3_s2_odd": (1, 80, 13, 13, 32, 3, 2, 1, False, {}),              # per-row tiles of 7 pixels, odd tile count
    "3x3_s2_wide_res": (2, 96, 11, 40, 48, 3, 2, 1, True, {}),          # 20 output columns: 2 tiles per row, clamped
    "1x1_s2": (1, 64, 14, 14, 64, 1, 2, 0, False, {}),
    "1x1_s2_odd_part_res": (2, 80, 13, 11, 32, 1, 2, 0, True, {}),      # subsampled copy: 7x6, half a 64-block
    "1x1_s3": (1, 128, 10, 10, 32, 1, 3, 0, False, {}),
    "5x5_s1": (1, 144, 10, 10, 32, 5, 1, 2, False, {}),                 # KW 5: c64 only
    "7x7_s2": (1, 16, 23, 23, 32, 7, 2, 3, False, dict(zx=128)),
    "3x3_batch3_weight_heavy_res": (3, 128, 5, 5, 96, 3, 1, 1, True, {}),   # images inside output blocks (c64)
    "3x3_s2_batch2_weight_heavy": (2, 256, 7, 7, 64, 3, 2, 1, False, {}),
    "3x3_b1_weights_over_2mib": (1, 512, 5, 5, 512, 3, 1, 1, True, {}),  # one image, output-block pair order
    "3x3_b1_odd_ob_res": (1, 16, 9, 9, 48, 3, 1, 1, True, {}),          # one image, pixel order, one N tile
    "3x3_b1_64kib_input": (1, 64, 32, 32, 32, 3, 1, 1, True, {}),       # int4: pixel order, weight unpacked whole
    "1x1_batch4_pair_ranges": (4, 32, 8, 8, 320, 1, 1, 0, True, {}),    # int4: 10 pairs in 5 ranges x 2 image ranges
}


def _schemes(name):
    _, _, _, _, _, k, s, _, _, _ = AMX_CASES[name]
    return (["taps"] if s == 1 and k <= 4 else []) + ["c64"]


PARAMS = [(name, scheme) for name in AMX_CASES for scheme in _schemes(name)]


# int4 weights (two per byte, unpacked per output-block pair and chunk): both schemes, odd output-block counts,
# batches whose tasks cross chunk and pair boundaries, strides, residual
INT4_CASES = ["3x3_12x12", "3x3_batch2_res_odd_ob", "1x1_144ch", "3x3_s2_wide_res", "5x5_s1",
              "3x3_batch3_weight_heavy_res", "3x3_s2_batch2_weight_heavy", "3x3_7x7_wide", "3x3_b1_weights_over_2mib",
              "3x3_b1_odd_ob_res", "3x3_b1_64kib_input", "1x1_batch4_pair_ranges"]
PARAMS += [(name, scheme + "+int4") for name in INT4_CASES for scheme in _schemes(name)]
# the int32-clamp epilogue (every shift >= 32; int64 products formed in place from the accumulators' lane pairs):
# residual and not, clamp, odd output-block counts, int4; its lifted forms (shifts from 28: the accumulator and the
# rounding constants shifted left by 32 - shift first, proved exact for the case) on some
GE32_CASES = ["3x3_12x12", "3x3_batch2_res_odd_ob", "3x3_b1_odd_ob_res", "1x1_clamp_4rows", "3x3_s2_odd", "3x3_clamp", "1x1_144ch", "3x3_s2_wide_res", "3x3_zx0"]
PARAMS += [(name, scheme + "+ge32") for name in GE32_CASES for scheme in _schemes(name)]
PARAMS += [("3x3_batch3_weight_heavy_res", "c64+int4+ge32"), ("1x1_batch4_pair_ranges", "taps+int4+ge32"),
           ("3x3_batch2_res_odd_ob", "taps+int4+ge32")]
# shifts 26..35 (multipliers scaled down alike): the lifted form with a right shift; 26..32: without one
PARAMS += [(name, scheme + "+lifted") for name in ("3x3_batch2_res_odd_ob", "3x3_s2_wide_res")
           for scheme in _schemes(name)]
PARAMS += [(name, scheme + "+lifted32") for name in ("1x1_clamp_4rows", "3x3_s2_wide_res") for scheme in _schemes(name)]
PARAMS += [("3x3_batch2_res_odd_ob", "taps+lifted32"), ("1x1_batch4_pair_ranges", "taps+int4+lifted32")]


def _case(name, scheme="c64"):
    from test_kernels_x86 import _conv_case, _conv_lifted_bounds, lifted_caps, lifted_form

    n, c, h, w, o, k, s, p, residual, extra = AMX_CASES[name]
    scheme, *flags = scheme.split("+")
    int4, ge32 = "int4" in flags, "ge32" in flags
    lifted = "lifted" in flags or "lifted32" in flags
    zx, zo = extra.get("zx", 3), extra.get("zo", 5)
    lo, hi = extra.get("lo", 0), extra.get("hi", 255)
    cs = _conv_case(np.random.default_rng(sum(map(ord, name))), n, c, h, w, o, k, s, p, residual=residual, zx=zx,
                    zo=zo, lo=lo, hi=hi, int4=int4, min_shift=32 if ge32 else 28 if lifted else 1,
                    max_shift=lifted_caps("lifted" if "lifted32" in flags else "lifted+shift", o) if lifted else 62)
    epilogue = "int32" if ge32 else lifted_form(cs["sh"]) if lifted else "int64"
    if lifted:      # the case needs it: shifts below 32, and the builder's proof holds
        assert cs["sh"].min() < 32 and K.lifted_epilogue_exact(cs["sh"], *_conv_lifted_bounds(cs)), cs["sh"]
        assert epilogue == ("lifted" if "lifted32" in flags else "lifted+shift")
    wp = K.pack_conv_weight(cs["w"], groups=1, ic_block=64 if scheme == "c64" else 16, isa="vnni")
    b, m, sh = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])
    arrays = [K.nchw_to_nchwc(cs["x"], 16, pad_value=zx), K.pack_amx_int4(wp) if int4 else wp, b, m, sh]
    if residual:
        arrays += [K.nchw_to_nchwc(cs["r"], 16), K.pack_channel_params(cs["bias"], cs["mr"], cs["sh"])[1]]
    func = K.amx_conv_primfunc("main", arrays[0].shape, wp.shape, (p, p), zx, zo, lo, hi, 7, residual, stride=(s, s),
                               int4=int4, threads=3 if int4 else None,    # int4: pairs split into >= 6 chunks
                               epilogue=epilogue)
    return cs, arrays, func, o


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=SPR)


@pytest.mark.parametrize("name,scheme", PARAMS)
def test_amx_conv_bit_exact(name, scheme):
    """Every case equals kernels.reference (the integer contract) bit for bit: border taps, tile tails that overlap,
    short tiles, odd tile counts, one or two N tiles, strides, partial 64-channel blocks, residual, clamp, zero
    point 0; int4 weights (the extremes -8 and 7 in every case) unpacked in the kernel."""
    cs, arrays, func, o = _case(name, scheme)
    lib = _build(func)
    if not HAS_AMX:
        pytest.skip("no AMX-INT8 on this CPU: compiled only")
    from ptq2tvm.bundle_runner import request_amx_state

    request_amx_state()
    kern = K.StandaloneKernel(lib, (cs["ref"].shape[0], arrays[1].shape[0], *cs["ref"].shape[2:], 16), "uint8", func)
    got = K.nchwc_to_nchw(kern.run(*arrays), o)
    assert np.array_equal(got, cs["ref"]), f"{int((got != cs['ref']).sum())} of {got.size} outputs differ"


def test_amx_kernel_instructions_and_support_rules(tmp_path):
    """The kernel is tile code (ldtilecfg, tileloadd, tdpbusd, tilestored) on any host that can compile it; the
    support rule takes dense int8 stride-1 convs of <= 4 horizontal taps and nothing else."""
    from ptq2tvm.bench.disasm import count_instructions

    _, arrays, func, _ = _case("3x3_12x12", "taps")
    so = tmp_path / "k.so"
    _build(func).export_library(str(so))
    n = count_instructions(so, ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored", "tilerelease"))
    assert n["ldtilecfg"] >= 1 and n["tdpbusd"] >= 4 and n["tileloadd"] >= 4 and n["tilestored"] >= 4, n
    wp, xs = arrays[1].shape, arrays[0].shape
    assert K.amx_conv_supported(wp, xs, (1, 1), (1, 1), "int8")
    assert not K.amx_conv_supported(wp, xs, (2, 2), (1, 1), "int8")          # taps: stride 1 only
    assert not K.amx_conv_supported(wp, xs, (1, 1), (2, 2), "int8")          # dilated
    assert not K.amx_conv_supported((2, 2, 3, 3, 32), xs, (1, 1), (1, 1), "uint8")   # packed int4
    assert not K.amx_conv_supported((2, 1, 3, 3, 4, 16, 4), xs, (1, 1), (1, 1), "int8")  # grouped: 1 of 2 blocks
    assert not K.amx_conv_supported((2, 2, 5, 5, 4, 16, 4), xs, (1, 1), (1, 1), "int8")  # KW 5 > 64 bytes
    assert K.amx_conv_supported((2, 1, 5, 5, 16, 16, 4), xs, (2, 2), (1, 1), "int8")     # c64: any stride / kernel
    assert not K.amx_conv_supported((2, 2, 3, 3, 16, 16, 4), xs, (1, 1), (1, 1), "int8")  # c64 of 2 blocks: 128 ch
    with pytest.raises(ValueError, match="AMX conv needs"):
        K.amx_conv_primfunc("f", (1, 2, 8, 8, 16), (2, 2, 5, 5, 4, 16, 4), (2, 2), 0, 0, 0, 255, 0, False)


def test_amx_target_detection(monkeypatch):
    """A target has AMX from its mcpu or mattr; PTQ2TVM_AMX=0 turns the kernels off; the host target gets the AMX
    mattr exactly where /proc/cpuinfo has AMX (a virtualized Xeon may be named 'rocketlake' by LLVM)."""
    from ptq2tvm.backend import compile as C

    assert K.target_has_amx(SPR)
    assert K.target_has_amx(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server",
                                               "mattr": ["+amx-tile", "+amx-int8"]}))
    assert not K.target_has_amx(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"}))
    assert not K.target_has_amx(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    for off in ("0", "false", " OFF", "no"):
        monkeypatch.setenv(K.AMX_ENV, off)
        assert not K.target_has_amx(SPR) and K.target_has_amx(SPR, honour_env=False), off
    monkeypatch.setenv(K.AMX_ENV, "1")
    assert K.target_has_amx(SPR)
    monkeypatch.delenv(K.AMX_ENV)
    # a virtualized Sapphire Rapids: cpuinfo has AMX, LLVM names the CPU 'rocketlake' (AVX-512, no AMX); both are
    # faked so that the check does not depend on this host's CPU
    monkeypatch.setattr("tvm.target.codegen.llvm_get_system_cpu", lambda: "rocketlake")
    monkeypatch.setattr("ptq2tvm.backend.isa.host_cpu_flags", lambda: {"avx2", "avx512_vnni", "amx_int8",
                                                                        "amx_tile"})
    assert C.host_target()["mcpu"] == "rocketlake" and C.host_target()["mattr"] == ["+amx-tile", "+amx-int8"]
    assert K.target_has_amx(tvm.target.Target(C.host_target()))
    monkeypatch.setattr("ptq2tvm.backend.isa.host_cpu_flags", lambda: {"avx2", "avx512_vnni", "avx512bw"})
    t = C.host_target()
    assert "+amx-int8" not in t.get("mattr", [])


@pytest.mark.parametrize("w,a", [(8, 8), (4, 8), (4, 4), (2, 4)])
def test_network_amx_dispatch_bit_exact(tmp_path, w, a):
    """TinyNet built for an AMX target: its stride-1 convs with int8 or int4 weights are AMX kernels ("taps": 8-32
    channels), the strided ones and 2-bit weights (four per byte) keep AVX-512 VNNI; int4 layers store the same
    bytes as without AMX; the sidecar says isa 'amx' and needs amx_tile/amx_int8; on an AMX host the .so is
    bit-exact against the reference executor."""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.blocked_builder import _BlockedBuilder, build_blocked_module
    from ptq2tvm.backend.storage import keeps_int8_storage
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(w, a)
    mod, _ = build_blocked_module(graph, 2, "vnni", amx=True)
    def dense(nd):      # dense, or a grouping packed as a dense block-diagonal weight (kernels.conv_weight_mode)
        o, cg = nd.arrays["weight"].shape[:2]
        return K.conv_weight_mode(o, cg * nd.attrs["groups"], nd.attrs["groups"]) in ("dense", "expanded")

    # TinyNet's few channels: "taps" for every stride-1 conv, "rows" for its 1-channel stem (it reads the input)
    def packed(nd):     # <= 2-bit weights the build stores four per byte: VNNI (the tiles unpack int4 only);
        wt = nd.arrays["weight"]   # layers whose weights meet few pixels per call keep int8 storage: AMX then
        return int(nd.attrs.get("w_bits", 8)) <= 2 and int(wt.min()) >= -2 and int(wt.max()) <= 1 \
            and not keeps_int8_storage(nd, 2)

    # a 1x1 conv from <= 16 channels whose only reader is a depthwise conv runs inside that conv's fused kernel
    # (int8 weights, every shift >= 32: kernels.expand_depthwise), not as an AMX kernel
    builder = _BlockedBuilder(graph, "vnni", amx=True)
    builder.batch = 2               # as built above (the storage rule counts output pixels per call)
    fused = {e.name for e in builder.expand_depthwise_pairs().values()}
    eligible = [nd for nd in graph.nodes if nd.op == "conv2d" and dense(nd) and tuple(nd.attrs["dilation"]) == (1, 1)
                and not packed(nd) and nd.name not in fused
                and (tuple(nd.attrs["stride"]) == (1, 1) or nd.inputs[0] == graph.input.name)]
    assert K.amx_kernel_count(mod) == len(eligible)
    assert sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and str(f.attrs.get("ptq2tvm_kernel", "")) == K.EXPAND_DEPTHWISE_KIND) == len(fused)
    assert build_blocked_module(graph, 2, "vnni")[1] == build_blocked_module(graph, 2, "vnni", amx=True)[1]
    res = compile_so(graph, tmp_path / "m.so", batch=2, target=SPR_TARGET)
    want = "amx" if eligible else "vnni"
    assert res.meta["isa"] == want and res.meta["backend"] == f"x86-nchw16c-{want}"
    assert {"amx_tile", "amx_int8"} <= set(res.meta["cpu_features"])
    if not HAS_AMX:
        pytest.skip("no AMX-INT8 on this CPU: built only")
    q = np.random.default_rng(0).integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(graph, q))


def test_amx_build_refused_without_amx(tmp_path, capsys, monkeypatch):
    """An AMX build on a host whose flags lack amx_tile / amx_int8 (simulated here by hiding them) is refused at load
    by CompiledModel and by the bundle runner with the features named (not SIGILL); on an AMX host the process asks
    Linux for the tile state once."""
    from conftest import tiny_integer_graph

    from ptq2tvm import bundle_runner
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.errors import TargetError

    res = compile_so(tiny_integer_graph(8, 8), tmp_path / "m.so", batch=1, target=SPR_TARGET)
    meta = json.loads(res.meta_path.read_text())
    assert bundle_runner.needs_amx_state(meta)
    if HAS_AMX:
        bundle_runner.request_amx_state()        # granted once per process; a second call is free
        bundle_runner.request_amx_state()
    flags = (bundle_runner.host_cpu_flags() or set(meta["cpu_features"])) - {"amx_tile", "amx_int8"}
    monkeypatch.setattr(bundle_runner, "host_cpu_flags", lambda: flags)
    assert {"amx_int8", "amx_tile"} <= set(bundle_runner.missing_cpu_features(meta))
    with pytest.raises(TargetError, match="amx_int8, amx_tile"):
        CompiledModel(res.so_path)
    assert bundle_runner.main(["--so", str(res.so_path), "--random", "1"]) == 2
    assert "amx_int8, amx_tile" in capsys.readouterr().err


@pytest.mark.parametrize("name,c64,taps,vnni,fused", [("resnet18", 19, 0, 0, 0), ("mobilenet_v2", 11, 22, 0, 1)])
def test_amx_scheme_choice_on_zoo_models(name, c64, taps, vnni, fused):
    """The measured dispatch rule (blocked_builder._BlockedBuilder.amx_weight) on real architectures: ResNet-18's
    3x3 convs (strided too) and all three 1x1/2 downsamples (64, 128, 256 channels) run "c64"; MobileNetV2's 1x1 convs with >= 320 input channels (384, 576, 960 and the final 320) "c64",
    its other 1x1 convs "taps" except features.2's 16 -> 96 expand, fused with its depthwise conv
    (kernels.expand_depthwise); both stems "rows" (depthwise convs have their own kernel). Build only."""
    import torch

    from ptq2tvm.api import to_integer
    from ptq2tvm.backend.blocked_builder import build_blocked_module
    from ptq2tvm.frontend.calibrate import quantize_rtn
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    calib = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    graph = to_integer(quantize_rtn(model, calib, QuantConfig(w_bits=8, a_bits=8), progress=False))
    mod, _ = build_blocked_module(graph, 1, "vnni", amx=True)
    schemes = {"c64": 0, "taps": 0, "rows": 0}
    kinds: dict[str, int] = {}
    for _, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and K.AMX_ATTR in f.attrs:
            schemes[str(f.attrs[K.AMX_ATTR])] += 1
        elif isinstance(f, tvm.tirx.PrimFunc) and (K.kernel_kind(f) or "").startswith(("conv2d_nchwc", "conv2d_rows")):
            kinds[K.kernel_kind(f)] = kinds.get(K.kernel_kind(f), 0) + 1
    assert schemes == {"c64": c64, "taps": taps, "rows": 1}, schemes
    assert sum(kinds.values()) == vnni, kinds
    assert sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and str(f.attrs.get("ptq2tvm_kernel", "")) == K.EXPAND_DEPTHWISE_KIND) == fused


ROWS_CASES = [(1, 3, 32, 32, 32, 7, 2, 3, False), (1, 3, 23, 21, 16, 7, 2, 3, False), (2, 1, 16, 16, 16, 3, 1, 1, True),
              (1, 3, 18, 32, 48, 3, 2, 1, False), (1, 4, 12, 12, 16, 5, 1, 2, False), (1, 3, 224, 224, 64, 7, 2, 3, False)]


@pytest.mark.parametrize("n,c,h,w,o,k,s,p,residual,int4",
                         [(*case, False) for case in ROWS_CASES] + [(*ROWS_CASES[i], True) for i in (0, 2, 4)])
def test_amx_rows_first_conv_bit_exact(n, c, h, w, o, k, s, p, residual, int4):
    """The first conv (1-4 input channels) on tiles reading the row layout: an A row = one output pixel's
    ceil(KW*C/4)*4 bytes of a kernel row, rows stride*C bytes apart; bit-exact against kernels.reference (the
    ResNet stem at 224x224 included: 112 output columns = 7 tiles per row); int4 weights too."""
    from test_kernels_x86 import _conv_case

    cs = _conv_case(np.random.default_rng(100 * c + 10 * k + h), n, c, h, w, o, k, s, p, residual=residual, zx=29,
                    int4=int4)
    xr = K.nchw_to_rows(cs["x"], k, s, p, 29)
    wr = K.pack_rows_weight(cs["w"], isa="vnni")
    b, m, sh = K.pack_channel_params(cs["bias"], cs["m"], cs["sh"])
    arrays = [xr, K.pack_amx_int4(wr) if int4 else wr, b, m, sh]
    if residual:
        arrays += [K.nchw_to_nchwc(cs["r"], 16), K.pack_channel_params(cs["bias"], cs["mr"], cs["sh"])[1]]
    func = K.amx_rows_conv_primfunc("main", xr.shape, wr.shape, c, w, (k, k), (s, s), (p, p), 5, 0, 255, 7, residual,
                                    int4=int4)
    assert str(func.attrs[K.AMX_ATTR]) == "rows"
    lib = _build(func)
    if not HAS_AMX:
        pytest.skip("no AMX-INT8 on this CPU: compiled only")
    from ptq2tvm.bundle_runner import request_amx_state

    request_amx_state()
    ref = cs["ref"]
    kern = K.StandaloneKernel(lib, (n, wr.shape[0], ref.shape[2], ref.shape[3], 16), "uint8", func)
    got = K.nchwc_to_nchw(kern.run(*arrays), o)
    assert np.array_equal(got, ref), f"{int((got != ref).sum())} of {got.size} outputs differ"
