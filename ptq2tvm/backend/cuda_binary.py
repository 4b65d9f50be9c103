"""Ahead-of-time CUDA binaries for a CUDA build.

TVM 0.27's pip wheel does not compile CUDA kernels when it builds: the exported .so holds the kernels' CUDA C++
source, and ``libtvm_runtime_cuda`` compiles it when the .so is loaded, by calling the global function
``tvm_callback_cuda_compile``, which only the full ``tvm`` Python package registers (NVRTC through cuda-python).
A GPU host with only TVM's runtime (what a bundle ships) could not load such a .so, and every load would spend
seconds in NVRTC.

So ptq2tvm compiles each CUDA source with nvcc at build time (a fatbin: SASS for the target's arch plus its PTX,
which the driver compiles for newer GPUs), checks it, and stores it in the sidecar by the source's sha256;
:func:`ptq2tvm.bundle_runner.register_cuda_binaries` hands the stored binary to the runtime when it asks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ArtifactError


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def cuda_sources(module: Any) -> list[str]:
    """The CUDA C++ source of every CUDA module imported (at any depth) by a built TVM module."""
    out: list[str] = []

    def walk(m: Any) -> None:
        for imp in m.imports:
            if imp.kind == "cuda":
                src = imp.inspect_source("")
                if src not in out:
                    out.append(src)
            walk(imp)

    walk(module)
    return out


def is_cuda_arch(arch: str) -> bool:
    """'sm_80', 'sm_90a', ...: the arch names nvcc takes."""
    return re.fullmatch(r"sm_\d+a?", arch) is not None


def _nvcc(nvcc: str, text: str, input_suffix: str, args: list[str], output_suffix: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="ptq2tvm-nvcc-") as d:
        src, dst = Path(d) / f"kernels{input_suffix}", Path(d) / f"kernels{output_suffix}"
        src.write_text(text)
        proc = subprocess.run([nvcc, "-w", "-O3", *args, "-o", str(dst), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ArtifactError(f"nvcc failed on the generated CUDA kernels ({' '.join(args)}):\n{proc.stderr[-4000:]}")
        return dst.read_bytes()


def compile_cuda_source(source: str, arch: str, nvcc: str | None = None) -> dict[str, Any]:
    """nvcc ``source`` for ``arch`` (e.g. 'sm_80') -> a sidecar entry: the fatbin (base64) with its checksums and the
    number of ``dp4a`` instructions in its PTX. The C++ is compiled once, to PTX; the fatbin is made from that PTX
    (byte-identical to compiling the source to a fatbin directly, at a third of the time)."""
    if not is_cuda_arch(arch):
        raise ValueError(f"CUDA arch must look like 'sm_80', got {arch!r}")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise ArtifactError("a CUDA build needs nvcc (the CUDA toolkit) to compile its kernels ahead of time: put it "
                            "on PATH or set CUDA_HOME")
    compute = "compute_" + arch[3:]
    ptx = _nvcc(nvcc, source, ".cu", ["--ptx", f"-arch={compute}"], ".ptx").decode()
    fatbin = _nvcc(nvcc, ptx, ".ptx", ["--fatbin", "-gencode", f"arch={compute},code={arch}",
                                       "-gencode", f"arch={compute},code={compute}"], ".fatbin")
    return {
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "format": "fatbin",
        "arch": arch,
        "sha256": hashlib.sha256(fatbin).hexdigest(),
        "dp4a_count": sum(1 for line in ptx.splitlines() if line.strip().startswith("dp4a.")),
        "data_b64": base64.b64encode(fatbin).decode("ascii"),
    }


def build_cuda_binaries(module: Any, arch: str) -> list[dict[str, Any]]:
    """Compile every CUDA source of a built module (see the module docstring)."""
    sources = cuda_sources(module)
    if not sources:
        raise ArtifactError("the CUDA build has no CUDA kernels (nothing was offloaded to the GPU)")
    return [compile_cuda_source(src, arch) for src in sources]


__all__ = ["build_cuda_binaries", "compile_cuda_source", "cuda_sources", "find_nvcc", "is_cuda_arch"]
