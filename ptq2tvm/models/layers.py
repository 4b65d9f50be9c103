"""Building blocks shared by the zoo models, named like torchvision's ``torchvision.ops.misc`` / ``ops`` layers.

- :class:`SqueezeExcitation`: torchvision's ``ops.misc.SqueezeExcitation`` (Hu et al., "Squeeze-and-Excitation
  Networks", 2018): children ``avgpool``, ``fc1`` (1x1 conv with bias), ``activation``, ``fc2``,
  ``scale_activation``; forward ``x * scale_activation(fc2(activation(fc1(avgpool(x)))))``.
- :class:`StochasticDepth`: torchvision's ``ops.StochasticDepth`` in "row" mode (Huang et al., "Deep Networks with
  Stochastic Depth", 2016); the identity in eval mode, so a traced eval model has no node for it.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    """Channel gating: global average pool -> 1x1 conv -> activation -> 1x1 conv -> gate -> ``x * gate``.

    Input and output (N, C, H, W) float32; the gate is (N, C, 1, 1) and broadcasts over H, W. State dict keys
    ``fc1.weight`` (S, C, 1, 1), ``fc1.bias`` (S,), ``fc2.weight`` (C, S, 1, 1), ``fc2.bias`` (C,) with
    S = ``squeeze_channels``, exactly as torchvision's.
    """

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: type[nn.Module] = nn.ReLU, scale_activation: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        if input_channels < 1 or squeeze_channels < 1:
            raise ValueError(f"SqueezeExcitation needs positive channel counts, got {input_channels}, "
                             f"{squeeze_channels}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample with probability ``p`` in training ("row" mode), scaling the kept
    ones by ``1 / (1 - p)``; the identity in eval mode (and for ``p == 0``). No parameters."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
