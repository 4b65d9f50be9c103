"""Instruction counts in a compiled .so (``objdump -d``) and the host CPU's SIMD features."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# "  1139:\t{vex} vpdpbusd %ymm2,%ymm1,%ymm0" (address, tab, optional raw bytes + tab, then the instruction)
_INSN = re.compile(r"^\s*[0-9a-f]+:\t(?:(?:[0-9a-f]{2} )+\s*\t)?(.*)$")
_PREFIXES = {"{vex}", "{vex3}", "{evex}", "{disp8}", "{disp32}", "{load}", "{store}", "lock", "rep", "repz",
             "repe", "repnz", "repne", "notrack", "bnd", "data16", "addr32", "ds", "cs"}


class ObjdumpMissingError(RuntimeError):
    """``objdump`` is not on PATH."""


def _objdump() -> str | None:
    return shutil.which("objdump")


def _instructions(so_path: Path, objdump: str) -> Iterator[tuple[str, str]]:
    """(mnemonic, operands) of every instruction in the executable sections, streamed from ``objdump -d``."""
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: a chatty stderr cannot block stdout
        proc = subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(so_path)], stdout=subprocess.PIPE,
                                stderr=errf, text=True, errors="replace", env={**os.environ, "LC_ALL": "C"})
        assert proc.stdout is not None
        done = False
        try:
            for line in proc.stdout:  # streamed: a large .so never sits in memory as text
                m = _INSN.match(line)
                if m:
                    toks = m.group(1).split(None)
                    i = next((k for k, t in enumerate(toks) if t not in _PREFIXES), None)
                    if i is not None:
                        yield toks[i], " ".join(toks[i + 1:])
            done = True
        finally:
            proc.stdout.close()
            if proc.wait() != 0 and done:  # a consumer that stops early makes objdump die of SIGPIPE: not an error
                errf.seek(0)
                raise RuntimeError(f"objdump -d {so_path} failed ({proc.returncode}): {errf.read().strip()[:500]}")


def _check(so_path: str | Path, what: str, missing_ok: bool) -> tuple[Path, str | None]:
    so_path = Path(so_path)
    if not so_path.is_file():
        raise FileNotFoundError(f"no such object file: {so_path}")
    objdump = _objdump()
    if objdump is None:
        msg = (f"objdump not found on PATH: install binutils (e.g. `apt-get install binutils`) to count {what} "
               f"in {so_path.name}")
        if not missing_ok:
            raise ObjdumpMissingError(msg)
        warnings.warn(msg, stacklevel=3)
    return so_path, objdump


def count_instructions(so_path: str | Path, mnemonics: Iterable[str] = ("vpdpbusd",),
                       missing_ok: bool = True) -> dict[str, int]:
    """How often each mnemonic occurs in the executable sections of ``so_path`` (``objdump -d``).

    Prefixes such as ``{vex}`` (AVX-VNNI's VEX form of vpdpbusd) and ``{evex}`` are skipped, so both encodings
    count. Without ``objdump`` (package binutils) this warns and returns ``{}`` (``missing_ok``) or raises
    :class:`ObjdumpMissingError`.
    """
    wanted = {m.lower(): 0 for m in mnemonics}
    so_path, objdump = _check(so_path, ", ".join(wanted), missing_ok)
    if objdump is None:
        return {}
    for mn, _ in _instructions(so_path, objdump):
        if mn in wanted:
            wanted[mn] += 1
    return wanted


def count_by_width(so_path: str | Path, mnemonic: str = "vpdpbusd", missing_ok: bool = True) -> dict[str, int]:
    """Occurrences of ``mnemonic`` by vector width of its destination: ``{"xmm": n, "ymm": n, "zmm": n}``.

    128-bit ``xmm`` VNNI does a quarter of the work of ``zmm`` per instruction; a kernel that only shows xmm
    forms is not using the machine's full vector width. ``{}`` when objdump is missing (``missing_ok``).
    """
    so_path, objdump = _check(so_path, mnemonic, missing_ok)
    if objdump is None:
        return {}
    out = {"xmm": 0, "ymm": 0, "zmm": 0}
    for mn, ops in _instructions(so_path, objdump):
        if mn == mnemonic:
            regs = re.findall(r"%([xyz]mm)\d+", ops)  # AT&T: destination is the last register operand
            if regs:
                out[regs[-1]] += 1
    return out


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = val.strip()
        elif key == "flags" and not flags:
            flags = set(val.split())
        if model != "unknown" and flags:
            break
    return model, flags


def llvm_host_cpu() -> str:
    """LLVM's name for the host CPU (``tvm.target.codegen.llvm_get_system_cpu``), or ``'unknown'``."""
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu()) or "unknown"
    except Exception:
        return "unknown"


def cpu_features(llvm: bool = True) -> dict[str, Any]:
    """Host CPU model, SIMD flags from ``/proc/cpuinfo`` and (``llvm``) LLVM's host CPU name.

    Flags a hypervisor hides read False here even when the silicon has them; ``llvm_cpu`` comes from CPUID
    through LLVM and can name a newer core than the visible flags suggest.
    """
    model, flags = _cpuinfo()
    out: dict[str, Any] = {"model_name": model, "logical_cpus": os.cpu_count()}
    for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16"):
        out[f] = f in flags
    out["vnni"] = out["avx512_vnni"] or out["avx_vnni"]
    out["llvm_cpu"] = llvm_host_cpu() if llvm else "unknown"
    return out


__all__ = ["ObjdumpMissingError", "count_by_width", "count_instructions", "cpu_features", "llvm_host_cpu"]
