"""Per-layer, per-candidate sensitivity to quantization, label-free, on calibration images.

Two measures for every conv/linear layer i and candidate (w, a) = (weight bits, bits of the layer's input tensor):

1. HAWQ-V2/V3 (Dong et al. 2020, Eq. 3-4; Yao et al. 2021, Eq. 12): the Hessian-trace-weighted perturbation
       Omega_i(w, a) = Tr(H_W_i) / n_W_i * ||Q_w(W_i) - W_i||^2  +  Tr(H_x_i) / n_x_i * ||Q_a(x_i) - x_i||^2 / k_i
   H is the Hessian of the label-free loss L = KL(softmax(f32(x)) || softmax(f(x))) (batch mean, nats; a model with
   several outputs: the sum over its outputs, half the mean squared error per element for an output that is not
   (N, classes) logits, e.g. a feature map, or a sigmoid box: ptq2tvm.model_outputs.squashed_outputs) with respect
   to the layer's weight W_i (n_W_i elements) and to its input activation tensor x_i on the batch (n_x_i elements;
   HAWQ-V3 weights only; the activation term is the same estimate for the input quantizer). At the FP32 point L's
   gradient is zero and its Hessian is the Gauss-Newton / Fisher matrix of the output distribution: positive
   semi-definite, no labels needed. Two trace estimators (``estimator``), both unbiased, every layer's traces from
   the same random draws:
   - ``gauss-newton`` (default): H = (1/B) sum_b J_b^T S_b J_b (J_b: Jacobian of image b's logits z_b, S_b =
     diag(p_b) - p_b p_b^T the softmax Hessian at its FP32 output p_b; the Gauss-Newton matrix, equal to the Hessian
     at this point; Martens 2020, "New insights and perspectives on the natural gradient method", Sec. 8-9).
     S_b = A_b A_b^T with A_b = diag(sqrt p_b) - p_b sqrt(p_b)^T; with r_b Rademacher, u_b = A_b r_b has mean 0 and
     covariance S_b, independent over images, so one backward of sum_b <z_b, u_b> gives g = sum_b J_b^T u_b with
     E||g||^2 = B Tr(H): Tr(H) ~ ||g||^2 / B, a sum of squares (never negative), one backward per sample. (Sampled
     labels, u_b = onehot(y_b) - p_b, have the same covariance but on a confident model almost every draw is the
     argmax and a rare other label dominates the estimate.)
   - ``hutchinson``: Tr(H) = E[v^T H v], v Rademacher, H v by double backward (``torch.autograd.grad`` with
     ``create_graph=True``; HAWQ-V2's estimator). Single estimates can fall below zero (float noise around a
     positive semi-definite H); the ILP clips them at zero. k_i = the number of layers reading tensor x_i (they share its bits, so its term is split).
   Q_w / Q_a are the calibrated quantizers of ptq2tvm (MSE-searched ranges), the ones the pipeline deploys.
2. The FP32-output error when only that layer (its weights at w bits and its input tensor at a bits) is quantized:
   MSE of the logits (all outputs, concatenated) against FP32 and SQNR = 10 log10(sum y^2 / sum (y - y_q)^2) dB.

Torch's autograd is the Hessian-vector product (PyHessian, the HAWQ authors' library, is the same double backward
with labels and is unmaintained since 2021).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_path, write_json
from ..frontend.calibrate import calibrate, validate_calibration
from ..frontend.graph import FloatGraph
from ..frontend.qmodel import QuantConfig, QuantModel, _key
from ..frontend.quantizers import WeightQuantizer
from ..frontend.trace import trace_model
from ..model_outputs import squashed_outputs
from .layerbits import CANDIDATES, candidate_name

LOSS = ("KL(softmax(fp32 logits) || softmax(logits)), batch mean, nats; half MSE per element for other outputs "
        "and squashed (N, k) ones")       # part of the cache key: a changed loss is a new analysis


@dataclass
class LayerSensitivity:
    name: str
    op: str
    n_weights: int
    input_tensor: str
    input_numel: int
    readers: int                       # layers reading the same input tensor (share its bits)
    trace_w: float
    trace_w_stderr: float
    trace_x: float
    trace_x_stderr: float
    #: candidate name (W4A8) -> {omega_w, omega_x, omega, output_mse, output_sqnr_db}
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]
    candidates: list[list[int]]
    loss: str
    n_images: int
    hutchinson_samples: int
    seed: int
    key: str
    seconds: float = 0.0
    #: trace estimator: "gauss-newton" or "hutchinson" (module docstring)
    estimator: str = "hutchinson"

    def layer_names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    def matrix(self, measure: str = "hessian") -> np.ndarray:
        """(L, C) objective for the ILP: ``hessian`` -> Omega; ``output`` -> the FP32-output MSE."""
        k = {"hessian": "omega", "output": "output_mse"}[measure]
        return np.array([[lay.candidates[candidate_name(tuple(c))][k] for c in self.candidates]
                         for lay in self.layers])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityReport":
        d = dict(d)
        d["layers"] = [LayerSensitivity(**lay) for lay in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    def summary(self) -> str:
        names = [candidate_name(tuple(c)) for c in self.candidates]
        w = max(len(lay.name) for lay in self.layers)
        lines = [f"sensitivity ({self.n_images} images, {self.hutchinson_samples} {self.estimator} samples, "
                 f"loss {self.loss})",
                 f"{'layer':<{w}}  {'Tr(H_W)/n':>10} {'Tr(H_x)/n':>10}  " + " ".join(f"{n:>16}" for n in names),
                 f"{'':<{w}}  {'':>10} {'':>10}  " + " ".join(f"{'Omega / SQNR dB':>16}" for _ in names)]
        for lay in self.layers:
            cells = " ".join(f"{lay.candidates[n]['omega']:9.2e}/{lay.candidates[n]['output_sqnr_db']:5.1f}"
                             for n in names)
            lines.append(f"{lay.name:<{w}}  {lay.trace_w / lay.n_weights:10.3e} "
                         f"{lay.trace_x / max(lay.input_numel, 1):10.3e}  {cells}")
        return "\n".join(lines)


def sensitivity_key(model: nn.Module, images: np.ndarray, settings: dict[str, Any]) -> str:
    """SHA-256 over the FP32 parameters, the images and the settings: identifies one sensitivity analysis."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


