"""Typed configuration: dataclasses, named presets, YAML round trip and ``key=value`` overrides.

A :class:`Config` is everything a run needs; it is printed by ``remax config show``, saved beside every checkpoint
and overridden from the command line with ``--set section.field=value``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of a kMaX-DeepLab / ReMaX model (SPEC §3, kmax-reference §1)."""

    # timm model name, built with features_only=True, or "max_s" (alias "axial_resnet50"): our Axial-ResNet-50
    # (remax/models/axial_resnet.py), which timm does not have.
    backbone: str = "resnet50"
    backbone_pretrained: bool = False  # True downloads ImageNet weights through timm / the HF hub
    backbone_pretrained_file: str = ""  # a local timm checkpoint instead of the hub (offline; implies pretrained)
    backbone_drop_path: float = 0.0
    # BatchNorm eps / momentum of the backbone's own BN layers; None keeps timm's (1e-5 / 0.1). The kMaX reference
    # (and deeplab2, where ReMaX was trained) uses 1e-3 / 0.01 in its ResNet-50, so its weights need 1e-3.
    # "max_s" is ours, not timm's: None there means the decoder's 1e-3 / 0.01, deeplab2's setting.
    backbone_bn_eps: float | None = None
    backbone_bn_momentum: float | None = None
    input_size: tuple[int, int] = (641, 641)  # fixed padded input (H, W), each k*32+1
    num_classes: int = 133  # K, without void; class order is [things..., stuff...], void is index K
    # Pixel decoder, coarse to fine (strides 32, 16, 8, 4): blocks per stage, base width d (block output 4d).
    pixel_decoder_layers: tuple[int, ...] = (1, 5, 1, 1)
    pixel_decoder_channels: tuple[int, ...] = (512, 256, 128, 64)
    pixel_decoder_block_types: tuple[str, ...] = ("axial", "axial", "bottleneck", "bottleneck")
    # A fifth, high-resolution pixel-decoder stage on a backbone "stem" feature (then 5 entries above): "" (none),
    # "reference" (the kMaX reference's Cityscapes stem feature, stride 4) or "stride2" (a true stride-2 feature,
    # predictions at stride 2). See remax/models/backbones.py.
    pixel_decoder_stem_feature: str = ""
    axial_heads: int = 8
    axial_max_length: int = 255  # longest axis the relative-position tables cover
    # kMaX transformer decoder: layers at strides 32, 16, 8.
    transformer_decoder_layers: tuple[int, ...] = (2, 2, 2)
    num_queries: int = 128
    hidden_dim: int = 256  # cluster-centre width
    ffn_dim: int = 2048
    self_attention_heads: int = 8
    kmeans_bottleneck_dim: int = 256
    pixel_embedding_dim: int = 128
    pixel_head_dim: int = 256
    drop_path: float = 0.2  # transformer decoder drop path
    void_prior: float = 0.9  # P(void) at initialisation, through a constant bias on the void logit
    mask_scale_init: float = 0.1  # initial gamma of the shared BN on the mask logits (the reference's 0.1)
    kmeans_update_init: float = 0.0  # initial gamma of the BN closing each k-means update (the reference's 0)
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3
    # Training-only heads (never built for inference unless asked for).
    aux_semantic_head: bool = True  # kMaX auxiliary semantic decoder on backbone features
    # True: the Panoptic-DeepLab-style decoder on res5/res3/res2; False: the reference's light head on res5 alone
    # (its Cityscapes configurations, USE_AUX_SEMANTIC_DECODER: False).
    aux_semantic_decoder: bool = True
    semantic_head_channels: int = 256
    aspp_dilations: tuple[int, ...] = (6, 12, 18)
    remask_stages: int = 4  # ReMaX per-stage semantic heads on the first n decoder layers (0 = none)


