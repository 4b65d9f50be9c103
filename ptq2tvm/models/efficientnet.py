"""EfficientNet-B0 whose parameter names and shapes match torchvision's ``efficientnet_b0``.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks" (ICML 2019), Table 1;
structure as torchvision/models/efficientnet.py: ``features.0`` the stem (3x3 stride-2 conv, BN, SiLU),
``features.1..7`` one ``nn.Sequential`` per stage of MBConv blocks whose ``block`` is [expand 1x1 (expand ratio >
1)] -> depthwise kxk -> SqueezeExcitation (SiLU, Sigmoid; squeeze width = block input width // 4) -> linear 1x1
projection, ``features.8`` a 1x1 conv to 4x the last width (SiLU); ``classifier`` is ``Dropout, Linear``.
Stochastic depth on the residual branch is the identity in eval mode (:class:`~.layers.StochasticDepth`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .layers import SqueezeExcitation, StochasticDepth
from .mobilenet_v2 import ConvBNAct, make_divisible


class StageSetting(NamedTuple):
    """One stage: expand ratio, depthwise kernel, first stride, input / output channels, number of blocks."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


B0_SETTING: tuple[StageSetting, ...] = (
    StageSetting(1, 3, 1, 32, 16, 1),
    StageSetting(6, 3, 2, 16, 24, 2),
    StageSetting(6, 5, 2, 24, 40, 2),
    StageSetting(6, 3, 2, 40, 80, 3),
    StageSetting(6, 5, 1, 80, 112, 3),
    StageSetting(6, 5, 2, 112, 192, 4),
    StageSetting(6, 3, 1, 192, 320, 1),
)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation; ``stochastic_depth(result) + x`` when shapes match."""

    def __init__(self, cin: int, cout: int, expand_ratio: float, kernel: int, stride: int,
                 stochastic_depth_prob: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.use_res_connect = stride == 1 and cin == cout
        expanded = make_divisible(cin * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + x
        return result


class EfficientNet(nn.Module):
    """EfficientNet (V1 layout); ``first_stride`` / ``in_channels`` / ``last_channel`` differ from torchvision only
    when changed (``last_channel=None``: 4x the last stage width)."""

    def __init__(self, setting: Sequence[StageSetting], dropout: float = 0.2, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000, in_channels: int = 3, first_stride: int = 2,
                 last_channel: int | None = None) -> None:
        super().__init__()
        if not setting:
            raise ValueError("EfficientNet needs a non-empty stage setting")
        layers: list[nn.Module] = [ConvBNAct(in_channels, setting[0].input_channels, 3, first_stride,
                                             activation=nn.SiLU)]
        total = sum(s.num_layers for s in setting)
        block_id = 0
        for s in setting:
            stage: list[nn.Module] = []
            for i in range(s.num_layers):
                sd_prob = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(s.input_channels if i == 0 else s.out_channels, s.out_channels, s.expand_ratio,
                                    s.kernel, s.stride if i == 0 else 1, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = setting[-1].out_channels
        last_out = last_channel if last_channel is not None else 4 * last_in
        layers.append(ConvBNAct(last_in, last_out, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> EfficientNet:
    """torchvision ``efficientnet_b0`` (5,288,548 parameters with 1000 classes; width and depth multipliers 1.0)."""
    return EfficientNet(B0_SETTING, num_classes=num_classes, in_channels=in_channels, **kwargs)
