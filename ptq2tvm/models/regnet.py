"""RegNetX / RegNetY whose parameter names and shapes match torchvision's ``regnet_x_400mf`` / ``regnet_y_400mf``.

Radosavovic et al., "Designing Network Design Spaces" (CVPR 2020). Layout: ``stem`` (conv/BN/ReLU),
``trunk_output.block{s}.block{s}-{i}`` with ``proj`` (1x1 conv + BN, where the shape changes) and ``f.a`` /
``f.b`` (grouped 3x3) / [``f.se``: squeeze-excitation (ReLU, Sigmoid) of width round(se_ratio * block input width),
RegNetY only] / ``f.c``, then ``avgpool`` and ``fc``.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import torch
from torch import nn

from .layers import SqueezeExcitation
from .mobilenet_v2 import ConvBNAct, make_divisible


def regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                  bottleneck_multiplier: float = 1.0) -> tuple[list[int], list[int], list[int]]:
    """Per-stage (depths, widths, group widths) from the RegNet design parameters (quantized linear widths)."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError("invalid RegNet parameters")
    # Same float32 torch arithmetic as the reference, so the rounding of every block width is identical.
    cont = torch.arange(depth, device="cpu") * w_a + w_0  # CPU even under a `with torch.device("meta")`
    steps = torch.round(torch.log(cont / w_0) / math.log(w_m))
    block_widths = (torch.round(w_0 * torch.pow(w_m, steps) / 8) * 8).int().tolist()
    widths, depths = [], []
    for w, run in itertools.groupby(block_widths):
        widths.append(w)
        depths.append(len(list(run)))
    # Make the bottleneck width a multiple of the (possibly clipped) group width.
    bottleneck = [int(w * bottleneck_multiplier) for w in widths]
    groups = [min(group_width, b) for b in bottleneck]
    bottleneck = [make_divisible(b, g) for b, g in zip(bottleneck, groups)]
    widths = [int(b / bottleneck_multiplier) for b in bottleneck]
    return depths, widths, groups


class BottleneckTransform(nn.Sequential):
    """``a`` 1x1 -> ``b`` grouped 3x3 (carries the stride) -> [``se``] -> ``c`` 1x1 without activation."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None = None) -> None:
        w_b = int(round(cout * bottleneck_multiplier))
        layers: OrderedDict[str, nn.Module] = OrderedDict([
            ("a", ConvBNAct(cin, w_b, 1)),
            ("b", ConvBNAct(w_b, w_b, 3, stride, groups=w_b // group_width)),
        ])
        if se_ratio:
            # The SE width is relative to the block's input width, as in the paper / torchvision.
            layers["se"] = SqueezeExcitation(w_b, int(round(se_ratio * cin)), activation=nn.ReLU)
        layers["c"] = ConvBNAct(w_b, cout, 1, activation=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """``relu(shortcut(x) + f(x))`` with a 1x1 conv + BN shortcut (``proj``) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None = None) -> None:
        super().__init__()
        self.proj = ConvBNAct(cin, cout, 1, stride, activation=None) if cin != cout or stride != 1 else None
        self.f = BottleneckTransform(cin, cout, stride, group_width, bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class AnyStage(nn.Sequential):
    """``depth`` blocks named ``block{index}-{i}``; only the first one changes width / resolution."""

    def __init__(self, cin: int, cout: int, stride: int, depth: int, group_width: int,
                 bottleneck_multiplier: float, index: int, se_ratio: float | None = None) -> None:
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, group_width,
                                       bottleneck_multiplier, se_ratio)
            self.add_module(f"block{index}-{i}", block)


class RegNet(nn.Module):
    """RegNet: 3x3 stride-2 stem, stride-2 stages of residual bottleneck blocks (with squeeze-excitation when
    ``se_ratio`` is set: RegNetY), average pool, linear."""

    def __init__(self, depths: list[int], widths: list[int], group_widths: list[int],
                 bottleneck_multiplier: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 stem_width: int = 32, se_ratio: float | None = None) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_width, 3, 2)
        stages, cin = [], stem_width
        for i, (depth, width, gw) in enumerate(zip(depths, widths, group_widths)):
            stages.append((f"block{i + 1}", AnyStage(cin, width, 2, depth, gw, bottleneck_multiplier, i + 1,
                                                     se_ratio)))
            cin = width
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def regnet_x_400mf(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> RegNet:
    """torchvision ``regnet_x_400mf`` (5,495,976 parameters with 1000 classes; stages 1/2/7/12 x 32/64/160/400)."""
    depths, widths, groups = regnet_stages(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16)
    return RegNet(depths, widths, groups, num_classes=num_classes, in_channels=in_channels, **kwargs)


def regnet_y_400mf(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> RegNet:
    """torchvision ``regnet_y_400mf`` (4,344,144 parameters with 1000 classes; stages 1/3/6/6 x 48/104/208/440,
    group width 8, squeeze-excitation ratio 0.25)."""
    depths, widths, groups = regnet_stages(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8)
    return RegNet(depths, widths, groups, num_classes=num_classes, in_channels=in_channels, se_ratio=0.25,
                  **kwargs)
