"""The explicit-vector elementwise kernels: the VBMI table lookup (kernels/lut_vbmi.py) and the requantized multiply
(kernels/mul_vnni.py), bit-exact against numpy on the integer contract; the blocked builder picks them for SiLU /
squeeze-excitation networks.

Runs where the CPU has AVX-512 VNNI (every such CPU this project targets has VBMI); elsewhere the kernels are compiled
for an Ice Lake server target and disassembled, the run skipped with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from test_kernels_x86 import HAS_VNNI, HOST, _cap_shifts, lifted_form  # noqa: E402

ICX = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})


def _run(func, arrays, out_shape, tmp_path, instructions):
    """Output of ``func`` on ``arrays`` on this host; without AVX-512 VNNI: compiled for Ice Lake, its disassembly
    checked for one of each group of ``instructions``, then skipped."""
    if not HAS_VNNI:
        from ptq2tvm.bench.disasm import count_instructions

        so = tmp_path / "k.so"
        tvm.compile(tvm.IRModule({"main": func}), target=ICX).export_library(str(so))
        n = count_instructions(so, tuple(i for group in instructions for i in group))
        assert all(sum(n[i] for i in group) > 0 for group in instructions), n
        pytest.skip("no AVX-512 VNNI on this CPU: compiled only")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.uint8))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


# shape, table entries: 1.2 MB (several 16 KiB parallel chunks), an SE vector of 60 blocks, 4-bit and 200-entry
# tables (codes past the table read its last entry; 52 x 64 + 32 bytes: the last vector overlaps), exactly 64 bytes,
# a second 16 KiB chunk of 17 vectors whose last one overlaps
LUT_CASES = {"112x112x96": ((1, 6, 112, 112, 16), 256), "se_vector_4bit": ((1, 60, 1, 1, 16), 16),
             "odd_200_entries": ((2, 3, 5, 7, 16), 200), "one_vector": ((1, 1, 2, 2, 16), 256),
             "chunk_tail_17_vectors": ((1, 1, 33, 33, 16), 256)}


@pytest.mark.parametrize("name", list(LUT_CASES))
def test_lut_vbmi_bit_exact(name, tmp_path):
    """out == table[min(x, entries - 1)] for every byte (every code 0..255 present, 0 and 255 often)."""
    shape, entries = LUT_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    x.reshape(-1)[::5] = 255
    x.reshape(-1)[1::7] = 0
    x.reshape(-1)[:256 if x.size >= 256 else 0] = np.arange(256 if x.size >= 256 else 0, dtype=np.uint8)
    table = rng.integers(0, 256, entries, dtype=np.uint8)
    got = _run(K.lut_vbmi_primfunc("main", shape), [x, K.pad_lut_table(table)], shape, tmp_path,
                   (("vpermi2b", "vpermt2b"), ("vpmovb2m", "vpblendmb")))
    assert np.array_equal(got, table[np.minimum(x, entries - 1)])


def test_lut_vbmi_refuses_bad_input():
    """Fewer than 64 bytes, or a table that is empty, longer than 256 entries or not uint8: ValueError naming it."""
    assert not K.lut_vbmi_supported((1, 2, 2))
    with pytest.raises(ValueError, match="64 bytes"):
        K.lut_vbmi_primfunc("main", (1, 4))
    for bad in (np.zeros(0, np.uint8), np.zeros(257, np.uint8), np.zeros(16, np.int8)):
        with pytest.raises(ValueError, match="lookup table"):
            K.pad_lut_table(bad)


# a_shape, b_shape, (za, zb), z_out, lo, hi, threads: SE gate broadcast over 28x28 (784 pixels: groups of 8); the
# gate first and a 4-bit clamp at 7x9 (63 pixels: 8s, a 4, a 3); same shapes, a clamp, 25 pixels in 3 bands
MUL_CASES = {"se_28x28": ((1, 6, 28, 28, 16), (1, 6, 1, 1, 16), (3, 0), 5, 0, 255, 2),
             "gate_first_4bit": ((2, 3, 1, 1, 16), (2, 3, 7, 9, 16), (0, 128), 0, 0, 15, 3),
             "same_shape_clamp": ((1, 2, 5, 5, 16), (1, 2, 5, 5, 16), (7, 9), 100, 10, 200, 3),
             # shifts 1..43: the int64 epilogue (W4A4 SE gates have shifts below 32)
             "se_any_shift": ((1, 3, 9, 9, 16), (1, 3, 1, 1, 16), (5, 0), 8, 0, 15, 2),
             # shifts from 18 in the lifted int32 form (each product shifted left by 32 - shift; proved exact)
             "se_any_shift_lifted": ((1, 3, 9, 9, 16), (1, 3, 1, 1, 16), (5, 0), 8, 0, 15, 2),
             "se_any_shift_lifted32": ((1, 3, 9, 9, 16), (1, 3, 1, 1, 16), (5, 0), 8, 0, 15, 2)}


@pytest.mark.parametrize("name", list(MUL_CASES))
def test_mul_vnni_bit_exact(name, tmp_path):
    """out == clamp(z + ((a - za) * (b - zb) * m + 2^(s-1)) >> s, lo, hi) per channel (shifts 32..43, or 1..62:
    the int64 and the lifted epilogues, on the same data; extreme codes present)."""
    a_shape, b_shape, zps, z, lo, hi, threads = MUL_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name.removesuffix("_lifted32").removesuffix("_lifted"))))
    a, b = (rng.integers(0, 256, s, dtype=np.uint8) for s in (a_shape, b_shape))
    a.reshape(-1)[::5] = 255
    b.reshape(-1)[::3] = 0
    out_shape = K.mul_vnni_out_shape(a_shape, b_shape)
    cb = out_shape[1]
    m = rng.integers(1 << 30, 1 << 31, cb * 16).astype(np.int32)
    s = rng.integers(32, 44, cb * 16).astype(np.int32)
    if "any_shift" in name:     # shifts 20..31 with small mantissas (outputs not all saturated), edges 1 and 62
        m = rng.integers(1 << 8, 1 << 14, cb * 16).astype(np.int32)
        s = rng.integers(20, 32, cb * 16).astype(np.int32)
        s[:2], m[0] = (1, 62), 3
        if "lifted" in name:    # products of up to 2^16 lifted by up to 14 bits; no right shift with "32"
            m, s = _cap_shifts(m, np.maximum(s, 18), 32 if name.endswith("32") else 62)
    prod = (a.astype(np.int64) - zps[0]) * (b.astype(np.int64) - zps[1])
    mm, ss = (v.astype(np.int64).reshape(1, cb, 1, 1, 16) for v in (m, s))
    ref = np.clip(((prod * mm + (np.int64(1) << (ss - 1))) >> ss) + z, lo, hi).astype(np.uint8)
    assert len(np.unique(ref)) >= min((hi - lo + 1) * 3 // 4, 64), "test data too degenerate"
    epilogue = "int32" if int(s.min()) >= 32 else lifted_form(s) if "lifted" in name else "int64"
    if "lifted" in name:    # the builder's proof (ops.eltwise.Mul.lifted_epilogue_bounds) holds for the case
        assert epilogue == ("lifted" if name.endswith("32") else "lifted+shift")
        assert K.lifted_epilogue_exact(s, [(max(zps[0], 255 - zps[0]) * max(zps[1], 255 - zps[1]), m)])
    func = K.mul_vnni_primfunc("main", a_shape, b_shape, zps, z, lo, hi, threads=threads, epilogue=epilogue)
    got = _run(func, [a, b, m, s], out_shape, tmp_path, (("vpmuldq",), ("vpackssdw", "vpackuswb")))
    assert np.array_equal(got, ref), int((got != ref).sum())


def test_mul_vnni_refuses_other_shapes():
    """Inputs that are not blocked, or broadcast other than over H and W together: ValueError naming both."""
    for a, b in [((1, 2, 4, 4, 16), (1, 2, 4, 1, 16)), ((1, 2, 4, 4, 16), (1, 1, 4, 4, 16)),
                 ((1, 2, 4, 4), (1, 2, 4, 4))]:
        with pytest.raises(ValueError, match="mul_vnni needs blocked"):
            K.mul_vnni_out_shape(a, b)


def test_builder_picks_them_for_silu_and_se(tmp_path):
    """An SE block with SiLU (tests/test_ops.py's "se" model) built for AVX-512 VNNI: its tables are VBMI lookups
    and its gate multiply the paired kernel (the shifts are >= 32 there); PTQ2TVM_BASELINE_KERNELS=1 keeps the TE
    ones. The network's bit-exactness is tests/test_ops.py::test_so_bit_exact_both_backends."""
    from test_ops import _quantize

    from ptq2tvm.backend.blocked_builder import build_blocked_module
    from ptq2tvm.api import to_integer

    graph = to_integer(_quantize("se", 8, 8)[1])

    def kinds(mod):
        return [str(f.attrs.get("ptq2tvm_kernel", "")) for _, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None]

    luts = sum(1 for n in graph.nodes if n.op == "lut")
    muls = [n for n in graph.nodes if n.op == "mul"]
    assert luts and muls and all(K.shifts_allow_int32_epilogue(n.arrays["shift"]) for n in muls)
    got = kinds(build_blocked_module(graph, 2, "vnni")[0])
    assert got.count(K.LUT_VBMI_KIND) >= 1 and got.count(K.MUL_VNNI_KIND) == len(muls), got


def test_w4a4_lifted_epilogues_bit_exact(tmp_path):
    """tests/test_ops.py's "lut" model (SiLU / Hardswish tables after convs) at W4A4: convs with 4-bit weights and
    inputs feeding an 8-bit table input have shifts below 32, which the builder proves liftable
    (kernels.layout.lifted_epilogue_exact) and gives the lifted int32 epilogue instead of the int64 one in an AMX
    build; the .so for this host equals the reference executor on calibration-like and random codes."""
    from test_ops import _images, _quantize

    from ptq2tvm.api import compile_so, to_integer
    from ptq2tvm.backend.blocked_builder import build_blocked_module
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = to_integer(_quantize("lut", 4, 4)[1])
    assert any(int(n.arrays["shift"].min()) < 32 for n in graph.nodes if n.op == "conv2d")
    mod = build_blocked_module(graph, 2, "vnni", amx=True)[0]     # its convs on AMX tiles (built, not run)
    forms = [str(f.attrs["epilogue"]) for _, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "epilogue" in f.attrs]
    assert "lifted" in forms and "int64" not in forms, forms
    compile_so(graph, tmp_path / "m.so", batch=2)
    cm = CompiledModel(tmp_path / "m.so")
    q = np.concatenate([graph.input.quantize(_images(4, 6)),
                        np.random.default_rng(5).integers(0, graph.input.qmax + 1, (4, 3, 8, 8)).astype(np.uint8)])
    got, ref = cm.run_int(q), run_reference(graph, q)
    assert np.array_equal(got, ref), int((got != ref).sum())


def test_hand_written_kernels_name_bad_arguments():
    """Zero-sized dimensions, zero points outside [0, 255], clamps with lo > hi or outside [0, 255], negative AMX
    padding, a non-7-D AMX weight, a bool where the fused kernel wants a pair of flags, an int8 weight passed as int4:
    a ValueError naming the kernel and the argument (found by a break-it helper: ZeroDivisionError, TVM's literal
    check, or a silently built kernel before)."""
    from kernels.depthwise_vnni import depthwise_vnni_primfunc
    from kernels.expand_depthwise import expand_depthwise_primfunc

    ok = (1, 2, 4, 4, 16)
    dw = ((1, 2, 8, 8, 16), (2, 3, 1, 16, 4), 3, (1, 1), (1, 1), 1)
    ex = ((1, 1, 8, 8, 16), (2, 1, 1, 1, 4, 16, 4), (2, 3, 1, 16, 4), 3, (1, 1), (1, 1), 1)
    wa = (2, 2, 3, 3, 4, 16, 4)
    cases = [
        (lambda: K.lut_vbmi_primfunc("m", (0, 64)), "lut_vbmi: tensor shape"),
        (lambda: K.mul_vnni_primfunc("m", ok, ok, (256, 0), 0, 0, 255), "za 256"),
        (lambda: K.mul_vnni_primfunc("m", ok, ok, (0, 0), 0, 200, 100), r"clamp out \[200, 100\]"),
        (lambda: K.mul_vnni_primfunc("m", ok, ok, (0,), 0, 0, 255), "zero_points must be"),
        (lambda: K.mul_vnni_primfunc("m", (1, 0, 4, 4, 16), (1, 0, 4, 4, 16), (0, 0), 0, 0, 255), "a shape"),
        (lambda: depthwise_vnni_primfunc("f", (0, 2, 8, 8, 16), *dw[1:], 0, 0, 0, 255, 0, False), "input shape"),
        (lambda: depthwise_vnni_primfunc("f", *dw, 300, 0, 0, 255, 0, False), "input zero point 300"),
        (lambda: expand_depthwise_primfunc("f", *ex, 0, 0, 255, 0, 0, 255, 0, False, epilogue="int32"), "a pair"),
        (lambda: expand_depthwise_primfunc("f", *ex, 0, 200, 100, 0, 0, 255, 0, False), r"clamp mid"),
        (lambda: expand_depthwise_primfunc("f", *ex, 0, 0, 255, 0, 0, 255, 0, False, int4=True), "two-per-byte"),
        (lambda: K.amx_conv_primfunc("m", (0, 2, 8, 8, 16), wa, (1, 1), 0, 0, 0, 255, 0, False), "input shape"),
        (lambda: K.amx_conv_primfunc("m", (1, 2, 8, 8, 16), wa, (-1, -1), 0, 0, 0, 255, 0, False), "padding"),
        (lambda: K.amx_conv_primfunc("m", (1, 2, 8, 8, 16), wa[:6], (1, 1), 0, 0, 0, 255, 0, False), "7-D"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()


def test_cascade_lake_target_keeps_the_te_lookup():
    """Cascade Lake has AVX-512 VNNI but not VBMI: an SE + SiLU graph built for it keeps the TE lookup (LLVM aborts
    the whole process compiling ``vpermi2b`` for such a target) and still takes the paired multiply; the module
    compiles."""
    from test_ops import _quantize

    from ptq2tvm.api import to_integer
    from ptq2tvm.backend.blocked_builder import build_x86_module

    clx = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
    assert not K.target_has_vbmi(tvm.target.Target(clx))
    assert K.target_has_vbmi(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"}))
    mod, _ = build_x86_module(to_integer(_quantize("se", 8, 8)[1]), 2, clx)
    kinds = [str(f.attrs.get("ptq2tvm_kernel", "")) for _, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None]
    assert K.LUT_VBMI_KIND not in kinds and K.MUL_VNNI_KIND in kinds, kinds
    tvm.compile(mod, target=tvm.target.Target(clx))


@pytest.mark.parametrize("shape,parallel", [((1, 6, 4, 4, 16), False), ((1, 60, 7, 7, 16), True)])
def test_small_se_multiply_runs_on_the_calling_thread(shape, parallel):
    """The squeeze-excitation multiply of fewer than kernels.vector_tir.SERIAL_OUTPUTS output elements (here 1.5 K)
    runs its tasks in a serial loop, a larger one (47 K, MobileNetV3-Large's last stage) in parallel."""
    func = K.mul_vnni_primfunc("m", shape, (*shape[:2], 1, 1, 16), (3, 0), 5, 0, 255, threads=2)
    assert ("T.parallel" in func.script()) == parallel
