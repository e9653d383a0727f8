"""The kMaX-DeepLab reference parity fixture (``tests/fixtures/kmax_parity``, see its README): the weight rule
that rebuilds every reference tensor from its name, and where the fixture lives.

The fixture holds data produced by the reference code (key lists, an input image, outputs); no reference code. It
is vendored with the tests (as is the two-photo COCO sample) so CI checks parity on a clean checkout; set
``REMAX_PARITY_DIR`` / ``REMAX_COCO_SAMPLE`` to use a copy elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor

_FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_DIR = Path(os.environ.get("REMAX_PARITY_DIR", _FIXTURES / "kmax_parity"))
COCO_SAMPLE = Path(os.environ.get("REMAX_COCO_SAMPLE", _FIXTURES / "coco_panoptic_sample"))
# Fixture name -> the preset of its architecture.
PRESETS = {"r50": "kmax_r50", "convnext_t": "kmax_convnext_t"}


def require_fixture() -> Path:
    if not (PARITY_DIR / "r50.keys.json").is_file():
        pytest.skip(f"reference parity fixture not found at {PARITY_DIR} (set REMAX_PARITY_DIR)")
    return PARITY_DIR


def rule_tensor(name: str, shape: list[int]) -> Tensor:
    """The README's weight rule: one generator per key, seeded with the CRC-32 of its name."""
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    if name.endswith("running_var"):
        v = 0.5 + torch.rand(shape, generator=g)
        if "_batch_norm_similarity." in name:
            v = v * 64.0
        elif "_kmeans_query_batch_norm_retrieved_value." in name:
            v = v * 256.0
        return v
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:
        if name.endswith("._cluster_centers.weight") or name.endswith("._embeddings.weight"):
            return torch.randn(shape, generator=g) * 1.0
        return torch.randn(shape, generator=g) * (1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=g)
    return (0.1 * torch.randn(shape, generator=g)) + 1.0


def reference_state_dict(name: str) -> dict[str, Tensor]:
    """The reference-format state_dict of fixture ``name`` (``r50`` or ``convnext_t``), in the reference's order."""
    keys = json.loads((require_fixture() / f"{name}.keys.json").read_text())
    return {k["name"]: rule_tensor(k["name"], k["shape"]) for k in keys}


