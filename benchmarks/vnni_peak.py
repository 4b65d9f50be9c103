"""The AVX-512 VNNI product ceiling of this host, measured: 512-bit `vpdpbusd` per second per core with every core
busy, and what it implies for a network's MACs.

    .venv/bin/python benchmarks/vnni_peak.py [--cores 2] [--repeats 7] [--gmac-per-image 1.680]
        [--out benchmarks/results/vnni_peak]

Why: on a host without AMX the int8 convs are bound by `vpdpbusd` (64 multiply-adds of u8 x s8 per 512-bit
instruction), and whether a kernel or a whole network has anything left to gain is its time against that ceiling.
A constant clock would not do: the 2-core VMs this project is measured on ran this loop at 2.0-3.5 G per second per
core depending on the hour (session 24, Zen 4), so the ceiling is measured, right after the run it qualifies
(`benchmarks/latency_cpu.py`) or between its rounds (`benchmarks/layer_gap.py`).

How: a C loop whose body is 12 independent `vpdpbusd` chains in inline assembly, nothing else (registers only: no
loads, no register copies; 12 chains cover the instruction's latency at the throughput of one or two per cycle, 24
ran no faster), compiled with the system C compiler (``cc -O2``), run as one process per core at the same time
(``--cores``, default all) for about half a second,
``--repeats`` times; the rate is wall-clock instructions per second (the core clock included, as the kernels see
it). Medians over the repeats, per core. ``--gmac-per-image``: the network's multiply-adds per image on real input
(ResNet-18 at 224x224: 1.680 G of its 1.814 G; the convs skip the products on zero padding,
:func:`ptq2tvm.mixed.latency.layer_macs`) for the floor in milliseconds at batch 1 and 8.

Writes ``<out>.json`` (with the CPU model and load average) and ``<out>.md``; prints the table. Exits 2 with a
message on a CPU without AVX-512 VNNI or without a C compiler.

Until session 25 the loop was written with intrinsics on an array of 12 ``__m512i``: GCC compiled it with two
register copies (``vmovdqa64``) per ``vpdpbusd``, and on the Zen 4 that loop ran at 0.83-1.03x (median ~0.91x) the
rate of this one, interleaved: the floors quoted before then were ~10% too high (too kind to the .so), and ~8% more for counting
the products on zero padding the convs skip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq2tvm.atomic import write_json, write_text  # noqa: E402
from ptq2tvm.bench.cc import compile_c  # noqa: E402
from ptq2tvm.bench.disasm import cpu_features  # noqa: E402

MAC_PER_VPDPBUSD = 64       # 16 int32 lanes x 4 u8 x s8 products
CHAINS = 12
#: sleep before each run: right after a benchmark's calls the runtimes' worker threads still spin on the cores
#: (TVM's thread pool, OpenVINO's), and a loop started then shares them (layer_gap's first version, without the
#: gap, measured 2.1 G per second per core at batch 1 while the kernels between its runs went 1.1x faster)
IDLE_BEFORE_S = 0.1

_CHAIN_REGS = range(2, 2 + CHAINS)            # zmm2..zmm13 accumulate; zmm1 (u8) and zmm0 (s8) are the operands
C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
  long n = atol(argv[1]);
  struct timespec t0, t1;
  __asm__ volatile("vpternlogd $0xff, %%zmm0, %%zmm0, %%zmm0\n\tvpabsb %%zmm0, %%zmm1\n\t" ::: "xmm0", "xmm1");
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; k++) {
    __asm__ volatile(
""" + "".join(f'      "vpdpbusd %%zmm0, %%zmm1, %%zmm{r}\\n\\t"\n' for r in _CHAIN_REGS) + \
    "      ::: " + ", ".join(f'"xmm{r}"' for r in _CHAIN_REGS) + r""");
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%.9f\n", (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
  return 0;
}
"""


def longest_vpdpbusd_run(disassembly: str) -> int:
    """The most 512-bit ``vpdpbusd`` in a row in ``objdump -d`` output, no other instruction between them."""
    best = run = 0
    for line in disassembly.splitlines():
        if "\t" not in line or ":" not in line.split("\t")[0]:
            continue                                    # labels, headers, blank lines
        run = run + 1 if "vpdpbusd" in line and "zmm" in line else 0
        best = max(best, run)
    return best


def build(workdir: Path) -> Path:
    """Compile the peak loop; -> the executable. RuntimeError without a C compiler, when it fails, or when the
    binary does not hold :data:`CHAINS` ``vpdpbusd`` in a row (:func:`longest_vpdpbusd_run`)."""
    exe = compile_c(C_SOURCE, workdir, "peak", [])
    dis = subprocess.run(["objdump", "-d", str(exe)], capture_output=True, text=True).stdout \
        if shutil.which("objdump") else ""
    if dis and longest_vpdpbusd_run(dis) < CHAINS:
        raise RuntimeError(f"the compiled loop has {longest_vpdpbusd_run(dis)} consecutive vpdpbusd, expected "
                           f"{CHAINS} with nothing between them")
    return exe


