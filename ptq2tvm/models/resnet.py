"""ResNet / ResNeXt whose parameter names and shapes match torchvision's ``resnet18`` / ``resnet34`` / ``resnet50`` /
``resnext50_32x4d``.

Stages are attributes ``layer1..layerN``; a block's shortcut projection is ``downsample`` (``0`` conv, ``1`` BN).
``small_input=True`` gives the CIFAR-style stem (3x3 stride-1 conv, no max-pool) used by ``resnet_small``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and base_width=64, got {groups}, {base_width}")
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision "ResNet v1.5"; ``groups`` for ResNeXt) -> 1x1 expand (x4),
    plus shortcut. The inner width is ``int(planes * base_width / 64) * groups``."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet with one stage per entry of ``layers``; stage ``i > 0`` halves the resolution."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512), small_input: bool = False,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.groups, self.base_width = groups, width_per_group
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must be non-empty, equal length")
        self.num_stages = len(layers)
        self.inplanes = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, blocks, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        kw = dict(groups=self.groups, base_width=self.base_width)
        stage = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = out
        stage += [block(out, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """torchvision ``resnet18`` (11,689,512 parameters with 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """torchvision ``resnet34`` (21,797,672 parameters with 1000 classes)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """torchvision ``resnet50`` (25,557,032 parameters with 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnext50_32x4d(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """torchvision ``resnext50_32x4d`` (25,028,904 parameters with 1000 classes; 32 groups of width 4)."""
    kwargs.setdefault("groups", 32)
    kwargs.setdefault("width_per_group", 4)
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs)
