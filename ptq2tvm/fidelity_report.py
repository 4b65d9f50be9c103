"""How faithful is the fake-quant model to FP32, without labels: SQNR of the output and top-1 agreement on images
the model was not calibrated on, optionally per layer.

SQNR (dB) = 10 log10( sum(y_fp32^2) / sum((y_q - y_fp32)^2) ) over all elements (signal-to-quantization-noise
ratio, as in e.g. AIMET's and Brevitas' layer reports); top-1 agreement = fraction of images whose argmax is the
same. Per layer, the fake-quant model's tensor is compared with the same tensor of its FP twin (BN folded,
quantizers off), each on its own inputs (errors accumulate through the network, as at inference).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .frontend.qmodel import QuantModel

#: below this output SQNR (dB) or top-1 agreement the summary warns
LOW_SQNR_DB = 10.0
LOW_AGREEMENT = 0.9


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(|ref|^2 / |got - ref|^2) in dB; +inf when equal."""
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((np.asarray(got, np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


@dataclass
class LayerFidelity:
    name: str
    op: str
    sqnr_db: float


@dataclass
class FidelityReport:
    n_images: int
    held_out: bool               # False: measured on the calibration images themselves
    sqnr_db: float               # network output, fake-quant vs FP32
    top1_agreement: float
    per_layer: list[LayerFidelity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("sqnr_db",):
            d[k] = None if not math.isfinite(d[k]) else round(d[k], 2)
        for p in d["per_layer"]:
            p["sqnr_db"] = None if not math.isfinite(p["sqnr_db"]) else round(p["sqnr_db"], 2)
        return d

    @property
    def low(self) -> bool:
        return self.sqnr_db < LOW_SQNR_DB or self.top1_agreement < LOW_AGREEMENT

    def summary(self) -> str:
        where = f"{self.n_images} held-out calibration images" if self.held_out else \
            f"{self.n_images} calibration images (no held-out images left)"
        lines = [f"fidelity vs FP32 (no labels; {where}): output SQNR {self.sqnr_db:.1f} dB, "
                 f"top-1 agreement {100 * self.top1_agreement:.1f}%"]
        if self.low:
            lines.append(f"warning: low fidelity (SQNR < {LOW_SQNR_DB:g} dB or agreement < {100 * LOW_AGREEMENT:g}%): "
                         "check the calibration data's preprocessing, or use more bits / --method qdrop")
        if self.per_layer:
            w = max(len(p.name) for p in self.per_layer)
            lines.append("per layer (fake-quant vs FP, SQNR dB):")
            lines += [f"  {p.name:<{w}}  {p.op:<7} {p.sqnr_db:6.1f}" for p in self.per_layer]
        return "\n".join(lines)


@torch.no_grad()
def fidelity_report(model: nn.Module, qm: QuantModel, images: np.ndarray, held_out: bool = True,
                    per_layer: bool = False, batch_size: int = 64) -> FidelityReport:
    """Compare ``qm`` (fake-quant) with the FP32 ``model`` on ``images`` (float32 NCHW); see the module docstring."""
    model.eval()
    qm.eval()
    ref, got = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))
        ref.append(model(x).float().numpy())
        got.append(qm(x).float().numpy())
    ref_a, got_a = np.concatenate(ref), np.concatenate(got)
    agree = float(np.mean(ref_a.reshape(len(ref_a), -1).argmax(1) == got_a.reshape(len(got_a), -1).argmax(1)))
    rep = FidelityReport(int(len(images)), held_out, sqnr_db(ref_a, got_a), agree)
    if per_layer:
        fp = copy.deepcopy(qm).set_quant(weights=False, acts=False)
        sub = torch.from_numpy(np.ascontiguousarray(images[:batch_size]))
        env_q, env_f = qm(sub, return_all=True), fp(sub, return_all=True)
        for n in qm.graph.nodes:
            if n.op in ("conv", "linear", "add") and n.name in env_q:
                rep.per_layer.append(LayerFidelity(n.name, n.op, sqnr_db(env_f[n.name].numpy(),
                                                                         env_q[n.name].numpy())))
    return rep


__all__ = ["FidelityReport", "LayerFidelity", "fidelity_report", "sqnr_db"]
