"""benchmarks/vnni_peak.py: the measured `vpdpbusd` ceiling that benchmarks/latency_cpu.py quotes the .so against
(the "VNNI floor"). Runs where the CPU has AVX-512 VNNI and a C compiler exists; skipped elsewhere with the reason."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vnni_peak  # noqa: E402

pytestmark = pytest.mark.skipif(not vnni_peak.has_vnni() or not (shutil.which("cc") or shutil.which("gcc")),
                                reason="needs AVX-512 VNNI (avx512_vnni in /proc/cpuinfo) and a C compiler")


def test_peak_loop_is_the_instruction_it_claims(tmp_path: Path) -> None:
    exe = vnni_peak.build(tmp_path)
    dis = __import__("subprocess").run(["objdump", "-d", str(exe)], capture_output=True, text=True).stdout
    assert dis.count("vpdpbusd") >= vnni_peak.CHAINS          # 12 independent chains, 512-bit
    assert "zmm" in dis


def test_measured_rate_is_per_core_and_plausible() -> None:
    m = vnni_peak.measure(cores=1, repeats=2, seconds=0.05)
    assert m is not None and len(m["runs"]) == 2 and all(len(run) == 1 for run in m["runs"])
    # one 512-bit vpdpbusd per cycle at 1-6 GHz, or two: anything outside 0.5-12.5 G/s is a broken loop or timer
    assert 0.5e9 < m["per_core"] < 12.5e9
    assert m["spread"][0] <= m["per_core"] <= m["spread"][1]
