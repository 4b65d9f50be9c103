"""ONNX Runtime as a second, independent executor of the integer graph: the QDQ export run on ORT's CPU execution
provider against the reference executor, per layer and at the output.

Where the two may differ, and by how much (docs/onnx.md derives it):

* ORT fuses ``DQ -> Conv/Gemm -> Q`` into QLinearConv / QGemm: int32 accumulation (exact), then requantization as
  ``rint_half_even(float32(acc) * float32(s_x * s_w / s_out)) + z``. The reference computes
  ``(acc * m + 2^(n-1)) >> n`` with the 31-bit dyadic ``m * 2^-n``. Both round a value within ~2^-22 relative of the
  other, so they differ by at most 1 LSB, and only when the exact product lies within that distance of a
  half-integer (or exactly on a tie, which ORT rounds to even and the reference up).
* Nodes ORT leaves in float (a residual add before the Q, a Clip that is not the Q's own range, average pools it
  does not fuse) compute the same real numbers in float32 and round once at the Q: again at most 1 LSB, near ties.
* On x86 CPUs without VNNI, ORT's u8 x s8 kernels (int8 weights) use ``vpmaddubsw``, which adds pairs of u8*s8
  products in saturating int16: those layers can be off by many LSB. The uint8-weight export (same integers + 128,
  zero point 128) runs ORT's exact u8 x u8 kernels; ``weights="auto"`` picks it on such hosts.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import ArtifactError
from .ir.graph import IntegerGraph
from .ir.reference import run_reference
from .model_outputs import first_classification_output
from .onnx_export import INPUT_NAME, build_onnx, choose_weights, graph_output_names, onnx_output_names
from .units import percent

INTEGER_KERNELS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                   "MatMulIntegerToFloat")
FLOAT_CONVS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


@dataclass
class OnnxLayerParity:
    name: str
    op: str
    exact_fraction: float
    max_abs_lsb: int
    lsb_histogram: dict[str, int]
    ort_kernel: str | None = None
    local_exact_fraction: float = 1.0     # this layer alone, on the reference's input codes
    local_max_abs_lsb: int = 0
    local_lsb_histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class OnnxParityReport:
    onnx_weights: str
    int4: bool
    ort_version: str
    host_vnni: bool
    n_inputs: int
    n_elements: int
    exact_fraction: float
    mismatched_elements: int
    max_abs_lsb: int
    lsb_histogram: dict[str, int]
    top1_agreement_vs_reference: float | None     # of the first (N, classes) output; None when none is
    input_codes_exact_fraction: float
    ort_kernels: dict[str, int]
    integer_kernels: int
    float_kernels: int
    ort_top1: float | None = None
    reference_top1: float | None = None
    per_layer: list[OnnxLayerParity] = field(default_factory=list)
    per_layer_inputs: int = 0
    output_float_exact_fraction: float = 1.0   # ORT's float32 output == float32(q_ref - z) * float32(s), bitwise
    integer_requant: str = "none"
    integer_requant_layers: list[str] = field(default_factory=list)
    requant_fit: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"ONNX Runtime {self.ort_version} (CPU EP), QDQ export with {self.onnx_weights} weights"
            f"{' + INT4' if self.int4 else ''}; host VNNI: {'yes' if self.host_vnni else 'no'}; "
            f"{self.n_inputs} inputs",
            f"export: {len(self.integer_requant_layers)} conv/dense as ConvInteger/MatMulInteger + int64 requant "
            f"(integer_requant={self.integer_requant}); QLinearConv/QGemm float32 multiplier exact on every "
            f"accumulator value in {sum(f['exact_channels'] for f in self.requant_fit.values())} of "
            f"{sum(f['channels'] for f in self.requant_fit.values())} channels "
            f"({sum(f['mismatching_accumulators'] for f in self.requant_fit.values())} accumulator values differ)",
            f"ORT vs reference executor at the output codes: {percent(self.exact_fraction, 4)}% exact "
            f"({self.mismatched_elements} of {self.n_elements} elements differ), max |diff| {self.max_abs_lsb} LSB, "
            f"histogram {self.lsb_histogram}; float32 output bitwise equal on {percent(self.output_float_exact_fraction, 4)}%"
            + ("" if self.top1_agreement_vs_reference is None else
               f"; top-1 agreement {percent(self.top1_agreement_vs_reference)}%"),
            f"input quantization (ORT QuantizeLinear vs numpy): {percent(self.input_codes_exact_fraction, 4)}% exact",
            f"ORT kernels after graph optimisation: {self.integer_kernels} integer "
            f"({', '.join(f'{k} {v}' for k, v in self.ort_kernels.items() if k in INTEGER_KERNELS) or 'none'}), "
            f"{self.float_kernels} float conv/gemm",
        ]
        if self.ort_top1 is not None:
            lines.append(f"top-1: ORT {100 * self.ort_top1:.2f}%  reference (= .so) {100 * self.reference_top1:.2f}%")
        if self.per_layer:
            lines.append(f"per layer (ORT vs reference, first {self.per_layer_inputs} inputs; kernel: what ORT ran after "
                         "optimisation; local: the layer alone on the reference's inputs; chained: ORT end to end, "
                         "inheriting earlier layers' differences):")
            w = max(len(p.name) for p in self.per_layer)
            for p in self.per_layer:
                lines.append(f"  {p.name:<{w}} {p.op:<10} {str(p.ort_kernel):<24} local {percent(p.local_exact_fraction, 4, 8)}%"
                             f" max {p.local_max_abs_lsb} LSB | chained {percent(p.exact_fraction, 4, 8)}% "
                             f"max {p.max_abs_lsb:3d} LSB {p.lsb_histogram}")
        return "\n".join(lines)


def ort_session(path: str | Path, threads: int = 2, optimized_path: str | Path | None = None) -> Any:
    """An ORT CPU session at full graph optimisation (``optimized_path``: where ORT saves the optimised graph)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind exception types
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {type(e).__name__}: {e}") from e


