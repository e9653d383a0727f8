"""Training augmentation of (image, panoptic target) pairs: copy-paste, scale jitter, crop, flip, colour jitter.

Every random draw uses torch's global RNG in a fixed order, so a sample is a pure function of the seed the trainer
sets for its stream position (:mod:`remax.engine.sampling`). Id maps are always resampled with nearest neighbour,
and segments that no longer have a pixel are dropped from the target (crowd stays crowd). Padding to the model's
input size happens in :func:`remax.data.loader.collate_panoptic`, after normalisation, so that padded pixels are
exactly 0 in the model's input range as at inference.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from remax.structures import PanopticTarget

__all__ = ["TrainTransform", "resize_pair", "crop_pair", "hflip_pair", "copy_paste", "drop_missing_segments"]

log = logging.getLogger(__name__)


def _replace(target: PanopticTarget, **fields: Any) -> PanopticTarget:
    values = dict(id_map=target.id_map, classes=target.classes, is_thing=target.is_thing, is_crowd=target.is_crowd,
                  segment_ids=target.segment_ids, areas=target.areas)
    values.update(fields)
    return PanopticTarget(**values)


def resize_nearest(id_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer map with pixel-centre alignment (as bilinear images use)."""
    h, w = id_map.shape
    nh, nw = size
    rows = ((torch.arange(nh, dtype=torch.float64) + 0.5) * (h / nh)).floor().long().clamp_(0, h - 1)
    cols = ((torch.arange(nw, dtype=torch.float64) + 0.5) * (w / nw)).floor().long().clamp_(0, w - 1)
    return id_map[rows][:, cols]


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of a uint8 ``3×H×W`` image."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def resize_pair(image: torch.Tensor, target: PanopticTarget, size: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                             PanopticTarget]:
    """Resize image (bilinear) and id map (nearest) to ``size`` = (H, W)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image, target
    return resize_image(image, size), _replace(target, id_map=resize_nearest(target.id_map, size))


def crop_pair(image: torch.Tensor, target: PanopticTarget, top: int, left: int, height: int,
              width: int) -> tuple[torch.Tensor, PanopticTarget]:
    """The window ``[top, top + height) × [left, left + width)`` of both (must lie inside the image)."""
    return (image[:, top:top + height, left:left + width].contiguous(),
            _replace(target, id_map=target.id_map[top:top + height, left:left + width].contiguous()))


def hflip_pair(image: torch.Tensor, target: PanopticTarget) -> tuple[torch.Tensor, PanopticTarget]:
    """Mirror both left-right."""
    return image.flip(-1).contiguous(), _replace(target, id_map=target.id_map.flip(-1).contiguous())


def drop_missing_segments(target: PanopticTarget) -> PanopticTarget:
    """Remove segments without a pixel and renumber the id map; ``areas`` become the pixel counts."""
    S = target.num_segments
    counts = torch.bincount(target.id_map.reshape(-1), minlength=S + 1)[: S + 1]
    keep = counts[1:] > 0
    lut = torch.zeros(S + 1, dtype=torch.int64)
    lut[1:][keep] = torch.arange(1, int(keep.sum()) + 1)
    return PanopticTarget(
        id_map=lut[target.id_map],
        classes=target.classes[keep],
        is_thing=target.is_thing[keep],
        is_crowd=target.is_crowd[keep],
        segment_ids=None if target.segment_ids is None else target.segment_ids[keep],
        areas=counts[1:][keep].to(torch.int64),
    )


def copy_paste(image: torch.Tensor, target: PanopticTarget, src_image: torch.Tensor,
               src_target: PanopticTarget) -> tuple[torch.Tensor, PanopticTarget]:
    """Panoptic copy-paste: paste a second image's non-crowd things and a random half of its stuff.

    The source is shrunk to half size and placed at a random offset (clipped at the border). Pasted things become
    new segments with new ids; pasted stuff joins the existing non-crowd segment of its class (or becomes one).
    Random draws: the stuff subset (``randperm``), then the offset (two ``randint``).
    """
    H, W = image.shape[1:]
    h2, w2 = max(1, src_image.shape[1] // 2), max(1, src_image.shape[2] // 2)
    src_image = resize_image(src_image, (h2, w2))
    src_ids = resize_nearest(src_target.id_map, (h2, w2))

    S2 = src_target.num_segments
    things = [k for k in range(S2) if bool(src_target.is_thing[k]) and not bool(src_target.is_crowd[k])]
    stuff = [k for k in range(S2) if not bool(src_target.is_thing[k]) and not bool(src_target.is_crowd[k])]
    perm = torch.randperm(len(stuff)).tolist()
    chosen_stuff = sorted(stuff[p] for p in perm[: (len(stuff) + 1) // 2])
    top = int(torch.randint(0, max(H - h2, 0) + 1, ()))
    left = int(torch.randint(0, max(W - w2, 0) + 1, ()))
    selected = sorted(things + chosen_stuff)
    if not selected:
        return image, target

    classes = target.classes.tolist()
    is_thing = target.is_thing.tolist()
    is_crowd = target.is_crowd.tolist()
    seg_ids = target.segment_ids.tolist() if target.segment_ids is not None else list(range(1, len(classes) + 1))
    next_id = max(seg_ids, default=0) + 1
    stuff_index = {}
    for k in range(len(classes)):
        if not is_thing[k] and not is_crowd[k]:
            stuff_index.setdefault(classes[k], k)
    lut = torch.zeros(S2 + 1, dtype=torch.int64)  # source k + 1 -> new id_map value, 0 = not pasted
    for k in selected:
        c = int(src_target.classes[k])
        thing = bool(src_target.is_thing[k])
        if not thing and c in stuff_index:
            lut[k + 1] = stuff_index[c] + 1
            continue
        classes.append(c)
        is_thing.append(thing)
        is_crowd.append(False)
        seg_ids.append(next_id)
        next_id += 1
        if not thing:
            stuff_index[c] = len(classes) - 1
        lut[k + 1] = len(classes)

    ph, pw = min(h2, H - top), min(w2, W - left)
    pasted = lut[src_ids[:ph, :pw]]
    mask = pasted > 0
    id_map = target.id_map.clone()
    region = id_map[top:top + ph, left:left + pw]
    region[mask] = pasted[mask]
    out_image = image.clone()
    img_region = out_image[:, top:top + ph, left:left + pw]
    img_region[:, mask] = src_image[:, :ph, :pw][:, mask]
    out = PanopticTarget(
        id_map=id_map,
        classes=torch.tensor(classes, dtype=torch.int64),
        is_thing=torch.tensor(is_thing, dtype=torch.bool),
        is_crowd=torch.tensor(is_crowd, dtype=torch.bool),
        segment_ids=torch.tensor(seg_ids, dtype=torch.int64),
        areas=None,
    )
    return out_image, drop_missing_segments(out)


class TrainTransform:
    """The training augmentation of a :class:`~remax.config.DataConfig`, called as ``t(image, target, index)``.

    Order: copy-paste (probability ``copy_paste_prob``, source drawn from ``dataset``), resize so the longer side is
    ``resize_longer_side`` times a scale drawn from ``[min_scale, max_scale]``, random crop to at most
    ``crop_size``, horizontal flip with probability 1/2, colour jitter.
    """

    def __init__(self, data_cfg: Any, dataset: Any = None) -> None:
        self.crop_size = (int(data_cfg.crop_size[0]), int(data_cfg.crop_size[1]))
        self.longer_side = int(data_cfg.resize_longer_side)
        self.min_scale = float(data_cfg.min_scale)
        self.max_scale = float(data_cfg.max_scale)
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"data.min_scale / data.max_scale must satisfy 0 < min <= max, got "
                             f"{self.min_scale} / {self.max_scale}")
        self.hflip = bool(data_cfg.hflip)
        self.copy_paste_prob = float(data_cfg.copy_paste_prob) if data_cfg.copy_paste else 0.0
        self.dataset = dataset
        # Photometric distortion of about the strength of the reference's SSD-style colour augmentation.
        self.jitter = v2.ColorJitter(brightness=0.25, contrast=0.4, saturation=0.4, hue=0.05) \
            if data_cfg.color_jitter else None

    def __call__(self, image: torch.Tensor, target: PanopticTarget, index: int = 0) -> tuple[torch.Tensor,
                                                                                             PanopticTarget]:
        if self.copy_paste_prob > 0 and self.dataset is not None and len(self.dataset) > 1:
            if float(torch.rand(())) < self.copy_paste_prob:
                j = int(torch.randint(0, len(self.dataset) - 1, ()))
                j += int(j >= index)
                src_image, src_target = self.dataset.raw_item(j)
                image, target = copy_paste(image, target, src_image, src_target)

        H, W = image.shape[1:]
        scale = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        factor = self.longer_side * scale / max(H, W)
        size = (max(1, round(H * factor)), max(1, round(W * factor)))
        image, target = resize_pair(image, target, size)

        ch, cw = min(self.crop_size[0], size[0]), min(self.crop_size[1], size[1])
        top = int(torch.randint(0, size[0] - ch + 1, ()))
        left = int(torch.randint(0, size[1] - cw + 1, ()))
        image, target = crop_pair(image, target, top, left, ch, cw)

        if self.hflip and float(torch.rand(())) < 0.5:
            image, target = hflip_pair(image, target)
        if self.jitter is not None:
            image = self.jitter(image)
        return image, drop_missing_segments(target)