ESTIMATORS = ("gauss-newton", "hutchinson")


def _traces(qm: QuantModel, x: torch.Tensor, layers: list[str], points: list[str], samples: int,
            seed: int, estimator: str = "gauss-newton") -> tuple[np.ndarray, np.ndarray]:
    """Trace estimates (mean, stderr over samples) of the loss Hessian w.r.t. each layer's weight, then each
    point's tensor (module docstring, ``estimator``)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    qm.set_quant(False, False)
    x = x.clone().requires_grad_(True)
    env = qm(x, return_all=True)
    outs = [env[o] for o in qm.graph.output_names]
    class_scores = [is_logits_shape(y) and not sq for y, sq in zip(outs, squashed_outputs(qm.graph))]
    params = [qm.layer(n).weight for n in layers] + [x if p == qm.graph.input_name else env[p] for p in points]
    gen = torch.Generator().manual_seed(seed)
    est = np.zeros((samples, len(params)))
    if estimator == "gauss-newton":
        for s in range(samples):
            # one backward of sum over outputs of <y_k, u_k>, u_k independent with covariance S_k: the cross terms
            # vanish in expectation, so E||g||^2 = B * sum_k Tr(J_k^T S_k J_k)
            us = [_gauss_newton_draw(y, gen, logits) for y, logits in zip(outs, class_scores)]
            g = torch.autograd.grad(outs, params, grad_outputs=us, retain_graph=s < samples - 1)
            est[s] = [float(t.double().square().sum()) / len(x) for t in g]
    else:
        loss = sum(output_loss(y, logits) for y, logits in zip(outs, class_scores))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for s in range(samples):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=s < samples - 1)
            est[s] = [float((v * h).sum()) for v, h in zip(vs, hv)]
    return est.mean(axis=0), est.std(axis=0, ddof=1) / np.sqrt(samples) if samples > 1 else np.zeros(len(params))


def is_logits_shape(y: torch.Tensor) -> bool:
    """A classification output by shape: (N, classes) with at least 2 classes (the caller also asks
    :func:`ptq2tvm.model_outputs.squashed_outputs`: a sigmoid box is (N, 4) too)."""
    return y.dim() == 2 and y.shape[1] > 1


def _gauss_newton_draw(y: torch.Tensor, gen: torch.Generator, logits: bool) -> torch.Tensor:
    """u with mean 0 and covariance S, the Hessian of the output's loss at its FP32 value (per image): for logits
    S_b = diag(p_b) - p_b p_b^T of the softmax (KL loss), u_b = A_b r_b as in the module docstring; for any other
    output (a feature map, a regression) the mean-squared error per element, S_b = I / n_b (n_b elements per image),
    u_b = r_b / sqrt(n_b). ``logits``: whether ``y`` holds class scores."""
    if logits:
        p_fp = F.softmax(y.detach().double(), dim=1)
        sq = p_fp.sqrt()
        r = torch.randint(0, 2, p_fp.shape, generator=gen).double() * 2 - 1
        return (sq * r - p_fp * (sq * r).sum(dim=1, keepdim=True)).to(y.dtype)      # A_b r_b
    r = torch.randint(0, 2, y.shape, generator=gen).to(y.dtype) * 2 - 1
    return r / float(np.sqrt(y[0].numel()))


def output_loss(y: torch.Tensor, logits: bool, target: torch.Tensor | None = None) -> torch.Tensor:
    """The label-free loss of one output against its own FP32 value (batch mean; or against ``target``, the FP32
    output, for an output computed elsewhere): KL of the softmax for logits,
    half the squared error per element otherwise (its Hessian at the FP32 point is the S of _gauss_newton_draw)."""
    target = y.detach() if target is None else target
    if logits:
        return F.kl_div(F.log_softmax(y, dim=1), F.softmax(target, dim=1), reduction="batchmean")
    return 0.5 * (y - target).square().sum() / (len(y) * y[0].numel())


def _outputs(qm: QuantModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every output of the model, in graph order (a multi-output model returns a tuple / list / dict)."""
    env = qm(x, return_all=True)
    return [env[o] for o in qm.graph.output_names]


