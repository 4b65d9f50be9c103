"""Interleaved latency timing: every runtime in one process, on the same input, round-robin with rotated order.

Thread counts: :func:`time_interleaved` sets torch's intra-op threads (``threads``). ONNX Runtime sessions fix their
thread count when they are built (``ort_*_runner(..., threads)``) and TVM's pool reads ``TVM_NUM_THREADS`` when it
starts (``CompiledModel(..., threads=...)``); build those runners with the same ``threads``.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TimingStats:
    """Latency summary of one runner, in milliseconds over ``n`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n: int

    @classmethod
    def from_ns(cls, samples_ns: list[int] | np.ndarray) -> TimingStats:
        """Summarise raw ``perf_counter_ns`` durations."""
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if ms.size == 0:
            raise ValueError("no timing samples")
        p10, med, p90 = np.percentile(ms, [10, 50, 90])
        return cls(median_ms=float(med), p10_ms=float(p10), p90_ms=float(p90), mean_ms=float(ms.mean()),
                   min_ms=float(ms.min()), n=int(ms.size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Longer than ONNX Runtime's post-call spin (~35 ms CPU at default settings) with margin.
DEFAULT_GAP_S = 0.1


def _median(x: TimingStats | float) -> float:
    return x.median_ms if isinstance(x, TimingStats) else float(x)


def ratio(a: TimingStats | float, b: TimingStats | float) -> float:
    """Median latency of ``a`` over ``b`` (< 1: ``a`` is faster)."""
    return _median(a) / _median(b)


def speedup(a: TimingStats | float, b: TimingStats | float) -> float:
    """How many times faster ``a`` is than ``b`` (``b / a`` medians)."""
    return _median(b) / _median(a)


def ratios(stats: Mapping[str, TimingStats], reference: str) -> dict[str, float]:
    """Median of every runner over the median of ``stats[reference]``."""
    ref = stats[reference]
    return {k: ratio(v, ref) for k, v in stats.items()}


def rotated_order(names: list[str], round_index: int) -> list[str]:
    """Round ``round_index``'s call order: ``names`` rotated left by ``round_index``."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def time_interleaved(runners: Mapping[str, Callable[[np.ndarray], Any]], inputs: np.ndarray, warmup: int = 10,
                     repeats: int = 50, threads: int | None = None, progress: bool = True,
                     gap_s: float = DEFAULT_GAP_S, calls_per_turn: int = 1) -> dict[str, TimingStats]:
    """Time every runner on the same ``inputs``: ``warmup`` untimed then ``repeats`` timed rounds.

    Each round calls each runner once; the order is rotated every round so no runner always follows the same
    one. ``threads`` sets torch's intra-op threads only (ORT / TVM threads are fixed by their runners).

    ``gap_s`` is an untimed sleep before every call. Idle worker threads busy-wait after a call (measured here:
    ONNX Runtime ~35 ms of CPU, PyTorch/OpenMP ~10 ms, TVM ~0) and, back to back, steal cores from whichever
    runtime runs next; the gap lets them go to sleep so each call starts on an idle machine. ``gap_s=0`` times
    back to back. After the gap, one untimed call wakes the runner's own parked workers (OpenMP threads that went
    to sleep during the gap cost PyTorch ~10 ms to wake here), so the timed call starts with its own pool awake and
    every other pool idle. The garbage collector is paused during the timed rounds.

    ``calls_per_turn`` timed calls run back to back in each turn (each one a sample): 1 measures the latency of a
    call that follows an idle period, more measure steady-state latency (a serving loop), still interleaved with the
    other runtimes turn by turn. Small networks (~1 ms) are much slower right after an idle gap on this VM (CPU
    clock and caches wake up): MobileNetV2 took ~2 ms as the first call after 0.1 s idle and ~0.9 ms back to back.
    """
    if not runners:
        raise ValueError("no runners to time")
    if repeats < 1 or warmup < 0 or calls_per_turn < 1:
        raise ValueError(f"repeats and calls_per_turn must be >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"calls_per_turn={calls_per_turn}, warmup={warmup}")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    names = list(runners)
    samples: dict[str, list[int]] = {n: [] for n in names}
    total = warmup + repeats
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="bench rounds", unit="round", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(total):
            timed = r >= warmup
            if timed and r == warmup:
                gc.collect()
                gc.disable()
            for name in rotated_order(names, r):
                fn = runners[name]
                if gap_s > 0:
                    time.sleep(gap_s)
                    fn(inputs)  # prime: wake this runtime's own (parked) worker threads, untimed
                for _ in range(calls_per_turn):
                    t0 = clock()
                    out = fn(inputs)
                    t1 = clock()
                    if timed:
                        samples[name].append(t1 - t0)
                    del out
            if bar is not None:
                bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        if bar is not None:
            bar.close()
    return {n: TimingStats.from_ns(samples[n]) for n in names}


__all__ = ["DEFAULT_GAP_S", "TimingStats", "ratio", "ratios", "rotated_order", "speedup", "time_interleaved"]
