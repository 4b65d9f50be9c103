"""Benchmark reports: JSON rows (atomic), a markdown table, a PNG bar chart and a plain-text table.

A row is ``{model, input, batch, w_bits, a_bits, runtime, median_ms, p10_ms, p90_ms, threads, vpdpbusd_count}``
(``w_bits`` / ``a_bits``: the compiled run's setting, which groups the rows; :func:`validate_row` adds
``precision``, what the row's runtime itself ran: ``FP32`` for the float baselines, ``W8A8`` for ONNX Runtime's and
OpenVINO's own INT8 quantization, else ``W<w>A<a>``);
``runtime`` is one of :data:`RUNTIMES` (or ``ptq2tvm_<tag>`` for several compiled variants); ``vpdpbusd_count`` is
``None`` except for the ptq2tvm .so. Optional ``isa`` (the vector ISA the runtime's kernels used: the .so's
sidecar, OpenVINO's oneDNN primitives, the host's for ORT / torch) shows as a column; ``cpu`` names the host. An optional ``schedule`` (``hand`` | ``tuned``) tells two builds of the same .so
apart; tables and charts label tuned rows ``ptq2tvm tuned`` and compare every row with the hand-scheduled build.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..atomic import atomic_path, write_text

RUNTIMES = ("ptq2tvm", "torch_fp32", "ort_fp32", "ort_int8", "tvm_fp32", "openvino_fp32", "openvino_int8",
            "ort_ptq2tvm_qdq")  # ONNX Runtime running ptq2tvm's QDQ export of the same integer graph
ROW_KEYS = ("model", "input", "batch", "w_bits", "a_bits", "runtime", "median_ms", "p10_ms", "p90_ms", "threads",
            "vpdpbusd_count")
# Rows with equal identity describe the same measurement; merge_rows keeps the newest.
ROW_IDENTITY = ("model", "input", "batch", "w_bits", "a_bits", "runtime", "threads", "schedule")


def _label(r: dict[str, Any]) -> str:
    return f"{r['runtime']} tuned" if r.get("schedule") == "tuned" else str(r["runtime"])


def _is_ptq2tvm(runtime: str) -> bool:
    return runtime == "ptq2tvm" or runtime.startswith("ptq2tvm_")


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; non-finite floats -> None (strict JSON)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def validate_row(row: dict[str, Any]) -> dict[str, Any]:
    """Check a row has every key of :data:`ROW_KEYS` and a known runtime; return it with plain Python values."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"benchmark row is missing {missing}: {row}")
    rt = str(row["runtime"])
    if rt not in RUNTIMES and not _is_ptq2tvm(rt):
        raise ValueError(f"benchmark row has unknown runtime {rt!r}; expected one of {RUNTIMES}")
    out = {k: _plain(row[k]) for k in ROW_KEYS}
    out.update({k: _plain(v) for k, v in row.items() if k not in ROW_KEYS})  # extra keys are kept, at the end
    out["precision"] = bits_label(out)
    return out


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Validate ``rows`` and write them as a JSON list; the file is replaced atomically (no partial file)."""
    path = Path(path)
    text = json.dumps([validate_row(r) for r in rows], indent=2, allow_nan=False) + "\n"
    write_text(path, text)
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON file written by :func:`write_rows`."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of benchmark rows")
    return [validate_row(r) for r in rows]


def merge_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``rows`` to the JSON file at ``path`` (created if absent), replacing rows with the same identity."""
    path = Path(path)
    merged: dict[tuple, dict[str, Any]] = {}
    for r in (read_rows(path) if path.exists() else []) + [validate_row(r) for r in rows]:
        merged[tuple(r.get(k) for k in ROW_IDENTITY)] = r
    out = list(merged.values())
    write_rows(out, path)
    return out


def _fmt_ms(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _group_key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["input"], r["batch"], r["w_bits"], r["a_bits"], r["threads"])


