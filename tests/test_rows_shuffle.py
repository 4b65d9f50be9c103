"""The first conv's row layout as one shuffle per 16 pixels (kernels/rows_shuffle.py): the same bytes as the numpy
twin (and so as the TE kernel) for 1-4 channels, kernels 1-7, strides 1-2, paddings, pad values, batch 1-2; the
shapes it refuses; the builder's choice between it and the TE kernel; a network that uses it equals the reference
executor; and the module keeps every kernel's noalias compute scope (the TVM 0.27 trap it fell into first)."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import kernels as K  # noqa: E402
from kernels.rows_shuffle import interleave_indices  # noqa: E402
from kernels.standalone import host_target  # noqa: E402

HOST = host_target(2)
HAS_AVX2 = tvm.target.codegen.llvm_cpu_has_features(["avx2"], HOST)

# (n, c, h, w, kernel, stride, padding, pad value)
CASES = {
    "resnet_stem_rgb_224": (1, 3, 224, 224, 7, 2, 3, 0),
    "rgb_32_batch2_pad29": (2, 3, 32, 32, 7, 2, 3, 29),
    "gray_3x3_s1": (1, 1, 20, 16, 3, 1, 1, 7),
    "two_ch_5x5": (2, 2, 9, 48, 5, 1, 2, 255),
    "rgba_3x3_s2": (1, 4, 16, 32, 3, 2, 1, 3),
    "rgb_1x1_no_pad": (1, 3, 5, 16, 1, 1, 0, 0),
}


def _run(x: np.ndarray, kernel: int, stride: int, padding: int, pad_value: int, target=HOST) -> np.ndarray:
    func = K.nchw_to_rows_primfunc("main", x.shape, (kernel, kernel), (stride, stride), (padding, padding), pad_value)
    out_shape = K.nchw_to_rows(x, kernel, stride, padding, pad_value).shape
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    return K.StandaloneKernel(lib, out_shape, "uint8", func).run(x)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_shuffle_equals_the_numpy_twin(name):
    n, c, h, w, k, s, p, pad = CASES[name]
    x = np.random.default_rng(sum(map(ord, name))).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    want = K.nchw_to_rows(x, k, s, p, pad)
    got = _run(x, k, s, p, pad)
    assert got.shape == want.shape
    assert int((got != want).sum()) == 0, f"{int((got != want).sum())} of {want.size} bytes differ"
    # the interior holds the image, channel-interleaved: row ph + i, pixel column left + j, channel ci
    left = 16
    assert np.array_equal(got[:, p + 1, (left + 3) * c:(left + 3) * c + c], x[:, :, 1, 3])


def test_rows_shuffle_on_an_avx2_target():
    """AVX2 builds take the kernel too (no VBMI byte permute there: LLVM lowers the shuffle otherwise); built for a
    Haswell (AVX2) and run here where the CPU has AVX2."""
    if not HAS_AVX2:
        pytest.skip("no AVX2 on this CPU: the Haswell build cannot run here")
    x = np.random.default_rng(5).integers(0, 256, (2, 3, 10, 32), dtype=np.uint8)
    got = _run(x, 7, 2, 3, 17, target=host_target(2, mcpu="haswell"))
    assert np.array_equal(got, K.nchw_to_rows(x, 7, 2, 3, 17))


def test_interleave_indices_place_channel_k_mod_c_of_pixel_k_div_c():
    for c in (1, 2, 3, 4):
        idx = interleave_indices(c, 16)
        assert sorted(idx) == list(range(16 * c))
        assert all(idx[k] == (k % c) * 16 + k // c for k in range(16 * c))


def test_rows_shuffle_refuses_what_it_cannot_do():
    """Width not a multiple of 16, five channels, a pad value that is no byte: each error says which."""
    assert not K.rows_shuffle_supported((1, 3, 28, 28)) and K.rows_shuffle_supported((1, 3, 28, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        K.nchw_to_rows_primfunc("f", (1, 3, 28, 28))
    with pytest.raises(ValueError, match="1-4 channels"):
        K.nchw_to_rows_primfunc("f", (1, 5, 32, 32))
    with pytest.raises(ValueError, match="pad value 256"):
        K.nchw_to_rows_primfunc("f", (1, 3, 32, 32), pad_value=256)


def _rgb_tiny_graph(width: int):
    """The seeded TinyNet on 3 x 16 x ``width`` input (RGB: the first conv takes the row layout), W8A8."""
    from conftest import tiny_integer_graph

    return tiny_integer_graph(8, 8, in_ch=3, hw=(16, width))


def _to_rows(mod) -> tvm.tirx.PrimFunc:
    return next(f for gv, f in mod.functions.items() if gv.name_hint == "to_rows")


def test_builder_takes_the_shuffle_where_the_width_allows_and_the_te_kernel_elsewhere():
    from ptq2tvm.backend.blocked_builder import build_blocked_module

    shuffle = _to_rows(build_blocked_module(_rgb_tiny_graph(32), 2, "vnni")[0])
    te_kernel = _to_rows(build_blocked_module(_rgb_tiny_graph(20), 2, "vnni")[0])
    assert K.kernel_kind(shuffle) is None and "Shuffle" in shuffle.script()
    assert K.kernel_kind(te_kernel) == "to_rows"


def test_network_with_the_shuffle_equals_the_reference_and_keeps_noalias_compute_scopes(tmp_path):
    """RGB TinyNet at 16 x 32, batch 2: the .so (to_rows by the shuffle kernel) equals the reference executor on
    random codes; its LLVM module gives every parallel kernel its ``<name>_compute_`` function, where TVM 0.27 marks
    the pointer arguments noalias (the shuffle kernel, which holds a root block, with the older ``tir.noalias`` key
    had made it lower the whole module without them: ResNet-18's convs 4-9% slower)."""
    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.compile import build_module, resolve_target
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    graph = _rgb_tiny_graph(32)
    target = resolve_target(None)
    mod, backend, _ = build_module(graph, 2, target, "auto")
    if not backend.startswith("x86-nchw16c"):
        pytest.skip(f"the row layout is built for x86 hosts with AVX2 or AVX-512 VNNI; this one builds {backend}")
    ir = next(m.inspect_source("ll") for m in tvm.compile(mod, target=tvm.target.Target(target)).mod.imports
              if m.kind == "llvm")
    kernels = [str(gv.name_hint) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    scoped = [k for k in kernels if f"@{k}_compute_(" in ir]
    assert "to_rows" in scoped and len(scoped) >= len(kernels) - 2, (scoped, kernels)
    signature = re.search(r"define [^@\n]*@to_rows_compute_\(([^)]*)\)", ir)
    assert signature and "noalias" in signature.group(1), signature
    res = compile_so(graph, tmp_path / "m.so", batch=2)
    q = np.random.default_rng(1).integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(graph, q))


def test_rows_shuffle_random_geometries():
    """Hypothesis draws (seeded, derandomized): 1-4 channels, kernels 1-7, strides 1-3, paddings up to half the
    kernel, heights 1-40, widths 16-64, pad values 0-255, batch 1-3; each equals the numpy twin."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def geometry(draw):
        k = draw(st.integers(1, 7))
        return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), h=draw(st.integers(max(1, k - 3), 40)),
                    w=16 * draw(st.integers(1, 4)), k=k, s=draw(st.integers(1, 3)), p=draw(st.integers(0, k // 2)),
                    pad=draw(st.integers(0, 255)), seed=draw(st.integers(0, 99)))

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None)
    @hypothesis.given(geometry())
    def check(g):
        x = np.random.default_rng(g["seed"]).integers(0, 256, (g["n"], g["c"], g["h"], g["w"]), dtype=np.uint8)
        if g["h"] + 2 * g["p"] < g["k"]:
            return                      # no output row: the layout is defined, the conv is not
        want = K.nchw_to_rows(x, g["k"], g["s"], g["p"], g["pad"])
        assert np.array_equal(_run(x, g["k"], g["s"], g["p"], g["pad"]), want), g

    check()
