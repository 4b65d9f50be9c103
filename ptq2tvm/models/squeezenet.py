"""SqueezeNet 1.1 whose parameter names and shapes match torchvision's ``squeezenet1_1``.

Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters" (2016), v1.1 from the authors'
repository; structure as torchvision/models/squeezenet.py: ``features`` = 3x3 stride-2 conv (bias), ReLU,
MaxPool2d(3, 2, ceil_mode=True), Fire modules (``squeeze`` 1x1 -> ReLU -> ``torch.cat`` of ``expand1x1`` and
``expand3x3``, each with ReLU) and two more ceil-mode max pools; ``classifier`` = Dropout, 1x1 conv to the classes,
ReLU, AdaptiveAvgPool2d(1); then ``flatten``. No BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init


class Fire(nn.Module):
    """``cat(relu(expand1x1(s)), relu(expand3x3(s)))`` with ``s = relu(squeeze(x))``; output channels e1 + e3."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (the 1.0 layout is not provided)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        final_conv = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_1(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> SqueezeNet:
    """torchvision ``squeezenet1_1`` (1,235,496 parameters with 1000 classes); input at least 17x17."""
    return SqueezeNet(num_classes=num_classes, in_channels=in_channels, **kwargs)
