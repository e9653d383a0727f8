"""The kMaX transformer decoder (kmax-reference §1.4): cross-attention between cluster centres and pixels recast
as k-means clustering.

Each layer: pixel feature ``P`` and projected centres ``Q``; an auxiliary predictor gives mask logits; the
assignment is ``one_hot(argmax over queries)`` under stop-gradient; the update adds ``BN(A·V)`` (a *sum* of the
assigned pixel values, in fp32) to the centres. Query self-attention is computed from the same ``Q`` in parallel
with the k-means update; then an FFN. Each of the three updates has its own drop-path mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from remax.models.heads import KMaXPredictor
from remax.models.layers import (BN_EPS, BN_MOMENTUM, ConvBN, at_least_fp32, batch_norm, no_autocast,
                                 softmax_fp32, trunc_normal_)

# (stage prediction, stage pixel feature P) -> the prediction whose "pred_masks" the k-means assignment uses.
StageRelaxation = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]


def kmeans_assignment(mask_logits: Tensor) -> Tensor:
    """Hard cluster assignment ``one_hot(argmax_N mask_logits)`` as a B×N×HW float tensor, under stop-gradient."""
    with torch.no_grad():
        logits = mask_logits.detach().flatten(2)
        index = logits.argmax(dim=1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, index, 1.0)


def kmeans_cross_attention(mask_logits: Tensor, pixel_value: Tensor) -> Tensor:
    """The k-means cross-attention read-out: for each cluster the *sum* of the values of its pixels.

    ``mask_logits`` B×N×H×W (the assignment logits), ``pixel_value`` B×C×H×W -> B×C×N in fp32. No gradient flows
    through the argmax; the values receive gradient.
    """
    assignment = kmeans_assignment(mask_logits)
    with no_autocast(pixel_value):
        value = at_least_fp32(pixel_value.flatten(2))
        return torch.einsum("bnp,bcp->bcn", assignment.to(value.dtype), value)


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among the centres: BN on the logits (over heads), fp32 softmax, BN + GELU on
    the retrieved values."""

    def __init__(self, value_depth: int, num_heads: int, *, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS):
        super().__init__()
        self.num_heads = num_heads
        self.similarity_bn = batch_norm(num_heads, 2, momentum=bn_momentum, eps=bn_eps)
        self.value_bn = batch_norm(value_depth, 1, momentum=bn_momentum, eps=bn_eps)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, _, n = q.shape
        h = self.num_heads
        q, k, v = q.reshape(b, h, -1, n), k.reshape(b, h, -1, n), v.reshape(b, h, -1, n)
        logits = self.similarity_bn(torch.einsum("bhdl,bhdm->bhlm", q, k))
        weights = softmax_fp32(logits, dim=-1)
        out = torch.einsum("bhlm,bhdm->bhdl", weights.to(v.dtype), v).reshape(b, -1, n)
        return F.gelu(self.value_bn(out))


