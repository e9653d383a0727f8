"""Turn a released kMaX-DeepLab checkpoint (bytedance/kmax-deeplab, detectron2 format) into a remax checkpoint.

The tensor renaming is :mod:`remax.models.convert_reference`; this module adds what a usable checkpoint needs
around it: reading the file without executing code, the architecture (a model preset) and the data set's
categories in the order the reference indexes its classes, and writing a normal remax checkpoint (``model``,
``config``, ``categories``) that ``Predictor.from_checkpoint``, ``remax predict``, ``remax eval --checkpoint`` and
``remax train --init-from`` read like any trained run.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from remax.checkpoint import CheckpointError, categories_to_state, first_line, save_checkpoint
from remax.config import Config, get_config
from remax.models.convert_reference import (ReferenceConversionError, plan_reference_conversion,
                                            reference_num_classes)
from remax.structures import CategoryInfo

log = logging.getLogger(__name__)

REFERENCE_DATASETS = ("coco", "cityscapes", "ade20k")

# The 100 ADE20K-150 classes the reference (Mask2Former's registration) treats as things; ids are 0-based class
# indices. The reference's contiguous order is the id order, things and stuff interleaved.
ADE20K_THING_IDS = frozenset((
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47,
    49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87,
    88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
    125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
))


def reference_categories(dataset: str) -> list[CategoryInfo]:
    """The categories of a reference model's data set, indexed as the reference indexes its classes.

    * ``coco``: the 133 COCO panoptic categories, 80 things then 53 stuff (COCO category ids).
    * ``cityscapes``: the 19 evaluated classes in train-id order, with Cityscapes *label* ids as category ids (as
      ``remax data convert cityscapes`` and cityscapesScripts write them); not things-first.
    * ``ade20k``: the 150 SceneParsing classes in id order (ids 0-149, as ``remax data convert ade20k`` writes
      them), 100 of them things; not things-first.
    """
    if dataset == "coco":
        from remax.data.coco_categories import coco_panoptic_categories

        return coco_panoptic_categories()
    if dataset == "cityscapes":
        from remax.data.cityscapes import CITYSCAPES_LABELS

        labels = sorted((lab for lab in CITYSCAPES_LABELS if not lab.ignore_in_eval), key=lambda lab: lab.train_id)
        return [CategoryInfo(id=lab.id, name=lab.name, isthing=lab.has_instances, color=lab.color)
                for lab in labels]
    if dataset == "ade20k":
        from remax.data.ade20k import ADE20K_CLASSES, ade20k_categories

        mapping = {k + 1: cid for k, cid in enumerate(sorted(ADE20K_THING_IDS))}
        cats = ade20k_categories(mapping)
        assert len(cats) == len(ADE20K_CLASSES)
        return [CategoryInfo(id=int(c["id"]), name=str(c["name"]), isthing=bool(c["isthing"]),
                             color=tuple(c["color"])) for c in cats]
    raise ValueError(f"unknown reference data set {dataset!r}; choose from {', '.join(REFERENCE_DATASETS)}")


def read_reference_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a reference checkpoint: ``(state_dict, other entries)``.

    Accepts a detectron2 checkpoint (a dict whose ``"model"`` is the state_dict; other entries such as
    ``"iteration"`` are returned as they are) or a bare state_dict. Reading uses ``weights_only=True``: a file
    that holds other Python objects is refused rather than unpickled, since unpickling can run code. Every
    failure raises :class:`~remax.checkpoint.CheckpointError` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f"e.g. {found.group(1)}" if found else first_line(exc)
            raise CheckpointError(
                f"{path} holds Python objects other than tensors ({what}); they are not unpickled because that "
                f"could run code. A file holding only the state_dict (tensors) converts") from None
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({first_line(exc)})") from None
    except Exception as exc:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"cannot read {path}: truncated, corrupt or not a torch checkpoint "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or a state_dict")
    if isinstance(obj.get("model"), Mapping):
        weights, extra = dict(obj["model"]), {k: v for k, v in obj.items() if k != "model"}
        if "config" in extra and "categories" in extra:
            raise CheckpointError(f"{path} is already a remax checkpoint; it needs no conversion")
    else:
        weights, extra = obj, {}
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(map(str, bad[:3]))
        raise CheckpointError(f"{path}: {len(bad)} state_dict entries are not tensors (e.g. {shown}); expected a "
                              f"detectron2 checkpoint {{'model': state_dict, ...}} or a bare state_dict")
    return weights, extra


def reference_config(preset: str, dataset: str = "coco", overrides: Sequence[str] = ()) -> Config:
    """The run config a converted checkpoint stores: the preset on the data set, kMaX baseline recipe (the
    weights were trained without ReMaX), ``num_classes`` from the data set, then ``section.field=value``
    overrides (e.g. ``model.input_size=[641,641]``)."""
    categories = reference_categories(dataset)
    cfg = get_config(preset, data=dataset, baseline=True)
    cfg.model.num_classes = len(categories)
    return cfg.override(list(overrides))


@dataclass
class ConversionSummary:
    """What :func:`convert_reference_checkpoint` wrote."""

    path: Path
    preset: str
    dataset: str
    num_classes: int
    mapped: int
    dropped: dict[str, str] = field(default_factory=dict)
    adjusted: dict[str, str] = field(default_factory=dict)
    aux_head: bool = True


def convert_reference_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, preset: str,
                                 dataset: str = "coco", *, keep_aux_head: bool = True,
                                 overrides: Sequence[str] = ()) -> ConversionSummary:
    """Read a reference checkpoint, map it onto ``preset`` and write a remax checkpoint to ``dst``.

    ``keep_aux_head=False`` drops the training-only auxiliary semantic head (a smaller, inference-only file);
    kept, it starts fine-tuning (``remax train --init-from``) from the reference's head, minus its void row.
    Raises :class:`~remax.checkpoint.CheckpointError` (unreadable file) or
    :class:`~remax.models.convert_reference.ReferenceConversionError` (weights that do not fit), one line each.
    """
    categories = reference_categories(dataset)
    weights, extra = read_reference_checkpoint(src)
    try:
        found = reference_num_classes(weights)
    except ReferenceConversionError as exc:
        raise ReferenceConversionError(f"{src}: {exc}") from None
    if found != len(categories):
        guess = [d for d in REFERENCE_DATASETS if len(reference_categories(d)) == found]
        hint = f"; use --dataset {guess[0]}" if guess else ""
        raise ReferenceConversionError(f"{src} predicts {found} classes but data set {dataset!r} has "
                                       f"{len(categories)}{hint}")
    cfg = reference_config(preset, dataset, overrides)
    plan = plan_reference_conversion(weights, cfg.model, keep_aux_head=keep_aux_head)
    state = {
        "model": plan.state_dict,
        "config": cfg.to_dict(),
        "categories": categories_to_state(categories),
        "source": {"format": "kmax-deeplab (detectron2)", "file": Path(src).name,
                   "iteration": extra.get("iteration") if isinstance(extra.get("iteration"), int) else None,
                   "dropped": sorted(plan.dropped), "adjusted": sorted(plan.adjusted)},
    }
    path = save_checkpoint(dst, state)
    has_aux = any(k.startswith("aux_semantic_head.") for k in plan.state_dict)
    log.info("wrote %s: %s on %s, %d tensors (%d source tensors dropped)", path, preset, dataset,
             len(plan.state_dict), len(plan.dropped))
    return ConversionSummary(path=path, preset=preset, dataset=dataset, num_classes=len(categories),
                             mapped=len(plan.state_dict), dropped=plan.dropped, adjusted=plan.adjusted,
                             aux_head=has_aux)
