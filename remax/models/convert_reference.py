"""Rename the weights of a bytedance/kmax-deeplab (detectron2) model into a :class:`KMaXDeepLab` state_dict.

The reference registers its modules in another order and under other names, so tensors are matched by *name*,
never by position: each source key is rewritten by the regular-expression rules of its section (backbone, pixel
decoder, transformer decoder, auxiliary semantic head) and must land on a tensor of the target model with the
same shape. The conversion is strict: every source tensor is used or dropped for a stated reason, every target
tensor is filled, and any mismatch raises one :class:`ReferenceConversionError` whose message is a single line
naming the offending keys.

Two differences are handled explicitly rather than silently:

* The reference's auxiliary semantic classifier has K+1 rows (void last); ours has K. Its void row is dropped
  when the head is kept (for fine-tuning), or the whole head is dropped (``keep_aux_head=False``, inference).
  The light res5 head of the Cityscapes configurations (``USE_AUX_SEMANTIC_DECODER: False``) already has K rows
  and is copied as it is.
* The reference's ResNet-50 BatchNorm uses eps 1e-3; the weights are copied unchanged and the model must be built
  with ``ModelConfig.backbone_bn_eps=1e-3`` (the ``kmax_r50`` preset does so), never folded into ``running_var``.

File reading, categories and checkpoint writing live in :mod:`remax.convert`; this module only maps tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from remax.config import ModelConfig
from remax.models.kmax_deeplab import KMaXDeepLab

log = logging.getLogger(__name__)

_Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]

_CLASS_HEAD = "sem_seg_head.predictor._predcitor._transformer_class_head.conv.weight"
_AUX_PREFIX = "sem_seg_head.predictor._auxiliary_semantic_predictor."
_AUX_CLASSIFIER = "aux_semantic_head.classifier."
_LIST_LIMIT = 5  # keys shown per problem in an error message


class ReferenceConversionError(ValueError):
    """A reference state_dict that does not fit the requested model; the message is one line."""


def _rules(*pairs: tuple[str, str | Callable[[re.Match[str]], str]]) -> list[_Rule]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


def _shift_stage(match: re.Match[str]) -> str:
    # detectron2 names ResNet stages res2..res5, timm layer1..layer4.
    return f"layer{int(match.group(1)) - 1}.{match.group(2)}."


# Each rule rewrites part of the key *after* the section prefix; rules apply in order.
_RESNET_RULES = _rules(
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.weight$", "conv1.weight"),
    (r"^res(\d)\.(\d+)\.", _shift_stage),
    (r"\.conv(\d)\.norm\.", r".bn\1."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.weight$", ".downsample.0.weight"),
)
_CONVNEXT_RULES = _rules(
    (r"^downsample_layers\.0\.(\d)\.", r"stem_\1."),
    (r"^downsample_layers\.(\d)\.(\d)\.", r"stages_\1.downsample.\2."),
    (r"^stages\.(\d)\.(\d+)\.", r"stages_\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
)
_PIXEL_DECODER_RULES = _rules(
    (r"^_in_norms\.", "backbone_norms."),
    (r"^_stages\.(\d+)\._blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^_resized_fuses\.(\d+)\._conv_bn_low\.", r"fuses.\1.low_proj."),
    (r"^_resized_fuses\.(\d+)\._conv_bn_high\.", r"fuses.\1.high_proj."),
    (r"\._conv(\d)_bn(_act)?\.", r".conv\1."),
    (r"\._shortcut\.", ".shortcut."),
    (r"\._attention\._(height|width)_axis\.", r".attention.\1_axis."),
    (r"\.qkv_transform\.conv\.weight$", ".qkv.weight"),
    (r"\._(query|key|value)_rpe\._embeddings\.weight$", r".\1_rpe.rpe"),
    (r"\._batch_norm_qkv\.", ".qkv_bn."),
    (r"\._batch_norm_similarity\.", ".similarity_bn."),
    (r"\._batch_norm_retrieved_output\.", ".output_bn."),
)
# The prediction head appears once per k-means layer and once as the final predictor.
_PREDICTOR_RULES = [
    (r"_predcitor\._pixel_space_head_conv0bnact\.", "predictor.pixel_conv0."),
    (r"_predcitor\._pixel_space_head_conv1bnact\.", "predictor.pixel_conv1."),
    (r"_predcitor\._pixel_space_head_last_convbn\.", "predictor.pixel_conv2."),
    (r"_predcitor\._transformer_mask_head\.", "predictor.mask_head."),
    (r"_predcitor\._transformer_class_head\.conv\.", "predictor.class_head."),
    (r"_predcitor\._pixel_space_mask_batch_norm\.", "predictor.mask_bn."),
]
_TRANSFORMER_RULES = _rules(
    (r"^_cluster_centers\.weight$", "cluster_centers"),
    (r"^_class_embedding_projection\.", "class_embedding."),
    (r"^_mask_embedding_projection\.", "mask_embedding."),
    (r"^_kmax_transformer_layers\.(\d+)\.", r"layers.\1."),
    (r"\._pixel_conv1_bn_act\.", ".pixel_conv1."),
    (r"\._query_conv1_bn_act\.", ".query_conv1."),
    (r"\._pixel_v_conv_bn\.", ".pixel_v."),
    (r"\._query_qkv_conv_bn\.", ".query_qkv."),
    (r"\._query_self_attention\._batch_norm_similarity\.", ".self_attention.similarity_bn."),
    (r"\._query_self_attention\._batch_norm_retrieved_value\.", ".self_attention.value_bn."),
    (r"\._query_conv3_bn\.", ".query_conv3."),
    (r"\._query_ffn_conv(\d)_bn(_act)?\.", r".ffn_conv\1."),
    (r"\._kmeans_query_batch_norm_retrieved_value\.", ".kmeans_value_bn."),
    (r"\._kmeans_query_conv3_bn\.", ".kmeans_conv3."),
    *[(r"(^|\.)" + pattern, r"\1" + repl) for pattern, repl in _PREDICTOR_RULES],
)
_AUX_RULES = _rules(
    (r"^_aspp\._aspp_conv(\d)\.", r"aspp.branches.\1."),
    (r"^_aspp\._aspp_pool\.", "aspp.pool."),
    (r"^_aspp\._proj_conv_bn_act\.", "aspp.project."),
    (r"^_low_level_projection_os(\d)\.", r"proj_os\1."),
    (r"^_low_level_fusion_os(\d)_conv(\d)_bn_act\.", r"fuse_os\1.\2."),
    (r"^conv_block_(\d)\.", r"head.\1."),
    (r"^final_conv\.conv\.", "classifier."),
    # USE_AUX_SEMANTIC_DECODER False (the Cityscapes configs): a light nn.Sequential on res5 whose three ConvBNs are
    # our Res5SemanticHead's depthwise 5x5, 1x1 projection and classifier (K rows, no void row, no norm).
    (r"^0\.", "depthwise."),
    (r"^1\.", "project."),
    (r"^2\.conv\.", "classifier."),
)

# (source prefix, target prefix, rules). The aux head is listed before the transformer decoder it sits inside.
_SECTIONS: dict[str, list[tuple[str, str, list[_Rule]]]] = {
    "resnet": [("backbone.", "backbone.body.", _RESNET_RULES)],
    "convnext": [("backbone.", "backbone.body.", _CONVNEXT_RULES)],
}
_HEAD_SECTIONS = [
    ("sem_seg_head.pixel_decoder.", "pixel_decoder.", _PIXEL_DECODER_RULES),
    (_AUX_PREFIX, "aux_semantic_head.", _AUX_RULES),
    ("sem_seg_head.predictor.", "transformer_decoder.", _TRANSFORMER_RULES),
]
# Source tensors that have no counterpart by design.
_DROPPABLE = (
    (re.compile(r"^pixel_(mean|std)$"), "input normalisation constants (remax normalises in the predictor)"),
    (re.compile(r"^criterion\."), "loss buffer, not a model weight"),
)

# Known reference backbones, to name what a checkpoint holds in error messages.
_RESNET_DEPTHS = {(3, 4, 6, 3): "ResNet-50 (preset kmax_r50)", (3, 4, 23, 3): "ResNet-101"}
_CONVNEXT_VARIANTS = {
    ((3, 3, 9, 3), 96): "ConvNeXt-T (preset kmax_convnext_t)",
    ((3, 3, 27, 3), 96): "ConvNeXt-S (preset kmax_convnext_s)",
    ((3, 3, 27, 3), 128): "ConvNeXt-B (preset kmax_convnext_b)",
    ((3, 3, 27, 3), 192): "ConvNeXt-L (preset kmax_convnext_l)",
}


@dataclass
class ReferenceConversion:
    """The converted weights and what happened to every source tensor that was not copied one to one."""

    state_dict: dict[str, Tensor]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    adjusted: dict[str, str] = field(default_factory=dict)  # target key -> what was changed
    num_classes: int = 0


def reference_backbone(src: Mapping[str, Tensor]) -> str:
    """``"resnet"`` or ``"convnext"``: which reference backbone a state_dict holds (from its key names)."""
    if "backbone.stem.conv1.weight" in src:
        return "resnet"
    if "backbone.downsample_layers.0.0.weight" in src:
        return "convnext"
    raise ReferenceConversionError(
        "not a kMaX-DeepLab reference state_dict: no 'backbone.stem.conv1.weight' (ResNet) or "
        "'backbone.downsample_layers.0.0.weight' (ConvNeXt) key")


def reference_num_classes(src: Mapping[str, Tensor]) -> int:
    """K, the number of classes a reference state_dict predicts (its class head has K+1 rows, void last)."""
    if _CLASS_HEAD not in src:
        raise ReferenceConversionError(f"not a kMaX-DeepLab reference state_dict: no {_CLASS_HEAD!r} key")
    return int(src[_CLASS_HEAD].shape[0]) - 1


def _model_backbone(name: str) -> str:
    for family in ("resnet", "convnext"):
        if name.startswith(family):
            return family
    raise ReferenceConversionError(f"backbone {name!r} has no kMaX-DeepLab reference counterpart "
                                   f"(the reference releases ResNet-50 and ConvNeXt models)")


def _stage_depths(keys: list[str], pattern: str) -> tuple[int, ...]:
    """Blocks per stage from keys like ``...stage S ... block B ...`` matched by ``pattern`` (groups S, B)."""
    depth: dict[int, int] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), block + 1)
    return tuple(depth[s] for s in sorted(depth))


def _describe_source(src: Mapping[str, Tensor], family: str) -> tuple[tuple, str]:
    keys = list(src)
    if family == "resnet":
        depths = _stage_depths(keys, r"^backbone\.res(\d)\.(\d+)\.conv1\.weight$")
        return depths, _RESNET_DEPTHS.get(depths, f"a ResNet with {list(depths)} blocks per stage")
    depths = _stage_depths(keys, r"^backbone\.stages\.(\d)\.(\d+)\.dwconv\.weight$")
    width = int(src["backbone.downsample_layers.0.0.weight"].shape[0])
    return (depths, width), _CONVNEXT_VARIANTS.get(
        (depths, width), f"a ConvNeXt with depths {list(depths)} and width {width}")


def _describe_target(spec: Mapping[str, torch.Size], family: str) -> tuple:
    keys = list(spec)
    if family == "resnet":
        return _stage_depths(keys, r"^backbone\.body\.layer(\d)\.(\d+)\.conv1\.weight$")
    depths = _stage_depths(keys, r"^backbone\.body\.stages_(\d)\.blocks\.(\d+)\.conv_dw\.weight$")
    return depths, int(spec["backbone.body.stem_0.weight"][0])


def _check_backbone(src: Mapping[str, Tensor], spec: Mapping[str, torch.Size], backbone: str) -> str:
    family = reference_backbone(src)
    wanted = _model_backbone(backbone)
    found_shape, found = _describe_source(src, family)
    if family != wanted:
        raise ReferenceConversionError(
            f"backbone mismatch: the checkpoint holds {found}, but the model's backbone is {backbone!r}; "
            f"choose the preset of the checkpoint's backbone")
    target_shape = _describe_target(spec, family)
    if found_shape != target_shape:
        desc = (f"{list(target_shape)} blocks per stage" if family == "resnet"
                else f"depths {list(target_shape[0])} and width {target_shape[1]}")
        raise ReferenceConversionError(
            f"depth mismatch: the checkpoint holds {found}, but the model's {backbone!r} has {desc}; "
            f"choose the preset of the checkpoint's backbone")
    return family


def _rename(key: str, sections: list[tuple[str, str, list[_Rule]]]) -> str | None:
    for src_prefix, dst_prefix, rules in sections:
        if key.startswith(src_prefix):
            rest = key[len(src_prefix):]
            for pattern, repl in rules:
                rest = pattern.sub(repl, rest)
            return dst_prefix + rest
    return None


def _target_spec(model: KMaXDeepLab | ModelConfig, keep_aux_head: bool) -> tuple[dict[str, torch.Size],
                                                                                 dict[str, torch.dtype], str]:
    """Shapes and dtypes of the tensors to fill (no ReMaX heads: the reference has none) and the backbone name."""
    if isinstance(model, ModelConfig):
        cfg = dataclasses.replace(model, remask_stages=0, backbone_pretrained=False, backbone_pretrained_file="")
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = KMaXDeepLab(cfg, with_training_heads=keep_aux_head)
    if not isinstance(model, KMaXDeepLab):
        raise TypeError(f"expected a KMaXDeepLab or a ModelConfig, got {type(model).__name__}")
    state = model.state_dict()
    keep = {k: v for k, v in state.items()
            if not k.startswith("remask_heads.") and (keep_aux_head or not k.startswith("aux_semantic_head."))}
    return ({k: v.shape for k, v in keep.items()}, {k: v.dtype for k, v in keep.items()}, model.cfg.backbone)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def plan_reference_conversion(src: Mapping[str, Tensor], model: KMaXDeepLab | ModelConfig, *,
                              keep_aux_head: bool = True) -> ReferenceConversion:
    """Map a reference state_dict onto ``model`` (a built model, or a config to describe one).

    ``keep_aux_head``: keep the auxiliary semantic head (for fine-tuning; its void row is dropped) if the target
    has one, or drop it (inference). ReMaX's per-stage semantic heads are never filled: the reference has none,
    and fine-tuning (``remax train --init-from``) starts them fresh.
    """
    spec, dtypes, backbone = _target_spec(model, keep_aux_head)
    family = _check_backbone(src, spec, backbone)
    num_classes = reference_num_classes(src)
    target_classes = spec["transformer_decoder.predictor.class_head.weight"][0] - 1
    if num_classes != target_classes:
        raise ReferenceConversionError(
            f"class count mismatch: the checkpoint predicts {num_classes} classes (+ void), the model "
            f"{target_classes}; pick the checkpoint's data set (COCO 133, Cityscapes 19, ADE20K 150)")
    has_aux = any(k.startswith("aux_semantic_head.") for k in spec)
    sections = _SECTIONS[family] + _HEAD_SECTIONS

    out: dict[str, Tensor] = {}
    result = ReferenceConversion(out, num_classes=num_classes)
    unexpected, wrong_shape, twice = [], [], []
    for key, value in src.items():
        if key.startswith(_AUX_PREFIX) and not has_aux:
            result.dropped[key] = "training-only auxiliary semantic head, not kept"
            continue
        reason = next((why for pattern, why in _DROPPABLE if pattern.search(key)), None)
        if reason is not None:
            result.dropped[key] = reason
            continue
        name = _rename(key, sections)
        if name is None or name not in spec:
            unexpected.append(key)
            continue
        if name in out:
            twice.append(key)
            continue
        if not isinstance(value, Tensor):
            wrong_shape.append(f"{key} (a {type(value).__name__}, not a tensor)")
            continue
        want = spec[name]
        if name.startswith(_AUX_CLASSIFIER) and value.shape[0] == want[0] + 1 and value.shape[1:] == want[1:]:
            value = value[:-1].clone()  # K+1 rows with void last -> K rows; clone so the file holds no extra row
            result.adjusted[name] = "void row dropped"
        if value.shape != want:
            wrong_shape.append(f"{key} {tuple(value.shape)} -> {name} {tuple(want)}")
            continue
        dtype = dtypes[name]
        out[name] = value.to(dtype) if value.dtype != dtype else value
    missing = [k for k in spec if k not in out]
    problems = []
    for label, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong_shape),
                        ("mapped twice", twice)):
        if keys:
            problems.append(f"{len(keys)} {label}: {_listing(keys)}")
    if problems:
        raise ReferenceConversionError(f"reference state_dict does not fit the {backbone} model: "
                                       + "; ".join(problems))
    log.info("reference state_dict converted: %d tensors mapped, %d dropped", len(out), len(result.dropped))
    for key, why in result.dropped.items():
        log.debug("  dropped %s: %s", key, why)
    return result


def convert_reference_state_dict(src: Mapping[str, Tensor], model: KMaXDeepLab | ModelConfig, *,
                                 keep_aux_head: bool = True) -> dict[str, Tensor]:
    """The :class:`KMaXDeepLab` state_dict for a reference (detectron2 ``checkpoint["model"]``) state_dict.

    Raises :class:`ReferenceConversionError` (a ``ValueError``) with a one-line message when the source does not
    fit ``model``. See :func:`plan_reference_conversion` for ``keep_aux_head``.
    """
    return plan_reference_conversion(src, model, keep_aux_head=keep_aux_head).state_dict
