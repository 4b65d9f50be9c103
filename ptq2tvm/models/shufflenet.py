"""ShuffleNetV2 whose parameter names and shapes match torchvision's ``shufflenet_v2_x1_0``.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (ECCV 2018), Table 5;
structure as torchvision/models/shufflenetv2.py: ``conv1`` (3x3 stride-2 conv, BN, ReLU), ``maxpool``,
``stage2..4`` of :class:`InvertedResidual` units, ``conv5`` (1x1 conv, BN, ReLU), global mean over (H, W), ``fc``.
A stride-1 unit splits the channels in two halves (``chunk``), transforms the second (``branch2``) and
concatenates; a stride-2 unit concatenates ``branch1(x)`` and ``branch2(x)``; both end in a channel shuffle
(view -> transpose -> view), written as torchvision writes it so that ``torch.fx`` traces the same nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W) with channel ``g * (C // groups) + i`` moved to ``i * groups + g``."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=channels)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit; ``branch1`` is an empty ``nn.Sequential`` for stride 1 (as torchvision: no state)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        branch_features = oup // 2
        if stride == 1 and inp != branch_features * 2:
            raise ValueError(f"a stride-1 ShuffleNetV2 unit needs inp == oup (even), got inp {inp}, oup {oup}")
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(inp, stride),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            _depthwise(branch_features, stride),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 with three stages; ``first_stride`` / ``maxpool`` / ``in_channels`` only differ from torchvision
    when changed."""

    def __init__(self, stages_repeats: Sequence[int], stages_out_channels: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, first_stride: int = 2, maxpool: bool = True) -> None:
        super().__init__()
        if len(stages_repeats) != 3:
            raise ValueError(f"expected stages_repeats as 3 positive ints, got {tuple(stages_repeats)}")
        if len(stages_out_channels) != 5:
            raise ValueError(f"expected stages_out_channels as 5 positive ints, got {tuple(stages_out_channels)}")
        cin = stages_out_channels[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, cin, 3, first_stride, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        for i, (repeats, cout) in enumerate(zip(stages_repeats, stages_out_channels[1:4])):
            units = [InvertedResidual(cin, cout, 2)] + [InvertedResidual(cout, cout, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            cin = cout
        cout = stages_out_channels[-1]
        self.conv5 = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(cout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])  # global average pool
        return self.fc(x)


def shufflenet_v2_x1_0(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ShuffleNetV2:
    """torchvision ``shufflenet_v2_x1_0`` (2,278,604 parameters with 1000 classes)."""
    return ShuffleNetV2((4, 8, 4), (24, 116, 232, 464, 1024), num_classes=num_classes, in_channels=in_channels,
                        **kwargs)
