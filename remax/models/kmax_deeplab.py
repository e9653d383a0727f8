"""The kMaX-DeepLab meta-architecture: backbone → pixel decoder → kMaX transformer decoder → outputs.

Training-only heads (the kMaX auxiliary semantic decoder and the ReMaX per-stage semantic heads) are built only
with ``with_training_heads=True`` and can be removed with :meth:`KMaXDeepLab.drop_training_heads`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import Tensor, nn

from remax.config import ModelConfig, model_config
from remax.models.backbones import TimmBackbone
from remax.models.heads import AuxSemanticDecoder, ReMaskSemanticHead
from remax.models.kmax_decoder import KMaXTransformerDecoder
from remax.models.layers import resize_bilinear
from remax.models.pixel_decoder import KMaXPixelDecoder

log = logging.getLogger(__name__)

TRAINING_HEADS = ("aux_semantic_head", "remask_heads")


def normalize_image(x: Tensor) -> Tensor:
    """Map RGB values in 0..255 to [-1, 1] (``x / 127.5 - 1``); pad *after* this so padding is exactly 0."""
    return x.float() / 127.5 - 1.0


class KMaXDeepLab(nn.Module):
    """kMaX-DeepLab / ReMaX panoptic model. See ``docs/design.md`` for the output contract.

    ``forward(images)`` takes normalised, zero-padded B×3×H×W images. In ``eval()`` mode it returns only
    ``pred_logits`` (B×N×(K+1), void last) and ``pred_masks`` (B×N×h×w at stride 4); in ``train()`` mode also
    ``pixel_embeddings``, per-layer ``aux_outputs`` upsampled to h×w, and the semantic logits of the training
    heads that are built.
    """

    def __init__(self, cfg: ModelConfig, *, with_training_heads: bool = False):
        super().__init__()
        self.cfg = cfg
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        self.backbone = TimmBackbone(cfg.backbone, pretrained=cfg.backbone_pretrained,
                                     drop_path=cfg.backbone_drop_path,
                                     pretrained_file=cfg.backbone_pretrained_file)
        self.pixel_decoder = KMaXPixelDecoder(
            self.backbone.channels, tuple(cfg.pixel_decoder_layers), tuple(cfg.pixel_decoder_channels),
            tuple(cfg.pixel_decoder_block_types), num_heads=cfg.axial_heads, max_length=cfg.axial_max_length, **bn)
        dec_channels = self.pixel_decoder.out_channels
        if len(cfg.transformer_decoder_layers) != 3:
            raise ValueError(f"transformer_decoder_layers needs 3 counts (strides 32/16/8), got "
                             f"{cfg.transformer_decoder_layers}")
        self.transformer_decoder = KMaXTransformerDecoder(
            dec_channels[:3], dec_channels[3], cfg.num_classes, layers=tuple(cfg.transformer_decoder_layers),
            num_queries=cfg.num_queries, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.kmeans_bottleneck_dim,
            num_heads=cfg.self_attention_heads, ffn_dim=cfg.ffn_dim, drop_path=cfg.drop_path,
            head_dim=cfg.pixel_head_dim, embedding_dim=cfg.pixel_embedding_dim, void_prior=cfg.void_prior, **bn)
        self.aux_semantic_head: AuxSemanticDecoder | None = None
        self.remask_heads: nn.ModuleList | None = None
        if with_training_heads:
            self.build_training_heads()

    @property
    def num_decoder_layers(self) -> int:
        return len(self.transformer_decoder.layers)

    @property
    def has_training_heads(self) -> bool:
        return self.aux_semantic_head is not None or self.remask_heads is not None

    def build_training_heads(self) -> "KMaXDeepLab":
        """Add the training-only heads the config asks for (idempotent)."""
        cfg = self.cfg
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        device = self.transformer_decoder.cluster_centers.device
        if cfg.aux_semantic_head and self.aux_semantic_head is None:
            self.aux_semantic_head = AuxSemanticDecoder(self.backbone.channels, cfg.num_classes,
                                                        cfg.semantic_head_channels, tuple(cfg.aspp_dilations),
                                                        **bn).to(device)
        stages = min(cfg.remask_stages, self.num_decoder_layers)
        if stages > 0 and self.remask_heads is None:
            self.remask_heads = nn.ModuleList(
                ReMaskSemanticHead(cfg.kmeans_bottleneck_dim, cfg.num_classes, cfg.semantic_head_channels,
                                   tuple(cfg.aspp_dilations), **bn) for _ in range(stages)).to(device)
        return self

    def drop_training_heads(self) -> "KMaXDeepLab":
        """Remove the training-only heads (their parameters disappear from the model); returns ``self``."""
        self.aux_semantic_head = None
        self.remask_heads = None
        return self

    def forward(self, images: Tensor) -> dict[str, Any]:
        features = self.backbone(images)
        multi_scale, pixel_feature = self.pixel_decoder(features)
        final, aux, keys = self.transformer_decoder(multi_scale, pixel_feature)
        if not self.training:
            return {"pred_logits": final["pred_logits"], "pred_masks": final["pred_masks"]}
        size = final["pred_masks"].shape[-2:]
        out: dict[str, Any] = dict(final)
        out["aux_outputs"] = [
            {"pred_logits": p["pred_logits"], "pred_masks": resize_bilinear(p["pred_masks"], size),
             "pixel_embeddings": resize_bilinear(p["pixel_embeddings"], size)}
            for p in aux]
        if self.aux_semantic_head is not None:
            out["semantic_logits"] = resize_bilinear(self.aux_semantic_head(features), size)
        if self.remask_heads is not None:
            out["remask_semantic_logits"] = [resize_bilinear(head(key), size)
                                             for head, key in zip(self.remask_heads, keys)]
        return out


def build_model(preset: str | ModelConfig, *, with_training_heads: bool = False, **overrides: Any) -> KMaXDeepLab:
    """Build a model from a preset name (see :func:`remax.config.list_presets`) or a :class:`ModelConfig`,
    with :class:`ModelConfig` field overrides. Nothing is downloaded unless ``backbone_pretrained=True``."""
    if isinstance(preset, ModelConfig):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {', '.join(unknown)}")
        cfg = dataclasses.replace(preset, **overrides)
    elif isinstance(preset, str):
        cfg = model_config(preset, **overrides)
    else:
        raise TypeError(f"preset must be a preset name or a ModelConfig, got {type(preset).__name__}")
    return KMaXDeepLab(cfg, with_training_heads=with_training_heads)