def optimized_kernels(optimized_path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """Op-type counts of ORT's optimised graph, and for each ``q:<tensor>`` the op type that produces it (through
    layout Transposes / reorders)."""
    import onnx

    m = onnx.load(str(optimized_path), load_external_data=False)
    counts: dict[str, int] = {}
    producer: dict[str, Any] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
        for o in n.output:
            producer[o] = n
    kernels: dict[str, str] = {}
    for t, n in producer.items():
        if not t.startswith("q:"):
            continue
        kernels[t[2:]] = _kernel_of(n, producer)
    return dict(sorted(counts.items())), kernels


def _as_list(v: Any) -> list[np.ndarray]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _scored_columns(shapes: list[tuple[int, ...]]) -> Any:
    """For per-sample output ``shapes``: a function taking the :func:`_flat` array to the first (N, classes) output
    (what top-1 is computed on, as ``eval`` and ``parity`` do), or None when no output is 1-D per sample."""
    k = first_classification_output([(1, *s) for s in shapes])
    if k is None:
        return None
    start = sum(int(np.prod(s)) for s in shapes[:k])
    return lambda flat: flat[:, start:start + shapes[k][0]] if len(shapes) > 1 else flat


def _flat(outs: list[np.ndarray]) -> np.ndarray:
    """One output: as is (N, ...); several: each flattened per sample and concatenated (N, sum of sizes)."""
    if len(outs) == 1:
        return np.asarray(outs[0])
    return np.concatenate([np.asarray(o).reshape(len(o), -1) for o in outs], axis=1)


def _kernel_of(n: Any, producer: dict[str, Any], depth: int = 0) -> str:
    """The op that computes node ``n``'s value, looking through layout changes; ``X -> Q`` when a float X feeds a
    QuantizeLinear (ORT did not fuse it into an integer kernel)."""
    while n.op_type in ("Transpose", "ReorderOutput", "ReorderInput", "Identity") and n.input and depth < 6:
        n, depth = producer.get(n.input[0], n), depth + 1
    if n.op_type == "Cast":  # an integer-requant layer (onnx_export._integer_weighted): find its integer kernel
        k = n
        for _ in range(16):
            if k.op_type in ("ConvInteger", "MatMulInteger"):
                return f"{k.op_type}->int64"
            if not k.input or k.input[0] not in producer:
                break
            k = producer[k.input[0]]
    if n.op_type == "QuantizeLinear" and n.input and n.input[0] in producer and depth < 6:
        c = producer[n.input[0]]   # an exact clamp on the codes (onnx_export._split_clamp): Q(Clip(DQ(codes)))
        if c.op_type == "Clip" and c.input[0] in producer and producer[c.input[0]].op_type == "DequantizeLinear" \
                and producer[c.input[0]].input[0] in producer:
            return f"{_kernel_of(producer[producer[c.input[0]].input[0]], producer, depth + 1)}+Clip"
        return f"{_kernel_of(producer[n.input[0]], producer, depth + 1)}->Q"
    return n.op_type


def _dequant(q: np.ndarray, t: Any) -> np.ndarray:
    """The reference's codes as DequantizeLinear computes them: ``float32(q - z) * float32(s)`` (one rounding)."""
    return (np.asarray(q, dtype=np.int64) - int(t.zero_point)).astype(np.float32) * np.float32(t.scale)


def _lsb(a: np.ndarray, b: np.ndarray) -> tuple[float, int, dict[str, int]]:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    vals, counts = np.unique(np.minimum(d, 4), return_counts=True)
    return (float((d == 0).mean()) if d.size else 1.0, int(d.max(initial=0)),
            {("4+" if v == 4 else str(int(v))): int(c) for v, c in zip(vals, counts)})


def _run_cut(graph: IntegerGraph, images: np.ndarray, env: dict[str, np.ndarray], weights: str, int4: bool,
             threads: int, batch_size: int, td: str, integer_requant: str = "none") -> dict[str, np.ndarray]:
    """Every layer run by ORT on the reference executor's input codes (``build_onnx(cut_layers=True)``)."""
    import onnx

    cut, _ = build_onnx(graph, weights=weights, int4=int4, cut_layers=True, integer_requant=integer_requant)
    onnx.save(cut, f"{td}/cut.onnx")
    sess = ort_session(f"{td}/cut.onnx", threads)
    names = [o.name for o in sess.get_outputs()]
    feeds = [i.name for i in sess.get_inputs()]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(images), batch_size):
        feed = {f: (images[i:i + batch_size] if f == INPUT_NAME else env[f[len("in:"):]][i:i + batch_size])
                for f in feeds}
        for n, v in zip(names, sess.run(None, feed)):
            got[n].append(v)
    return {n[len("codes:"):]: np.concatenate(v) for n, v in got.items() if n.startswith("codes:")}


