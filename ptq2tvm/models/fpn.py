"""ResNet-18 backbone + feature pyramid (P2-P5) named like torchvision's ``resnet_fpn_backbone("resnet18")``.

Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017); structure as torchvision's
``BackboneWithFPN`` (models/detection/backbone_utils.py) around ``ops.FeaturePyramidNetwork``:

- ``body``: the ResNet trunk (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``; no ``avgpool`` / ``fc``),
  whose ``layer1..4`` outputs C2..C5 have strides 4, 8, 16, 32;
- ``fpn.inner_blocks.{i}.0``: 1x1 lateral convs (with bias) to ``out_channels``;
- top-down path: ``last = inner[i](C) + upsample_nearest_2x(last)``, from C5 down to C2;
- ``fpn.layer_blocks.{i}.0``: 3x3 output convs (with bias) giving P2..P5.

The output is a dict ``{"0": P2, "1": P3, "2": P4, "3": P5}`` (torchvision's keys), each (N, out_channels, H/s, W/s)
for s = 4, 8, 16, 32. Differences from torchvision, none of which changes the state dict's names or shapes:
BatchNorm2d instead of FrozenBatchNorm2d (identical in eval mode; BatchNorm adds a ``num_batches_tracked`` buffer
per BN, and PyTorch fills that in when a FrozenBatchNorm checkpoint is loaded with ``strict=True``); the top-down
upsampling is ``F.interpolate(scale_factor=2, mode="nearest")`` instead of resizing to the lateral's size, which is
the same map when H and W are multiples of 32 (required here); the extra "pool" level (LastLevelMaxPool) is off by
default (``extra_pool=True`` adds it as key ``"pool"``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, ResNet


class FeaturePyramidNetwork(nn.Module):
    """torchvision's ``ops.FeaturePyramidNetwork`` without normalization: lateral 1x1 + top-down nearest 2x
    upsampling and add + 3x3 output conv per level. ``forward`` takes the maps finest first and returns the same
    number of maps, finest first, each with ``out_channels`` channels."""

    def __init__(self, in_channels_list: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if not in_channels_list or any(c <= 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list must be positive channel counts, got {tuple(in_channels_list)}")
        self.inner_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.inner_blocks)
        last = self.inner_blocks[n - 1](features[n - 1])
        results = [self.layer_blocks[n - 1](last)]
        for i in range(n - 2, -1, -1):
            last = self.inner_blocks[i](features[i]) + F.interpolate(last, scale_factor=2.0, mode="nearest")
            results.insert(0, self.layer_blocks[i](last))
        return results


class ResNetBody(nn.Module):
    """The ResNet trunk returning the outputs of ``layer1..4`` (C2..C5)."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        if resnet.num_stages != 4:
            raise ValueError(f"the FPN backbone needs a 4-stage ResNet, got {resnet.num_stages} stages")
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class BackboneWithFPN(nn.Module):
    """``body`` (ResNet trunk) + ``fpn``; returns ``{"0": P2, "1": P3, "2": P4, "3": P5}`` (+ ``"pool"``)."""

    def __init__(self, resnet: ResNet, in_channels_list: Sequence[int], out_channels: int = 256,
                 extra_pool: bool = False) -> None:
        super().__init__()
        self.body = ResNetBody(resnet)
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels)
        self.out_channels = out_channels
        self.extra_pool = bool(extra_pool)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p2, p3, p4, p5 = self.fpn(self.body(x))
        out = OrderedDict([("0", p2), ("1", p3), ("2", p4), ("3", p5)])
        if self.extra_pool:
            out["pool"] = F.max_pool2d(p5, 1, 2, 0)
        return out


def resnet18_fpn(in_channels: int = 3, out_channels: int = 256, **kwargs) -> BackboneWithFPN:
    """ResNet-18 + FPN (P2-P5, 256 channels): torchvision ``resnet_fpn_backbone("resnet18")``'s names and shapes
    (13,783,616 parameters with 3 input channels). Input H, W must be multiples of 32."""
    extra_pool = kwargs.pop("extra_pool", False)
    resnet = ResNet(BasicBlock, (2, 2, 2, 2), num_classes=1, in_channels=in_channels, **kwargs)
    return BackboneWithFPN(resnet, [64, 128, 256, 512], out_channels, extra_pool=extra_pool)
