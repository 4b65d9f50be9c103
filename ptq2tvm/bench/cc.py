"""Compile a small C benchmark loop with the system C compiler (the instruction-throughput benchmarks:
benchmarks/avx2_dot_throughput.py, benchmarks/vnni_peak.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def compile_c(source: str, workdir: Path, name: str, flags: list[str]) -> Path:
    """Write ``source`` to ``workdir/<name>.c`` and compile it with ``cc -O2 <flags>``; -> the executable's path.
    Raises RuntimeError naming the missing compiler, or the compiler and the start of its error message."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    src, exe = workdir / f"{name}.c", workdir / name
    src.write_text(source)
    proc = subprocess.run([cc, "-O2", *flags, "-o", str(exe), str(src)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
    return exe
