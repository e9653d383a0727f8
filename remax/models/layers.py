"""Primitive layers shared by the model files: BatchNorm with the reference settings, TF-style initialisers,
conv+BN units, channels-first LayerNorm, odd-size-aware bilinear resizing and an fp32 region under autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def batch_norm(channels: int, dims: int = 2, *, momentum: float = BN_MOMENTUM, eps: float = BN_EPS,
               init: float = 1.0) -> nn.Module:
    """A BatchNorm over ``dims`` spatial dimensions (1, 2 or 3) with the reference momentum/eps and γ init."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(channels, eps=eps, momentum=momentum)
    nn.init.constant_(bn.weight, init)
    return bn


def trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """TF-style truncated normal (cut at ±2 std)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def he_normal_(weight: Tensor) -> Tensor:
    """TF ``he_normal``: truncated normal with std sqrt(2 / fan_in)."""
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    return trunc_normal_(weight, math.sqrt(2.0 / max(fan_in, 1)))


def align_corners_for(size: tuple[int, int] | torch.Size) -> bool:
    """The reference rule: ``align_corners=True`` when the target width is odd (all sizes are odd for k·32+1)."""
    return int(size[-1]) % 2 == 1


def resize_bilinear(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of a B×C×H×W tensor to ``size`` with the odd-size ``align_corners`` convention."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners_for(size))


class ConvBN(nn.Module):
    """Convolution (1-D or 2-D) followed by optional BatchNorm and optional GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False, norm: bool = True,
                 act: bool = False, dims: int = 2, init: str = "he_normal", std: float | None = None,
                 norm_init: float = 1.0, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bias)
        if std is not None:
            trunc_normal_(self.conv.weight, std)
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            he_normal_(self.conv.weight)
        if bias:
            nn.init.zeros_(self.conv.bias)
        self.norm = (batch_norm(out_channels, dims, momentum=bn_momentum, eps=bn_eps, init=norm_init)
                     if norm else nn.Identity())
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B×C×H×W tensor, computed in fp32 (the reference does so under AMP)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = at_least_fp32(x)
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return (y * at_least_fp32(self.weight)[:, None, None] + at_least_fp32(self.bias)[:, None, None]).to(dtype)


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or unchanged when it is already wider (float64 stays float64 for exact checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softmax_fp32(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax computed in at least fp32 with autocast off (the reference does so under AMP); result in fp32+."""
    with no_autocast(x):
        return F.softmax(at_least_fp32(x), dim=dim)


def no_autocast(x: Tensor) -> ContextManager:
    """Disable autocast on ``x``'s device so a region runs in the dtype of its (fp32) inputs."""
    if x.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def subsample_stride(input_size: tuple[int, int], output_size: tuple[int, int]) -> int:
    """The stride ``s`` with ``ceil(H / s) == h`` and ``ceil(W / s) == w`` (641 -> 161 gives 4).

    Raises ``ValueError`` when no integer stride maps the input size onto the output size.
    """
    (H, W), (h, w) = input_size, output_size
    if h <= 0 or w <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"bad sizes for sub-sampling: input {input_size}, output {output_size}")
    candidates = []
    for big, small in ((H, h), (W, w)):
        if small > 1:
            candidates.append(max(1, round((big - 1) / (small - 1))))
            candidates.append(max(1, math.ceil(big / small)))
    if not candidates:  # a 1x1 output: any stride >= the input size works
        candidates.append(max(H, W))
    for s in candidates:
        if math.ceil(H / s) == h and math.ceil(W / s) == w:
            return s
    raise ValueError(
        f"ground-truth id map of size {H}x{W} cannot be strided onto the prediction size {h}x{w}: "
        f"no integer stride s gives ceil({H}/s)={h} and ceil({W}/s)={w} (inputs must be k*s+1 or a multiple of s)"
    )