@dataclass
class RemaxConfig:
    """The ReMaX relaxations (SPEC §4.1). ``enabled=False`` gives the kMaX-DeepLab baseline objective."""

    enabled: bool = True
    remask: bool = True
    remask_stages: int = 4  # relaxed decoder stages, counted from the first
    # sigma in Eq. 1 and the mask-ID loss: the paper's best is "sigmoid" (Table 2); "softmax" trained better in our
    # convergence study (docs/convergence.md), so it is the default. Set both to "sigmoid" for the paper's choice.
    remask_activation: str = "softmax"
    remask_detach_class: bool = False  # also stop the gradient through sigma(p) in Eq. 1
    remask_stop_gradient: bool = True  # no gradient from the panoptic loss into the semantic heads
    remask_use_gt: bool = False  # Table 7 control: m_sem replaced by the ground-truth semantic mask
    remask_semantic_weight: float = 0.5  # per-stage semantic loss weight
    # The relaxed masks are the stage's prediction inside the decoder (its k-means assignment and every later stage
    # see them); false: they feed only the stage's losses (the earlier, loss-only reading).
    remask_in_decoder: bool = True
    # Sigmoid Eq. 1 only: set the semantic heads' class bias so 1 + sum_c sigma(m_sem)sigma(p) starts at this value
    # instead of 1 + K/4 (34 on COCO). 0 = zero bias (the plain initialisation).
    remask_init_multiplier: float = 0.0
    reclass: bool = True
    reclass_eta: float = 0.1
    reclass_unmatched: bool = False  # also soften the (void) target of unmatched queries
    reclass_activation: str = "sigmoid"  # sigma(m_pan) in Eq. 3: "sigmoid" (paper) or "softmax" over queries
    reclass_normalize: bool = False  # rescale the soft target of Eq. 4 to sum 1 (Eq. 4 as printed does not)
    mask_id_activation: str = "softmax"  # see remask_activation; the kMaX baseline always uses "softmax"


@dataclass
class LossConfig:
    """Weights and options of the kMaX-DeepLab objective (kmax-reference §2)."""

    pq_class_weight: float = 3.0
    pq_dice_weight: float = 3.0
    mask_id_weight: float = 0.3
    instance_discrimination_weight: float = 1.0
    semantic_weight: float = 1.0
    pq_alpha: float = 0.75
    mask_id_activation: str = "softmax"  # overridden by RemaxConfig.mask_id_activation when ReMaX is on
    # Sigmoid mask-ID: "sum" or "mean" of the per-query BCE over the N queries, or "matched" (Mask2Former style:
    # matched queries only, mean over pixels, then over the matched masks). See remax/losses/mask_id.py; "mean"
    # is the default on the evidence of docs/convergence.md (second edition).
    mask_id_sigmoid_reduction: str = "mean"
    instance_discrimination_sample_k: int = 4096
    instance_discrimination_sample_temperature: float = 1.5
    instance_discrimination_temperature: float = 0.3
    semantic_sample_k: int = 4096  # 0 = plain cross-entropy over every non-void pixel
    semantic_sample_temperature: float = 2.0
    deep_supervision: bool = True
    share_final_matching: bool = True
    # Input pixels between the points where the mask terms (matching, PQ-style, mask-ID, ReClass) are supervised.
    # 4 is kMaX-DeepLab's stride-4 grid. 2 or 1 upsample the mask logits bilinearly first, so that boundaries
    # between grid points are supervised too (small objects, upscaled images); memory of those terms grows (4/s)².
    mask_loss_stride: int = 4


@dataclass
class DataConfig:
    """Where the data lives and how training images are augmented (SPEC §5)."""

    name: str = "synthetic"  # synthetic | coco | cityscapes | ade20k | custom
    root: str = ""  # COCO-panoptic layout: ROOT/annotations/panoptic_{split}.json, .../panoptic_{split}/, ROOT/{split}/
    train_split: str = "train"
    val_split: str = "val"
    # Explicit paths for other layouts (override ROOT-derived ones when set).
    train_json: str = ""
    train_png_dir: str = ""
    train_image_dir: str = ""
    val_json: str = ""
    val_png_dir: str = ""
    val_image_dir: str = ""
    crop_size: tuple[int, int] = (641, 641)
    resize_longer_side: int = 640  # longer side before scale jitter; k·32 for a k·32+1 input (as the Predictor)
    min_scale: float = 0.3
    max_scale: float = 1.7
    hflip: bool = True
    color_jitter: bool = True
    copy_paste: bool = True
    copy_paste_prob: float = 0.5
    num_workers: int = 2
    # Synthetic data set (written by `remax data synth`, made automatically by `remax train`).
    synth_train: int = 400
    synth_val: int = 50
    synth_size: int = 256
    synth_seed: int = 0


