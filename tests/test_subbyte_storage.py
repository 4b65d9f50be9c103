"""How x86 builds store <= 4-bit weights (issue 12: W4A4 no slower than W8A8): packed two (four) per byte, or one
per byte for small layers whose weights meet few output pixels per call (ptq2tvm.backend.storage.keeps_int8_storage);
the GFNI unpack of packed int4 weights (kernels.intrin.register_unpack4_intrinsic). Same integers every way."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kernels as K
from ptq2tvm.backend.blocked_builder import build_blocked_module
from ptq2tvm.backend.storage import INT8_STORAGE_MAX_BYTES, INT8_STORAGE_MAX_PIXELS, keeps_int8_storage


def _expected_int8_layers(graph, batch: int) -> list[str]:
    """The rule written out independently: <= 4-bit conv / dense (not depthwise) with 2..255 output pixels per call
    and <= 64 KiB of int8 weights."""
    names = []
    for n in graph.nodes:
        w = n.arrays.get("weight")
        if w is None or n.op not in ("conv2d", "dense") or int(n.attrs["w_bits"]) > 4:
            continue
        if n.op == "conv2d" and int(n.attrs["groups"]) > 1 and w.shape[1] == 1:
            continue
        pixels = batch * (int(np.prod(n.out.shape[1:])) if len(n.out.shape) > 1 else 1)
        if 1 < pixels < INT8_STORAGE_MAX_PIXELS and w.size <= INT8_STORAGE_MAX_BYTES:
            names.append(n.name)
    return names


def test_int8_storage_of_low_reuse_layers(tmp_path):
    """TinyNet W4A4 (40x40 input) at batch 1: the layers whose weights meet 2..255 output pixels keep one weight per
    byte (the sidecar names them, the stored bytes grow by half their weights), the 1-pixel classifier and the
    layers with >= 256 pixels stay packed; "packed" packs every layer; both builds are bit-exact against the
    reference. At a batch where every layer meets >= 256 pixels nothing is kept as int8."""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so, stored_weight_bytes
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    assert INT8_STORAGE_MAX_PIXELS == 256
    g = tiny_integer_graph(4, 4, hw=(40, 40))         # block1 at 20x20 (400 pixels), block2 and after at <= 10x10
    expected = _expected_int8_layers(g, 1)
    low = [n for n in g.nodes if n.op in ("conv2d", "dense") and int(n.attrs["w_bits"]) <= 4
           and not (n.op == "conv2d" and int(n.attrs["groups"]) > 1 and n.arrays["weight"].shape[1] == 1)]
    assert expected and len(expected) < len(low), expected         # the tiny graph has both kinds
    assert not keeps_int8_storage(next(n for n in g.nodes if n.op == "dense"), 1)    # one pixel: packed
    q = np.random.default_rng(5).integers(0, g.input.qmax + 1, (1, *g.input.shape)).astype(np.uint8)
    ref = run_reference(g, q)
    auto = compile_so(g, tmp_path / "auto.so", batch=1)
    packed = compile_so(g, tmp_path / "packed.so", batch=1, subbyte_storage="packed")
    for res in (auto, packed):
        assert np.array_equal(CompiledModel(res.so_path).run_int(q), ref), res.so_path
    assert auto.meta["int8_storage_layers"] == expected and auto.meta["subbyte_storage"] == "auto"
    assert packed.meta["int8_storage_layers"] == [] and packed.meta["subbyte_storage"] == "packed"
    assert auto.meta["stored_weight_bytes"] > packed.meta["stored_weight_bytes"]
    # the quantize summary's estimate follows the same rule: half a byte more per weight of the int8-stored layers
    grown = sum(int(n.arrays["weight"].size) - (int(n.arrays["weight"].size) + 1) // 2
                for n in g.nodes if n.name in expected)
    assert stored_weight_bytes(g, batch=1) - stored_weight_bytes(g, batch=1, subbyte_storage="packed") == grown
    # the kernel of an int8-stored layer takes an int8 weight, a packed one uint8 nibbles (a 1x1 expand run inside
    # its depthwise conv's kernel has no kernel of its own)
    mod, _ = build_blocked_module(g, 1, K.target_isa())
    dtypes = {gv.name_hint: {str(p.dtype) for p in f.params} for gv, f in mod.functions.items()
              if hasattr(f, "params") and gv.name_hint.startswith("k_")}
    checked = 0
    for n in low:
        kern = f"k_{n.name.replace('.', '_')}"
        if kern in dtypes:
            checked += 1
            assert ("int8" in dtypes[kern]) == (n.name in expected), (kern, dtypes[kern])
    assert checked >= 4
    # a batch at which every layer meets >= 256 output pixels (the 1-pixel classifier too): all packed
    assert _expected_int8_layers(g, 256) == [] and not any(keeps_int8_storage(n, 256) for n in g.nodes)


def test_subbyte_storage_choice_is_checked(tmp_path):
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so

    g = tiny_integer_graph(4, 4)
    with pytest.raises(ValueError, match=r"subbyte_storage must be one of auto, packed, got 'int8'"):
        compile_so(g, tmp_path / "new" / "never.so", subbyte_storage="int8")
    assert not (tmp_path / "new").exists()          # refused before anything is written


def test_per_layer_bits_graph_is_built_packed(tmp_path):
    """A graph with per-layer bits (a mixed-precision plan or --layer-bits) was sized and timed by the mixed-precision
    model with packed sub-byte weights: to_integer marks it, and the build stores it packed unless told otherwise."""
    import torch
    from conftest import TinyNet, randomize_bn

    from ptq2tvm.api import compile_so, quantize, stored_weight_bytes, to_integer
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.frontend.qmodel import QuantConfig
    from ptq2tvm.ir.reference import run_reference

    torch.manual_seed(0)
    model = randomize_bn(TinyNet()).eval()
    calib = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
    g = to_integer(quantize(model, calib, QuantConfig(4, 4, layer_w_bits={"block2.conv1": 8}), progress=False))
    assert g.meta["subbyte_storage"] == "packed" and _expected_int8_layers(g, 1)     # auto would keep some int8
    built = compile_so(g, tmp_path / "m.so", batch=1)
    assert built.meta["subbyte_storage"] == "packed" and built.meta["int8_storage_layers"] == []
    assert stored_weight_bytes(g) < stored_weight_bytes(g, subbyte_storage="auto")
    auto = compile_so(g, tmp_path / "a.so", batch=1, subbyte_storage="auto")        # the caller's choice wins
    assert auto.meta["int8_storage_layers"] == _expected_int8_layers(g, 1)
    q = np.random.default_rng(2).integers(0, g.input.qmax + 1, (1, *g.input.shape)).astype(np.uint8)
    for res in (built, auto):
        assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(g, q))
    uniform = to_integer(quantize(model, calib, QuantConfig(4, 4), progress=False))
    assert "subbyte_storage" not in uniform.meta


def test_compile_cli_names_the_int8_stored_layers_and_packs_on_request(tmp_path, capsys):
    """``ptq2tvm compile`` on a W4A4 run of the 28x28 ResNet: the default build names the layers it keeps one weight
    per byte (its layer2 at 14x14 = 196 pixels and layer3 at 7x7 = 49; not layer1 at 28x28) and how to pack them; ``--subbyte-storage packed`` packs every one
    (smaller stored weights, nothing named); a bad choice is refused by argparse with the choices."""
    from conftest import run_cli

    from ptq2tvm import cli

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
    assert cli.main(["quantize", "--model", "resnet_small", "--data", str(tmp_path / "x.npy"), "--calib-size", "8",
                     "--fidelity-images", "0", "--w-bits", "4", "--a-bits", "4", "--out", str(tmp_path / "run"),
                     "--no-progress", "--json", str(tmp_path / "quantize.json")]) == 0
    rc, out, _ = run_cli(capsys, "compile", tmp_path / "run", "--out", tmp_path / "auto.so", "--no-progress",
                         "--json", tmp_path / "auto_summary.json")
    assert rc == 0
    auto = json.loads((tmp_path / "auto_summary.json").read_text())
    quantized = json.loads((tmp_path / "quantize.json").read_text())      # one number, from either command
    assert quantized["weight_bytes"] == auto["weight_bytes"] and quantized["weight_count"] == auto["weight_count"]
    assert {n.split(".")[0] for n in auto["int8_storage_layers"]} == {"layer2", "layer3"}, auto["int8_storage_layers"]
    assert f"{len(auto['int8_storage_layers'])} <= 4-bit layer(s) stored one weight per byte" in out
    assert "--subbyte-storage packed packs them" in out
    rc, _, err = run_cli(capsys, "compile", tmp_path / "run", "--out", tmp_path / "packed.so", "--no-progress",
                         "--json", tmp_path / "packed.json")          # the sidecar's own path: refused, nothing built
    assert rc == 2 and "is the library's sidecar (needed to load it) this compile writes" in err
    assert not (tmp_path / "packed.so").exists()
    rc, out, _ = run_cli(capsys, "compile", tmp_path / "run", "--out", tmp_path / "packed.so", "--no-progress",
                         "--subbyte-storage", "packed", "--json", tmp_path / "packed_summary.json")
    packed = json.loads((tmp_path / "packed_summary.json").read_text())
    assert rc == 0 and packed["int8_storage_layers"] == [] and "stored one weight per byte" not in out
    assert packed["weight_bytes"] < auto["weight_bytes"]
    sidecar = json.loads((tmp_path / "packed.so").with_suffix(".json").read_text())   # the library's sidecar
    assert sidecar["weight_count"] == packed["weight_count"] == auto["weight_count"] > packed["weight_bytes"]
    assert sidecar["stored_weight_bytes"] == packed["weight_bytes"]     # --json's weight_bytes: what the .so stores
    with pytest.raises(SystemExit):
        cli.main(["compile", str(tmp_path / "run"), "--subbyte-storage", "int8"])
    assert "invalid choice: 'int8' (choose from 'auto', 'packed')" in capsys.readouterr().err


def test_tuned_int4_build_rebuilds_from_its_records_in_a_fresh_process(tmp_path):
    """A tuned build with packed int4 weights on a GFNI host: its records replay the tensorized unpack
    (kernels.intrin.register_unpack4_intrinsic), which a fresh process registers before TVM parses them (was:
    "TensorIntrin 'ptq2tvm_unpack_int4_16x4_gfni' is not registered" on every rebuild / resume)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.ir.reference import run_reference

    if K.target_isa() != "vnni" or not K.target_has_gfni512():
        pytest.skip("the GFNI int4 unpack needs AVX-512 VNNI + GFNI on this CPU")
    graph = tiny_integer_graph(4, 4)
    compile_so(graph, tmp_path / "a.so", batch=2, tune_trials=2, subbyte_storage="packed")
    assert "ptq2tvm_unpack_int4_16x4_gfni" in (tmp_path / "a.tuning" / "database_tuning_record.json").read_text()
    graph.save(tmp_path / "g.npz")
    code = ("import json; from ptq2tvm.api import compile_so; from ptq2tvm.ir.graph import IntegerGraph; "
            f"r = compile_so(IntegerGraph.load({str(tmp_path / 'g.npz')!r}), {str(tmp_path / 'b.so')!r}, batch=2, "
            f"tune_db={str(tmp_path / 'a.tuning')!r}, subbyte_storage='packed'); print(json.dumps(r.meta['tuning']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["measured"] == 0
    q = np.random.default_rng(4).integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)
    assert np.array_equal(CompiledModel(tmp_path / "b.so").run_int(q), run_reference(graph, q))


