"""EDSR super-resolution network with the parameter names of the authors' code (sanghyun-son/EDSR-PyTorch).

Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution" (CVPRW 2017), the baseline model
(16 residual blocks, 64 features, residual scaling 1): ``sub_mean`` (MeanShift, a fixed 1x1 conv) -> ``head.0``
3x3 conv -> ``body.0..15`` residual blocks (``body.0`` conv, ``body.1`` ReLU, ``body.2`` conv; no BatchNorm) and
``body.16`` 3x3 conv, plus the long skip from the head -> ``tail.0`` upsampler (per factor 2: a 3x3 conv to 4x the
features then ``PixelShuffle(2)``; factor 3: 9x then ``PixelShuffle(3)``) -> ``tail.1`` 3x3 conv to the colours ->
``add_mean``. Every conv has a bias. Input (N, n_colors, H, W) in the ``rgb_range`` scale (255 for the authors'
checkpoints), output (N, n_colors, scale*H, scale*W).

MeanShift: the authors subtract / add the DIV2K RGB mean with two frozen 1x1 convs; ``mean_shift=True`` keeps them
(so the authors' ``edsr_baseline_x{2,4}`` checkpoints load with ``strict=True``), ``mean_shift=False`` omits both
(normalize the input outside the model instead; the checkpoints' four ``sub_mean`` / ``add_mean`` entries then have
to be dropped before loading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def _conv(cin: int, cout: int, kernel_size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=True)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv ``y_c = x_c / std_c + sign * rgb_range * mean_c / std_c`` (weights frozen, in the state dict)."""

    def __init__(self, rgb_range: float, rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
                 rgb_std: Sequence[float] | None = None, sign: int = -1) -> None:
        n = len(rgb_mean)
        super().__init__(n, n, kernel_size=1)
        std = torch.tensor(rgb_std if rgb_std is not None else (1.0,) * n, dtype=torch.float32)
        with torch.no_grad():
            self.weight.copy_(torch.eye(n).view(n, n, 1, 1) / std.view(n, 1, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean, dtype=torch.float32) / std)
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    """``body(x) * res_scale + x`` with ``body`` = conv, ReLU, conv (children 0, 1, 2); no multiply when
    ``res_scale == 1`` (the baseline)."""

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(n_feats, n_feats, kernel_size), nn.ReLU(inplace=True),
                                  _conv(n_feats, n_feats, kernel_size))
        self.res_scale = float(res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1.0:
            res = res * self.res_scale
        return res + x


class Upsampler(nn.Sequential):
    """``scale`` = 2^k: k times (3x3 conv to 4n, PixelShuffle(2)); ``scale`` = 3: 3x3 conv to 9n, PixelShuffle(3)."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        if scale >= 1 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [_conv(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [_conv(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"EDSR upsampling scale must be a power of 2 or 3, got {scale}")
        super().__init__(*layers)


class EDSR(nn.Module):
    """EDSR; the defaults are the paper's baseline at the given ``scale``."""

    def __init__(self, scale: int = 2, n_resblocks: int = 16, n_feats: int = 64, n_colors: int = 3,
                 res_scale: float = 1.0, mean_shift: bool = True, rgb_range: float = 255.0,
                 rgb_mean: Sequence[float] = DIV2K_RGB_MEAN) -> None:
        super().__init__()
        if n_resblocks < 0 or n_feats < 1 or n_colors < 1:
            raise ValueError(f"invalid EDSR size: n_resblocks {n_resblocks}, n_feats {n_feats}, n_colors {n_colors}")
        self.scale = int(scale)
        if mean_shift:
            if len(rgb_mean) != n_colors:
                raise ValueError(f"rgb_mean has {len(rgb_mean)} entries for {n_colors} colours")
            self.sub_mean = MeanShift(rgb_range, rgb_mean, sign=-1)
        self.head = nn.Sequential(_conv(n_colors, n_feats))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale=res_scale) for _ in range(n_resblocks)],
                                  _conv(n_feats, n_feats))
        self.tail = nn.Sequential(Upsampler(self.scale, n_feats), _conv(n_feats, n_colors))
        if mean_shift:
            self.add_mean = MeanShift(rgb_range, rgb_mean, sign=1)
        self.mean_shift = bool(mean_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean_shift:
            x = self.sub_mean(x)
        x = self.head(x)
        x = self.tail(self.body(x) + x)
        if self.mean_shift:
            x = self.add_mean(x)
        return x


def edsr_x2(in_channels: int = 3, **kwargs) -> EDSR:
    """EDSR baseline x2 (16 blocks, 64 features; 1,369,883 parameters with MeanShift, 3 colours)."""
    return EDSR(scale=2, n_colors=in_channels, **kwargs)


def edsr_x4(in_channels: int = 3, **kwargs) -> EDSR:
    """EDSR baseline x4 (16 blocks, 64 features; 1,517,595 parameters with MeanShift, 3 colours)."""
    return EDSR(scale=4, n_colors=in_channels, **kwargs)