@dataclass
class TrainConfig:
    """Optimisation recipe and run options (SPEC §4.1, §7)."""

    optimizer: str = "adamw"
    lr: float = 0.006  # at `base_batch_size`; scaled linearly to `batch_size`
    base_batch_size: int = 64
    batch_size: int = 16
    backbone_lr_multiplier: float = 0.1
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "step"  # "step" (x0.1 at step_milestones) or "poly"
    step_milestones: tuple[float, ...] = (0.85, 0.95)
    poly_power: float = 0.9
    warmup_steps: int = 5000
    warmup_factor: float = 0.001
    max_steps: int = 50000
    grad_clip: float = 0.0  # 0 = off
    grad_accum_steps: int = 1
    amp: str = "none"  # none | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = True  # under DDP
    log_every: int = 20
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    tensorboard: bool = False
    num_val_images: int = 0  # 0 = the whole validation split


@dataclass
class EvalConfig:
    """Post-processing thresholds of the mask-wise merge (kmax-reference §4)."""

    pixel_confidence_threshold: float = 0.4
    thing_threshold: float = 0.7
    stuff_threshold: float = 0.5
    overlap_threshold: float = 0.8
    reorder_class_weight: float = 1.0
    reorder_mask_weight: float = 1.0
    thing_area_limit: int = 0
    stuff_area_limit: int = 0
    compute_ap: bool = True
    compute_miou: bool = True
    # Keep ReMask (and its semantic heads) at test time, the paper's Table 5 control; needs a training checkpoint.
    keep_remask: bool = False
    # "remax" (default) or "reference": pre-/post-processing exactly as bytedance/kmax-deeplab evaluates, to
    # reproduce its published numbers (docs/evaluation.md; measured difference in docs/benchmarks.md).
    protocol: str = "remax"


