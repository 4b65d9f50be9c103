"""Throughput of the AVX2 u8 x s8 dot-product instruction sequences, measured on this CPU (no TVM involved).

    .venv/bin/python benchmarks/avx2_dot_throughput.py [--repeats 7] [--out benchmarks/results/avx2_dot_throughput]

Why: on hosts without VNNI the conv kernels (kernels/README.md, "Arithmetic") use one of three exact sequences, and
which one a layer gets decides its speed: ``vpmaddubsw`` + ``vpmaddwd``(ones) + ``vpaddd`` (intrinsic ``ubsw``,
W7A8 and most W8A4 layers), ``vpmaddubsw`` + ``vpaddw`` into int16 (``ubsw16``, W4A4), and ``vpmaddwd`` on
zero-extended activation pairs (W8A8 with full 8-bit weights; the pairs made in the loop with ``vpshufb`` until
7a1c60e, since then read ready-widened from the pad stage). This script times each sequence in a hand-written
register-tiled loop shaped like the kernels' inner loop (4 output pixels x 16 output channels x 4 input channels =
256 multiply-adds per iteration, 8 int32 accumulators, activations broadcast from memory), plus an alternative
considered and not built (widening part of the ``vpmaddubsw`` sums with shifts instead of ``vpmaddwd``), and the
raw throughput of each instruction on independent registers.

The loops are inline assembly compiled with the system C compiler (``cc -O2 -mavx2``); times are TSC ticks (the
TSC runs at a fixed rate, not at the core clock: compare rows with each other, not with a clock). Medians of
``--repeats`` runs. Writes ``<out>.json`` (with the CPU model and load average) and ``<out>.md``; prints the table.
x86-64 with AVX2 only; exits 2 with a message elsewhere or without a C compiler.
"""

from __future__ import annotations

import argparse
import os
import platform
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

