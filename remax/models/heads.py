"""Prediction heads: the kMaX mask/class predictor and the training-only semantic heads.

* :class:`KMaXPredictor` (kmax-reference §1.5): L2-normalised pixel embeddings, mask kernels, mask logits through
  one shared BN scale (γ init 0.1), class logits over K classes + void with a constant void prior added at
  forward time.
* :class:`AuxSemanticDecoder` (§1.6): the kMaX auxiliary semantic decoder (Panoptic-DeepLab style) on backbone
  features, output at stride 4.
* :class:`Res5SemanticHead`: the reference's lighter auxiliary semantic head on res5 alone (its Cityscapes
  configurations, ``USE_AUX_SEMANTIC_DECODER: False``), output at stride 32.
* :class:`ReMaskSemanticHead` (SPEC §4.1): ReMaX's per-stage semantic head, ASPP + 1×1 conv on the key (pixel
  feature P) of a k-means cross-attention layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remax.models.layers import BN_EPS, BN_MOMENTUM, ConvBN, batch_norm, resize_bilinear, trunc_normal_


def void_prior_bias(num_classes: int, void_prior: float = 0.9) -> float:
    """``log((K_total - 1)·p/(1-p))`` with K_total = K + 1: makes P(void) ≈ ``void_prior`` at initialisation."""
    return math.log(num_classes * void_prior / (1.0 - void_prior))


class KMaXPredictor(nn.Module):
    """Mask and class prediction from a pixel feature and (mask, class) cluster embeddings.

    Pixel head: depthwise 5×5 → 1×1 (``head_dim``) → 1×1 (``embedding_dim``, with bias) + BN → L2 norm.
    Mask logits ``BN_1(e(x)·w_i)`` share one γ/β over all queries and pixels (γ starts at ``mask_scale_init``,
    0.1 in the reference).
    """

    def __init__(self, pixel_channels: int, query_channels: int, num_classes: int, *, head_dim: int = 256,
                 embedding_dim: int = 128, void_prior: float = 0.9, mask_scale_init: float = 0.1,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.pixel_conv0 = ConvBN(pixel_channels, pixel_channels, 5, padding=2, groups=pixel_channels, act=True,
                                  init="xavier_uniform", **bn)
        self.pixel_conv1 = ConvBN(pixel_channels, head_dim, 1, act=True, **bn)
        self.pixel_conv2 = ConvBN(head_dim, embedding_dim, 1, bias=True, std=0.01, **bn)
        self.mask_head = ConvBN(query_channels, embedding_dim, 1, dims=1, **bn)
        self.class_head = nn.Conv1d(query_channels, num_classes + 1, 1)
        trunc_normal_(self.class_head.weight, 0.01)
        nn.init.zeros_(self.class_head.bias)
        self.mask_bn = batch_norm(1, 3, momentum=bn_momentum, eps=bn_eps, init=mask_scale_init)
        self.void_bias = void_prior_bias(num_classes, void_prior)

    def forward(self, pixel_feature: Tensor, mask_embeddings: Tensor, class_embeddings: Tensor
                ) -> dict[str, Tensor]:
        """pixel_feature B×C×H×W, embeddings B×Q×N -> class logits B×N×(K+1), mask logits B×N×H×W,
        pixel embeddings B×D×H×W (unit norm)."""
        emb = self.pixel_conv2(self.pixel_conv1(self.pixel_conv0(pixel_feature)))
        emb = F.normalize(emb, p=2, dim=1)
        kernels = self.mask_head(mask_embeddings)  # B×D×N
        masks = torch.einsum("bdhw,bdn->bnhw", emb, kernels)
        masks = self.mask_bn(masks.unsqueeze(1)).squeeze(1)
        logits = self.class_head(class_embeddings).transpose(1, 2)
        # The void prior is a constant added at forward time, not stored in the bias.
        logits = torch.cat([logits[..., :-1], logits[..., -1:] + self.void_bias], dim=-1)
        return {"pred_logits": logits, "pred_masks": masks, "pixel_embeddings": emb}


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, three dilated 3×3, image pooling; concat → 1×1 → Dropout(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: tuple[int, ...] = (6, 12, 18), *,
                 dropout: float = 0.1, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(act=True, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.branches = nn.ModuleList([ConvBN(in_channels, out_channels, 1, **bn)])
        for d in dilations:
            self.branches.append(ConvBN(in_channels, out_channels, 3, padding=d, dilation=d, **bn))
        self.pool = ConvBN(in_channels, out_channels, 1, **bn)
        self.project = ConvBN(out_channels * (len(dilations) + 2), out_channels, 1, **bn)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))  # bilinear upsampling of a 1×1 map
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class AuxSemanticDecoder(nn.Module):
    """kMaX auxiliary semantic decoder on backbone res5/res3/res2 (training only), output at stride 4.

    ASPP on res5, then two fusion steps with projected res3 (``channels/4``) and res2 (``channels/8``), each a
    depthwise 5×5 + 1×1; then a depthwise 5×5 + 1×1 head and a 1×1 classifier.
    """

    def __init__(self, in_channels: dict[str, int], num_classes: int, channels: int = 256,
                 dilations: tuple[int, ...] = (6, 12, 18), *, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(act=True, bn_momentum=bn_momentum, bn_eps=bn_eps)
        c8, c4 = max(channels // 4, 1), max(channels // 8, 1)
        self.aspp = ASPP(in_channels["res5"], channels, dilations, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.proj_os8 = ConvBN(in_channels["res3"], c8, 1, **bn)
        self.fuse_os8 = nn.Sequential(
            ConvBN(channels + c8, channels + c8, 5, padding=2, groups=channels + c8, init="xavier_uniform", **bn),
            ConvBN(channels + c8, channels, 1, **bn))
        self.proj_os4 = ConvBN(in_channels["res2"], c4, 1, **bn)
        self.fuse_os4 = nn.Sequential(
            ConvBN(channels + c4, channels + c4, 5, padding=2, groups=channels + c4, init="xavier_uniform", **bn),
            ConvBN(channels + c4, channels, 1, **bn))
        self.head = nn.Sequential(
            ConvBN(channels, channels, 5, padding=2, groups=channels, init="xavier_uniform", **bn),
            ConvBN(channels, channels, 1, **bn))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        trunc_normal_(self.classifier.weight, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        x = self.aspp(features["res5"])
        low = self.proj_os8(features["res3"])
        x = self.fuse_os8(torch.cat([resize_bilinear(x, low.shape[-2:]), low], dim=1))
        low = self.proj_os4(features["res2"])
        x = self.fuse_os4(torch.cat([resize_bilinear(x, low.shape[-2:]), low], dim=1))
        return self.classifier(self.head(x))


class Res5SemanticHead(nn.Module):
    """Auxiliary semantic head on res5 only (training only): depthwise 5×5 → 1×1 (``channels``) → 1×1 classifier.

    The kMaX reference uses it instead of :class:`AuxSemanticDecoder` when ``USE_AUX_SEMANTIC_DECODER`` is off
    (its Cityscapes configurations); its classifier has K rows (no void row), as ours always does. The logits are
    at stride 32; the model resizes them to the mask size like the decoder's.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, *,
                 bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(act=True, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.depthwise = ConvBN(in_channels, in_channels, 5, padding=2, groups=in_channels, init="xavier_uniform",
                                **bn)
        self.project = ConvBN(in_channels, channels, 1, **bn)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        trunc_normal_(self.classifier.weight, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.project(self.depthwise(features["res5"])))


class ReMaskSemanticHead(nn.Module):
    """ReMaX per-stage semantic head (training only): ASPP + 1×1 conv to K classes on a layer's pixel feature."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 dilations: tuple[int, ...] = (6, 12, 18), *, bn_momentum: float = BN_MOMENTUM,
                 bn_eps: float = BN_EPS):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, dilations, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        trunc_normal_(self.classifier.weight, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.aspp(x))
