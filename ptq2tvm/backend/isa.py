"""Which x86 instructions a build uses and which this host has: kernel ISA choice, the CPU features recorded in a
build's sidecar (checked when it is loaded) and the ``--target`` strings.

Kernel ISAs (``kernels.target_isa``): ``vnni`` (AVX-512 VNNI ``vpdpbusd zmm``), ``avxvnni`` (AVX-VNNI, the 256-bit VEX
``vpdpbusd ymm`` of Alder Lake+ / Zen 5 client parts without AVX-512), ``avx2`` (``vpmaddubsw`` where a layer's weights
make it exact, else the int16 ``vpmaddwd`` path), ``amx`` (AMX-INT8 ``tdpbusd`` tiles for the int8 convs,
AVX-512 VNNI for the rest: kernels/amx.py; detected by :func:`host_isa`, built where the target has amx-int8).

Feature names are Linux's /proc/cpuinfo flags (``avx512_vnni``, ``avx_vnni``, ``amx_int8``); :data:`LLVM_TO_CPUINFO`
maps LLVM's names to them.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from ..bundle_runner import host_cpu_flags, missing_cpu_features
from ..errors import TargetError

# LLVM feature -> /proc/cpuinfo flag, for the features a compiled kernel may contain (ISA extensions, not tuning
# flags such as 'fast-variable-crosslane-shuffle')
LLVM_TO_CPUINFO = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512ifma": "avx512ifma", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "gfni": "gfni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}

# --target names for artifacts built on one machine and run on another (LLVM's x86-64 micro-architecture levels)
PORTABLE_TARGETS = {
    "x86-64-v3": "AVX2 + FMA + BMI2 (Haswell / Zen 1 and newer): the exact AVX2 kernels",
    "x86-64-v4": "AVX-512 F/BW/DQ/VL (Skylake-SP / Zen 4 and newer, no VNNI): the exact AVX2 kernels, AVX-512 code",
}


# kernel ISA (a build's sidecar "isa") -> the host-ISA name of :func:`host_isa`, so that benchmark rows of the .so,
# ONNX Runtime and OpenVINO name one instruction set one way
KERNEL_TO_HOST_ISA = {"vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx2": "avx2", "amx": "amx"}


def isa_label(kernel_isa: str) -> str:
    """A kernel ISA in :func:`host_isa`'s vocabulary ('vnni' -> 'avx512_vnni', 'avxvnni' -> 'avx_vnni'); other
    names (CUDA 'dp4a', 'generic') unchanged."""
    return KERNEL_TO_HOST_ISA.get(kernel_isa, kernel_isa)


def host_isa(flags: set[str] | None = None) -> str | None:
    """The best int8 dot-product ISA of this host: 'amx', 'avx512_vnni', 'avx_vnni', 'avx512' (AVX-512BW without
    VNNI), 'avx2', or None (no AVX2, or the flags cannot be read)."""
    flags = host_cpu_flags() if flags is None else flags
    if not flags:
        return None
    if {"amx_int8", "amx_tile"} <= flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx_vnni" in flags:
        return "avx_vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else None


def required_cpu_features(target: dict[str, Any]) -> list[str]:
    """The /proc/cpuinfo flags of every ISA extension LLVM may use for an llvm ``target`` (its mcpu and mattr);
    [] for other kinds."""
    if target.get("kind") != "llvm":
        return []
    import tvm
    from tvm.target import codegen

    feats = set(codegen.llvm_get_cpu_features(tvm.target.Target(target)))
    return sorted(LLVM_TO_CPUINFO[f] for f in feats if f in LLVM_TO_CPUINFO)


def parse_target_string(text: str) -> dict[str, Any]:
    """TVM's classic target string (``"llvm -mcpu=znver4 -num-cores=2 -mattr=+avx2,+fma"``) as the JSON dict TVM 0.27
    takes (it no longer parses strings). Raises TargetError on anything else."""
    toks = shlex.split(text)
    if not toks or toks[0].startswith("-"):
        raise TargetError(f"target string {text!r} does not start with a kind (e.g. 'llvm -mcpu=znver4')")
    out: dict[str, Any] = {"kind": toks[0]}
    for tok in toks[1:]:
        if not tok.startswith("-") or "=" not in tok:
            raise TargetError(f"target string {text!r}: expected -key=value options, got {tok!r}")
        key, val = tok.lstrip("-").split("=", 1)
        if key in ("mattr", "libs", "keys"):
            out[key] = [v for v in val.split(",") if v]
        elif key in ("num-cores", "max_num_threads", "opt-level") or val.lstrip("-").isdigit():
            try:
                out[key] = int(val)
            except ValueError:
                raise TargetError(f"target string {text!r}: -{key} expects an integer, got {val!r}") from None
        else:
            out[key] = val
    return out


def check_llvm_cpu(target: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    """``target`` unchanged if it is not an LLVM target, has no ``mcpu`` or LLVM knows its ``mcpu`` for its
    ``mtriple`` (default x86-64 Linux); else TargetError naming the CPU (``text``: the ``--target`` value it came
    from). LLVM itself only logs an unknown CPU and builds for a generic one: a typo would give a slow build."""
    from tvm.target import codegen

    mcpu = target.get("mcpu")
    if target.get("kind") != "llvm" or not mcpu:
        return target
    triple = str(target.get("mtriple") or "x86_64-unknown-linux-gnu")
    try:
        valid = codegen.llvm_is_valid_cpu(str(mcpu), triple)
    except Exception:  # noqa: BLE001 - a triple this LLVM has no backend for: left to the build's own error
        return target
    if not valid:
        bare = text == mcpu          # a bare --target word: a target name or a CPU name
        what, where = ("target or CPU", "") if bare else ("CPU", f" in target {text!r}" if text else "")
        raise TargetError(f"unknown {what} {mcpu!r}{where} for {triple}: use 'host', one of "
                          f"{', '.join(PORTABLE_TARGETS)}, an LLVM CPU name (znver4, sapphirerapids, alderlake, "
                          "haswell, ...), a TVM target string ('llvm -mcpu=znver4') or a JSON target dict")
    return target


def llvm_cpu_target(mcpu: str, num_cores: int | None = None) -> dict[str, Any]:
    """``{"kind": "llvm", "mcpu": mcpu, "num-cores": ...}`` after checking that LLVM knows ``mcpu`` (x86-64,
    :func:`check_llvm_cpu`)."""
    return check_llvm_cpu({"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores or os.cpu_count() or 1)}, mcpu)


__all__ = ["KERNEL_TO_HOST_ISA", "LLVM_TO_CPUINFO", "PORTABLE_TARGETS", "check_llvm_cpu", "host_cpu_flags", "host_isa", "isa_label", "llvm_cpu_target",
           "missing_cpu_features", "parse_target_string", "required_cpu_features"]