C_SOURCE = r"""
#include <stdio.h>
#include <x86intrin.h>
#define N 20000000L
static char buf[4096] __attribute__((aligned(64)));
#define CLOBBER "rcx","memory","ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11","ymm12","ymm13","ymm14","ymm15"
#define PROLOGUE "vpxor %%ymm0,%%ymm0,%%ymm0\n vpxor %%ymm1,%%ymm1,%%ymm1\n vpxor %%ymm2,%%ymm2,%%ymm2\n" \
  "vpxor %%ymm3,%%ymm3,%%ymm3\n vpxor %%ymm4,%%ymm4,%%ymm4\n vpxor %%ymm5,%%ymm5,%%ymm5\n vpxor %%ymm6,%%ymm6,%%ymm6\n" \
  "vpxor %%ymm7,%%ymm7,%%ymm7\n vmovdqa 512(%1),%%ymm15\n vmovdqa 544(%1),%%ymm14\n vmovdqa 576(%1),%%ymm13\n" \
  "vmovdqa 608(%1),%%ymm12\n mov %0, %%rcx\n1:\n"
#define BENCH(name, per, body) { unsigned long long t = __rdtsc(); \
  __asm__ volatile(PROLOGUE body "dec %%rcx\n jnz 1b\n" :: "r"(N), "r"(buf) : CLOBBER); \
  t = __rdtsc() - t; printf("%s\t%s\t%.4f\n", name, per, (double)t / N); }
#define X8(op) op("%%ymm0") op("%%ymm1") op("%%ymm2") op("%%ymm3") op("%%ymm4") op("%%ymm5") op("%%ymm6") op("%%ymm7")
#define I_UBSW(r) "vpmaddubsw %%ymm15," r "," r "\n"
#define I_WD(r) "vpmaddwd %%ymm15," r "," r "\n"
#define I_SRAD(r) "vpsrad $1," r "," r "\n"
#define I_ADDD(r) "vpaddd %%ymm15," r "," r "\n"
#define I_SHUFB(r) "vpshufb %%ymm15," r "," r "\n"

/* the kernels' inner loop: 4 pixels (accumulators ymm0..7: pixel p -> ymm2p, ymm2p+1), weights ymm8/9 */
#define UBSW_PIX(off, a0, a1) "vpbroadcastd " off "(%1),%%ymm10\n" \
  "vpmaddubsw %%ymm8,%%ymm10,%%ymm11\n vpmaddwd %%ymm15,%%ymm11,%%ymm11\n vpaddd %%ymm11," a0 "," a0 "\n" \
  "vpmaddubsw %%ymm9,%%ymm10,%%ymm14\n vpmaddwd %%ymm15,%%ymm14,%%ymm14\n vpaddd %%ymm14," a1 "," a1 "\n"
#define UBSW16_PIX(off, a0, a1) "vpbroadcastd " off "(%1),%%ymm10\n" \
  "vpmaddubsw %%ymm8,%%ymm10,%%ymm11\n vpaddw %%ymm11," a0 "," a0 "\n" \
  "vpmaddubsw %%ymm9,%%ymm10,%%ymm14\n vpaddw %%ymm14," a1 "," a1 "\n"
/* int16 vpmaddwd path as built: one broadcast of 4 activation bytes, vpshufb into (a0,a1) / (a2,a3) u16 pairs,
   weights sign-extended from int8 once per step (ymm8..ymm11) */
#define WD_PIX(off, a0, a1) "vpbroadcastd " off "(%1),%%ymm12\n vpshufb %%ymm14,%%ymm12,%%ymm13\n" \
  "vpshufb %%ymm15,%%ymm12,%%ymm12\n" \
  "vpmaddwd %%ymm8,%%ymm12,%%ymm14\n vpaddd %%ymm14," a0 "," a0 "\n vpmaddwd %%ymm9,%%ymm12,%%ymm12\n" \
  "vpaddd %%ymm12," a1 "," a1 "\n vpmaddwd %%ymm10,%%ymm13,%%ymm14\n vpaddd %%ymm14," a0 "," a0 "\n" \
  "vpmaddwd %%ymm11,%%ymm13,%%ymm13\n vpaddd %%ymm13," a1 "," a1 "\n vmovdqa 544(%1),%%ymm14\n"
/* activations widened to u16 by the pad stage (two broadcasts of ready pairs; the kernels since 7a1c60e sign-extend
   the int8 weights in the loop, here int16 weights are loaded once) */
#define WD16_PIX(off0, off1, a0, a1) "vpbroadcastd " off0 "(%1),%%ymm12\n vpbroadcastd " off1 "(%1),%%ymm13\n" \
  "vpmaddwd %%ymm8,%%ymm12,%%ymm14\n vpaddd %%ymm14," a0 "," a0 "\n vpmaddwd %%ymm9,%%ymm12,%%ymm12\n" \
  "vpaddd %%ymm12," a1 "," a1 "\n vpmaddwd %%ymm10,%%ymm13,%%ymm14\n vpaddd %%ymm14," a0 "," a0 "\n" \
  "vpmaddwd %%ymm11,%%ymm13,%%ymm13\n vpaddd %%ymm13," a1 "," a1 "\n"
/* hypothetical: one of the pixel's two products widened without vpmaddwd: acc += p ^ 0x8000, hi += p >> 16
   (exact: sum = acc - 65535 * hi - 32768 * steps), the hi sums in ymm12, the 0x8000 constant in ymm13 */
#define SHIFT_PIX(off, a0, a1) "vpbroadcastd " off "(%1),%%ymm10\n" \
  "vpmaddubsw %%ymm8,%%ymm10,%%ymm11\n vpmaddwd %%ymm15,%%ymm11,%%ymm11\n vpaddd %%ymm11," a0 "," a0 "\n" \
  "vpmaddubsw %%ymm9,%%ymm10,%%ymm14\n vpsrad $16,%%ymm14,%%ymm10\n vpxor %%ymm13,%%ymm14,%%ymm14\n" \
  "vpaddd %%ymm10,%%ymm12,%%ymm12\n vpaddd %%ymm14," a1 "," a1 "\n"

int main(void) {
  for (int i = 0; i < 4096; i++) buf[i] = (char)(i * 7 + 3);
  BENCH("vpmaddubsw", "instruction", X8(I_UBSW))
  BENCH("vpmaddwd", "instruction", X8(I_WD))
  BENCH("vpsrad", "instruction", X8(I_SRAD))
  BENCH("vpshufb", "instruction", X8(I_SHUFB))
  BENCH("vpaddd", "instruction", X8(I_ADDD))
  BENCH("ubsw: vpmaddubsw + vpmaddwd(ones) + vpaddd (W7A8)", "256 MAC",
        "vmovdqa 0(%1),%%ymm8\n vmovdqa 32(%1),%%ymm9\n"
        UBSW_PIX("1024", "%%ymm0", "%%ymm1") UBSW_PIX("1028", "%%ymm2", "%%ymm3")
        UBSW_PIX("1032", "%%ymm4", "%%ymm5") UBSW_PIX("1036", "%%ymm6", "%%ymm7"))
  BENCH("ubsw16: vpmaddubsw + vpaddw (W4A4)", "256 MAC",
        "vmovdqa 0(%1),%%ymm8\n vmovdqa 32(%1),%%ymm9\n"
        UBSW16_PIX("1024", "%%ymm0", "%%ymm1") UBSW16_PIX("1028", "%%ymm2", "%%ymm3")
        UBSW16_PIX("1032", "%%ymm4", "%%ymm5") UBSW16_PIX("1036", "%%ymm6", "%%ymm7"))
  BENCH("int16 vpmaddwd, vpshufb'd activations (W8A8 until 7a1c60e)", "256 MAC",
        "vpmovsxbw 0(%1),%%ymm8\n vpmovsxbw 16(%1),%%ymm9\n vpmovsxbw 32(%1),%%ymm10\n vpmovsxbw 48(%1),%%ymm11\n"
        WD_PIX("1024", "%%ymm0", "%%ymm1") WD_PIX("1028", "%%ymm2", "%%ymm3")
        WD_PIX("1032", "%%ymm4", "%%ymm5") WD_PIX("1036", "%%ymm6", "%%ymm7"))
  BENCH("int16 vpmaddwd, u16 activations from the pad stage (W8A8 now)", "256 MAC",
        "vmovdqa 0(%1),%%ymm8\n vmovdqa 32(%1),%%ymm9\n vmovdqa 64(%1),%%ymm10\n vmovdqa 96(%1),%%ymm11\n"
        WD16_PIX("1024", "1028", "%%ymm0", "%%ymm1") WD16_PIX("1032", "1036", "%%ymm2", "%%ymm3")
        WD16_PIX("1040", "1044", "%%ymm4", "%%ymm5") WD16_PIX("1048", "1052", "%%ymm6", "%%ymm7"))
  BENCH("ubsw, 1 of 8 products widened by shifts (not built)", "256 MAC",
        "vmovdqa 0(%1),%%ymm8\n vmovdqa 32(%1),%%ymm9\n"
        SHIFT_PIX("1024", "%%ymm0", "%%ymm1") UBSW_PIX("1028", "%%ymm2", "%%ymm3")
        UBSW_PIX("1032", "%%ymm4", "%%ymm5") UBSW_PIX("1036", "%%ymm6", "%%ymm7"))
  BENCH("ubsw, 2 of 8 products widened by shifts (not built)", "256 MAC",
        "vmovdqa 0(%1),%%ymm8\n vmovdqa 32(%1),%%ymm9\n"
        SHIFT_PIX("1024", "%%ymm0", "%%ymm1") UBSW_PIX("1028", "%%ymm2", "%%ymm3")
        SHIFT_PIX("1032", "%%ymm4", "%%ymm5") UBSW_PIX("1036", "%%ymm6", "%%ymm7"))
  return 0;
}
"""


