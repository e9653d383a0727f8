"""The kMaX-DeepLab meta-architecture: backbone → pixel decoder → kMaX transformer decoder → outputs.

Training-only heads (the kMaX auxiliary semantic decoder and the ReMaX per-stage semantic heads) are built only
with ``with_training_heads=True`` and can be removed with :meth:`KMaXDeepLab.drop_training_heads`. With ReMask
in the decoder (:class:`~remax.models.remask.ReMaskOptions`), each relaxed stage runs its semantic head inside the
forward pass and its k-means assignment is taken from the relaxed masks; in ``eval()`` that happens only when the
options ask for it (``at_test``), so by default an evaluated model never depends on its training heads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from torch import Tensor, nn

from remax.config import ModelConfig, model_config
from remax.models.backbones import build_backbone
from remax.models.heads import AuxSemanticDecoder, ReMaskSemanticHead, Res5SemanticHead
from remax.models.kmax_decoder import KMaXTransformerDecoder
from remax.models.layers import resize_bilinear
from remax.models.pixel_decoder import KMaXPixelDecoder
from remax.models.remask import ReMaskOptions, prior_bias, remask, stride_labels
from remax.preprocessing import normalize_image  # noqa: F401 (re-exported: remax.models.normalize_image)

log = logging.getLogger(__name__)

TRAINING_HEADS = ("aux_semantic_head", "remask_heads")


class KMaXDeepLab(nn.Module):
    """kMaX-DeepLab / ReMaX panoptic model. See ``docs/design.md`` for the output contract.

    ``forward(images)`` takes normalised, zero-padded B×3×H×W images. In ``eval()`` mode it returns only
    ``pred_logits`` (B×N×(K+1), void last) and ``pred_masks`` (B×N×h×w at ``output_stride``: 4, or 2 with a
    stride-2 pixel-decoder stage); in ``train()`` mode also ``pixel_embeddings``, per-layer ``aux_outputs``
    upsampled to h×w, and the semantic logits of the training heads that are built. ``remask`` says whether and
    how ReMask runs inside the decoder (off by default).
    """

    def __init__(self, cfg: ModelConfig, *, with_training_heads: bool = False,
                 remask: ReMaskOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.remask = remask or ReMaskOptions()
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        self.backbone = build_backbone(cfg.backbone, pretrained=cfg.backbone_pretrained,
                                       drop_path=cfg.backbone_drop_path,
                                       pretrained_file=cfg.backbone_pretrained_file,
                                       bn_eps=cfg.backbone_bn_eps, bn_momentum=cfg.backbone_bn_momentum,
                                       stem_feature=cfg.pixel_decoder_stem_feature)
        self.pixel_decoder = KMaXPixelDecoder(
            self.backbone.channels, tuple(cfg.pixel_decoder_layers), tuple(cfg.pixel_decoder_channels),
            tuple(cfg.pixel_decoder_block_types), order=self.backbone.feature_order, strides=self.backbone.strides,
            num_heads=cfg.axial_heads, max_length=cfg.axial_max_length, **bn)
        dec_channels = self.pixel_decoder.out_channels
        if len(cfg.transformer_decoder_layers) != 3:
            raise ValueError(f"transformer_decoder_layers needs 3 counts (strides 32/16/8), got "
                             f"{cfg.transformer_decoder_layers}")
        self.transformer_decoder = KMaXTransformerDecoder(
            dec_channels[:3], dec_channels[-1], cfg.num_classes, layers=tuple(cfg.transformer_decoder_layers),
            num_queries=cfg.num_queries, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.kmeans_bottleneck_dim,
            num_heads=cfg.self_attention_heads, ffn_dim=cfg.ffn_dim, drop_path=cfg.drop_path,
            head_dim=cfg.pixel_head_dim, embedding_dim=cfg.pixel_embedding_dim, void_prior=cfg.void_prior,
            mask_scale_init=cfg.mask_scale_init, kmeans_update_init=cfg.kmeans_update_init, **bn)
        self.aux_semantic_head: AuxSemanticDecoder | Res5SemanticHead | None = None
        self.remask_heads: nn.ModuleList | None = None
        if with_training_heads:
            self.build_training_heads()

    @property
    def output_stride(self) -> int:
        """Input pixels per mask-logit step: 4, or 2 with a stride-2 pixel-decoder stage."""
        return self.pixel_decoder.output_stride

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
            if cfg.aux_semantic_decoder:
                self.aux_semantic_head = AuxSemanticDecoder(self.backbone.channels, cfg.num_classes,
                                                            cfg.semantic_head_channels, tuple(cfg.aspp_dilations),
                                                            **bn).to(device)
            else:
                self.aux_semantic_head = Res5SemanticHead(self.backbone.channels["res5"], cfg.num_classes,
                                                          cfg.semantic_head_channels, **bn).to(device)
        stages = min(cfg.remask_stages, self.num_decoder_layers)
        if stages > 0 and self.remask_heads is None:
            self.remask_heads = nn.ModuleList(
                ReMaskSemanticHead(cfg.kmeans_bottleneck_dim, cfg.num_classes, cfg.semantic_head_channels,
                                   tuple(cfg.aspp_dilations), **bn) for _ in range(stages)).to(device)
            if self.remask.init_multiplier:
                bias = prior_bias(cfg.num_classes, self.remask.init_multiplier)
                for head in self.remask_heads:
                    nn.init.constant_(head.classifier.bias, bias)
        return self

    def set_remask(self, options: ReMaskOptions) -> "KMaXDeepLab":
        """Change how ReMask runs in the forward pass (e.g. keep it at test time for the paper's Table 5)."""
        self.remask = options
        return self

    def drop_training_heads(self) -> "KMaXDeepLab":
        """Remove the training-only heads (their parameters disappear from the model); returns ``self``."""
        self.aux_semantic_head = None
        self.remask_heads = None
        return self

    def relaxed_stages(self) -> int:
        """How many decoder stages ReMask relaxes in the next forward pass (0 in ``eval()`` unless ``at_test``)."""
        opts = self.remask
        if opts.stages <= 0 or not (self.training or opts.at_test):
            return 0
        if opts.use_gt:
            return min(opts.stages, self.num_decoder_layers)
        if self.remask_heads is None:
            if not self.training:
                raise ValueError("ReMask at test time needs the ReMaX semantic heads, but this model has none "
                                 "(built without training heads, or they were dropped)")
            return 0  # the criterion warns that the model gives fewer relaxed stages than asked for
        return min(opts.stages, len(self.remask_heads))

    def forward(self, images: Tensor, remask_gt_semantic: Tensor | None = None) -> dict[str, Any]:
        """``remask_gt_semantic``: B×H×W contiguous class ids at the input resolution (K on void), needed only
        by ReMask's ground-truth control (``ReMaskOptions.use_gt``)."""
        features = self.backbone(images)
        multi_scale, pixel_feature = self.pixel_decoder(features)
        n_relaxed = self.relaxed_stages()
        if n_relaxed and self.remask.use_gt and remask_gt_semantic is None:
            raise ValueError("ReMask with the ground-truth control (remax.remask_use_gt) needs the ground-truth "
                             "semantic map: call model(images, remask_gt_semantic=labels)")
        stage_semantic: dict[int, Tensor] = {}

        def relax(index: int):
            if index >= n_relaxed:
                return None
            return functools.partial(self._relax_stage, index, stage_semantic, remask_gt_semantic)

        final, aux, keys = self.transformer_decoder(multi_scale, pixel_feature, relax if n_relaxed else None)
        if not self.training:
            return {"pred_logits": final["pred_logits"], "pred_masks": final["pred_masks"]}
        size = final["pred_masks"].shape[-2:]
        out: dict[str, Any] = dict(final)
        out["aux_outputs"] = [
            {k: resize_bilinear(v, size) if k != "pred_logits" else v for k, v in p.items()} for p in aux]
        if self.aux_semantic_head is not None:
            out["semantic_logits"] = resize_bilinear(self.aux_semantic_head(features), size)
        if self.remask_heads is not None:
            out["remask_semantic_logits"] = [
                resize_bilinear(stage_semantic[i] if i in stage_semantic else head(key), size)
                for i, (head, key) in enumerate(zip(self.remask_heads, keys))]
        return out

    def _relax_stage(self, index: int, stage_semantic: dict[int, Tensor], gt_semantic: Tensor | None,
                     prediction: dict[str, Tensor], pixel: Tensor) -> dict[str, Tensor]:
        """ReMask on one decoder stage: the relaxed masks become the stage's ``pred_masks`` (the raw ones are
        kept as ``pred_masks_raw`` for ReClass); the head's logits are kept for its semantic loss."""
        opts = self.remask
        masks = prediction["pred_masks"]
        B, N, h, w = masks.shape
        semantic = labels = None
        if opts.use_gt:
            labels = stride_labels(gt_semantic.to(masks.device), (h, w)).flatten(1)
        else:
            stage_semantic[index] = self.remask_heads[index](pixel)
            semantic = stage_semantic[index].flatten(2)
        relaxed = remask(masks.flatten(2), prediction["pred_logits"], semantic, opts.activation,
                         opts.stop_gradient, opts.detach_class, labels)
        return {**prediction, "pred_masks": relaxed.view(B, N, h, w), "pred_masks_raw": masks}


def build_model(preset: str | ModelConfig, *, with_training_heads: bool = False,
                remask: ReMaskOptions | None = None, **overrides: Any) -> KMaXDeepLab:
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
    return KMaXDeepLab(cfg, with_training_heads=with_training_heads, remask=remask)
