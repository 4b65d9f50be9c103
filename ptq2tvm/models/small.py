"""Small models for 28x28 (Fashion-MNIST) and 8x8 (sklearn digits) single-channel inputs.

All reuse the torchvision-named classes, so their state_dict keys look like torchvision's (``layer1.0.conv1``,
``features.3.conv.1.0``, ``features.1.0.block.1.fc1``, ``classifier.1``...). ``edsr_small_fm`` is an x2
super-resolution model (input: the 14x14 2x2-average-pooled image, output: 28x28), trained by
:mod:`ptq2tvm.train` with an L1 loss.
"""

from __future__ import annotations

from .edsr import EDSR
from .efficientnet import EfficientNet, StageSetting
from .mobilenet_v2 import MobileNetV2
from .mobilenet_v3 import BlockSetting, MobileNetV3
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


# ---- Fashion-MNIST variants of the newer families (28x28, one channel) ------------------------------------------
# Both use a stride-2 stem (28 -> 14), which keeps their training within a few CPU minutes per epoch.
# MobileNetV3-style: 14 -> 14 -> 7 -> 4; SE in the blocks marked True (ReLU squeeze, Hardsigmoid gate).
SMALL_MOBILENET_V3_SETTING: tuple[BlockSetting, ...] = (
    BlockSetting(16, 3, 16, 16, True, "RE", 1),
    BlockSetting(16, 3, 64, 24, False, "RE", 2),
    BlockSetting(24, 3, 72, 24, False, "RE", 1),
    BlockSetting(24, 5, 96, 40, True, "HS", 2),
    BlockSetting(40, 5, 160, 40, True, "HS", 1),
    BlockSetting(40, 5, 120, 48, True, "HS", 1),
)

# EfficientNet-style: 14 -> 14 -> 7 -> 7 -> 4; every MBConv has SE (SiLU squeeze, Sigmoid gate); expand ratio 4.
SMALL_EFFICIENTNET_SETTING: tuple[StageSetting, ...] = (
    StageSetting(1, 3, 1, 16, 16, 1),
    StageSetting(4, 3, 2, 16, 24, 2),
    StageSetting(4, 5, 1, 24, 40, 2),
    StageSetting(4, 3, 2, 40, 64, 2),
)


def mobilenet_v3_small_fm(num_classes: int = 10, in_channels: int = 1, **kwargs) -> MobileNetV3:
    """MobileNetV3-style classifier for 28x28: stride-2 Hardswish stem, 6 blocks (4 with SE), 288-wide last conv,
    256-wide Hardswish head (0.17 M parameters)."""
    kwargs.setdefault("first_stride", 2)
    kwargs.setdefault("dropout", 0.1)
    return MobileNetV3(SMALL_MOBILENET_V3_SETTING, kwargs.pop("last_channel", 256), num_classes=num_classes,
                       in_channels=in_channels, **kwargs)


def efficientnet_small_fm(num_classes: int = 10, in_channels: int = 1, **kwargs) -> EfficientNet:
    """EfficientNet-style classifier for 28x28: stride-2 SiLU stem, 7 MBConv blocks with SE, 256-wide last conv,
    no stochastic depth by default (0.13 M parameters)."""
    kwargs.setdefault("first_stride", 2)
    kwargs.setdefault("last_channel", 256)
    kwargs.setdefault("dropout", 0.1)
    kwargs.setdefault("stochastic_depth_prob", 0.0)
    return EfficientNet(SMALL_EFFICIENTNET_SETTING, num_classes=num_classes, in_channels=in_channels, **kwargs)


def edsr_small_fm(in_channels: int = 1, **kwargs) -> EDSR:
    """EDSR-style x2 super-resolution for Fashion-MNIST (14x14 -> 28x28): 3 residual blocks of 32 features, one
    conv + PixelShuffle(2) upsampler, no MeanShift (the input is the normalized image)."""
    kwargs.setdefault("scale", 2)
    kwargs.setdefault("n_resblocks", 3)
    kwargs.setdefault("n_feats", 32)
    kwargs.setdefault("mean_shift", False)
    return EDSR(n_colors=in_channels, **kwargs)
