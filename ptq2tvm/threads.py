"""Thread counts that survive a busy machine.

PyTorch's OpenMP workers and TVM's runtime thread pool both spin-wait for each other at every parallel region. When
other processes already occupy the cores, a worker that is descheduled stalls the whole region: measured on the
2-core host with a load average of 8-10, the demo's 28x28 ResNet .so took 100-145 ms per call with 2 TVM threads and
0.85 ms with 1 (TVM_BIND_THREADS=0 or TVM_THREAD_POOL_SPIN_COUNT=0 did not cure it), and a 2-thread PyTorch training
step went from ~0.1 s to 3-4 s. So when the caller did not choose, the default is the preferred count on a quiet
machine and 1 thread on a busy one, and the choice is said.
"""

from __future__ import annotations

import os
import sys

_announced: set[str] = set()
# How the user overrides the choice, named in the note: the command line sets it to its own option when the running
# command has one (``ptq2tvm eval --threads``); callers give their own fallback (``hint``), else the API's.
_cli_hint: str | None = None


def set_override_hint(text: str | None) -> None:
    """What the note of :func:`auto_threads` tells the user to do to override it (None: each caller's own hint)."""
    global _cli_hint
    _cli_hint = text


def auto_threads(preferred: int, *, what: str = "running", announce: bool = True, hint: str | None = None) -> int:
    """``preferred`` threads (capped at the core count) when the 1-minute load average leaves that many cores idle,
    else 1. Returns an int >= 1; when it returns fewer than asked and ``announce``, one line on stderr says why
    (``what``: e.g. "training", "the .so") and how to override it: the running command's option
    (:func:`set_override_hint`), else ``hint``, else "pass threads=N"."""
    cores = os.cpu_count() or 1
    want = max(1, min(int(preferred), cores))
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return want
    if want > 1 and load > cores - want + 0.5:
        if announce and what not in _announced:     # once per process and purpose
            _announced.add(what)
            print(f"note: load average {load:.1f} on {cores} cores: {what} with 1 thread instead of {want} (thread "
                  f"pools that spin-wait slow down 10-100x when other processes compete; to override: "
                  f"{_cli_hint or hint or 'pass threads=N'})",
                  file=sys.stderr)
        return 1
    return want