def test_int4_expand_is_not_fused_for_avx512_without_gfni(tmp_path):
    """Cascade Lake has AVX-512 VNNI without GFNI: the fused expand + depthwise kernel's int4 unpack
    (vgf2p8affineqb) made LLVM abort the whole process ("Cannot select ... GF2P8AFFINEQB"). Its build keeps the
    int4 expand as a conv of its own (vectorized unpack) and is bit-exact where the host runs it; an Ice Lake build
    (GFNI) still fuses it."""
    from conftest import tiny_integer_graph

    from ptq2tvm.api import compile_so
    from ptq2tvm.backend.runtime import CompiledModel
    from ptq2tvm.bundle_runner import host_cpu_flags
    from ptq2tvm.ir.reference import run_reference

    graph = tiny_integer_graph(4, 4)
    fused = {}
    for mcpu in ("cascadelake", "icelake-server"):
        mod, _ = build_blocked_module(graph, 2, "vnni", subbyte_storage="packed",
                                      gfni=K.target_has_gfni512({"kind": "llvm", "mcpu": mcpu}))
        fused[mcpu] = sum(1 for f in mod.functions.values() if hasattr(f, "attrs") and f.attrs is not None
                          and str(f.attrs.get("ptq2tvm_kernel", "")) == K.EXPAND_DEPTHWISE_KIND)
    assert fused == {"cascadelake": 0, "icelake-server": 1}
    res = compile_so(graph, tmp_path / "cl.so", batch=2, target="cascadelake", subbyte_storage="packed")
    if "avx512_vnni" in (host_cpu_flags() or set()):
        q = np.random.default_rng(6).integers(0, graph.input.qmax + 1, (2, *graph.input.shape)).astype(np.uint8)
        assert np.array_equal(CompiledModel(res.so_path).run_int(q), run_reference(graph, q))