def run_onnx_parity(graph: IntegerGraph, images: np.ndarray, labels: np.ndarray | None = None, *,
                    weights: str = "auto", int4: bool = False, per_layer_inputs: int = 256, batch_size: int = 256,
                    threads: int = 2, work_dir: str | Path | None = None, progress: bool = True,
                    reference: np.ndarray | None = None, integer_requant: str = "none") -> OnnxParityReport:
    """Export ``graph`` (QDQ, see :mod:`ptq2tvm.onnx_export`), run it in ONNX Runtime on ``images`` (float32 NCHW) and
    compare with the reference executor: the output codes on every image, every IR tensor on the first
    ``per_layer_inputs`` images (a second export with per-layer outputs), ORT's kernels after optimisation.

    ``weights``: int8 | uint8 | auto (:func:`ptq2tvm.onnx_export.choose_weights`); ``integer_requant``: none | residual | inexact
    (:func:`ptq2tvm.onnx_export.build_onnx`). Compared at the output: the integer codes (``codes:<tensor>``) and the
    float32 output against the reference's codes dequantized the same way (``float32(q - z) * float32(s)``,
    bitwise). ``reference``: the reference executor's output codes
    on ``images`` when already computed (:func:`ptq2tvm.ir.reference.run_reference`). Raises :class:`ArtifactError` if ORT cannot load the
    export."""
    import onnx
    import onnxruntime as ort

    from .bench.baselines import host_has_vnni

    weights = choose_weights(weights)[0]
    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="ptq2tvm_onnx_", dir=work_dir) as td:
        plain, xrep = build_onnx(graph, weights=weights, int4=int4, integer_requant=integer_requant,
                                 output_codes=True)
        onnx.save(plain, f"{td}/model.onnx")
        sess = ort_session(f"{td}/model.onnx", threads, optimized_path=f"{td}/model.opt.onnx")
        counts, _ = optimized_kernels(f"{td}/model.opt.onnx")
        ort_out, ref_out, float_eq = [], [], []
        out_ts = [graph.tensor(n) for n in graph_output_names(graph)]
        fetch = onnx_output_names(graph) + [f"codes:{t.name}" for t in out_ts]
        for i in tqdm(range(0, len(images), batch_size), desc="ORT parity", disable=not progress, leave=False):
            x = images[i:i + batch_size]
            ys = sess.run(fetch, {INPUT_NAME: x})
            floats, codes = ys[:len(out_ts)], ys[len(out_ts):]
            ort_out.append(_flat(codes).astype(np.int64))
            if reference is None:
                env = run_reference(graph, graph.input.quantize(x), return_all=True)
                ref_out.append(_flat([env[t.name] for t in out_ts]))
                ref_b = [env[t.name] for t in out_ts]
            else:
                ref_b = [r[i:i + batch_size] for r in _as_list(reference)]
            float_eq.append(_flat([(np.asarray(f, dtype=np.float32) == _dequant(r, t)).astype(np.uint8)
                                   for f, r, t in zip(floats, ref_b, out_ts)]))
        del sess
        ort_q = np.concatenate(ort_out)
        ref_q = np.concatenate(ref_out) if reference is None else _flat(_as_list(reference))
        if ref_q.shape != ort_q.shape:
            raise ArtifactError(f"reference outputs {ref_q.shape} do not match ORT's {ort_q.shape}")
        exact, max_lsb, hist = _lsb(ort_q, ref_q)
        scored = _scored_columns([tuple(t.shape) for t in out_ts])
        rep = OnnxParityReport(
            onnx_weights=weights, int4=bool(int4), ort_version=ort.__version__, host_vnni=host_has_vnni(),
            n_inputs=int(len(images)), n_elements=int(ref_q.size), exact_fraction=exact,
            mismatched_elements=int((ort_q != ref_q).sum()), max_abs_lsb=max_lsb, lsb_histogram=hist,
            top1_agreement_vs_reference=(None if scored is None else
                                         float((scored(ort_q).argmax(1) == scored(ref_q).argmax(1)).mean())),
            input_codes_exact_fraction=1.0, ort_kernels=counts,
            output_float_exact_fraction=float(np.concatenate(float_eq).mean()),
            integer_requant=integer_requant, integer_requant_layers=list(xrep.integer_layers),
            requant_fit=dict(xrep.requant_fit),
            integer_kernels=sum(v for k, v in counts.items() if k in INTEGER_KERNELS),
            float_kernels=sum(v for k, v in counts.items() if k in FLOAT_CONVS))
        if labels is not None and scored is not None:
            rep.ort_top1 = float((scored(ort_q).argmax(1) == labels).mean())
            rep.reference_top1 = float((scored(ref_q).argmax(1) == labels).mean())
        if per_layer_inputs:
            sub = images[:per_layer_inputs]
            dbg, _ = build_onnx(graph, weights=weights, int4=int4, per_layer_outputs=True,
                                integer_requant=integer_requant)
            onnx.save(dbg, f"{td}/debug.onnx")
            s2 = ort_session(f"{td}/debug.onnx", threads, optimized_path=f"{td}/debug.opt.onnx")
            _, kernels = optimized_kernels(f"{td}/debug.opt.onnx")
            names = [o.name for o in s2.get_outputs()]
            got: dict[str, list[np.ndarray]] = {n: [] for n in names}
            for i in range(0, len(sub), batch_size):
                for n, v in zip(names, s2.run(None, {INPUT_NAME: sub[i:i + batch_size]})):
                    got[n].append(v)
            env = run_reference(graph, graph.input.quantize(sub), return_all=True)
            ops = {n.name: n.op for n in graph.nodes}
            rep.input_codes_exact_fraction = _lsb(np.concatenate(got[f"codes:{graph.input.name}"]),
                                                  env[graph.input.name])[0]
            local = _run_cut(graph, sub, env, weights, int4, threads, batch_size, td, integer_requant)
            for node in graph.nodes:
                e, m, h = _lsb(np.concatenate(got[f"codes:{node.name}"]), env[node.name])
                le, lm, lh = _lsb(local[node.name], env[node.name])
                rep.per_layer.append(OnnxLayerParity(node.name, ops[node.name], e, m, h, kernels.get(node.name),
                                                     le, lm, lh))
            rep.per_layer_inputs = int(len(sub))
    return rep


