"""DenseNet-121 whose parameter names and shapes match torchvision's ``densenet121``.

Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017), DenseNet-BC, Table 1; structure as
torchvision/models/densenet.py: ``features`` = ``conv0`` (7x7 stride 2), ``norm0``, ``relu0``, ``pool0`` (3x3 stride-2
max pool), then ``denseblock{i}`` (layers ``denselayer{j}``: ``torch.cat`` of every earlier feature map -> ``norm1``
-> ``relu1`` -> ``conv1`` 1x1 (bn_size * growth) -> ``norm2`` -> ``relu2`` -> ``conv2`` 3x3 (growth)) separated by
``transition{i}`` (``norm``, ``relu``, ``conv`` 1x1 halving the channels, ``pool`` 2x2 average), and ``norm5``;
then ReLU, global average pool, ``classifier`` (Linear). The final ReLU / pool are modules here (torchvision calls
them functionally); they hold no state, so the state dict is identical. No dropout (drop_rate 0) and no
memory-efficient checkpointing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class _DenseLayer(nn.Module):
    """Bottleneck layer on the concatenation of every earlier map of its block; returns ``growth_rate`` channels."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; output = ``cat`` of the input and every layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_features)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)),
            ("pool", nn.AvgPool2d(2, 2)),
        ]))


class DenseNet(nn.Module):
    """DenseNet-BC; ``in_channels`` differs from torchvision only when changed."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, num_classes: int = 1000,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, n, bn_size, growth_rate))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.relu(self.features(x)))
        return self.classifier(torch.flatten(x, 1))


def densenet121(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> DenseNet:
    """torchvision ``densenet121`` (7,978,856 parameters with 1000 classes; growth 32, blocks 6/12/24/16)."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, in_channels=in_channels, **kwargs)
