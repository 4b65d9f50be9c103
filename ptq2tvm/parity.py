"""Parity: the .so against the reference executor (bit for bit) and the integer network against fake-quant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .backend.runtime import CompiledModel
from .frontend.qmodel import QuantModel
from .ir.graph import IntegerGraph, QTensor
from .ir.reference import run_reference
from .model_outputs import first_classification_output, output_label, structure_keys
from .units import percent


@dataclass
class LayerParity:
    name: str
    op: str
    exact_fraction: float
    max_abs_lsb: int
    mean_abs_lsb: float
    lsb_histogram: dict[str, int]
    bits: str = ""               # 'W4 A8->A4' for conv/linear (weight, input, output bits), 'A8->A8' otherwise


@dataclass
class ParityReport:
    n_inputs: int
    bit_exact_vs_reference: bool
    mismatched_elements: int
    n_elements: int
    exact_fraction_vs_fakequant: float
    max_abs_lsb_vs_fakequant: int
    top1_agreement_vs_fakequant: float | None      # of the scored (N, classes) output; None when there is none
    top1_agreement_vs_reference: float | None
    so_top1: float | None = None
    fakequant_top1: float | None = None
    reference_top1: float | None = None
    per_layer: list[LayerParity] = field(default_factory=list)
    per_layer_inputs: int = 0
    scored_output: str | None = None     # several outputs: "output 1 'logits' (fc)", whose top-1 is reported

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"inputs: {self.n_inputs}",
            f".so vs reference executor: {'BIT-EXACT' if self.bit_exact_vs_reference else 'MISMATCH'} "
            f"({self.mismatched_elements} of {self.n_elements} elements differ)",
            f"integer vs fake-quant output{'s' if self.scored_output else ''}: "
            f"{percent(self.exact_fraction_vs_fakequant)}% exact, max |diff| {self.max_abs_lsb_vs_fakequant} LSB"
            + ("" if self.top1_agreement_vs_fakequant is None else
               f", top-1 agreement {percent(self.top1_agreement_vs_fakequant)}%"
               + (f" ({self.scored_output})" if self.scored_output else "")),
        ]
        if self.so_top1 is not None:
            lines.append(f"top-1: .so {100 * self.so_top1:.2f}%  fake-quant {100 * self.fakequant_top1:.2f}%"
                         + (f" ({self.scored_output})" if self.scored_output else ""))
        if self.per_layer:
            lines.append(f"per layer (integer reference vs fake-quant, first {self.per_layer_inputs} inputs):")
            w = max(len(p.name) for p in self.per_layer)
            for p in self.per_layer:
                lines.append(f"  {p.name:<{w}} {p.op:<10} {p.bits:<10} exact {percent(p.exact_fraction, width=6)}%  "
                             f"max {p.max_abs_lsb:3d} LSB  mean {p.mean_abs_lsb:.4f}")
        return "\n".join(lines)


def to_grid(x: np.ndarray, t: QTensor) -> np.ndarray:
    """Float values of a fake-quant tensor -> their integers on the grid of ``t``."""
    return np.rint(np.asarray(x, dtype=np.float64) / t.scale).astype(np.int64) + t.zero_point


def _lsb_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float, dict[str, int]]:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    vals, counts = np.unique(np.minimum(d, 4), return_counts=True)
    hist = {("4+" if v == 4 else str(int(v))): int(c) for v, c in zip(vals, counts)}
    return float((d == 0).mean()), int(d.max(initial=0)), float(d.mean()), hist


@torch.no_grad()
def fakequant_outputs(qm: QuantModel, images: np.ndarray, batch_size: int = 256, return_all: bool = False,
                      progress: bool = False) -> Any:
    """Fake-quant outputs on float ``images``: one array (a list in ``output_names`` order for several outputs; every
    tensor by name with ``return_all``)."""
    qm.eval()
    outs: list[Any] = []
    names = qm.graph.output_names
    for i in tqdm(range(0, len(images), batch_size), desc="fake-quant", disable=not progress, leave=False):
        r = qm(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])), return_all=True)
        outs.append({k: v.detach().numpy() for k, v in r.items()} if return_all else
                    [r[n].detach().numpy() for n in names])
    if return_all:
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    cat = [np.concatenate([o[j] for o in outs]) for j in range(len(names))]
    return cat[0] if len(cat) == 1 else cat


def _as_list(v: Any) -> list[np.ndarray]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _flat_outputs(arrays: list[np.ndarray]) -> np.ndarray:
    """One output as it is; several as (N, total elements) in output order."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of inputs whose argmax over the classes agrees; a and b: (N, classes)."""
    return float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean())


