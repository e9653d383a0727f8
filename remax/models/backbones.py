"""Backbones through timm ``features_only``, returning ``res2..res5`` at strides 4/8/16/32.

ConvNeXt gets the reference's zero padding before each down-sampling layer (top/left 1, bottom/right 2 before the
4×4 stem; bottom/right 1 before each 2×2 layer), installed as forward pre-hooks so the parameter names stay
timm's. With it a ``k·32+1`` input gives ``k·8+1, k·4+1, k·2+1, k+1`` features (1281 → 321/161/81/41), the same
``ceil(n/2)`` sizes the ResNet and MobileNet backbones give with their "same" padding.
"""

from __future__ import annotations

import logging
import os

import timm
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = (4, 8, 16, 32)


def _pad_hook(pad: tuple[int, int, int, int]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (F.pad(args[0], pad),) + tuple(args[1:])

    return hook


class TimmBackbone(nn.Module):
    """A timm ``features_only`` network exposing ``channels``/``strides`` and returning a feature dict.

    ``pretrained=True`` loads timm's default ImageNet weights from the hub (online); a ``pretrained_file``
    loads that local checkpoint (a timm ``state_dict`` as ``.pth``/``.bin``/``.safetensors``) instead,
    so offline machines and tests take the same loading path without a download.
    """

    def __init__(self, name: str, *, pretrained: bool = False, drop_path: float = 0.0, pretrained_file: str = ""):
        super().__init__()
        kwargs: dict = {"drop_path_rate": drop_path} if drop_path > 0 else {}
        if pretrained_file:
            pretrained = True  # a weights file is a request for pretrained weights
            if not os.path.isfile(pretrained_file):
                raise FileNotFoundError(f"backbone weights file {pretrained_file!r} does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": os.fspath(pretrained_file)}
        try:
            self.body = timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ValueError(f"cannot build backbone {name!r} with timm: {err}") from err
        reductions = list(self.body.feature_info.reduction())
        missing = [s for s in FEATURE_STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"backbone {name!r} has no features at stride(s) {missing} (has {reductions})")
        # The last feature of each stride (e.g. a ResNet's stride-2 stem is skipped).
        self._index = [max(i for i, r in enumerate(reductions) if r == s) for s in FEATURE_STRIDES]
        all_channels = self.body.feature_info.channels()
        self.channels = {n: all_channels[i] for n, i in zip(FEATURE_NAMES, self._index)}
        self.strides = dict(zip(FEATURE_NAMES, FEATURE_STRIDES))
        self.name = name
        if name.startswith("convnext"):
            self._install_convnext_padding()
        if pretrained:
            log.info("loaded pretrained backbone %s from %s", name, pretrained_file or "the timm hub")

    def _install_convnext_padding(self) -> None:
        stem = getattr(self.body, "stem_0", None)
        stages = [getattr(self.body, f"stages_{i}", None) for i in range(1, 4)]
        if not isinstance(stem, nn.Conv2d) or any(s is None or not hasattr(s, "downsample") for s in stages):
            raise ValueError(f"unexpected timm ConvNeXt layout for {self.name!r}; cannot add the reference padding")
        stem.register_forward_pre_hook(_pad_hook((1, 2, 1, 2)))
        for stage in stages:
            stage.downsample.register_forward_pre_hook(_pad_hook((0, 1, 0, 1)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        return {n: feats[i] for n, i in zip(FEATURE_NAMES, self._index)}
