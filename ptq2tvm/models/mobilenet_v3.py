"""MobileNetV3 whose parameter names and shapes match torchvision's ``mobilenet_v3_small`` / ``mobilenet_v3_large``.

Howard et al., "Searching for MobileNetV3" (ICCV 2019), Tables 1 and 2; structure as torchvision/models/mobilenetv3.py:
``features.0`` the stem (3x3 stride-2 conv, BN, Hardswish), ``features.1..N`` inverted residual blocks whose ``block``
is [expand 1x1 (when the width changes)] -> depthwise kxk -> [SqueezeExcitation (ReLU, Hardsigmoid) as ``block.k``]
-> linear 1x1 projection; the last ``features`` entry a 1x1 conv to 6x the last block width (Hardswish);
``classifier`` is ``Linear, Hardswish, Dropout, Linear``. Every BN has eps 1e-3, momentum 0.01, as torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .layers import SqueezeExcitation
from .mobilenet_v2 import ConvBNAct, make_divisible

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class BlockSetting(NamedTuple):
    """One inverted residual block: input/expanded/output channels (before ``width_mult``), depthwise kernel,
    squeeze-excitation, activation ("RE" ReLU or "HS" Hardswish), stride and dilation."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int
    dilation: int = 1


LARGE_SETTING: tuple[BlockSetting, ...] = (
    BlockSetting(16, 3, 16, 16, False, "RE", 1),
    BlockSetting(16, 3, 64, 24, False, "RE", 2),
    BlockSetting(24, 3, 72, 24, False, "RE", 1),
    BlockSetting(24, 5, 72, 40, True, "RE", 2),
    BlockSetting(40, 5, 120, 40, True, "RE", 1),
    BlockSetting(40, 5, 120, 40, True, "RE", 1),
    BlockSetting(40, 3, 240, 80, False, "HS", 2),
    BlockSetting(80, 3, 200, 80, False, "HS", 1),
    BlockSetting(80, 3, 184, 80, False, "HS", 1),
    BlockSetting(80, 3, 184, 80, False, "HS", 1),
    BlockSetting(80, 3, 480, 112, True, "HS", 1),
    BlockSetting(112, 3, 672, 112, True, "HS", 1),
    BlockSetting(112, 5, 672, 160, True, "HS", 2),
    BlockSetting(160, 5, 960, 160, True, "HS", 1),
    BlockSetting(160, 5, 960, 160, True, "HS", 1),
)

SMALL_SETTING: tuple[BlockSetting, ...] = (
    BlockSetting(16, 3, 16, 16, True, "RE", 2),
    BlockSetting(16, 3, 72, 24, False, "RE", 2),
    BlockSetting(24, 3, 88, 24, False, "RE", 1),
    BlockSetting(24, 5, 96, 40, True, "HS", 2),
    BlockSetting(40, 5, 240, 40, True, "HS", 1),
    BlockSetting(40, 5, 240, 40, True, "HS", 1),
    BlockSetting(40, 5, 120, 48, True, "HS", 1),
    BlockSetting(48, 5, 144, 48, True, "HS", 1),
    BlockSetting(48, 5, 288, 96, True, "HS", 2),
    BlockSetting(96, 5, 576, 96, True, "HS", 1),
    BlockSetting(96, 5, 576, 96, True, "HS", 1),
)


def _activation(name: str) -> type[nn.Module]:
    if name == "RE":
        return nn.ReLU
    if name == "HS":
        return nn.Hardswish
    raise ValueError(f"MobileNetV3 activation must be 'RE' or 'HS', got {name!r}")


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck; ``result + x`` when stride is 1 and the width is unchanged."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, activation: str,
                 stride: int, dilation: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        act = _activation(activation)
        bn = dict(norm_eps=BN_EPS, norm_momentum=BN_MOMENTUM)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=act, **bn))
        layers.append(ConvBNAct(expanded, expanded, kernel, 1 if dilation > 1 else stride, groups=expanded,
                                activation=act, dilation=dilation, **bn))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None, **bn))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = result + x
        return result


class MobileNetV3(nn.Module):
    """MobileNetV3; ``first_stride`` / ``in_channels`` / ``last_conv_mult`` only differ from torchvision when changed."""

    def __init__(self, setting: Sequence[BlockSetting], last_channel: int, num_classes: int = 1000,
                 width_mult: float = 1.0, dropout: float = 0.2, in_channels: int = 3, first_stride: int = 2,
                 last_conv_mult: int = 6) -> None:
        super().__init__()
        if not setting:
            raise ValueError("MobileNetV3 needs a non-empty block setting")

        def adjust(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        bn = dict(norm_eps=BN_EPS, norm_momentum=BN_MOMENTUM)
        blocks = [BlockSetting(adjust(s.input_channels), s.kernel, adjust(s.expanded_channels),
                               adjust(s.out_channels), s.use_se, s.activation, s.stride, s.dilation) for s in setting]
        layers: list[nn.Module] = [ConvBNAct(in_channels, blocks[0].input_channels, 3, first_stride,
                                             activation=nn.Hardswish, **bn)]
        layers += [InvertedResidual(*b) for b in blocks]
        last_in = blocks[-1].out_channels
        last_conv = last_conv_mult * last_in
        layers.append(ConvBNAct(last_in, last_conv, 1, activation=nn.Hardswish, **bn))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
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
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_large(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                       **kwargs) -> MobileNetV3:
    """torchvision ``mobilenet_v3_large`` (5,483,032 parameters at width 1.0, 1000 classes)."""
    return MobileNetV3(LARGE_SETTING, make_divisible(1280 * width_mult, 8), num_classes=num_classes,
                       width_mult=width_mult, in_channels=in_channels, **kwargs)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                       **kwargs) -> MobileNetV3:
    """torchvision ``mobilenet_v3_small`` (2,542,856 parameters at width 1.0, 1000 classes)."""
    return MobileNetV3(SMALL_SETTING, make_divisible(1024 * width_mult, 8), num_classes=num_classes,
                       width_mult=width_mult, in_channels=in_channels, **kwargs)
