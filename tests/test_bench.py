"""Bench harness: baseline runners agree with torch, interleaved timing, atomic reports, vpdpbusd counting."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest

from ptq2tvm.bench import disasm
from ptq2tvm.bench.baselines import export_onnx, ort_fp32_runner, ort_int8_runner, torch_fp32_runner
from ptq2tvm.bench.disasm import ObjdumpMissingError, count_by_width, count_instructions, cpu_features
from ptq2tvm.bench.report import (format_table, merge_rows, print_table, read_rows, write_chart, write_markdown,
                                  write_rows)
from ptq2tvm.bench.timing import TimingStats, ratio, ratios, rotated_order, speedup, time_interleaved


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from conftest import TinyNet, randomize_bn
    import torch

    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    data = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    path = export_onnx(model, data[:16], tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, data, path


def test_export_is_atomic_and_opset_17(onnx_model):
    import onnx

    _, _, path = onnx_model
    m = onnx.load(str(path))
    assert {o.domain: o.version for o in m.opset_import}.get("", None) == 17
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [16, 1, 12, 12]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_ort_fp32_matches_torch(onnx_model):
    model, data, path = onnx_model
    x = data[:16]
    ref = torch_fp32_runner(model, 1)(x)
    out = ort_fp32_runner(path, 1)(x)
    assert out.dtype == np.float32 and out.shape == ref.shape == (16, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_ort_int8_close_to_fp32(onnx_model):
    model, data, path = onnx_model
    x = data[:16]
    ref = torch_fp32_runner(model, 1)(x)
    run = ort_int8_runner(path, data, 1)
    out = run(x)
    assert (path.parent / "tiny.int8.onnx").is_file()
    assert out.dtype == np.float32 and out.shape == ref.shape and np.isfinite(out).all()
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    ops = {n.op_type for n in __import__("onnx").load(str(path.parent / "tiny.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_time_interleaved_rotates_and_summarises():
    calls: list[str] = []

    def make(name: str, sleep_s: float):
        def run(x):
            calls.append(name)
            time.sleep(sleep_s)
            return x

        return run

    names = ["a", "b", "c"]
    runners = {"a": make("a", 0.0), "b": make("b", 0.003), "c": make("c", 0.0)}
    stats = time_interleaved(runners, np.zeros(3, np.float32), warmup=2, repeats=7, progress=False, gap_s=0)
    assert set(stats) == set(names)
    assert len(calls) == 3 * 9
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    for r, order in enumerate(rounds):
        assert order == rotated_order(names, r)
        assert sorted(order) == names
    assert {tuple(o) for o in rounds} == {("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")}
    for st in stats.values():
        assert st.n == 7
        assert st.min_ms <= st.p10_ms <= st.median_ms <= st.p90_ms
    assert stats["b"].median_ms > 2.5 > stats["a"].median_ms
    assert ratio(stats["b"], stats["a"]) > 1 and speedup(stats["a"], stats["b"]) > 1
    assert ratios(stats, "b")["b"] == 1.0


def test_gap_is_not_timed():
    stamps: list[float] = []

    def run(x):
        stamps.append(time.perf_counter())
        return x

    stats = time_interleaved({"a": run, "b": run}, np.zeros(1), warmup=0, repeats=3, progress=False, gap_s=0.02)
    assert len(stamps) == 12                       # each timed call is preceded by one untimed priming call
    primes, timed = np.array(stamps[0::2]), np.array(stamps[1::2])
    assert min(primes[1:] - timed[:-1]) >= 0.019   # a gap of gap_s before every (prime, timed) pair ...
    assert max(timed - primes) < 0.01              # ... the timed call right after its prime
    assert max(st.median_ms for st in stats.values()) < 10  # ... and the sleep is not in the samples


def test_calls_per_turn_are_back_to_back_samples():
    calls: list[str] = []

    def make(name: str):
        def run(x):
            calls.append(name)
            return x

        return run

    stats = time_interleaved({"a": make("a"), "b": make("b")}, np.zeros(1), warmup=1, repeats=2, progress=False,
                             gap_s=0.001, calls_per_turn=3)
    assert all(st.n == 2 * 3 for st in stats.values())
    # per turn: one priming call + 3 timed calls of the same runner, turns rotate a/b, b/a, a/b
    assert "".join(calls) == "aaaa" "bbbb" "bbbb" "aaaa" "aaaa" "bbbb"
    with pytest.raises(ValueError, match="calls_per_turn"):
        time_interleaved({"a": make("a")}, np.zeros(1), calls_per_turn=0)


def test_timing_stats_percentiles():
    st = TimingStats.from_ns([i * 1_000_000 for i in range(1, 101)])
    assert st.n == 100 and st.min_ms == 1.0 and st.median_ms == 50.5
    assert st.p10_ms == pytest.approx(10.9) and st.p90_ms == pytest.approx(90.1)
    with pytest.raises(ValueError):
        time_interleaved({}, np.zeros(1))


def _rows():
    base = dict(model="resnet18", input="3x224x224", batch=1, w_bits=8, a_bits=8, threads=2)
    return [
        {**base, "runtime": "ptq2tvm", "median_ms": 4.0, "p10_ms": 3.8, "p90_ms": 4.5, "vpdpbusd_count": 123},
        {**base, "runtime": "torch_fp32", "median_ms": np.float64(24.0), "p10_ms": 23.0, "p90_ms": 26.0,
         "vpdpbusd_count": None},
        {**base, "runtime": "ort_fp32", "median_ms": 17.0, "p10_ms": 16.0, "p90_ms": 18.0, "vpdpbusd_count": None},
        {**base, "runtime": "ort_int8", "median_ms": 5.4, "p10_ms": 5.2, "p90_ms": 5.9, "vpdpbusd_count": None},
        {**base, "model": "mobilenet_v2", "batch": 8, "runtime": "ptq2tvm", "median_ms": 9.0, "p10_ms": 8.0,
         "p90_ms": 10.0, "vpdpbusd_count": 50},
        {**base, "model": "mobilenet_v2", "batch": 8, "runtime": "tvm_fp32", "median_ms": 30.0, "p10_ms": 28.0,
         "p90_ms": 33.0, "vpdpbusd_count": None},
    ]


def test_report_json_markdown_png(tmp_path, capsys):
    rows = _rows()
    js = write_rows(rows, tmp_path / "out" / "latency.json")
    loaded = json.loads(js.read_text())
    assert [r["runtime"] for r in loaded] == [r["runtime"] for r in rows]
    assert loaded[1]["median_ms"] == 24.0 and loaded[0]["vpdpbusd_count"] == 123
    assert read_rows(js) == loaded
    md = write_markdown(rows, tmp_path / "latency.md").read_text()
    assert "| resnet18 |" in md and "6.00x" in md  # torch 24 ms / ptq2tvm 4 ms
    png = write_chart(rows, tmp_path / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wide = [{**r, "median_ms": r["median_ms"] * (40 if r["runtime"] == "torch_fp32" else 1)} for r in rows]
    assert write_chart(wide, tmp_path / "wide.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # log axis
    print_table(rows)
    assert "ort_int8" in capsys.readouterr().out and "vpdpbusd" in format_table(rows)
    merged = merge_rows(js, [{**rows[0], "median_ms": 3.0}])
    assert len(merged) == len(rows) and read_rows(js)[0]["median_ms"] == 3.0
    assert not [p for p in tmp_path.rglob(".*")], "temp files left behind"


def test_rows_record_the_precision_each_runtime_ran(tmp_path):
    """w_bits / a_bits are the compiled run's (they group the rows); ``precision`` says what the row's runtime ran:
    a W4A4 run's float baselines FP32, ORT's / OpenVINO's own quantization W8A8, the .so W4A4 (the JSON used to say
    4 / 4 on every baseline row)."""
    rows = [{**r, "w_bits": 4, "a_bits": 4} for r in _rows()[:4]]
    rows.append({**rows[0], "runtime": "openvino_int8"})
    loaded = json.loads(write_rows(rows, tmp_path / "latency.json").read_text())
    assert [(r["runtime"], r["precision"]) for r in loaded] == [
        ("ptq2tvm", "W4A4"), ("torch_fp32", "FP32"), ("ort_fp32", "FP32"), ("ort_int8", "W8A8"),
        ("openvino_int8", "W8A8")]
    assert read_rows(tmp_path / "latency.json") == loaded


def test_report_write_is_atomic(tmp_path):
    path = tmp_path / "latency.json"
    write_rows(_rows(), path)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # not JSON-serialisable: fails after validation, before the file is replaced
        write_rows([{**_rows()[0], "median_ms": object()}], path)
    with pytest.raises(ValueError, match="missing"):
        write_rows([{"model": "x"}], path)
    with pytest.raises(ValueError, match="unknown runtime"):
        write_rows([{**_rows()[0], "runtime": "onnx_magic"}], path)
    assert path.read_bytes() == before
    with pytest.raises(TypeError):
        write_rows([{**_rows()[0], "median_ms": object()}], tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]


def test_count_vpdpbusd(tmp_path):
    if shutil.which("as") is None or shutil.which("objdump") is None:
        pytest.skip("binutils (as, objdump) not installed")
    src = tmp_path / "v.s"
    src.write_text(".text\n.globl f\nf:\n"
                   "  vpdpbusd %zmm2, %zmm1, %zmm0\n"
                   "  {vex} vpdpbusd %ymm2, %ymm1, %ymm0\n"
                   "  vpdpbusd 64(%rdi), %zmm1, %zmm0\n"
                   "  vpdpbusds %zmm2, %zmm1, %zmm0\n"
                   "  vpaddd %zmm2, %zmm1, %zmm0\n"
                   "  ret\n")
    obj = tmp_path / "v.o"
    res = subprocess.run(["as", str(src), "-o", str(obj)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"assembler lacks AVX-VNNI / AVX512-VNNI: {res.stderr.strip()[:200]}")
    counts = count_instructions(obj, ("vpdpbusd", "vpdpbusds", "vpmaddwd"))
    assert counts == {"vpdpbusd": 3, "vpdpbusds": 1, "vpmaddwd": 0}
    assert count_by_width(obj) == {"xmm": 0, "ymm": 1, "zmm": 2}


def test_count_without_objdump(tmp_path, monkeypatch):
    f = tmp_path / "x.so"
    f.write_bytes(b"\x7fELF")
    monkeypatch.setattr(disasm.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="binutils"):
        assert count_instructions(f) == {}
    with pytest.raises(ObjdumpMissingError, match="objdump not found"):
        count_instructions(f, missing_ok=False)
    with pytest.raises(FileNotFoundError):
        count_instructions(tmp_path / "absent.so")


def test_cpu_features_keys():
    feats = cpu_features(llvm=False)
    for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "vnni"):
        assert isinstance(feats[k], bool)
    assert feats["llvm_cpu"] == "unknown" and isinstance(feats["model_name"], str)


def test_load_sentence_says_whether_other_work_competed():
    """A benchmark's markdown says "other work competed" only where the load went above the core count."""
    from ptq2tvm.bench.runner import describe_load

    quiet = describe_load([0.4, 1.3], cores=2)
    busy = describe_load([0.4, 3.3], cores=2)
    assert "0.4-1.3" in quiet and "competed" not in quiet and "own threads" in quiet
    assert "0.4-3.3" in busy and "other work competed" in busy and "inflated" in busy
