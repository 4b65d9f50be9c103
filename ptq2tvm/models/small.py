"""Small models for 28x28 (Fashion-MNIST) and 8x8 (sklearn digits) single-channel inputs.

Both reuse the torchvision-named classes, so their state_dict keys look like torchvision's (``layer1.0.conv1``,
``features.3.conv.1.0``, ``classifier.1``...).
"""

from __future__ import annotations

from .mobilenet_v2 import MobileNetV2
from .resnet import BasicBlock, ResNet

# 28x28 -> 28 (stem, stride 1) -> 28 -> 14 -> 7 -> 4; 8x8 -> 8 -> 8 -> 4 -> 2 -> 1.
SMALL_MOBILENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


def resnet_small(num_classes: int = 10, in_channels: int = 1, **kwargs) -> ResNet:
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, BasicBlock stages [2, 2, 2] of width 16/32/64."""
    kwargs.setdefault("widths", (16, 32, 64))
    layers = kwargs.pop("layers", (2, 2, 2))
    return ResNet(BasicBlock, layers, num_classes=num_classes, in_channels=in_channels, small_input=True, **kwargs)


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 1, width_mult: float = 0.5,
                       **kwargs) -> MobileNetV2:
    """MobileNetV2 with a stride-1 stem, a 5-stage setting ending at 4x4 (for 28x28) and a 256-wide head."""
    kwargs.setdefault("inverted_residual_setting", SMALL_MOBILENET_SETTING)
    kwargs.setdefault("first_stride", 1)
    kwargs.setdefault("last_channel", 256)
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, **kwargs)
