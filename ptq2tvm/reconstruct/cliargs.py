"""Command-line options of the reconstruction runtime (device, time budget, early stopping) for ``ptq2tvm quantize``."""

from __future__ import annotations

import argparse
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="where calibration and reconstruction run: auto (cuda when "
                   "available), cpu, cuda, cuda:N; caches that do not fit the GPU go to pinned host memory")
    p.add_argument("--time-budget", metavar="T", help="wall-clock budget of the reconstruction, e.g. 10m, 90s, "
                   "1h30m: iterations per unit are chosen from measured rates (at most --iters)")
    p.add_argument("--early-stop", action="store_true", help="stop a unit once its rounding is decided and its "
                   "loss has converged (docs/reconstruction.md)")


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ReconSettings fields of these options."""
    return dict(device=args.device, time_budget=args.time_budget, early_stop=args.early_stop)
