"""Segmenter: a residual U-Net returning vessel logits (apply sigmoid for probabilities).

Channels 16..256 over 5 levels by default (~1.9M parameters). BatchNorm folds into the convolutions
at ONNX export time. Any H, W work: the decoder resizes to each skip's size (odd sizes included).
With ``fixed_upsample = True`` the decoder upsamples by a constant factor 2 instead, which gives the same
numbers when H and W are multiples of :attr:`SegmenterUNet.size_multiple`; exported ONNX graphs use it
because ONNX Runtime keeps a constant-scale Resize in its blocked NCHWc layout (12% faster at 304 px,
docs/EXPORT.md) while a shape-dependent one forces layout reorders around every decoder level.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.skip = (nn.Identity() if in_ch == out_ch else
                     nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class SegmenterUNet(nn.Module):
    """``forward(x [B, in_channels, H, W] in [-1, 1]) -> logits [B, 1, H, W]``."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.enc = nn.ModuleList()
        prev = in_channels
        for ch in channels:
            self.enc.append(ResConvBlock(prev, ch))
            prev = ch
        self.dec = nn.ModuleList(ResConvBlock(channels[i + 1] + channels[i], channels[i])
                                 for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], 1, 1)
        self.fixed_upsample = False

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this for ``fixed_upsample`` (one factor 2 per pooling)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.dec:
            skip = skips.pop()
            if self.fixed_upsample:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            else:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
