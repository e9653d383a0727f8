"""Axial-ResNet-50 ("MaX-S"), the backbone of the ReMaX paper's best Cityscapes model (Table 9), in plain PyTorch.

timm has no Axial-ResNet, so this is our own implementation of the design google-research/deeplab2 builds for
kMaX-DeepLab as ``axial_resnet50`` (``model/pixel_encoder/axial_resnet.py``: "the same backbone as MaX-S"), read
from its ``model/encoder/axial_resnet.py``, ``model/layers/{axial_block_groups,axial_blocks,axial_layers,stems}.py``:

* **Inception stem** (``backbone_type="resnet_beta"``): 3×3/2 conv to 64 + BN + GELU, 3×3 conv to 64 + BN + GELU,
  3×3 conv to 128 + BN (no activation). Stride 2, 128 channels; it is deeplab2's ``stage1`` endpoint, the
  feature the stride-2 pixel-decoder stage of its Cityscapes models reads. No max-pool: the first block of each
  stage strides instead (ResNet-"beta" layout).
* **Four stages** of 3/4/6/3 pre-activation residual blocks (GELU first, shortcut from the activated input, last
  BN initialised to zero) with base widths 64/128/256/512 and outputs 4× that (256/512/1024/2048) at strides
  4/8/16/32 (output stride 32: no dilation).
* **Axial attention from stride 16 on** (``use_axial_beyond_stride=16``): a block whose input already runs at
  stride ≥ 16 replaces the 3×3 conv by height-then-width axial attention with relative positions (key depth
  ``w``, value depth ``2w``, 8 heads, position tables of 2·255−1 rows as deeplab2's ``MAX_SPAN``) and widens its
  first 1×1 to ``2w``. That is blocks 2–6 of the third stage and all three blocks of the last stage (the first of
  which strides inside the attention). The first block of the stride-16 stage is a plain strided bottleneck.
* No global attention, no absolute positional encoding and no dual-path transformer
  (``backbone_use_transformer_beyond_stride=0``): the memory path of MaX-DeepLab is replaced by kMaX's decoder.
* **Drop path** on the blocks at stride ≥ 16 with deeplab2's linear schedule: ``rate · (log2(stride) − 1) / 4``,
  i.e. 0.75·rate at stride 16 and the full rate at stride 32 (deeplab2's Cityscapes config: keep 0.8, rate 0.2).

Features are returned like :class:`~remax.models.backbones.TimmBackbone`'s (``res2..res5``, plus ``"stem"``
with ``stem_feature="stride2"``), taken before the next block's activation, as deeplab2's kMaX pixel decoder
reads its ``stage1..stage5`` endpoints. The axial blocks are our :class:`~remax.models.blocks.BottleneckBlock`
on our :class:`~remax.models.axial.AxialAttention2D`, shared with the pixel decoder.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from remax.models.blocks import BottleneckBlock
from remax.models.layers import BN_EPS, BN_MOMENTUM, ConvBN

# Names that build this backbone through ModelConfig.backbone.
AXIAL_RESNET_NAMES = ("max_s", "axial_resnet50")
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck base widths; a stage outputs 4× (256 .. 2048)
AXIAL_FROM_STRIDE = 16  # deeplab2 use_axial_beyond_stride
DROP_PATH_FROM_STRIDE = 16  # deeplab2 drop_path_beyond_stride
_FEATURE_NAMES = ("res2", "res3", "res4", "res5")


class InceptionStem(nn.Module):
    """Three 3×3 convolutions (the first strided): 3 → 64 → 64 → 128 channels at stride 2, last one linear."""

    def __init__(self, width: int = 64, *, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        bn = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.conv1 = ConvBN(3, width, 3, stride=2, padding=1, act=True, **bn)
        self.conv2 = ConvBN(width, width, 3, padding=1, act=True, **bn)
        self.conv3 = ConvBN(width, 2 * width, 3, padding=1, **bn)
        self.out_channels = 2 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


def block_drop_path(rate: float, input_stride: int) -> float:
    """deeplab2's linear drop-path schedule for a block whose input runs at ``input_stride``."""
    if rate <= 0 or input_stride < DROP_PATH_FROM_STRIDE:
        return 0.0
    return rate * (math.log2(input_stride) - 1) / 4


