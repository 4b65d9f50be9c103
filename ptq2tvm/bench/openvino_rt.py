"""OpenVINO CPU baselines for `ptq2tvm bench`: FP32 (the FP32 ONNX model) and INT8 (the same static QDQ ONNX model
that the ONNX Runtime INT8 baseline runs; OpenVINO's low-precision transformations turn its QuantizeLinear /
DequantizeLinear pairs into int8 convolutions).

Every runner is a ``Callable[[np.ndarray], np.ndarray | list[np.ndarray]]`` (float32 NCHW batch in, float32 output
out: a list of every output for a model with several), compiled with
the settings of a latency benchmark: ``PERFORMANCE_HINT=LATENCY``, one stream, ``INFERENCE_NUM_THREADS=threads`` and
``INFERENCE_PRECISION_HINT=f32`` (on CPUs with bf16/AMX-BF16 OpenVINO would otherwise run FP32 models in bf16). The
hint does not slow the INT8 model down: on a Zen 4 (OpenVINO 2026.4, default hint bf16 there) ResNet-18's QDQ model
at batch 8 ran 46.49 ms with it and 46.42 ms with OpenVINO's defaults (60 interleaved rounds, 2 threads, 2026-12-03).
``runner.kernels`` tells which oneDNN primitives the compiled model uses, read from its runtime ("exec") graph
(e.g. ``{'brgconv_avx2_I8': 20, 'jit_avx2_I8': 1}``), and ``runner.isa`` the vector ISA they ran. OpenVINO's
primitive names do not say whether an AVX-512 int8 kernel uses VNNI (``brgconv_avx512_I8`` runs oneDNN's
``brg_conv_fwd:avx512_core_vnni`` on a VNNI host): :func:`onednn_implementations` reads the implementations oneDNN
itself reports (``ONEDNN_VERBOSE=profile_create``, one inference in a child process), and ``runner.isa`` comes from those when the
probe works (``runner.isa_source``: ``"onednn_verbose"``, else ``"primitive_name"``).
OpenVINO is optional (``pip install openvino``): :func:`openvino_available` says whether it can be imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .baselines import Runner

# oneDNN primitive names carry the ISA: brgconv_avx512_amx_I8, jit_avx512_core_vnni_I8, brgconv_avx2_vnni_I8, ...
_ISA_PATTERNS = (("amx", "amx"), ("avx512_core_vnni", "avx512_vnni"), ("avx2_vnni", "avx_vnni"),
                 ("avx512", "avx512"), ("avx2", "avx2"), ("sse41", "sse41"), ("ref", "reference"))


def openvino_available() -> bool:
    """True when the ``openvino`` package imports."""
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a broken install: no OpenVINO rows either way
        return False
    return True


def openvino_version() -> str | None:
    try:
        import openvino as ov

        return str(ov.__version__)
    except Exception:  # noqa: BLE001
        return None


def primitive_isa(primitive: str) -> str:
    """The vector ISA a oneDNN primitive name names, e.g. 'brgconv_avx512_amx_I8' -> 'amx', 'jit_avx2_I8' -> 'avx2';
    'unknown' when it names none."""
    p = primitive.lower()
    for key, isa in _ISA_PATTERNS:
        if key in p:
            return isa
    return "unknown"


# oneDNN's own ISA names (the suffix of an implementation such as "brg_conv_fwd:avx512_core_vnni") -> this
# project's labels; longest first so that avx512_core_amx is not read as avx512_core.
_ONEDNN_ISAS = (("avx512_core_amx_fp16", "amx"), ("avx512_core_amx", "amx"), ("avx10_1_512_amx", "amx"),
                ("avx512_core_fp16", "avx512_vnni"), ("avx512_core_bf16", "avx512_vnni"),
                ("avx512_core_vnni", "avx512_vnni"), ("avx2_vnni_2", "avx_vnni"), ("avx2_vnni", "avx_vnni"),
                ("avx512_core", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse41", "sse41"))
_VERBOSE_OPS = ("convolution", "inner_product", "matmul", "deconvolution")

_PROBE = r"""
import json, sys, numpy as np, openvino as ov
path, config, shape = sys.argv[1], json.loads(sys.argv[2]), [int(v) for v in sys.argv[3].split(",")]
c = ov.Core().compile_model(path, "CPU", config)
c.create_infer_request().infer({0: np.zeros(shape, np.float32)})
import ctypes
ctypes.CDLL(None).fflush(None)          # oneDNN prints with C stdio: every line out before the interpreter exits
"""


def latency_config(threads: int) -> dict[str, Any]:
    """The CPU plugin settings of every OpenVINO baseline (module docstring): latency hint, one stream, ``threads``
    threads, f32 precision hint; the timed runner and its oneDNN probe compile with the same."""
    return {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": int(threads),
            "INFERENCE_PRECISION_HINT": "f32"}


def onednn_isa(implementation: str) -> str:
    """This project's ISA label of a oneDNN implementation name as ``ONEDNN_VERBOSE`` prints it, e.g.
    'brg_conv_fwd:avx512_core_vnni' -> 'avx512_vnni', 'brgconv:avx512_core_amx' -> 'amx', 'jit:avx2' -> 'avx2',
    'gemm:jit' / 'ref:any' -> 'unknown'."""
    impl = implementation.lower()
    for key, isa in _ONEDNN_ISAS:
        if re.search(rf"(^|[:_]){key}($|[:_,])", impl):
            return isa
    return "unknown"


def onednn_implementations(onnx_path: str | Path, threads: int, input_shape: tuple[int, ...],
                           timeout_s: float = 120.0) -> dict[str, int] | None:
    """How many conv / inner-product / matmul primitives of one OpenVINO CPU inference of ``onnx_path`` (zeros of
    ``input_shape``, float32) use each oneDNN implementation, as oneDNN reports their creation with
    ``ONEDNN_VERBOSE=profile_create`` (e.g. ``{'brg_conv_fwd:avx512_core_vnni': 16, 'brgconv_1x1:avx512_core_vnni':
    3, 'brgemm:avx512_core_vnni': 1}``; layers OpenVINO fused, or that share a cached primitive, count once). Not
    the execution level (``ONEDNN_VERBOSE=1``): with it OpenVINO 2026.4 fails to run a QDQ model's input reorder
    ("could not execute a primitive"), so the INT8 probe of a ResNet-18 returned nothing. The inference runs in a child process so that the
    verbose mode never touches the timed runners. None when the probe fails (OpenVINO built without verbose support,
    a timeout, a model with several inputs): callers fall back to the primitive names."""
    env = dict(os.environ, ONEDNN_VERBOSE="profile_create")
    cmd = [sys.executable, "-c", _PROBE, str(onnx_path), json.dumps(latency_config(threads)),
           ",".join(str(int(d)) for d in input_shape)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    counts: Counter[str] = Counter()
    for line in out.stdout.splitlines():
        f = line.split(",")
        # onednn_verbose,v1,primitive,create:cache_miss,cpu,<op>,<implementation>,<prop_kind>,... (cache_hit too)
        if len(f) > 6 and f[0] == "onednn_verbose" and f[2] == "primitive" and f[3].startswith("create:") \
                and f[4] == "cpu" and f[5] in _VERBOSE_OPS:
            counts[f[6]] += 1
    return dict(counts.most_common()) or None


def runtime_kernels(compiled: Any, layer_types: tuple[str, ...] = ("Convolution", "FullyConnected", "MatMul",
                                                                    "GroupConvolution")) -> dict[str, int]:
    """How many layers of ``layer_types`` run each primitive, from ``compiled.get_runtime_model()`` (each node's
    rt_info ``layerType`` / ``primitiveType``)."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = _rt_str(info, "layerType") or op.get_type_name()
        if layer not in layer_types:
            continue
        counts[_rt_str(info, "primitiveType") or "unknown"] += 1
    return dict(counts.most_common())