def test_quantize_summary_and_compile_warning_name_the_storage(tmp_path, capsys):
    """The quantize summary says which small layers the default build keeps one weight per byte and how much packing
    them saves (it was a size that contradicted "W<=4 two per byte"); compiling a --layer-bits run (packed by
    default) with --subbyte-storage auto warns that the per-layer bits were chosen for packed weights."""
    from conftest import run_cli

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
    base = ["quantize", "--model", "resnet_small", "--data", tmp_path / "x.npy", "--calib-size", 8,
            "--fidelity-images", 0, "--w-bits", 4, "--a-bits", 4, "--no-progress"]
    rc, out, _ = run_cli(capsys, *base, "--out", tmp_path / "u")
    assert rc == 0 and "except 10 small layer(s) whose weights meet < 256 output pixels per call: one per byte" in out
    assert "compile --subbyte-storage packed packs them" in out
    rc, out, _ = run_cli(capsys, *base, "--layer-bits", "fc=8", "--out", tmp_path / "m")
    assert rc == 0 and "small layer(s)" not in out               # per-layer bits: packed, nothing kept
    rc, _, err = run_cli(capsys, "compile", tmp_path / "m", "--subbyte-storage", "auto", "--no-progress")
    assert rc == 0 and "has per-layer bits chosen for packed sub-byte weights" in err
    rc, _, err = run_cli(capsys, "compile", tmp_path / "m", "--no-progress")
    assert rc == 0 and "per-layer bits" not in err
