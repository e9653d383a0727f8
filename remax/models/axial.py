"""Axial attention with learned relative positions (Axial-DeepLab; kmax-reference §1.3).

Unlike the reference, nothing here is tied to one input size: the relative-position index is rebuilt from the
axis length of each call, so one model runs at any size whose axes are at most ``max_length`` long.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from remax.models.layers import BN_EPS, BN_MOMENTUM, batch_norm, softmax_fp32, trunc_normal_


class RelativePositionTable(nn.Module):
    """Learned embeddings for the offsets ``-(max_length-1) … max_length-1`` (``2·max_length-1`` rows)."""

    def __init__(self, max_length: int, depth: int):
        super().__init__()
        self.max_length = max_length
        self.rpe = nn.Parameter(torch.empty(2 * max_length - 1, depth))
        trunc_normal_(self.rpe, 1.0)

    def forward(self, length: int) -> Tensor:
        """The L×L×depth table whose entry (i, j) embeds the offset ``j - i`` (query i, key j)."""
        if length > self.max_length:
            raise ValueError(f"axial attention axis of length {length} exceeds the relative-position table "
                             f"limit {self.max_length} (ModelConfig.axial_max_length); use a smaller input")
        pos = torch.arange(length, device=self.rpe.device)
        index = pos[None, :] - pos[:, None] + (self.max_length - 1)
        return self.rpe[index]


class AxialAttention1D(nn.Module):
    """Global multi-head self-attention along the last axis of a B×C×L tensor.

    Logits are the sum of three batch-normalised terms, content ``q·k``, query-position ``q·r^q`` and
    key-position ``k·r^k``; the softmax over keys runs in fp32; the output sums the batch-normalised content
    and position retrievals ``Σ a·v`` and ``Σ a·r^v``.
    """

    def __init__(self, in_channels: int, key_depth: int, value_depth: int, num_heads: int = 8,
                 max_length: int = 255, *, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        if key_depth % num_heads or value_depth % num_heads:
            raise ValueError(f"axial attention depths {key_depth}/{value_depth} must divide by {num_heads} heads")
        self.key_depth, self.value_depth, self.num_heads = key_depth, value_depth, num_heads
        bn = dict(momentum=bn_momentum, eps=bn_eps)
        self.qkv = nn.Conv1d(in_channels, 2 * key_depth + value_depth, 1, bias=False)
        trunc_normal_(self.qkv.weight, in_channels ** -0.5)
        self.qkv_bn = batch_norm(2 * key_depth + value_depth, 1, **bn)
        self.query_rpe = RelativePositionTable(max_length, key_depth // num_heads)
        self.key_rpe = RelativePositionTable(max_length, key_depth // num_heads)
        self.value_rpe = RelativePositionTable(max_length, value_depth // num_heads)
        self.similarity_bn = batch_norm(3 * num_heads, 2, **bn)
        self.output_bn = batch_norm(2 * value_depth, 1, **bn)

    def forward(self, x: Tensor) -> Tensor:
        b, _, length = x.shape
        h = self.num_heads
        q, k, v = torch.split(self.qkv_bn(self.qkv(x)), [self.key_depth, self.key_depth, self.value_depth], 1)
        q = q.reshape(b, h, -1, length)
        k = k.reshape(b, h, -1, length)
        v = v.reshape(b, h, -1, length)
        r_q, r_k, r_v = self.query_rpe(length), self.key_rpe(length), self.value_rpe(length)
        logits = torch.cat([
            torch.einsum("bhdl,bhdm->bhlm", q, k),
            torch.einsum("bhdl,lmd->bhlm", q, r_q.to(q.dtype)),
            torch.einsum("bhdm,lmd->bhlm", k, r_k.to(k.dtype)),
        ], dim=1)
        logits = self.similarity_bn(logits).reshape(b, 3, h, length, length).sum(1)
        weights = softmax_fp32(logits, dim=-1).to(v.dtype)
        out = torch.cat([
            torch.einsum("bhlm,bhdm->bhdl", weights, v),
            torch.einsum("bhlm,lmd->bhdl", weights, r_v.to(v.dtype)),
        ], dim=1).reshape(b, 2 * self.value_depth, length)
        return self.output_bn(out).reshape(b, 2, self.value_depth, length).sum(1)


class AxialAttention2D(nn.Module):
    """Height-axis attention followed by width-axis attention on a B×C×H×W map (output ``value_depth`` ch.).

    ``stride`` > 1 down-samples inside the layer, as the strided axial blocks of an Axial-ResNet do (deeplab2's
    MaX-S): the height-axis output keeps every ``stride``-th row before the width axis runs, and the width-axis
    output every ``stride``-th column, so an ``n``-long axis becomes ``ceil(n / stride)`` like a strided conv.
    """

    def __init__(self, in_channels: int, key_depth: int, value_depth: int, num_heads: int = 8,
                 max_length: int = 255, *, stride: int = 1, **bn):
        super().__init__()
        if stride < 1:
            raise ValueError(f"axial attention stride must be >= 1, got {stride}")
        self.value_depth = value_depth
        self.stride = stride
        self.height_axis = AxialAttention1D(in_channels, key_depth, value_depth, num_heads, max_length, **bn)
        self.width_axis = AxialAttention1D(value_depth, key_depth, value_depth, num_heads, max_length, **bn)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        d, s = self.value_depth, self.stride
        # Columns as sequences: B·W × C × H.
        y = self.height_axis(x.permute(0, 3, 1, 2).reshape(b * width, c, height)).reshape(b, width, d, height)
        if s > 1:
            y = y[..., ::s]
            height = y.shape[-1]
        # Rows as sequences: B·H × D × W.
        y = y.permute(0, 3, 2, 1).reshape(b * height, d, width)
        y = self.width_axis(y).reshape(b, height, d, width).permute(0, 2, 1, 3)
        return y[..., ::s] if s > 1 else y