def _rt_str(info: Any, key: str) -> str | None:
    """A runtime-model rt_info entry as text (``str()`` of an OVAny is its class name; ``astype(str)`` its value)."""
    if key not in info:
        return None
    v = info[key]
    return str(v.astype(str)) if hasattr(v, "astype") else str(v)


def _main_isa(kernels: dict[str, int]) -> str:
    """The ISA of the primitive that runs the most conv/dense layers."""
    if not kernels:
        return "unknown"
    return primitive_isa(max(kernels.items(), key=lambda kv: kv[1])[0])


def _prop_str(v: Any) -> str:
    name = getattr(v, "get_type_name", None)       # element types (INFERENCE_PRECISION_HINT) print as <Type: ..>
    return str(name()) if callable(name) else str(getattr(v, "name", v))


def openvino_runner(onnx_path: str | Path, threads: int, input_shape: tuple[int, ...] | None = None) -> Runner:
    """Compile ``onnx_path`` for OpenVINO's CPU plugin (latency hint, 1 stream, ``threads`` threads, f32 precision
    hint); an INT8 QDQ model runs in int8, an FP32 model in FP32. Raises ImportError without openvino.

    With ``input_shape`` (the NCHW shape that will be timed), ``runner.onednn`` holds
    :func:`onednn_implementations` of one inference of that shape and ``runner.isa`` its main ISA (what oneDNN
    reports it ran); without it, or when that probe fails, ``runner.isa`` is read from the primitive names
    (``runner.isa_source`` says which)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    config = latency_config(threads)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    ports = list(compiled.outputs)             # every output, in the ONNX model's order

    def run(x: np.ndarray) -> Any:
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        outs = [np.array(request.get_tensor(p).data, dtype=np.float32, copy=True) for p in ports]
        return outs[0] if len(outs) == 1 else outs

    kernels = runtime_kernels(compiled)
    run.compiled = compiled            # type: ignore[attr-defined]
    run.kernels = kernels              # type: ignore[attr-defined]
    impls = onednn_implementations(onnx_path, threads, input_shape) if input_shape is not None else None
    run.onednn = impls                 # type: ignore[attr-defined]
    if impls:
        run.isa = onednn_isa(max(impls.items(), key=lambda kv: kv[1])[0])  # type: ignore[attr-defined]
        run.isa_source = "onednn_verbose"  # type: ignore[attr-defined]
    else:
        run.isa = _main_isa(kernels)   # type: ignore[attr-defined]
        run.isa_source = "primitive_name"  # type: ignore[attr-defined]
    run.config = {k: _prop_str(compiled.get_property(k)) for k in config}  # type: ignore[attr-defined]
    return run


__all__ = ["onednn_implementations", "onednn_isa", "openvino_available", "openvino_runner", "openvino_version",
           "primitive_isa", "runtime_kernels"]
