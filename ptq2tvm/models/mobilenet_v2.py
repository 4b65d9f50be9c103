"""MobileNetV2 whose parameter names and shapes match torchvision's ``mobilenet_v2``.

``features.0`` is the stem, ``features.1..N`` the inverted residual blocks, the last ``features`` entry the 1x1
conv to ``last_channel``; ``classifier`` is ``Dropout, Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# (expand ratio t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper (Table 2).
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def init_conv_(conv: nn.Conv2d) -> None:
    """He-normal init with fan_out counted per group (``k*k*out/groups``); equals torchvision's ``kaiming_normal_(
    mode="fan_out")`` for ordinary convs, but keeps depthwise convs from shrinking activations ~sqrt(C)x per layer."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``), never dropping >10%."""
    lowest = divisor if min_value is None else min_value
    rounded = max(lowest, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding) -> ``BatchNorm2d`` -> optional activation, children named 0, 1, 2.

    torchvision's ``Conv2dNormActivation`` with a BatchNorm; ``norm_eps`` / ``norm_momentum`` are the BN's settings
    (MobileNetV3 uses 1e-3 / 0.01).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU, dilation: int = 1, norm_eps: float = 1e-5,
                 norm_momentum: float = 0.1) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=norm_eps, momentum=norm_momentum),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when t == 1) -> depthwise 3x3 -> linear 1x1 projection; identity add when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``first_stride``/``last_channel``/``in_channels`` only differ from torchvision when changed."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None, round_nearest: int = 8,
                 dropout: float = 0.2, in_channels: int = 3, first_stride: int = 2,
                 last_channel: int = 1280) -> None:
        super().__init__()
        setting = IMAGENET_SETTING if inverted_residual_setting is None else inverted_residual_setting
        if len(setting) == 0 or any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting must be a non-empty list of [t, c, n, s], got {setting}")
        channels = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNAct(in_channels, channels, 3, first_stride, activation=nn.ReLU6)]
        for t, c, n, s in setting:
            out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNAct(channels, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 **kwargs) -> MobileNetV2:
    """torchvision ``mobilenet_v2`` (3,504,872 parameters at width 1.0, 1000 classes)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, **kwargs)