@torch.no_grad()
def _point_values(qm: QuantModel, x: torch.Tensor, points: list[str]) -> dict[str, torch.Tensor]:
    qm.set_quant(False, False)
    env = qm(x, return_all=True)
    return {p: (x if p == qm.graph.input_name else env[p]).detach() for p in points}


def analyze_sensitivity(model: nn.Module, images: np.ndarray, candidates: Sequence[tuple[int, int]] = CANDIDATES,
                        hutchinson_samples: int = 32, seed: int = 0, max_images: int = 256,
                        config: QuantConfig | None = None, progress: bool = True,
                        threads: int = 1, cache: str | Path | None = None,
                        estimator: str = "gauss-newton") -> SensitivityReport:
    """Sensitivity of every conv/linear layer of ``model`` for every candidate (module docstring).

    ``images``: float (N, C, H, W) calibration images (no labels); the quantizers are calibrated on all of them, the
    traces and output errors use the first ``max_images``. ``config`` supplies the range-search norms
    (``weight_lp``, ``act_lp``). ``estimator``: the trace estimator (module docstring), ``hutchinson_samples``
    random draws. Deterministic for a given seed and thread count. Raises DataError on bad images.
    """
    t0 = time.perf_counter()
    images = validate_calibration(images)
    base = config or QuantConfig()
    settings = dict(candidates=[list(c) for c in candidates], samples=hutchinson_samples, seed=seed,
                    max_images=max_images, weight_lp=base.weight_lp, act_lp=base.act_lp, loss=LOSS,
                    estimator=estimator)
    key = sensitivity_key(model, images, settings)
    cached = load_sensitivity(cache) if cache is not None else None
    if cached is not None and cached.key == key:
        return cached
    graph: FloatGraph = trace_model(model, tuple(images.shape[1:]))
    a_set = sorted({a for _, a in candidates}, reverse=True)
    w_set = sorted({w for w, _ in candidates}, reverse=True)
    models = {a: calibrate(QuantModel(graph, QuantConfig(w_bits=8, a_bits=a, first_last_8bit=False,
                                                         weight_lp=base.weight_lp, act_lp=base.act_lp)),
                           images, progress=progress) for a in a_set}
    qm = models[a_set[0]]
    layers = qm.layer_names()
    point_of = {n: qm.grid_source(graph.node(n).inputs[0]) for n in layers}
    points = list(dict.fromkeys(point_of.values()))
    readers = {p: sum(1 for n in layers if point_of[n] == p) for p in points}
    x = torch.from_numpy(np.ascontiguousarray(images[:max_images]))
    tr, se = _traces(qm, x, layers, points, hutchinson_samples, seed, estimator)
    tr_w, se_w = dict(zip(layers, tr[:len(layers)])), dict(zip(layers, se[:len(layers)]))
    tr_x, se_x = dict(zip(points, tr[len(layers):])), dict(zip(points, se[len(layers):]))
    xs = _point_values(qm, x, points)
    with torch.no_grad():
        qm.set_quant(False, False)
        y_fp = torch.cat([y.flatten() for y in _outputs(qm, x)])
        wq: dict[tuple[str, int], WeightQuantizer] = {}
        for n in layers:
            for w in w_set:
                q = WeightQuantizer(w, qm.layer(n).weight.shape[0])
                q.init_scale(qm.layer(n).weight, base.weight_lp)
                wq[n, w] = q
        x_err = {(p, a): float((models[a].act_quant[_key(p)](xs[p]) - xs[p]).square().sum())
                 for p in points for a in a_set}
        for m in models.values():
            m.set_quant(False, False)
        out: list[LayerSensitivity] = []
        for n in layers:
            node = graph.node(n)
            weight = qm.layer(n).weight
            p = point_of[n]
            lay = LayerSensitivity(n, node.op, int(weight.numel()), p, int(xs[p].numel()), readers[p],
                                   float(tr_w[n]), float(se_w[n]), float(tr_x[p]), float(se_x[p]))
            for w, a in candidates:
                om_w = tr_w[n] / weight.numel() * float((wq[n, w](weight) - weight).square().sum())
                om_x = tr_x[p] / xs[p].numel() * x_err[p, a] / readers[p]
                m = models[a]
                layer = m.layer(n)
                saved = layer.wq
                layer.wq = wq[n, w]
                layer.wq.enabled = True
                m.act_quant[_key(p)].enabled = True
                try:
                    y = torch.cat([t.flatten() for t in _outputs(m, x)])
                finally:
                    layer.wq = saved
                    m.act_quant[_key(p)].enabled = False
                err = float((y - y_fp).square().sum())
                lay.candidates[candidate_name((w, a))] = dict(
                    omega_w=float(om_w), omega_x=float(om_x), omega=float(om_w + om_x),
                    output_mse=err / y.numel(),
                    output_sqnr_db=float(10 * np.log10(float(y_fp.square().sum()) / max(err, 1e-30))))
            out.append(lay)
    return SensitivityReport(out, [list(c) for c in candidates], LOSS, int(len(x)), hutchinson_samples, seed, key,
                             round(time.perf_counter() - t0, 2), estimator)