@dataclass
class Config:
    """A complete run: model, objective, data, recipe and post-processing."""

    preset: str = "remax_m"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    remax: RemaxConfig = field(default_factory=RemaxConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _from_dict(cls, data, "")

    @classmethod
    def from_yaml(cls, text: str) -> "Config":
        return cls.from_dict(yaml.safe_load(text) or {})

    def override(self, assignments: list[str]) -> "Config":
        """Return a copy with ``section.field=value`` assignments applied (values parsed as YAML)."""
        cfg = copy.deepcopy(self)
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, raw = item.split("=", 1)
            _assign(cfg, key.strip(), yaml.safe_load(raw))
        return cfg


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X]: None or an X
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "config"
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _assign(cfg: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ValueError(f"unknown config key {key!r} (no section {'.'.join(parts[: i + 1])!r})")
        target = getattr(target, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
        known = ", ".join(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else ""
        raise ValueError(f"unknown config key {key!r}; fields here: {known}")
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(hints[name], value, key))


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

_R50_DECODER = dict(pixel_decoder_layers=(1, 5, 1, 1), transformer_decoder_layers=(2, 2, 2))
# The reference ResNet-50 backbone normalises with the decoder's SyncBN settings, not torchvision's/timm's.
_REFERENCE_BN = dict(backbone_bn_eps=1e-3, backbone_bn_momentum=0.01)
# bytedance/kmax-deeplab configs/cityscapes/panoptic_segmentation/kmax_*.yaml: 19 classes, 256 queries, 1025×2049,
# a fifth pixel-decoder stage (one bottleneck of width 32, 128 channels out, which becomes the pixel feature) on the
# backbone's "stem" feature, and the light res5 auxiliary semantic head. Any Cityscapes preset built on the
# reference architecture (the ReMaX ones too) takes this dict rather than restating it.
_CITYSCAPES_DECODER = dict(
    input_size=(1025, 2049), num_classes=19, num_queries=256, pixel_decoder_layers=(1, 5, 1, 1, 1),
    pixel_decoder_channels=(512, 256, 128, 64, 32),
    pixel_decoder_block_types=("axial", "axial", "bottleneck", "bottleneck", "bottleneck"),
    pixel_decoder_stem_feature="reference", transformer_decoder_layers=(2, 2, 2), aux_semantic_decoder=False)
# configs/ade20k/panoptic_segmentation/kmax_*.yaml: the COCO architecture with 150 classes and no drop path in the
# transformer decoder.
_ADE20K_DECODER = dict(input_size=(1281, 1281), num_classes=150, drop_path=0.0, **_R50_DECODER)
# ReMaX on Cityscapes (ReMaX paper §4.3, Tables 8-9): the kMaX Cityscapes architecture above, with its fifth stage on a
# true stride-2 feature. ReMaX was trained in deeplab2, whose kMaX sets high_resolution_output_stride = 2 for
# Cityscapes and feeds that stage the backbone's stride-2 "stage1" (docs/models.md, "ReMaX on Cityscapes and ADE20K").
_REMAX_CITYSCAPES = dict(_CITYSCAPES_DECODER, pixel_decoder_stem_feature="stride2")
# The efficient ReMaX models' decoders (ReMaX-T/S, paper Table 12): one block / one kMaX layer per stride.
_EFFICIENT_CITYSCAPES = dict(_REMAX_CITYSCAPES, pixel_decoder_layers=(1, 1, 1, 1, 1),
                             transformer_decoder_layers=(1, 1, 1))

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # ReMaX family (ReMaX paper, Table 12).
    "remax_t": dict(backbone="mobilenetv3_small_100", input_size=(641, 641), pixel_decoder_layers=(1, 1, 1, 1),
                    transformer_decoder_layers=(1, 1, 1)),
    "remax_s": dict(backbone="mobilenetv3_large_100", input_size=(641, 641), pixel_decoder_layers=(1, 1, 1, 1),
                    transformer_decoder_layers=(1, 1, 1)),
    "remax_m": dict(backbone="resnet50", input_size=(641, 641), pixel_decoder_layers=(1, 5, 1, 1),
                    transformer_decoder_layers=(1, 1, 1), **_REFERENCE_BN),
    "remax_b": dict(backbone="resnet50", input_size=(1281, 1281), **_R50_DECODER, **_REFERENCE_BN),
    # kMaX-DeepLab family (kMaX paper; reference checkpoints).
    "kmax_r50": dict(backbone="resnet50", input_size=(1281, 1281), **_R50_DECODER, **_REFERENCE_BN),
    "kmax_convnext_t": dict(backbone="convnext_tiny", backbone_drop_path=0.3, input_size=(1281, 1281), **_R50_DECODER),
    "kmax_convnext_s": dict(backbone="convnext_small", backbone_drop_path=0.4, input_size=(1281, 1281), **_R50_DECODER),
    "kmax_convnext_b": dict(backbone="convnext_base", backbone_drop_path=0.5, input_size=(1281, 1281), **_R50_DECODER),
    "kmax_convnext_l": dict(backbone="convnext_large", backbone_drop_path=0.6, input_size=(1281, 1281), **_R50_DECODER),
    "kmax_cityscapes_r50": dict(backbone="resnet50", **_CITYSCAPES_DECODER, **_REFERENCE_BN),
    "kmax_cityscapes_convnext_l": dict(backbone="convnext_large", backbone_drop_path=0.6, **_CITYSCAPES_DECODER),
    "kmax_ade20k_r50": dict(backbone="resnet50", **_ADE20K_DECODER, **_REFERENCE_BN),
    "kmax_ade20k_convnext_l": dict(backbone="convnext_large", backbone_drop_path=0.7, **_ADE20K_DECODER),
    # ReMaX on Cityscapes (Tables 8-9) and ADE20K (Table 10); docs/models.md lists the sources of each choice.
    "remax_cityscapes_mnv3s": dict(backbone="mobilenetv3_small_100", **_EFFICIENT_CITYSCAPES),
    "remax_cityscapes_mnv3l": dict(backbone="mobilenetv3_large_100", **_EFFICIENT_CITYSCAPES),
    "remax_cityscapes_r50": dict(backbone="resnet50", **_REMAX_CITYSCAPES, **_REFERENCE_BN),
    # Axial-ResNet-50 as deeplab2's kMaX "axial_resnet50" (MaX-S), drop-path keep 0.8 (remax/models/axial_resnet.py).
    "remax_cityscapes_maxs": dict(backbone="max_s", backbone_drop_path=0.2, **_REMAX_CITYSCAPES),
    "remax_ade20k_r50_641": dict(backbone="resnet50", **{**_ADE20K_DECODER, "input_size": (641, 641)},
                                 **_REFERENCE_BN),
    "remax_ade20k_r50_1281": dict(backbone="resnet50", **_ADE20K_DECODER, **_REFERENCE_BN),
    # Not a paper model: a small network for tests and the CPU demo on the synthetic data set.
    "nano": dict(backbone="mobilenetv3_small_050", input_size=(257, 257), num_classes=9,
                 pixel_decoder_layers=(1, 1, 1, 1), pixel_decoder_channels=(64, 32, 32, 16),
                 transformer_decoder_layers=(1, 1, 1), num_queries=32, hidden_dim=64, ffn_dim=256,
                 self_attention_heads=4, kmeans_bottleneck_dim=64, pixel_embedding_dim=32, pixel_head_dim=64,
                 axial_heads=4, drop_path=0.0, semantic_head_channels=64, remask_stages=3),
}

PAPER_PRESETS = [name for name in MODEL_PRESETS if name != "nano"]

# The data preset `get_config` uses when none is given; every other preset defaults to "coco".
PRESET_DATA: dict[str, str] = {
    "nano": "synthetic",
    "kmax_cityscapes_r50": "cityscapes",
    "kmax_cityscapes_convnext_l": "cityscapes",
    "kmax_ade20k_r50": "ade20k",
    "kmax_ade20k_convnext_l": "ade20k",
    "remax_cityscapes_mnv3s": "cityscapes",
    "remax_cityscapes_mnv3l": "cityscapes",
    "remax_cityscapes_r50": "cityscapes",
    "remax_cityscapes_maxs": "cityscapes",
    "remax_ade20k_r50_641": "ade20k",
    "remax_ade20k_r50_1281": "ade20k",
}


def list_presets() -> list[str]:
    """Names of the model presets, paper models first."""
    return list(MODEL_PRESETS)


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a preset, with field overrides."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    values = {**MODEL_PRESETS[preset], **overrides}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}")
    return ModelConfig(**values)