def build(work: Path) -> Path:
    """Compile the loops; -> the executable. Raises RuntimeError naming the compiler and its message."""
    return compile_c(C_SOURCE, work, "dot", ["-mavx2"])


def measure(exe: Path, repeats: int) -> list[dict]:
    """Run the executable ``repeats`` times; -> rows (name, unit, median / min TSC ticks per unit, all runs)."""
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
        for line in out.strip().splitlines():
            name, unit, ticks = line.split("\t")
            runs.setdefault((name, unit), []).append(float(ticks))
    return [dict(name=name, per=unit, median_tsc=statistics.median(v), min_tsc=min(v), runs=v)
            for (name, unit), v in runs.items()]


def to_markdown(rows: list[dict], meta: dict) -> str:
    base = next(r["median_tsc"] for r in rows if r["name"].startswith("ubsw:"))
    lines = ["# AVX2 dot-product sequences: throughput on this CPU", "",
             f"Command: `{meta['command']}` ({meta['date']})", "",
             f"CPU: {meta['cpu']}; load average {meta['loadavg'][0]:.2f} / {meta['loadavg'][1]:.2f} (1 / 5 min). "
             f"TSC ticks (fixed-rate counter, not core cycles), median and minimum of {meta['repeats']} runs "
             "(on a shared host the minimum is the least disturbed run).", "",
             "Single instructions (8 independent registers, register operands):", "",
             "| instruction | TSC ticks per instruction (median) | instructions per tick (median / best) |",
             "|---|---:|---:|"]
    for r in rows:
        if r["per"] == "instruction":
            lines.append(f"| {r['name']} | {r['median_tsc'] / 8:.3f} | {8 / r['median_tsc']:.2f} / "
                         f"{8 / r['min_tsc']:.2f} |")
    lines += ["", "Inner loops shaped like the conv kernels' (4 pixels x 16 output channels x 4 input channels, "
              "8 int32 accumulators, activation broadcasts from memory):", "",
              "| sequence | TSC ticks per 256 MAC (median / best) | MAC per tick (median) | vs ubsw (median / best) |",
              "|---|---:|---:|---:|"]
    best = next(r["min_tsc"] for r in rows if r["name"].startswith("ubsw:"))
    for r in rows:
        if r["per"] == "256 MAC":
            lines.append(f"| {r['name']} | {r['median_tsc']:.2f} / {r['min_tsc']:.2f} | {256 / r['median_tsc']:.1f} | "
                         f"{r['median_tsc'] / base:.2f}x / {r['min_tsc'] / best:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="runs of the whole set; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/avx2_dot_throughput"),
                    help="output path without extension (.json and .md are written)")
    args = ap.parse_args(argv)
    cpu = cpu_features(llvm=False)
    if platform.machine() not in ("x86_64", "AMD64") or not cpu["avx2"]:
        print("avx2_dot_throughput: needs an x86-64 CPU with AVX2", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = build(Path(tmp))
        except RuntimeError as e:
            print(f"avx2_dot_throughput: {e}", file=sys.stderr)
            return 2
        rows = measure(exe, args.repeats)
    meta = dict(cpu=cpu["model_name"], loadavg=list(os.getloadavg()), repeats=args.repeats,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command="python benchmarks/avx2_dot_throughput.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]))
    md = to_markdown(rows, meta)
    write_json(Path(args.out + ".json"), dict(meta, rows=rows))
    write_text(Path(args.out + ".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