def plot_sensitivity(report: SensitivityReport, path: str | Path) -> Path:
    """Bar chart (PNG): per layer, Omega (log scale) and the FP32-output SQNR of each candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [candidate_name(tuple(c)) for c in report.candidates if tuple(c) != (8, 8)] or \
        [candidate_name(tuple(c)) for c in report.candidates]
    layers = report.layer_names()
    xpos = np.arange(len(layers))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(layers) + 3), 8), sharex=True)
    for k, cand in enumerate(names):
        om = [max(lay.candidates[cand]["omega"], 1e-12) for lay in report.layers]
        sq = [lay.candidates[cand]["output_sqnr_db"] for lay in report.layers]
        axes[0].bar(xpos + k * width - 0.4 + width / 2, om, width, label=cand)
        axes[1].bar(xpos + k * width - 0.4 + width / 2, sq, width, label=cand)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Omega = Tr(H)/n ||Q(W)-W||^2 (+ input term)")
    axes[0].set_title(f"HAWQ sensitivity per layer ({report.hutchinson_samples} {report.estimator} samples, "
                      f"{report.n_images} images; loss: KL to FP32 output)")
    axes[1].set_ylabel("FP32-output SQNR, only this layer quantized (dB)")
    axes[1].set_xticks(xpos)
    axes[1].set_xticklabels(layers, rotation=70, ha="right", fontsize=8)
    axes[0].legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def load_sensitivity(path: str | Path) -> SensitivityReport | None:
    """A saved report, or None if the file is missing or unreadable (it is then recomputed)."""
    try:
        return SensitivityReport.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


__all__ = ["ESTIMATORS", "LOSS", "LayerSensitivity", "SensitivityReport", "analyze_sensitivity", "load_sensitivity",
           "plot_sensitivity", "sensitivity_key"]
