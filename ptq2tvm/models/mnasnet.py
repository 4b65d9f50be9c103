"""MNASNet-B1 whose parameter names and shapes match torchvision's ``mnasnet0_5/0_75/1_0/1_3``.

Everything sits in one ``layers`` Sequential (stem at 0-7, stacks at 8-13, head at 14-16); ``classifier`` is
``Dropout, Linear``. Follows torchvision's current ("version 2") layout, where the stem also scales with alpha.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobilenet_v2 import init_conv_

# TensorFlow's BN decay 0.9997 expressed as a PyTorch momentum.
_BN_MOMENTUM = 1 - 0.9997

# (kernel, stride, expansion, repeats) of the six inverted-residual stacks.
_STACKS: tuple[tuple[int, int, int, int], ...] = (
    (3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1),
)
_BASE_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)


def _round_to_multiple_of(value: float, divisor: int, round_up_bias: float = 0.9) -> int:
    """Round to a multiple of ``divisor``, rounding up when rounding down would lose more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded if rounded >= round_up_bias * value else rounded + divisor


def scaled_depths(alpha: float) -> list[int]:
    """Channel counts of stem, stem projection and the six stacks for depth multiplier ``alpha``."""
    return [_round_to_multiple_of(d * alpha, 8) for d in _BASE_DEPTHS]


class _InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> linear 1x1, all with BN; identity add when shapes match."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_residual:
            return self.layers(x) + x
        return self.layers(x)


def _stack(cin: int, cout: int, kernel_size: int, stride: int, expansion: int, repeats: int) -> nn.Sequential:
    blocks = [_InvertedResidual(cin, cout, kernel_size, stride, expansion)]
    blocks += [_InvertedResidual(cout, cout, kernel_size, 1, expansion) for _ in range(1, repeats)]
    return nn.Sequential(*blocks)


class MNASNet(nn.Module):
    """MNASNet-B1 with depth multiplier ``alpha``; global average pooling is ``x.mean([2, 3])``."""

    # torchvision checks this version when loading: 2 = stem scaled with alpha (matches this layout).
    _version = 2

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, dropout: float = 0.2,
                 in_channels: int = 3) -> None:
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        d = scaled_depths(alpha)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, d[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[0], 3, 1, 1, groups=d[0], bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[1], 1, bias=False),
            nn.BatchNorm2d(d[1], momentum=_BN_MOMENTUM),
        ]
        for i, (k, s, e, r) in enumerate(_STACKS):
            layers.append(_stack(d[i + 1], d[i + 2], k, s, e, r))
        layers += [
            nn.Conv2d(d[7], 1280, 1, bias=False),
            nn.BatchNorm2d(1280, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True),
        ]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x).mean([2, 3])
        return self.classifier(x)


def mnasnet0_5(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MNASNet:
    """torchvision ``mnasnet0_5`` (2,218,512 parameters with 1000 classes)."""
    return MNASNet(0.5, num_classes=num_classes, in_channels=in_channels, **kwargs)


def mnasnet0_75(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MNASNet:
    """torchvision ``mnasnet0_75`` (3,170,208 parameters with 1000 classes)."""
    return MNASNet(0.75, num_classes=num_classes, in_channels=in_channels, **kwargs)


def mnasnet1_0(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MNASNet:
    """torchvision ``mnasnet1_0`` (4,383,312 parameters with 1000 classes)."""
    return MNASNet(1.0, num_classes=num_classes, in_channels=in_channels, **kwargs)


def mnasnet1_3(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MNASNet:
    """torchvision ``mnasnet1_3`` (6,282,256 parameters with 1000 classes)."""
    return MNASNet(1.3, num_classes=num_classes, in_channels=in_channels, **kwargs)
