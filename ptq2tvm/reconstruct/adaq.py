"""AdaQTransform (Case 2.2 + per-channel shift), the fake-quant side.

Each quantized conv/linear computes y = xi * (W_hat * x_hat) + b + eta (Eq. 8):

- the integer base of W_hat comes from the frozen quant step s_w (and AdaRound), so AdaRound learns on a fixed grid;
- xi = s_w' / s_w per output channel is the decoupled, learnable de-quant step (Case 2.2), initialised to 1;
- eta per output channel is a learnable shift on top of the (frozen) folded bias b, initialised to 0.

The fold (ptq2tvm.fold.fold) puts xi * s_w * s_x / s_out into the requant multiplier and (b + eta) into the int32 bias
(Eq. 9), negating a channel's integer weights when xi < 0, so the compiled .so costs nothing extra.
"""

from __future__ import annotations

import torch.nn as nn

from ..frontend.qmodel import QLayer, QuantModel


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


def adaq_summary(qm: QuantModel) -> dict:
    """Spread of the learned xi / eta (for reports)."""
    xs = [layer.xi.detach() for layer in qm.layers.values() if layer.adaq]
    es = [layer.eta.detach() for layer in qm.layers.values() if layer.adaq]
    if not xs:
        return {}
    import torch

    x, e = torch.cat(xs), torch.cat(es)
    return dict(xi_min=float(x.min()), xi_max=float(x.max()), xi_mean=float(x.mean()),
                eta_absmax=float(e.abs().max()), negative_xi=int((x < 0).sum()), channels=int(x.numel()))
