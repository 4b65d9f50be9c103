"""Benchmarks: baseline runtimes (PyTorch / ONNX Runtime FP32 and INT8), interleaved timing, reports, disassembly.

The orchestration of `ptq2tvm bench` lives in :mod:`ptq2tvm.bench.runner`.
"""

from __future__ import annotations

from .baselines import export_onnx, ort_fp32_runner, ort_int8_runner, quantize_onnx_int8, torch_fp32_runner
from .disasm import count_by_width, count_instructions, cpu_features
from .report import RUNTIMES, merge_rows, print_table, read_rows, write_chart, write_markdown, write_rows
from .timing import TimingStats, ratio, ratios, speedup, time_interleaved

__all__ = [
    "RUNTIMES", "TimingStats", "count_by_width", "count_instructions", "cpu_features", "export_onnx", "merge_rows",
    "ort_fp32_runner", "ort_int8_runner", "print_table", "quantize_onnx_int8", "ratio", "ratios", "read_rows",
    "speedup", "time_interleaved", "torch_fp32_runner", "write_chart", "write_markdown", "write_rows",
]
