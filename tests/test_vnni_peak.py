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
    """The loop body is 12 512-bit vpdpbusd in a row: the intrinsics loop it replaces had two register copies per
    product, which the run check would now reject."""
    exe = vnni_peak.build(tmp_path)
    dis = __import__("subprocess").run(["objdump", "-d", str(exe)], capture_output=True, text=True).stdout
    assert vnni_peak.longest_vpdpbusd_run(dis) == vnni_peak.CHAINS
    assert len({line.split()[-1] for line in dis.splitlines() if "vpdpbusd" in line}) == vnni_peak.CHAINS


def test_run_check_rejects_copies_between_the_products() -> None:
    line = "  11c6:\tvpdpbusd %zmm0,%zmm1,%zmm{}"
    copy = "  11cc:\tvmovdqa64 %zmm14,%zmm2"
    clean = "\n".join(["0000000000001180 <main>:"] + [line.format(r) for r in range(2, 14)])
    copied = "\n".join(line.format(r) + "\n" + copy for r in range(2, 14))
    assert vnni_peak.longest_vpdpbusd_run(clean) == 12
    assert vnni_peak.longest_vpdpbusd_run(copied) == 1


def test_measured_rate_is_per_core_and_plausible() -> None:
    m = vnni_peak.measure(cores=1, repeats=2, seconds=0.05)
    assert m is not None and len(m["runs"]) == 2 and all(len(run) == 1 for run in m["runs"])
    # one 512-bit vpdpbusd per cycle at 1-6 GHz, or two: anything outside 0.5-12.5 G/s is a broken loop or timer
    assert 0.5e9 < m["per_core"] < 12.5e9
    assert m["spread"][0] <= m["per_core"] <= m["spread"][1]
