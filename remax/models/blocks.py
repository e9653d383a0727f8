"""Building blocks of the kMaX pixel decoder: conv+BN units, bottleneck and axial blocks, ResizedFuse.

Conventions (kmax-reference §1.1): BatchNorm with PyTorch momentum 0.01 and eps 1e-3, exact GELU, LayerNorm
(eps 1e-6) on backbone features, bilinear resizing with ``align_corners=True`` for odd sizes.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from remax.models.axial import AxialAttention2D
from remax.models.layers import BN_EPS, BN_MOMENTUM, ConvBN, LayerNorm2d, resize_bilinear

__all__ = ["BlockGroup", "BottleneckBlock", "ConvBN", "LayerNorm2d", "ResizedFuse", "resize_bilinear"]


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck: GELU → 1×1 → 3×3 (or 2-D axial attention) → 1×1 with zero-init last BN.

    ``axial=True`` replaces the 3×3 conv by height-then-width axial attention (key depth ``mid``, value depth
    ``2·mid``) followed by GELU, as in the reference axial block. ``stride`` > 1 (backbone blocks, e.g. MaX-S)
    strides the first spatial operation (the 3×3 conv or the attention) and the shortcut, as deeplab2 does; the
    pixel decoder's blocks keep stride 1.
    """

    def __init__(self, in_channels: int, filters: tuple[int, int, int], *, axial: bool = False,
                 num_heads: int = 8, max_length: int = 255, drop_path: float = 0.0, stride: int = 1,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        c1, mid, out = filters
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.axial = axial
        self.stride = stride
        self.conv1 = ConvBN(in_channels, c1, 1, act=True, **bn)
        if axial:
            self.attention = AxialAttention2D(c1, key_depth=mid, value_depth=2 * mid, num_heads=num_heads,
                                              max_length=max_length, stride=stride, **bn)
            conv3_in = 2 * mid
        else:
            self.conv2 = ConvBN(c1, mid, 3, stride=stride, padding=1, act=True, **bn)
            conv3_in = mid
        self.conv3 = ConvBN(conv3_in, out, 1, norm_init=0.0, **bn)
        self.shortcut = ConvBN(in_channels, out, 1, stride=stride, **bn) if in_channels != out else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(x)
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x[..., :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.axial:
            y = F.gelu(self.attention(self.conv1(x)))
        else:
            y = self.conv2(self.conv1(x))
        return shortcut + self.drop_path(self.conv3(y))


class BlockGroup(nn.Sequential):
    """``num_blocks`` blocks of one type with base width ``d``: axial (2d, d, 4d) or bottleneck (d, d, 4d)."""

    def __init__(self, in_channels: int, base: int, num_blocks: int, block_type: str, **kwargs):
        if block_type not in ("axial", "bottleneck"):
            raise ValueError(f"unknown pixel-decoder block type {block_type!r}; use 'axial' or 'bottleneck'")
        axial = block_type == "axial"
        filters = (2 * base, base, 4 * base) if axial else (base, base, 4 * base)
        blocks = []
        for _ in range(num_blocks):
            blocks.append(BottleneckBlock(in_channels, filters, axial=axial, **kwargs))
            in_channels = filters[-1]
        super().__init__(*blocks)
        self.out_channels = filters[-1]


class ResizedFuse(nn.Module):
    """Sum of an upsampled low-resolution decoder feature and a high-resolution backbone skip.

    Each input is projected (GELU → 1×1 conv → BN) to ``out_channels`` unless it already has that width.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, *,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.low_proj = ConvBN(low_channels, out_channels, 1, **bn) if low_channels != out_channels else None
        self.high_proj = ConvBN(high_channels, out_channels, 1, **bn) if high_channels != out_channels else None

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        if self.low_proj is not None:
            low = self.low_proj(F.gelu(low))
        low = resize_bilinear(low, high.shape[-2:])
        if self.high_proj is not None:
            high = self.high_proj(F.gelu(high))
        return low + high