def bits_label(r: dict[str, Any]) -> str:
    """The W/A column of a row: 'FP32' for the float baselines (``*_fp32``), 'W8A8' for ONNX Runtime's and
    OpenVINO's own INT8 quantization of the FP32 model (``ort_int8`` / ``openvino_int8``), the row's ``bits`` for a
    run with per-layer bits ("mixed W4A8 x11, ...": :func:`ptq2tvm.bench.runner.run_bits_label`), else the run's
    bits. The row's ``w_bits`` / ``a_bits`` stay the run's (they group the rows)."""
    rt = str(r["runtime"])
    if rt.endswith("_fp32"):
        return "FP32"
    if rt in ("ort_int8", "openvino_int8"):
        return "W8A8"
    if r.get("bits"):
        return str(r["bits"])
    return f"W{r['w_bits']}A{r['a_bits']}"


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells; ``vs ptq2tvm`` is this row's median over the ptq2tvm median of its group."""
    rows = [validate_row(r) for r in rows]
    ref = {}
    for r in rows:
        hand = r.get("schedule") != "tuned"
        if (r["runtime"] == "ptq2tvm" and hand) or (_is_ptq2tvm(r["runtime"]) and _group_key(r) not in ref):
            ref[_group_key(r)] = r["median_ms"]
    header = ["model", "input", "batch", "W/A bits", "runtime", "isa", "median ms", "p10 ms", "p90 ms", "threads",
              "vpdpbusd", "vs ptq2tvm"]
    cells = []
    for r in rows:
        base = ref.get(_group_key(r))
        rel = (f"{r['median_ms'] / base:.2f}x" if base and r["median_ms"] is not None else "-")
        cells.append([str(r["model"]), str(r["input"]), str(r["batch"]), bits_label(r),
                      _label(r), str(r.get("isa") or "-"), _fmt_ms(r["median_ms"]), _fmt_ms(r["p10_ms"]),
                      _fmt_ms(r["p90_ms"]), str(r["threads"]), "-" if r["vpdpbusd_count"] is None else str(r["vpdpbusd_count"]), rel])
    return header, cells


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``rows``; ``vs ptq2tvm`` > 1 means the ptq2tvm .so is that many times faster."""
    header, cells = _table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 6 else "---:" for i in
                                                               range(len(header))) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None,
                   footer: str | None = None) -> Path:
    """Write :func:`markdown_table` (with an optional ``# title`` and a ``footer`` paragraph, e.g. the command that
    made it) atomically."""
    path = Path(path)
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows)
    text += "\nLatency in ms per batch (median, p10, p90 of interleaved runs in one process on the same input). " \
            "`vs ptq2tvm` = runtime median / ptq2tvm median.\n"
    if footer:
        text += f"\n{footer}\n"
    write_text(path, text)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width plain-text table of ``rows``."""
    header, cells = _table(rows)
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) if cells else len(header[i])
              for i in range(len(header))]
    right = set(range(6, len(header)))

    def line(c: list[str]) -> str:
        return "  ".join(s.rjust(w) if i in right else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


def print_table(rows: Sequence[dict[str, Any]], file: TextIO | None = None) -> None:
    """Print :func:`format_table` to stdout (or ``file``)."""
    print(format_table(rows), file=file or sys.stdout)


def chart_top(medians: Sequence[float], upper: Sequence[float], spread: float = 2.0) -> float:
    """The y-axis top of a latency panel: the tallest error bar, but at most ``spread`` times the largest median, so
    one runtime's p90 outlier does not squash every bar (a clipped bar is labelled with its p90); 15% headroom."""
    peak = max(medians, default=0.0) or 1.0
    tallest = max((m + h for m, h in zip(medians, upper)), default=peak)
    return min(tallest, spread * peak) * 1.15


def use_log_axis(medians: Sequence[float], spread: float = 10.0) -> bool:
    """A latency panel gets a log y axis when its largest median is more than ``spread`` times its smallest
    positive one (on a linear axis the fast bars would be a few pixels tall)."""
    positive = [m for m in medians if m and m > 0]
    return len(positive) > 1 and max(positive) > spread * min(positive)


_COLORS = {"ptq2tvm": "#d62728", "torch_fp32": "#7f7f7f", "ort_fp32": "#1f77b4", "ort_int8": "#2ca02c",
           "tvm_fp32": "#ff7f0e", "ort_ptq2tvm_qdq": "#bcbd22",
           "openvino_fp32": "#17becf", "openvino_int8": "#9467bd"}


def write_chart(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """PNG bar chart of median latency with p10/p90 error bars: one panel per (model, batch), one bar per runtime.

    When a group holds several bit widths, ptq2tvm bars are labelled ``ptq2tvm W?A?``; a repeated baseline keeps
    its last row. Written atomically.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    rows = [validate_row(r) for r in rows]
    if not rows:
        raise ValueError("no benchmark rows to chart")
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        g = groups.setdefault((r["model"], r["batch"]), {})
        bits = {(x["w_bits"], x["a_bits"]) for x in rows
                if (x["model"], x["batch"]) == (r["model"], r["batch"]) and _is_ptq2tvm(x["runtime"])}
        label = _label(r)
        if _is_ptq2tvm(r["runtime"]) and len(bits) > 1:
            label = f"{label} W{r['w_bits']}A{r['a_bits']}"
        g[label] = r
    n = len(groups)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, ((model, batch), series) in zip(axes.flat, groups.items()):
        order = {rt: i for i, rt in enumerate(RUNTIMES)}
        labels = sorted(series, key=lambda k: (not _is_ptq2tvm(series[k]["runtime"]),
                                               order.get(series[k]["runtime"], len(order)), k))
        med = [series[k]["median_ms"] or 0.0 for k in labels]
        lo = [max(0.0, m - (series[k]["p10_ms"] if series[k]["p10_ms"] is not None else m))
              for k, m in zip(labels, med)]
        hi = [max(0.0, (series[k]["p90_ms"] if series[k]["p90_ms"] is not None else m) - m)
              for k, m in zip(labels, med)]
        colors = [_COLORS.get(series[k]["runtime"], _COLORS["ptq2tvm"] if _is_ptq2tvm(series[k]["runtime"])
                              else "#9467bd") for k in labels]
        xs = range(len(labels))
        ax.bar(xs, med, yerr=[lo, hi], color=colors, capsize=3, ecolor="black", error_kw={"elinewidth": 0.8})
        log = use_log_axis(med)
        if log:       # e.g. FP32 PyTorch 30x an int8 .so: on a linear axis the int8 bars are a few pixels tall
            positive = [m for m in med if m > 0]
            bottom, top = min(positive) / 2, max(m + h for m, h in zip(med, hi)) * 2.5
            ax.set_yscale("log")
        else:
            bottom, top = 0.0, chart_top(med, hi)
        for x, m, h in zip(xs, med, hi):
            clipped = not log and m + h > top / 1.15
            y = (m + h) * 1.08 if log else min(m + h, top / 1.15) + 0.02 * top
            ax.text(x, y, _fmt_ms(m) + (f"\n(p90 {_fmt_ms(m + h)})" if clipped else ""), ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        threads = sorted({series[k]["threads"] for k in labels})
        ax.set_title(f"{model}  batch {batch}  ({'/'.join(map(str, threads))} thr)", fontsize=9)
        ax.set_ylabel("latency ms (median, p10-p90)" + (", log scale" if log else ""), fontsize=8)
        ax.set_ylim(bottom, top)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


__all__ = ["RUNTIMES", "ROW_KEYS", "chart_top", "format_table", "markdown_table", "merge_rows", "print_table", "read_rows",
           "use_log_axis", "validate_row", "write_chart", "write_markdown", "write_rows"]
