"""Backbones through timm ``features_only``, returning ``res2..res5`` at strides 4/8/16/32.

ConvNeXt gets the reference's zero padding before each down-sampling layer (top/left 1, bottom/right 2 before the
4×4 stem; bottom/right 1 before each 2×2 layer), installed as forward pre-hooks so the parameter names stay
timm's. With it a ``k·32+1`` input gives ``k·8+1, k·4+1, k·2+1, k+1`` features (1281 → 321/161/81/41), the same
``ceil(n/2)`` sizes the ResNet and MobileNet backbones give with their "same" padding.

``stem_feature`` adds a fifth feature, ``"stem"``, for pixel decoders with an extra high-resolution stage (the
kMaX Cityscapes configurations):

* ``"reference"``: what the kMaX-DeepLab PyTorch reference registers as ``"stem"``: the ResNet stem after its
  max-pool (64 channels) or the ConvNeXt stem after its LayerNorm (before the first blocks). Both are at stride
  **4**, not 2. The reference orders its decoder inputs by *declared* stride: ResNet declares 4 and lists the stem
  first, so the stem feeds the fourth stage and ``res2`` the fifth; ConvNeXt declares 2, so ``res2`` feeds the
  fourth and the stem the fifth. ``feature_order`` reproduces that, so converted reference checkpoints fit
  tensor for tensor and compute the same function.
* ``"stride2"``: timm's stride-2 feature (a ResNet's ``act1`` before the max-pool, a MobileNetV3's first block),
  fed to a true stride-2 fifth stage, as deeplab2 and the ReMaX paper describe. ConvNeXt has none.
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
STEM_FEATURES = ("", "reference", "stride2")
# Module whose output the kMaX reference returns as "stem", per timm family (features_only layout).
_REFERENCE_STEM_MODULES = {"resnet": "maxpool", "convnext": "stem_1"}


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

    def __init__(self, name: str, *, pretrained: bool = False, drop_path: float = 0.0, pretrained_file: str = "",
                 stem_feature: str = "", bn_eps: float | None = None, bn_momentum: float | None = None):
        super().__init__()
        if stem_feature not in STEM_FEATURES:
            raise ValueError(f"unknown stem_feature {stem_feature!r}; use one of {STEM_FEATURES}")
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
        self._set_batch_norm(bn_eps, bn_momentum)
        if name.startswith("convnext"):
            self._install_convnext_padding()
        self.stem_feature = stem_feature
        self._stem_index: int | None = None
        self._captured: list[Tensor] = []
        # Coarse to fine: the order in which the pixel decoder consumes the features.
        self.feature_order: tuple[str, ...] = tuple(reversed(FEATURE_NAMES))
        if stem_feature == "reference":
            self._install_reference_stem()
        elif stem_feature == "stride2":
            if 2 not in reductions:
                raise ValueError(f"backbone {name!r} has no stride-2 feature for stem_feature='stride2' "
                                 f"(has {reductions})")
            self._stem_index = max(i for i, r in enumerate(reductions) if r == 2)
            self.channels["stem"] = all_channels[self._stem_index]
            self.strides["stem"] = 2
            self.feature_order = (*self.feature_order, "stem")
        if pretrained:
            log.info("loaded pretrained backbone %s from %s", name, pretrained_file or "the timm hub")

    def _set_batch_norm(self, eps: float | None, momentum: float | None) -> None:
        """Give every BatchNorm of the backbone the requested eps / momentum (``None`` keeps timm's).

        The kMaX reference's ResNet-50 uses eps 1e-3 / momentum 0.01; its weights are only exact with that eps
        (nothing is folded into ``running_var``, so fine-tuning keeps the reference's normalisation).
        """
        if eps is None and momentum is None:
            return
        for module in self.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if eps is not None:
                    module.eps = float(eps)
                if momentum is not None:
                    module.momentum = float(momentum)

    def _install_convnext_padding(self) -> None:
        stem = getattr(self.body, "stem_0", None)
        stages = [getattr(self.body, f"stages_{i}", None) for i in range(1, 4)]
        if not isinstance(stem, nn.Conv2d) or any(s is None or not hasattr(s, "downsample") for s in stages):
            raise ValueError(f"unexpected timm ConvNeXt layout for {self.name!r}; cannot add the reference padding")
        stem.register_forward_pre_hook(_pad_hook((1, 2, 1, 2)))
        for stage in stages:
            stage.downsample.register_forward_pre_hook(_pad_hook((0, 1, 0, 1)))

    def _install_reference_stem(self) -> None:
        """Capture the module output the reference returns as "stem" and order the features as it does."""
        family = next((f for f in _REFERENCE_STEM_MODULES if self.name.startswith(f)), None)
        module = getattr(self.body, _REFERENCE_STEM_MODULES[family], None) if family else None
        if module is None:
            raise ValueError(f"stem_feature='reference' is defined for the reference's ResNet and ConvNeXt "
                             f"backbones only, not {self.name!r}")
        if family == "resnet":
            info = self.body.feature_info  # the max-pool keeps the width of the stride-2 stem activation
            self.channels["stem"] = info.channels()[list(info.reduction()).index(2)]
            self.feature_order = ("res5", "res4", "res3", "stem", "res2")
        else:
            self.channels["stem"] = self.channels["res2"]  # the stem LayerNorm's width is the first stage's
            self.feature_order = ("res5", "res4", "res3", "res2", "stem")
        self.strides["stem"] = 4
        module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._captured.append(output)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self._captured.clear()
        feats = self.body(x)
        out = {n: feats[i] for n, i in zip(FEATURE_NAMES, self._index)}
        if self._stem_index is not None:
            out["stem"] = feats[self._stem_index]
        elif self.stem_feature == "reference":
            out["stem"] = self._captured.pop()
            self._captured.clear()  # hold no activations between calls
        return out


def build_backbone(name: str, **kwargs) -> nn.Module:
    """The backbone called ``name``: our Axial-ResNet-50 for ``"max_s"`` / ``"axial_resnet50"`` (timm has none),
    otherwise a timm ``features_only`` network. Both expose ``channels``, ``strides`` and ``feature_order`` and
    return a feature dict, so the pixel decoder and the heads do not care which one they get."""
    from remax.models.axial_resnet import AXIAL_RESNET_NAMES, AxialResNet

    if name in AXIAL_RESNET_NAMES:
        return AxialResNet(name, **kwargs)
    return TimmBackbone(name, **kwargs)
