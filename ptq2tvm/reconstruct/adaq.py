"""AdaQTransform (Case 2.2 + per-channel shift), the fake-quant side.

Each quantized conv/linear computes y = xi * (W_hat * x_hat) + b + eta (Eq. 8):

- the integer base of W_hat comes from the frozen quant step s_w (and AdaRound), so AdaRound learns on a fixed grid;
- xi = s_w' / s_w per output channel is the decoupled, learnable de-quant step (Case 2.2), initialised to 1;
- eta per output channel is a learnable shift on top of the (frozen) folded bias b, initialised to 0.

The fold (ptq2tvm.fold.fold) puts xi * s_w * s_x / s_out into the requant multiplier and (b + eta) into the int32 bias
(Eq. 9), so the compiled .so costs nothing extra.

xi is a step size ratio and stays positive: after every optimiser step it is projected onto [XI_MIN, inf)
(``project_xi``). A negative xi would have to be folded by negating the channel's integer weights, which takes a
b-bit weight's -2^(b-1) out of range (at <= 4 bits the layer silently loses packed int4 storage, at 8 bits -128 clips
to 127); the fold rejects xi <= 0 instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..frontend.qmodel import QLayer, QuantModel

#: lower bound of the learned de-quant step ratio xi (projection after every optimiser step)
XI_MIN = 1e-3


def enable_adaq(qm: QuantModel) -> QuantModel:
    """Turn AdaQTransform on for every quantized conv/linear layer (identity at start)."""
    return qm.enable_adaq()


def adaq_params(layers: list[QLayer]) -> list[nn.Parameter]:
    """The xi and eta parameters of ``layers`` that have AdaQTransform on."""
    out: list[nn.Parameter] = []
    for layer in layers:
        if layer.adaq:
            out += [layer.xi, layer.eta]
    return out


@torch.no_grad()
def project_xi(layers: list[QLayer], xi_min: float = XI_MIN) -> None:
    """Projected gradient step: clamp every AdaQTransform xi of ``layers`` to >= ``xi_min`` (keeps the sign, so the
    fold never negates integer weights)."""
    for layer in layers:
        if layer.adaq:
            layer.xi.clamp_(min=xi_min)


def adaq_summary(qm: QuantModel) -> dict:
    """Spread of the learned xi / eta (for reports)."""
    xs = [layer.xi.detach() for layer in qm.layers.values() if layer.adaq]
    es = [layer.eta.detach() for layer in qm.layers.values() if layer.adaq]
    if not xs:
        return {}
    x, e = torch.cat(xs), torch.cat(es)
    return dict(xi_min=float(x.min()), xi_max=float(x.max()), xi_mean=float(x.mean()),
                eta_absmax=float(e.abs().max()), negative_xi=int((x < 0).sum()), channels=int(x.numel()))