def ort_output_codes(graph: IntegerGraph, images: np.ndarray, *, weights: str = "auto", integer_requant: str = "none",
                     threads: int = 2, batch_size: int = 256, work_dir: str | Path | None = None
                     ) -> tuple[np.ndarray, dict[str, int], Any]:
    """ONNX Runtime's integer output codes of the QDQ export of ``graph`` on ``images`` (float32 NCHW), without the
    reference executor (for a large evaluation set, e.g. ORT top-1 on a full test split).

    Returns ``(codes, kernels, export)``: int64 codes (N, ...) of the output tensor (several outputs: each flattened
    per sample and concatenated), op-type counts of ORT's optimised graph, and the export's
    :class:`ptq2tvm.onnx_export.ExportReport` (containers, clips, requant fit). ``weights`` / ``integer_requant`` as in
    :func:`run_onnx_parity`. Raises :class:`ArtifactError` if ORT cannot load the export."""
    import onnx

    weights = choose_weights(weights)[0]
    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="ptq2tvm_onnx_", dir=work_dir) as td:
        model, xrep = build_onnx(graph, weights=weights, integer_requant=integer_requant, output_codes=True)
        onnx.save(model, f"{td}/model.onnx")
        sess = ort_session(f"{td}/model.onnx", threads, optimized_path=f"{td}/model.opt.onnx")
        counts, _ = optimized_kernels(f"{td}/model.opt.onnx")
        fetch = [f"codes:{n}" for n in graph_output_names(graph)]
        outs = [_flat(sess.run(fetch, {INPUT_NAME: images[i:i + batch_size]})).astype(np.int64)
                for i in range(0, len(images), batch_size)]
        del sess
    return np.concatenate(outs), counts, xrep


def ort_qdq_runner(graph: IntegerGraph, onnx_path: str | Path, threads: int, weights: str = "auto") -> Any:
    """ONNX Runtime on ptq2tvm's own QDQ export of ``graph`` (written to ``onnx_path``) for `ptq2tvm bench`: a
    ``Callable[[np.ndarray], np.ndarray]`` (float32 NCHW in, float32 out) with the bench's ORT session options.
    ``runner.kernels``: op counts of ORT's optimised graph; ``runner.weights``: the weight container used."""
    from .bench.baselines import _ort_runner
    from .onnx_export import export_onnx

    weights = choose_weights(weights)[0]
    export_onnx(graph, onnx_path, weights=weights)
    run = _ort_runner(onnx_path, threads)
    with tempfile.TemporaryDirectory(prefix="ptq2tvm_onnx_") as td:
        ort_session(onnx_path, threads, optimized_path=f"{td}/opt.onnx")
        counts, _ = optimized_kernels(f"{td}/opt.onnx")
    run.kernels = {k: v for k, v in counts.items() if k in INTEGER_KERNELS + FLOAT_CONVS}  # type: ignore[attr-defined]
    run.weights = weights  # type: ignore[attr-defined]
    return run
