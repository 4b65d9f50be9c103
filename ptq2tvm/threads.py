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


def auto_threads(preferred: int, *, what: str = "running", announce: bool = True) -> int:
    """``preferred`` threads (capped at the core count) when the 1-minute load average leaves that many cores idle,
    else 1. Returns an int >= 1; when it returns fewer than asked and ``announce``, one line on stderr says why
    (``what``: e.g. "training", "the .so")."""
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
                  "pools that spin-wait slow down 10-100x when other processes compete; pass --threads to override)",
                  file=sys.stderr)
        return 1
    return want