def get_config(preset: str = "nano", data: str | None = None, baseline: bool = False) -> Config:
    """A complete run config: a model preset with its recipe, on a data preset.

    ``baseline=True`` gives the kMaX-DeepLab recipe (no ReMaX, softmax mask-ID loss, lr 5e-4, poly, wd 0.05).
    """
    cfg = Config(preset=preset, model=model_config(preset))
    data_name = data or PRESET_DATA.get(preset, "coco")
    cfg.data = data_config(data_name)
    cfg.data.crop_size = cfg.model.input_size
    cfg.data.resize_longer_side = _fit_side(max(cfg.model.input_size))
    _apply_data_preset(cfg, data_name)
    if cfg.model.pixel_decoder_stem_feature == "stride2":
        cfg.loss.mask_loss_stride = 2  # the logits' own grid: stride 4 would not divide their stride of 2
    if preset == "nano":
        _apply_nano_recipe(cfg)
    if baseline:
        apply_kmax_baseline(cfg)
    return cfg


def _fit_side(side: int) -> int:
    """Image side that fills a ``k·32+1`` input: ``k·32`` plus one pixel of padding (as the Predictor does)."""
    return side - 1 if side % 2 == 1 else side


def apply_kmax_baseline(cfg: Config) -> Config:
    """Switch a config to the kMaX-DeepLab baseline recipe in place (ReMaX off)."""
    cfg.remax.enabled = False
    cfg.model.remask_stages = 0  # no ReMaX semantic heads: they would be unused parameters
    cfg.loss.mask_id_activation = "softmax"
    if cfg.preset != "nano":
        cfg.train.lr = 5e-4
        cfg.train.weight_decay = 0.05
        cfg.train.schedule = "poly"
    else:
        cfg.train.schedule = "poly"
    return cfg


