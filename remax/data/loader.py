"""Data sets of a config and the batch collation: images to one padded ``B×3×H_in×W_in`` tensor plus targets.

Images are placed top-left and padded bottom/right *after* normalisation, so padding is exactly zero in the model's
input range, the same geometry the predictor uses at inference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from remax.data.coco_panoptic import COCOPanopticDataset, paths_from_config
from remax.data.transforms import TrainTransform, resize_image, resize_nearest
from remax.structures import CategoryInfo, PanopticTarget

__all__ = ["build_dataset", "collate_panoptic", "build_train_loader", "build_val_loader", "fit_size"]

log = logging.getLogger(__name__)


def build_dataset(data_cfg: Any, split: str, train: bool,
                  category_order: Sequence[CategoryInfo] | None = None) -> COCOPanopticDataset:
    """The split ``split`` of ``data_cfg``; ``train=True`` attaches the training augmentation. ``category_order``
    sets the contiguous class order (e.g. a checkpoint's), matched by category id."""
    dataset = COCOPanopticDataset.from_paths(paths_from_config(data_cfg, split), category_order=category_order)
    if train:
        dataset.transform = TrainTransform(data_cfg, dataset)
    return dataset


def fit_size(height: int, width: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Size of an image shrunk (aspect kept) to fit ``input_size``; images that fit keep their size."""
    if height <= input_size[0] and width <= input_size[1]:
        return height, width
    scale = min(input_size[0] / height, input_size[1] / width)
    return (min(input_size[0], max(1, round(height * scale))), min(input_size[1], max(1, round(width * scale))))


def collate_panoptic(batch: Sequence[dict[str, Any]], input_size: tuple[int, int],
                     normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, list[PanopticTarget]]:
    """Stack data set items into ``(images, targets)`` at the fixed model input size.

    ``images`` is float ``B×3×H_in×W_in``: each image (shrunk to fit if larger) at the top-left, ``normalize``
    applied to its 0..255 values (``None`` leaves them), zeros elsewhere. Each target's ``id_map`` gets the same
    geometry, padded with void (0).
    """
    H, W = int(input_size[0]), int(input_size[1])
    images = torch.zeros(len(batch), 3, H, W)
    targets = []
    for b, item in enumerate(batch):
        image, target = item["image"], item["target"]
        h, w = fit_size(int(image.shape[1]), int(image.shape[2]), (H, W))
        if (h, w) != tuple(image.shape[1:]):
            image = resize_image(image, (h, w))
            target = PanopticTarget(id_map=resize_nearest(target.id_map, (h, w)), classes=target.classes,
                                    is_thing=target.is_thing, is_crowd=target.is_crowd,
                                    segment_ids=target.segment_ids, areas=target.areas)
        x = image.float()
        if normalize is not None:
            x = normalize(x)
        images[b, :, :h, :w] = x
        id_map = torch.zeros(H, W, dtype=torch.int64)
        id_map[:h, :w] = target.id_map
        targets.append(PanopticTarget(id_map=id_map, classes=target.classes, is_thing=target.is_thing,
                                      is_crowd=target.is_crowd, segment_ids=target.segment_ids, areas=target.areas))
    return images, targets


def _model_normalize() -> Callable[[torch.Tensor], torch.Tensor]:
    from remax.preprocessing import normalize_image

    return normalize_image


def build_train_loader(cfg: Any, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A plain shuffled loader of augmented, normalised training batches (the trainer uses its own seeded one)."""
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=True)
    collate = functools.partial(collate_panoptic, input_size=tuple(cfg.model.input_size),
                                normalize=_model_normalize())
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=shuffle, drop_last=True,
                                       num_workers=cfg.data.num_workers, collate_fn=collate,
                                       persistent_workers=cfg.data.num_workers > 0)


def build_val_loader(cfg: Any, batch_size: int | None = None) -> torch.utils.data.DataLoader:
    """Validation batches in order, without augmentation, normalised and padded to the model's input size."""
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    collate = functools.partial(collate_panoptic, input_size=tuple(cfg.model.input_size),
                                normalize=_model_normalize())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or cfg.train.batch_size, shuffle=False,
                                       num_workers=cfg.data.num_workers, collate_fn=collate)
