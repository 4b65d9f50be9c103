"""Per-unit reconstruction losses: JSON (every unit's curve, initial and final loss) and a PNG (curves + the final
loss per unit along the network, MRECG Fig. 6 style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import write_json


def loss_table(report: Any) -> dict[str, Any]:
    """JSON-able summary: per stage, the ordered units with initial / final loss, plus the curves."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for key, c in report.curves.items():
        if key.startswith("probe:"):
            continue
        stages.setdefault(c["stage"], []).append(dict(
            unit=c["unit"], index=c.get("index"), initial_loss=c["initial_loss"], final_loss=c["final_loss"],
            iters=c["iters"], seconds=c["seconds"], iters_per_s=c["iters_per_s"],
            changed_roundings=c.get("changed_roundings", 0), curve=dict(it=c["it"], rec=c["rec"], reg=c["reg"])))
    for rows in stages.values():
        rows.sort(key=lambda r: r["index"] if r["index"] is not None else 0)
    return dict(method=report.method, granularity=report.granularity, adaqtransform=report.adaqtransform,
                lam=report.lam, iterations=report.iterations, optim_seconds=report.optim_seconds,
                iters_per_s=report.iters_per_s, seconds=report.seconds, mrecg=report.mrecg, stages=stages)


def save_loss_json(report: Any, path: str | Path) -> Path:
    return write_json(Path(path), loss_table(report))


def plot_losses(report: Any, path: str | Path) -> Path | None:
    """Two panels: rec-loss curves of every unit (log scale), and the final loss per unit along the network."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:      # pragma: no cover - matplotlib is a dependency, but plotting is optional
        return None
    table = loss_table(report)
    if not table["stages"]:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for stage, rows in table["stages"].items():
        for r in rows:
            ax1.plot(r["curve"]["it"], [max(v, 1e-12) for v in r["curve"]["rec"]], lw=0.8,
                     label=f"{stage}/{r['unit']}" if len(rows) <= 12 else None)
        xs = list(range(len(rows)))
        ax2.plot(xs, [r["final_loss"] for r in rows], "o-", label=f"{stage}: after")
        ax2.plot(xs, [r["initial_loss"] for r in rows], "x--", alpha=0.6, label=f"{stage}: before (RTN)")
        ax2.set_xticks(xs)
        ax2.set_xticklabels([r["unit"] for r in rows], rotation=70, fontsize=7)
    ax1.set_yscale("log")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("reconstruction loss (batch)")
    ax1.set_title("per-unit loss curves")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=6, ncol=2)
    ax2.set_yscale("log")
    ax2.set_ylabel("unit loss (all calibration images)")
    ax2.set_title(f"{report.method} / {report.granularity}" + (" + AdaQTransform" if report.adaqtransform else ""))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
