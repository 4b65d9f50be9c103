"""Baseline runtimes for `ptq2tvm bench`: PyTorch FP32, ONNX Runtime FP32 and ONNX Runtime INT8 (static QDQ).

Every runner is a ``Callable[[np.ndarray], np.ndarray | list[np.ndarray]]``: float32 NCHW batch in, float32 numpy
output out (a list of every output, in the integer graph's order, for a model with several outputs: a tuple / list
or a dict's values; each runtime computes and returns all of them, as the .so does), with its own thread count fixed
when it is built (ORT: session options; torch: ``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..atomic import atomic_path
from ..errors import DataError
from ..model_outputs import flatten_outputs

Runner = Callable[[np.ndarray], Any]   # np.ndarray, or list[np.ndarray] for several outputs

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(model: nn.Module, example: np.ndarray, path: str | Path, opset: int = OPSET) -> Path:
    """Export ``model`` (eval mode) to ONNX at the fixed shape of ``example``; atomic write, returns ``path``.

    Uses torch's TorchScript exporter (``dynamo=False``): in torch 2.13 it still exists (with a DeprecationWarning),
    honours opset 17 and folds BatchNorm into Conv. The default dynamo exporter cannot emit opset < 18 (its
    down-conversion fails on ResNets) and is only used as a fallback, at opset 18. A model with several outputs
    (tuple / list / dict) gets ONNX outputs ``output_0``, ``output_1``, ... in the integer graph's order.
    """
    path = Path(path)
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_out = len(flatten_outputs(model(x))[0])
        names = [OUTPUT_NAME] if n_out == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(n_out)]
        with atomic_path(path, suffix=".onnx") as tmp, torch.no_grad():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x,), str(tmp), opset_version=opset, dynamo=False,
                                      input_names=[INPUT_NAME], output_names=names,
                                      do_constant_folding=True)
            except Exception as legacy_err:  # legacy exporter gone or failed: fall back to torch.export
                try:
                    torch.onnx.export(model, (x,), str(tmp), opset_version=max(opset, 18), dynamo=True,
                                      input_names=[INPUT_NAME], output_names=names,
                                      external_data=False, verbose=False)
                except Exception as dynamo_err:
                    raise RuntimeError(f"ONNX export of {type(model).__name__} failed: legacy exporter: "
                                       f"{legacy_err!r}; dynamo exporter: {dynamo_err!r}") from dynamo_err
    finally:
        model.train(was_training)
    return path


def torch_fp32_runner(model: nn.Module, threads: int) -> Runner:
    """PyTorch eager FP32 under ``inference_mode`` with ``threads`` intra-op threads (a process-wide setting); every
    output as numpy (a list for several)."""
    model = model.eval()
    torch.set_num_threads(int(threads))
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(1)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            outs = flatten_outputs(model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))))[0]
        return outs[0].numpy() if len(outs) == 1 else [o.numpy() for o in outs]

    return run


def _session(onnx_path: str | Path, threads: int, allow_spinning: bool = True) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # ORT's idle workers spin-wait by default; in an interleaved benchmark they can steal the next runtime's cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_runner(onnx_path: str | Path, threads: int, allow_spinning: bool = True) -> Runner:
    sess = _session(onnx_path, threads, allow_spinning)
    inp = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]      # every output: the whole forward, as the .so computes it

    def run(x: np.ndarray) -> Any:
        res = sess.run(outs, {inp: np.ascontiguousarray(x, dtype=np.float32)})
        if len(res) == 1:
            return np.asarray(res[0], dtype=np.float32)
        return [np.asarray(r, dtype=np.float32) for r in res]

    run.session = sess  # type: ignore[attr-defined]
    return run


def ort_fp32_runner(onnx_path: str | Path, threads: int, allow_spinning: bool = True) -> Runner:
    """ONNX Runtime CPU FP32: ``threads`` intra-op, 1 inter-op, sequential, graph optimization ALL.

    ``allow_spinning=False`` stops idle ORT workers busy-waiting (ORT's default is to spin).
    """
    return _ort_runner(onnx_path, threads, allow_spinning)


def _fixed_batch(onnx_path: str | Path) -> tuple[str, int | None]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in init)
    d0 = inp.type.tensor_type.shape.dim[0]
    return inp.name, (d0.dim_value if d0.HasField("dim_value") else None)


def _calibration_reader(name: str, calib: np.ndarray, batch: int | None) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    calib = np.ascontiguousarray(calib, dtype=np.float32)
    b = batch or min(len(calib), 32)
    n = -(-len(calib) // b) * b  # round up to whole batches, wrapping around the data
    data = calib if n == len(calib) else np.resize(calib, (max(n, b), *calib.shape[1:]))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(data), b))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {name: data[i:i + b]}

        def rewind(self) -> None:
            self._it = iter(range(0, len(data), b))

        def __len__(self) -> int:
            return len(data) // b

    return _Reader()


def host_has_vnni() -> bool:
    """True when this x86 host has a u8 x s8 dot-product instruction (AVX-512 VNNI or AVX-VNNI), read from
    /proc/cpuinfo (False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_onnx_int8(onnx_path: str | Path, calib: np.ndarray, out_path: str | Path | None = None,
                       per_channel: bool = True, preprocess: bool = True, reduce_range: bool | None = None) -> Path:
    """Static QDQ quantization with ORT: QInt8 per-channel weights, QUInt8 activations, MinMax over ``calib``.

    ``reduce_range`` (default: on hosts without VNNI) quantizes weights to 7 bits, as ORT's documentation advises
    for non-VNNI x86: there its u8 x s8 kernels use the saturating ``vpmaddubsw`` and lose accuracy otherwise.
    Writes ``<stem>.int8.onnx`` next to ``onnx_path`` unless ``out_path`` is given (atomic write).
    """
    if reduce_range is None:
        reduce_range = not host_has_vnni()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path else onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    calib = np.asarray(calib)
    if calib.ndim < 2 or len(calib) == 0:
        raise DataError(f"ORT INT8 calibration data must be a non-empty batch, got shape {calib.shape}")
    if not np.isfinite(calib).all():
        raise DataError("ORT INT8 calibration data contains NaN/Inf")
    name, batch = _fixed_batch(onnx_path)
    with tempfile.TemporaryDirectory(prefix="ort_int8_") as td, atomic_path(out_path, ".onnx") as tmp:
        src: Path = onnx_path
        if preprocess:  # shape inference + ORT graph optimisation (Conv+BN fold etc.) before quantization
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(td) / "pre.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=False)
                src = pre
            except Exception as e:  # pre-processing is an optimisation only
                warnings.warn(f"quant_pre_process failed ({e!r}); quantizing the unprocessed model", stacklevel=2)
        quantize_static(str(src), str(tmp), _calibration_reader(name, calib, batch),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
    return out_path


def ort_int8_runner(onnx_path: str | Path, calib: np.ndarray, threads: int, per_channel: bool = True,
                    out_path: str | Path | None = None, allow_spinning: bool = True) -> Runner:
    """ONNX Runtime INT8 (static QDQ, see :func:`quantize_onnx_int8`) with the same session options as FP32."""
    q_path = quantize_onnx_int8(onnx_path, calib, out_path=out_path, per_channel=per_channel)
    return _ort_runner(q_path, threads, allow_spinning)


__all__ = ["Runner", "export_onnx", "ort_fp32_runner", "ort_int8_runner", "quantize_onnx_int8",
           "torch_fp32_runner"]