class AxialResNet(nn.Module):
    """Axial-ResNet-50 (MaX-S) with a ``features_only``-style interface: ``channels`` / ``strides`` dicts,
    ``feature_order`` (coarse to fine) and ``forward(x) -> {"res2": /4, "res3": /8, "res4": /16, "res5": /32}``.

    ``stem_feature="stride2"`` adds the 128-channel stride-2 stem output as ``"stem"`` (deeplab2's ``stage1``)
    for a fifth pixel-decoder stage; ``"reference"`` is refused (the kMaX PyTorch reference has no MaX-S).
    A ``k·32+1`` input gives ``ceil(n / stride)`` feature sizes (1025 → 513/257/129/65/33). ImageNet weights are
    not on any hub here: ``pretrained_file`` loads a local state dict of this module (or a remax checkpoint, whose
    ``backbone.*`` tensors are used).
    """

    def __init__(self, name: str = "max_s", *, drop_path: float = 0.0, stem_feature: str = "",
                 num_heads: int = 8, max_length: int = 255, pretrained: bool = False, pretrained_file: str = "",
                 bn_eps: float | None = None, bn_momentum: float | None = None,
                 layers: tuple[int, ...] = STAGE_BLOCKS, widths: tuple[int, ...] = STAGE_WIDTHS):
        super().__init__()
        if name not in AXIAL_RESNET_NAMES:
            raise ValueError(f"unknown Axial-ResNet {name!r}; use one of {AXIAL_RESNET_NAMES}")
        if stem_feature not in ("", "stride2"):
            raise ValueError(f"stem_feature={stem_feature!r} is not defined for {name!r}: its stem is at stride 2, "
                             f"use 'stride2' (deeplab2's layout) or ''")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"an Axial-ResNet has 4 stages, got layers={layers}, widths={widths}")
        if pretrained and not pretrained_file:
            raise ValueError(f"no hub weights exist for {name!r} (timm has no Axial-ResNet); pass a local state "
                             f"dict with backbone_pretrained_file, or train from scratch")
        bn = dict(bn_momentum=BN_MOMENTUM if bn_momentum is None else float(bn_momentum),
                  bn_eps=BN_EPS if bn_eps is None else float(bn_eps))
        self.name = name
        self.stem_feature = stem_feature
        self.stem = InceptionStem(bn_momentum=bn["bn_momentum"], bn_eps=bn["bn_eps"])
        self.stages = nn.ModuleList()
        in_channels, stride = self.stem.out_channels, 2
        for num_blocks, width in zip(layers, widths):
            blocks = []
            for index in range(num_blocks):
                input_stride = stride if index == 0 else 2 * stride  # the first block strides
                axial = input_stride >= AXIAL_FROM_STRIDE
                filters = (2 * width, width, 4 * width) if axial else (width, width, 4 * width)
                blocks.append(BottleneckBlock(in_channels, filters, axial=axial, stride=2 if index == 0 else 1,
                                              num_heads=num_heads, max_length=max_length,
                                              drop_path=block_drop_path(drop_path, input_stride), **bn))
                in_channels = filters[-1]
            self.stages.append(nn.Sequential(*blocks))
            stride *= 2
        self.channels = {n: 4 * w for n, w in zip(_FEATURE_NAMES, widths)}
        self.strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self.feature_order: tuple[str, ...] = ("res5", "res4", "res3", "res2")
        if stem_feature == "stride2":
            self.channels["stem"] = self.stem.out_channels
            self.strides["stem"] = 2
            self.feature_order = (*self.feature_order, "stem")
        if pretrained_file:
            self.load_weights(pretrained_file)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the returned features in ``forward``'s order (timm's ``feature_info.channels()``)."""
        return [self.channels[n] for n in self._returned_names()]

    def _returned_names(self) -> tuple[str, ...]:
        return _FEATURE_NAMES + (("stem",) if self.stem_feature == "stride2" else ())

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a local state dict of this module (strict); a remax checkpoint's ``backbone.*`` tensors work too."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone weights file {os.fspath(path)!r} does not exist")
        if os.fspath(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(os.fspath(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if any(k.startswith("backbone.") for k in state):
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.load_state_dict(state, strict=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        x = stem = self.stem(x)
        for name, stage in zip(_FEATURE_NAMES, self.stages):
            x = stage(x)
            out[name] = x
        if self.stem_feature == "stride2":
            out["stem"] = stem  # last, as TimmBackbone returns it
        return out