def data_config(name: str) -> DataConfig:
    if name not in DATA_PRESETS:
        raise ValueError(f"unknown data preset {name!r}; choose from {', '.join(DATA_PRESETS)}")
    return DataConfig(**{**DATA_PRESETS[name], "name": name})


DATA_PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": dict(root="data/synthetic", min_scale=0.5, max_scale=1.5),
    "coco": dict(root="datasets/coco", train_split="train2017", val_split="val2017", min_scale=0.3, max_scale=1.7),
    "cityscapes": dict(root="datasets/cityscapes", train_split="train", val_split="val", min_scale=0.5,
                       max_scale=2.0),
    "ade20k": dict(root="datasets/ade20k", train_split="training", val_split="validation", min_scale=0.5,
                   max_scale=2.0),
    "custom": dict(root=""),
}

# Post-processing thresholds per data set (kmax-reference §4).
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "coco": dict(thing_threshold=0.7, stuff_threshold=0.5, overlap_threshold=0.8, reorder_mask_weight=1.0),
    "cityscapes": dict(thing_threshold=0.5, stuff_threshold=0.3, overlap_threshold=0.9, reorder_mask_weight=0.0),
    "ade20k": dict(thing_threshold=0.4, stuff_threshold=0.4, overlap_threshold=0.8, reorder_mask_weight=1.0),
    "synthetic": dict(thing_threshold=0.5, stuff_threshold=0.5, overlap_threshold=0.8, reorder_mask_weight=1.0),
    "custom": dict(thing_threshold=0.7, stuff_threshold=0.5, overlap_threshold=0.8, reorder_mask_weight=1.0),
}


def _apply_data_preset(cfg: Config, name: str) -> None:
    cfg.eval = EvalConfig(**EVAL_PRESETS[name])
    if name == "cityscapes":
        cfg.model.num_classes = 19
        cfg.model.num_queries = 256
        cfg.model.aux_semantic_head = True
        cfg.model.input_size = (1025, 2049)
        cfg.data.crop_size = (1025, 2049)
        cfg.data.resize_longer_side = 2048
        cfg.loss.instance_discrimination_sample_temperature = 0.6
        cfg.loss.semantic_sample_k = 0
        cfg.train.lr = 0.003
        cfg.train.base_batch_size = 32
        cfg.train.max_steps = 60000
    elif name == "ade20k":
        cfg.model.num_classes = 150
        cfg.model.drop_path = 0.0
        cfg.train.max_steps = 100000
    elif name == "coco":
        cfg.model.num_classes = 133


def _apply_nano_recipe(cfg: Config) -> None:
    """A short CPU recipe for the synthetic demo (not a paper recipe)."""
    t = cfg.train
    # nano's backbone starts from random weights (nothing is downloaded), so it trains at the full learning rate:
    # the 0.1 multiplier of the paper recipes protects ImageNet features that nano does not have. The rate itself
    # is twice the first demo's; docs/convergence.md has the measurements behind both.
    t.lr = 0.004
    t.backbone_lr_multiplier = 1.0
    t.base_batch_size = 8
    t.batch_size = 8
    t.weight_decay = 0.005
    t.warmup_steps = 50
    t.max_steps = 600  # 10–16 minutes on 2 CPU cores, depending on the machine (docs/benchmarks.md)
    t.log_every = 10
    t.checkpoint_every = 200
    t.eval_every = 200
    t.device = "cpu"
    cfg.data.num_workers = 1
    cfg.loss.instance_discrimination_sample_k = 512
    cfg.loss.semantic_sample_k = 1024