def run_parity(graph: IntegerGraph, compiled: CompiledModel, qm: QuantModel, images: np.ndarray,
               labels: np.ndarray | None = None, per_layer_inputs: int = 256, batch_size: int = 256,
               progress: bool = True) -> ParityReport:
    """Compare the .so with the reference executor and with the fake-quant model on ``images`` (float NCHW)."""
    compiled.check_graph(graph)
    q_in = graph.input.quantize(images)
    so_out, ref_out = [], []
    for i in tqdm(range(0, len(q_in), batch_size), desc="parity", disable=not progress, leave=False):
        chunk = q_in[i:i + batch_size]
        so_out.append(_as_list(compiled.run_int(chunk)))
        ref_out.append(_as_list(run_reference(graph, chunk)))
    fq_all = _as_list(fakequant_outputs(qm, images, batch_size))
    n_out = len(graph.output_names)
    so_list = [np.concatenate([o[j] for o in so_out]) for j in range(n_out)]
    ref_list = [np.concatenate([o[j] for o in ref_out]) for j in range(n_out)]
    # several outputs (FPN levels, ...): compared as one flat vector per input, in output order
    so, ref = _flat_outputs(so_list), _flat_outputs(ref_list)
    fq_int = _flat_outputs([to_grid(f, t) for f, t in zip(fq_all, graph.outputs)])
    exact, max_lsb, _, _ = _lsb_stats(so, fq_int)
    mism = int((so != ref).sum())
    k = first_classification_output([a.shape for a in so_list])   # what eval scores
    report = ParityReport(
        n_inputs=int(len(images)), bit_exact_vs_reference=mism == 0, mismatched_elements=mism,
        n_elements=int(so.size), exact_fraction_vs_fakequant=exact, max_abs_lsb_vs_fakequant=max_lsb,
        top1_agreement_vs_fakequant=None if k is None else _agreement(so_list[k], fq_all[k]),
        top1_agreement_vs_reference=None if k is None else _agreement(so_list[k], ref_list[k]),
        scored_output=None if k is None or n_out == 1 else
        output_label(k, structure_keys(compiled.meta.get("output_structure"))) + f" ({graph.output_names[k]})",
    )
    if labels is not None and k is not None:
        report.so_top1 = float((so_list[k].argmax(1) == labels).mean())
        report.fakequant_top1 = float((np.asarray(fq_all[k]).argmax(1) == labels).mean())
        report.reference_top1 = float((ref_list[k].argmax(1) == labels).mean())
    if per_layer_inputs:
        sub = images[:per_layer_inputs]
        ref_env = run_reference(graph, graph.input.quantize(sub), return_all=True)
        fq_env = fakequant_outputs(qm, sub, batch_size, return_all=True)
        for node in graph.nodes:
            e, m, mean, hist = _lsb_stats(ref_env[node.name], to_grid(fq_env[node.name], node.out))
            bits = f"A{graph.tensor(node.inputs[0]).bits}->A{node.out.bits}"
            if "w_bits" in node.attrs:
                bits = f"W{node.attrs['w_bits']} {bits}"
            report.per_layer.append(LayerParity(node.name, node.op, e, m, mean, hist, bits))
        report.per_layer_inputs = int(len(sub))
    return report