def rate_per_core(exe: Path, cores: int, iterations: int, idle: float = IDLE_BEFORE_S) -> list[float]:
    """One run of ``cores`` copies at once, after ``idle`` seconds of sleep (see :data:`IDLE_BEFORE_S`); -> each
    copy's vpdpbusd per second."""
    time.sleep(idle)
    procs = [subprocess.Popen([str(exe), str(iterations)], stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        rates.append(iterations * CHAINS / float(out.split()[0]))
    return rates


def iterations_for(exe: Path, seconds: float) -> int:
    """Loop iterations that take ``exe`` about ``seconds`` on one core now (a short probe run; at least 10^6)."""
    return max(1_000_000, int(rate_per_core(exe, 1, 2_000_000)[0] * seconds / CHAINS))


def has_vnni() -> bool:
    """Whether /proc/cpuinfo lists AVX-512 VNNI."""
    try:
        return "avx512_vnni" in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


def measure(cores: int, repeats: int, seconds: float = 0.5) -> dict | None:
    """The ceiling now: ``repeats`` runs of ``cores`` copies of the loop at once, each ~``seconds`` long;
    -> {"per_core": median vpdpbusd per second per copy, "spread": [min, max], "iterations": per run, "runs": all
    rates}, or None on a CPU without AVX-512 VNNI or without a C compiler (the reason printed to stderr)."""
    if not has_vnni():
        print("vnni_peak: this CPU has no AVX-512 VNNI (avx512_vnni in /proc/cpuinfo)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            exe = build(Path(d))
        except RuntimeError as e:
            print(f"vnni_peak: {e}", file=sys.stderr)
            return None
        iterations = iterations_for(exe, seconds)
        runs = [rate_per_core(exe, cores, iterations) for _ in range(repeats)]
    rates = [r for run in runs for r in run]
    return dict(per_core=statistics.median(rates), spread=[min(rates), max(rates)], iterations=iterations,
                runs=runs)


def floor_ms(gmac_per_image: float, batch: int, per_core: float, cores: int) -> float:
    """Milliseconds for ``batch`` images of ``gmac_per_image`` G multiply-adds at ``per_core`` ``vpdpbusd`` per
    second on each of ``cores`` cores: the time of a network doing nothing but its products on VNNI."""
    return gmac_per_image * 1e9 * batch / (per_core * MAC_PER_VPDPBUSD * cores) * 1e3


#: what a floor quoted from this loop is and is not (the benchmarks print it under their floor columns)
FLOOR_CAVEAT = ("A reference, not a bound: on the 2-core Zen 4 VMs the loop's rate depends on how long the cores "
                "have been busy (3.2-3.4 G per second per core in 0.1 s runs, 2.8-2.9 G over 1.2 s, no steal time)")


def floor_cell(floor: float | None, ours_ms: float, theirs_ms: float | None) -> str:
    """Markdown cell ``floor (ours / floor, theirs / floor)`` (milliseconds; theirs left out when None or 0), '-'
    without a floor."""
    if not floor:
        return "-"
    theirs = f", {theirs_ms / floor:.2f}x" if theirs_ms else ""
    return f"{floor:.2f} ({ours_ms / floor:.2f}x{theirs})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="copies run at once (default: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gmac-per-image", type=float, default=1.680,
                    help="ResNet-18 at 224x224 by default (its products on real input)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vnni_peak"))
    args = ap.parse_args(argv)
    host = cpu_features()
    loads = [round(os.getloadavg()[0], 2)]
    m = measure(args.cores, args.repeats)
    if m is None:
        return 2
    loads.append(round(os.getloadavg()[0], 2))
    per_core, iterations = m["per_core"], m["iterations"]
    gmacs = per_core * MAC_PER_VPDPBUSD * args.cores / 1e9
    floors = {b: floor_ms(args.gmac_per_image, b, per_core, args.cores) for b in (1, 8)}
    res = dict(host=host, cores=args.cores, repeats=args.repeats, iterations=iterations,
               vpdpbusd_per_s_per_core=per_core, gmacs=gmacs,
               spread=m["spread"],
               gmac_per_image=args.gmac_per_image, floor_ms=floors, loadavg=loads,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               command=".venv/bin/python " + " ".join(["benchmarks/vnni_peak.py", *(argv or sys.argv[1:])]))
    lines = [f"# AVX-512 VNNI ceiling: {host.get('model_name', '?')}, {args.cores} core(s) busy", "",
             "| vpdpbusd / s / core (median) | range over runs | GMAC/s, all cores | floor at batch 1 | floor at batch 8 |",
             "|---:|---:|---:|---:|---:|",
             f"| {per_core / 1e9:.3f} G | {res['spread'][0] / 1e9:.3f}-{res['spread'][1] / 1e9:.3f} G | {gmacs:.0f} | "
             f"{floors[1]:.2f} ms | {floors[8]:.2f} ms |", "",
             f"Floors: {args.gmac_per_image} GMAC per image at that rate (every product of the network on "
             "`vpdpbusd`, nothing else). 12 independent register chains, one process per core, "
             f"{args.repeats} runs of {iterations * CHAINS / 1e6:.0f} M instructions; 1-minute load average "
             f"{min(loads)}-{max(loads)}.", "", f"Command: `{res['command']}` ({res['date']})."]
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