class KMaXTransformerLayer(nn.Module):
    """One kMaX decoder layer: auxiliary prediction, k-means update, self-attention, FFN."""

    def __init__(self, pixel_channels: int, num_classes: int, *, hidden_dim: int = 256, bottleneck_dim: int = 256,
                 num_heads: int = 8, ffn_dim: int = 2048, drop_path: float = 0.0, head_dim: int = 256,
                 embedding_dim: int = 128, void_prior: float = 0.9, mask_scale_init: float = 0.1,
                 kmeans_update_init: float = 0.0, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.key_depth = bottleneck_dim // 2
        self.value_depth = bottleneck_dim
        std = bottleneck_dim ** -0.5
        self.pixel_conv1 = ConvBN(pixel_channels, bottleneck_dim, 1, act=True, **bn)
        self.query_conv1 = ConvBN(hidden_dim, bottleneck_dim, 1, dims=1, act=True, **bn)
        self.pixel_v = ConvBN(bottleneck_dim, self.value_depth, 1, std=std, **bn)
        self.predictor = KMaXPredictor(bottleneck_dim, bottleneck_dim, num_classes, head_dim=head_dim,
                                       embedding_dim=embedding_dim, void_prior=void_prior,
                                       mask_scale_init=mask_scale_init, **bn)
        # k-means update.
        self.kmeans_value_bn = batch_norm(self.value_depth, 1, momentum=bn_momentum, eps=bn_eps)
        # Zero-initialised in the reference: the centres start image-independent and the k-means update opens as
        # its BN scale grows.
        self.kmeans_conv3 = ConvBN(self.value_depth, hidden_dim, 1, dims=1, norm_init=kmeans_update_init, **bn)
        # Query self-attention.
        self.query_qkv = ConvBN(bottleneck_dim, 2 * self.key_depth + self.value_depth, 1, dims=1, std=std, **bn)
        self.self_attention = QuerySelfAttention(self.value_depth, num_heads, **bn)
        self.query_conv3 = ConvBN(self.value_depth, hidden_dim, 1, dims=1, norm_init=0.0, **bn)
        # FFN.
        self.ffn_conv1 = ConvBN(hidden_dim, ffn_dim, 1, dims=1, act=True, **bn)
        self.ffn_conv2 = ConvBN(ffn_dim, hidden_dim, 1, dims=1, norm_init=0.0, **bn)
        # Three independent drop-path masks (k-means, self-attention, FFN), as in the reference.
        self.drop_path_kmeans = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path_attn = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path_ffn = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, pixel_feature: Tensor, centers: Tensor, relax: StageRelaxation | None = None
                ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """pixel_feature B×C×H×W (pre-activation decoder output), centers B×D×N.

        ``relax(prediction, P)`` may replace the stage's mask prediction before the k-means assignment is taken
        from it (ReMaX's ReMask in the decoder). Returns the updated centres, the auxiliary prediction and the
        pixel feature ``P`` (the key of the k-means cross-attention, input of the ReMaX semantic head).
        """
        pixel = self.pixel_conv1(F.gelu(pixel_feature))  # P
        query = self.query_conv1(centers)  # Q
        value = self.pixel_v(pixel)  # V
        prediction = self.predictor(pixel, query, query)
        if relax is not None:
            prediction = relax(prediction, pixel)
        update = kmeans_cross_attention(prediction["pred_masks"], value)
        update = self.kmeans_conv3(self.kmeans_value_bn(update).to(centers.dtype))
        centers = centers + self.drop_path_kmeans(update)

        q, k, v = torch.split(self.query_qkv(query), [self.key_depth, self.key_depth, self.value_depth], dim=1)
        attn = self.query_conv3(self.self_attention(q, k, v))
        centers = F.gelu(centers + self.drop_path_attn(attn))

        ffn = self.ffn_conv2(self.ffn_conv1(centers))
        centers = F.gelu(centers + self.drop_path_ffn(ffn))
        return centers, prediction, pixel


class KMaXTransformerDecoder(nn.Module):
    """Learnable cluster centres refined by ``sum(layers)`` kMaX layers at strides 32/16/8, then the final
    predictor on the stride-4 pixel feature."""

    def __init__(self, in_channels: list[int], final_channels: int, num_classes: int, *,
                 layers: tuple[int, ...] = (2, 2, 2), num_queries: int = 128, hidden_dim: int = 256,
                 bottleneck_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, drop_path: float = 0.0,
                 head_dim: int = 256, embedding_dim: int = 128, void_prior: float = 0.9,
                 mask_scale_init: float = 0.1, kmeans_update_init: float = 0.0, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS):
        super().__init__()
        if len(layers) != len(in_channels):
            raise ValueError(f"transformer decoder layers {layers} must give one count per input stride "
                             f"({len(in_channels)})")
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        head = dict(head_dim=head_dim, embedding_dim=embedding_dim, void_prior=void_prior,
                    mask_scale_init=mask_scale_init)
        self.layer_counts = tuple(layers)
        self.layers = nn.ModuleList()
        for channels, count in zip(in_channels, layers):
            for _ in range(count):
                self.layers.append(KMaXTransformerLayer(
                    channels, num_classes, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                    num_heads=num_heads, ffn_dim=ffn_dim, drop_path=drop_path,
                    kmeans_update_init=kmeans_update_init, **head, **bn))
        # Stored as D×N and tiled over the batch.
        self.cluster_centers = nn.Parameter(torch.empty(hidden_dim, num_queries))
        trunc_normal_(self.cluster_centers, 1.0)
        self.class_embedding = ConvBN(hidden_dim, hidden_dim, 1, dims=1, act=True, **bn)
        self.mask_embedding = ConvBN(hidden_dim, hidden_dim, 1, dims=1, act=True, **bn)
        self.predictor = KMaXPredictor(final_channels, hidden_dim, num_classes, **head, **bn)

    def forward(self, features: list[Tensor], pixel_feature: Tensor,
                relax: Callable[[int], StageRelaxation | None] | None = None
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], list[Tensor]]:
        """features: decoder outputs at strides 32/16/8; pixel_feature: the stride-4 feature.

        ``relax(i)`` gives the relaxation of layer ``i`` (or ``None``). Returns (final prediction, per-layer
        auxiliary predictions at their own stride, per-layer ``P``).
        """
        b = pixel_feature.shape[0]
        centers = self.cluster_centers.unsqueeze(0).expand(b, -1, -1)
        aux, keys = [], []
        index = 0
        for feature, count in zip(features, self.layer_counts):
            for _ in range(count):
                stage_relax = relax(index) if relax is not None else None
                centers, prediction, pixel = self.layers[index](feature, centers, stage_relax)
                aux.append(prediction)
                keys.append(pixel)
                index += 1
        final = self.predictor(pixel_feature, self.mask_embedding(centers), self.class_embedding(centers))
        return final, aux, keys
