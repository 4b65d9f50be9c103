"""Where reconstruction runs and where its caches live: device choice, cache memory estimate, peak memory per unit.

- ``resolve_device("auto" | "cpu" | "cuda" | "cuda:1")``: auto is CUDA when ``torch.cuda.is_available()``.
- ``plan_caches``: before any unit runs, the bytes of every cached tensor (quantized and FP unit inputs, FP targets,
  the unit outputs being streamed) are computed from the traced shapes, per unit, and compared with the free memory
  of the device. Caches that do not fit (more than ``DEVICE_FRACTION`` of the free GPU memory) stay in pinned host
  memory; each iteration's rows are then gathered on the host and copied to the device (non-blocking).
- ``PeakMemory``: peak resident memory of this process over a unit (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import QuantConfigError

DEVICES = ("auto", "cpu", "cuda")
#: caches go to the device only if their peak fits in this fraction of its free memory (the rest is for the model,
#: activations of the batch, autograd and the allocator's slack)
DEVICE_FRACTION = 0.6


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (or None): cuda if available else cpu. Raises QuantConfigError for an unknown or absent device."""
    if isinstance(spec, torch.device):
        return spec
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise QuantConfigError(f"device {spec!r} requested but torch sees no CUDA device (torch "
                                   f"{torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        d = torch.device(s)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise QuantConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return d
    raise QuantConfigError(f"unknown device {spec!r}; use one of auto, cpu, cuda, cuda:N")


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo, else physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class CachePlan:
    """Cache sizes per unit (bytes) and where the caches live."""

    device: str
    cache_device: str
    pinned: bool
    n_images: int
    per_unit: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_unit: str = ""
    free_bytes: int = 0
    reason: str = ""

    def summary(self) -> str:
        mib = 1 << 20
        where = (f"pinned host memory ({self.reason})" if self.pinned else
                 f"{self.cache_device} memory" + (f" ({self.reason})" if self.reason else ""))
        return (f"reconstruction caches for {self.n_images} images: peak {self.peak_bytes / mib:.1f} MiB at unit "
                f"{self.peak_unit!r} (quantized + FP unit inputs, FP targets, streamed outputs); {self.device} has "
                f"{self.free_bytes / mib:.0f} MiB free -> caches in {where}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_shapes(fp: Any, images: torch.Tensor, device: torch.device) -> dict[str, tuple[int, ...]]:
    """Per-image shape of every tensor of the graph (one image through the FP model on ``device``)."""
    with torch.no_grad():
        env = fp(images[:1].to(device), return_all=True)
    return {k: tuple(v.shape[1:]) for k, v in env.items()}


def plan_caches(fp: Any, images: torch.Tensor, units: list, device: torch.device, itemsize: int = 4) -> CachePlan:
    """Bytes the caches need at each unit (see the module docstring) and where they will live."""
    shapes = tensor_shapes(fp, images, device)
    n = int(images.shape[0])

    def nbytes(names: list[str] | set[str]) -> int:
        total = 0
        for t in names:
            k = 1
            for d in shapes[t]:
                k *= d
            total += k * n * itemsize
        return total

    per_unit: dict[str, int] = {}
    produced = {fp.graph.input_name}
    for i, u in enumerate(units):
        needed = {t for v in units[i:] for t in v.inputs}
        live = produced & needed                                    # cached (quantized and FP) while u runs
        per_unit[u.name] = 2 * nbytes(live) + nbytes(set(u.targets) | set(u.outputs)) + nbytes(set(u.outputs))
        produced |= set(u.outputs)
    peak_unit = max(per_unit, key=per_unit.get) if per_unit else ""
    peak = per_unit.get(peak_unit, 0)
    free = free_bytes(device)
    plan = CachePlan(str(device), str(device), False, n, per_unit, peak, peak_unit, free)
    if device.type == "cuda" and peak > DEVICE_FRACTION * free:
        plan.cache_device, plan.pinned = "cpu", True
        plan.reason = f"peak > {DEVICE_FRACTION:.0%} of the free GPU memory"
    elif device.type == "cpu" and peak > free:
        plan.reason = "WARNING: more than the available RAM; use fewer calibration images"
    return plan


class PeakMemory:
    """Peak RSS (Linux VmHWM) and CUDA peak allocation between ``reset()`` and ``read()``."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")          # resets VmHWM to the current RSS
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / (1 << 20), 1)
        return out