def reference_outputs(name: str) -> dict[str, Tensor]:
    return torch.load(require_fixture() / f"{name}.outputs.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------------------------
# Key lists of the reference's Cityscapes and ADE20K R50 models, derived from the COCO R50 list.
#
# No reference outputs exist for these configurations, so they are checked for a complete key mapping and a
# working forward pass, not for numerical parity. The lists are built from the fixture's COCO R50 list by explicit
# rules, each stating the fact of the reference (bytedance/kmax-deeplab f8e1d04, configs/{cityscapes,ade20k}/
# panoptic_segmentation/kmax_r50.yaml and kmax_deeplab/modeling/) it encodes; they never consult remax's converter
# or model (that would be circular). Shapes are float32 except ``num_batches_tracked`` (int64, shape []).
# ------------------------------------------------------------------------------------------------------------------

_PD = "sem_seg_head.pixel_decoder."
_TD = "sem_seg_head.predictor."
_AUX = _TD + "_auxiliary_semantic_predictor."
_CLASS_HEAD_SUFFIX = "._transformer_class_head.conv."


def _key(name: str, shape: list[int]) -> dict:
    return {"name": name, "shape": list(shape),
            "dtype": "int64" if name.endswith("num_batches_tracked") else "float32"}


def _conv_bn(prefix: str, weight_shape: list[int]) -> list[dict]:
    """A reference ``ConvBN(..., bias=False, norm='syncbn')``: ``conv.weight`` + a SyncBatchNorm's five entries."""
    c = weight_shape[0]
    return [_key(prefix + "conv.weight", weight_shape)] + [
        _key(prefix + "norm." + s, [] if s == "num_batches_tracked" else [c])
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _with_classes(keys: list[dict], rows: int) -> list[dict]:
    """Every ``_transformer_class_head`` (the final predictor and the one inside each k-means layer) gets ``rows``
    outputs: ``kMaXPredictor(num_classes=NUM_CLASSES + 1)``, void last."""
    return [_key(k["name"], [rows, *k["shape"][1:]]) if _CLASS_HEAD_SUFFIX in k["name"] else k for k in keys]


def coco_r50_reference_keys() -> list[dict]:
    """The fixture's COCO R50 key list (1417 entries, in the reference's ``state_dict()`` order)."""
    return json.loads((require_fixture() / "r50.keys.json").read_text())


def ade20k_r50_reference_keys() -> list[dict]:
    """The reference's ADE20K R50 key list: configs/ade20k/panoptic_segmentation/kmax_r50.yaml is the COCO R50 model
    with ``NUM_CLASSES: 150``; everything else that shapes a tensor is unchanged (128 queries, the same pixel
    decoder and backbone; ``USE_AUX_SEMANTIC_DECODER`` is not set, so config.py's default True keeps the full
    ``SemanticPredictor``; ``DROP_PATH_PROB``/``IMAGE_SIZE`` hold no weights: the axial relative-position tables
    are ``2 * MAX_SPAN - 1 = 509`` rows for any input size)."""
    keys = _with_classes(coco_r50_reference_keys(), 151)
    # SemanticPredictor(num_classes=NUM_CLASSES + 1): the aux classifier has 151 rows, void last.
    final = _AUX + "final_conv.conv."
    return [_key(k["name"], [151, *k["shape"][1:]]) if k["name"].startswith(final) else k for k in keys]


def cityscapes_r50_reference_keys() -> list[dict]:
    """The reference's Cityscapes R50 key list (configs/cityscapes/panoptic_segmentation/kmax_r50.yaml), 1377 keys.

    Unchanged from COCO: the backbone (``OUT_FEATURES`` adds "stem", an output of existing modules, no weights),
    pixel-decoder stages 0-3 (a stage's input width is its fuse's output, ``DEC_CHANNELS[i]``, whatever feeds the
    fuse), fuses 0-2's low projections, and the k-means layers apart from their class heads (their pixel input is
    ``TRANS_DEC.IN_CHANNELS[:3]`` = 2048/1024/512, as for COCO). Changed or added, rule by rule, below.
    """
    out: list[dict] = []
    for k in _with_classes(coco_r50_reference_keys(), 20):  # NUM_CLASSES: 19 -> class heads of 19 + 1 rows
        name, shape = k["name"], k["shape"]
        if name.startswith(_AUX):
            # USE_AUX_SEMANTIC_DECODER: False -> the full SemanticPredictor is replaced (see below).
            continue
        if name == _TD + "_cluster_centers.weight":
            # NUM_OBJECT_QUERIES: 256 -> nn.Embedding(256, num_queries) is 256 x 256.
            out.append(_key(name, [256, 256]))
            continue
        if name.startswith(_TD + "_predcitor._pixel_space_head_conv0bnact."):
            # TRANS_DEC.IN_CHANNELS[-1] = 128: the final predictor's depthwise 5x5 runs on the 128-channel
            # output of the fifth pixel-decoder stage (COCO: 256 channels of the fourth).
            out.append(_key(name, [128, *shape[1:]]) if shape else k)
            continue
        if name.startswith(_TD + "_predcitor._pixel_space_head_conv1bnact.conv."):
            out.append(_key(name, [shape[0], 128, *shape[2:]]))  # 1x1 conv 128 -> 256
            continue
        if name.startswith(_PD + "_in_norms.3."):
            # PIXEL_DEC.IN_FEATURES adds "stem" (stride 4, 64 channels: detectron2's BasicStem after its max-pool).
            # kMaXPixelDecoder sorts its inputs by -stride with a stable sort over the backbone's OUT_FEATURES
            # order ["stem", "res2", ...], so the stride-4 tie keeps "stem" before "res2": inputs are
            # res5, res4, res3, stem, res2. LayerNorm 3 normalises the stem (64), LayerNorm 4 res2 (256).
            out.append(_key(name, [64]))
            if name.endswith(".bias"):
                out += [_key(_PD + "_in_norms.4.weight", [256]), _key(_PD + "_in_norms.4.bias", [256])]
            continue
        if name.startswith(_PD + "_resized_fuses.2._conv_bn_high."):
            # ResizedFuse(high_in_channels=64 (stem), out_channels=DEC_CHANNELS[3]=64) builds no high-resolution
            # projection when the two are equal.
            continue
        out.append(k)
        if name == _PD + "_stages.3._blocks.0._shortcut.norm.num_batches_tracked":
            # DEC_LAYERS[4] = 1 bottleneck of DEC_CHANNELS[4] = 32: SingleBlock(inplanes=32, filters [32, 32, 128]);
            # a shortcut projection since 32 != 128. ModuleLists register _in_norms, _stages, _resized_fuses in
            # that order, so stage 4 follows stage 3.
            stage4 = _PD + "_stages.4._blocks.0."
            out += (_conv_bn(stage4 + "_conv1_bn_act.", [32, 32, 1, 1])
                    + _conv_bn(stage4 + "_conv2_bn_act.", [32, 32, 3, 3])
                    + _conv_bn(stage4 + "_conv3_bn.", [128, 32, 1, 1])
                    + _conv_bn(stage4 + "_shortcut.", [128, 32, 1, 1]))
        if name == _PD + "_resized_fuses.2._conv_bn_low.norm.num_batches_tracked":
            # Fuse 3 (into stage 4): low = stage 3's output (DEC_CHANNELS[3] * 4 = 256) and high = res2 (256), both
            # projected to DEC_CHANNELS[4] = 32.
            fuse3 = _PD + "_resized_fuses.3."
            out += (_conv_bn(fuse3 + "_conv_bn_low.", [32, 256, 1, 1])
                    + _conv_bn(fuse3 + "_conv_bn_high.", [32, 256, 1, 1]))
    # The light auxiliary head: nn.Sequential(ConvBN(2048, 2048, 5x5, groups=2048), ConvBN(2048, 256, 1x1),
    # ConvBN(256, NUM_CLASSES, 1x1, bias=True, norm=None)) on res5. Its classifier has NUM_CLASSES = 19 rows (no
    # void row, unlike SemanticPredictor's num_classes + 1); norm=None is nn.Identity, so it has no norm entries.
    out += (_conv_bn(_AUX + "0.", [2048, 1, 5, 5]) + _conv_bn(_AUX + "1.", [256, 2048, 1, 1])
            + [_key(_AUX + "2.conv.weight", [19, 256, 1, 1]), _key(_AUX + "2.conv.bias", [19])])
    return out


def state_dict_from_keys(keys: list[dict]) -> dict[str, Tensor]:
    """A reference-format state_dict with every tensor of ``keys`` made by the README's weight rule."""
    return {k["name"]: rule_tensor(k["name"], k["shape"]) for k in keys}
