"""Cityscapes -> COCO panoptic, with the rules of the official ``createPanopticImgs`` script.

Input: ``SRC/gtFine/{split}/{city}/*_gtFine_instanceIds.png`` and ``SRC/leftImg8bit/{split}/{city}/*_leftImg8bit.png``.
In an instanceIds map a value ``v < 1000`` is a class-level region of label ``v`` (a crowd region for classes with
instances, a stuff segment otherwise) and ``v >= 1000`` is instance ``v % 1000`` of label ``v // 1000``. Classes that
are ``ignoreInEval`` become void. The segment id is ``v`` itself, the category id the label id (or the train id).

Output: ``OUT/annotations/panoptic_{split}.json``, ``OUT/annotations/panoptic_{split}/*_gtFine_panoptic.png`` and
``OUT/{split}`` (the images; image ``file_name`` is ``<city>/<name>_leftImg8bit.png``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from remax.data.coco_panoptic import DatasetError
from remax.data.io import place_images, segment_stats, write_json, write_panoptic_png

__all__ = ["CityscapesLabel", "CITYSCAPES_LABELS", "cityscapes_categories", "convert_cityscapes_ids",
           "convert_cityscapes"]

log = logging.getLogger(__name__)


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    category: str
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# The Cityscapes label definition (labels.py of cityscapesScripts): 19 evaluated classes, 8 of them with instances.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, "void", False, True, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, "void", False, True, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, "void", False, True, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, "void", False, True, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, "void", False, True, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, "void", False, True, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, "void", False, True, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, "flat", False, False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, "flat", False, False, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, "flat", False, True, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, "flat", False, True, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, "construction", False, False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, "construction", False, False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, "construction", False, False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, "construction", False, True, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, "construction", False, True, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, "construction", False, True, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, "object", False, False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, "object", False, True, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, "object", False, False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, "object", False, False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, "nature", False, False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, "nature", False, False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, "sky", False, False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, "human", True, False, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, "human", True, False, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, "vehicle", True, False, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, "vehicle", True, False, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, "vehicle", True, False, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, "vehicle", True, True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, "vehicle", True, True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, "vehicle", True, False, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", True, False, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, "vehicle", True, False, (119, 11, 32)),
    CityscapesLabel("license plate", -1, -1, "vehicle", False, True, (0, 0, 142)),
)
_BY_ID = {lab.id: lab for lab in CITYSCAPES_LABELS}


def cityscapes_categories(use_train_id: bool = False) -> list[dict[str, Any]]:
    """The 19 evaluated classes as COCO-panoptic categories, in label order."""
    return [{"id": lab.train_id if use_train_id else lab.id, "name": lab.name, "color": list(lab.color),
             "supercategory": lab.category, "isthing": int(lab.has_instances)}
            for lab in CITYSCAPES_LABELS if not lab.ignore_in_eval]


def convert_cityscapes_ids(instance_ids: np.ndarray, use_train_id: bool = False,
                           where: str = "") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One instanceIds map -> (panoptic segment ids with ignored classes void, ``segments_info``)."""
    values = np.unique(instance_ids)
    keep = np.zeros(values.shape, dtype=bool)
    meta = {}
    for k, v in enumerate(values.tolist()):
        label_id = v if v < 1000 else v // 1000
        lab = _BY_ID.get(label_id)
        if lab is None:
            raise DatasetError(f"{where}: value {v} is not a Cityscapes label id (or label id × 1000 + instance)")
        if lab.ignore_in_eval:
            continue
        keep[k] = True
        crowd = int(v < 1000 and lab.has_instances)
        meta[v] = (lab.train_id if use_train_id else lab.id, crowd)
    lut_pos = np.searchsorted(values, instance_ids)
    ids = np.where(keep[lut_pos], instance_ids, 0).astype(np.int64)
    stats = segment_stats(ids)
    segments = [{"id": int(v), "category_id": int(meta[v][0]), "area": area, "bbox": bbox, "iscrowd": meta[v][1]}
                for v, (area, bbox) in sorted(stats.items())]
    return ids, segments


def _split_files(src: Path, split: str) -> list[Path]:
    gt = src / "gtFine" / split
    if not gt.is_dir():
        raise DatasetError(f"{gt}: folder not found (expected SRC/gtFine/{split}/<city>/*_gtFine_instanceIds.png)")
    files = sorted(gt.glob("*/*_gtFine_instanceIds.png"))
    if not files:
        raise DatasetError(f"{gt}: no */*_gtFine_instanceIds.png files")
    return files


def convert_cityscapes(src: str | os.PathLike[str], out: str | os.PathLike[str],
                       splits: Iterable[str] = ("train", "val"), use_train_id: bool = False, images: str = "link",
                       progress: Callable[[int], Any] | None = None) -> list[Path]:
    """Convert the Cityscapes splits under ``src`` into a COCO-panoptic root ``out``; returns the files written.

    ``images``: ``"link"`` makes ``OUT/{split}`` a symlink to ``leftImg8bit/{split}``, ``"copy"`` copies it,
    ``"none"`` leaves the images where they are. Existing annotation files are never overwritten.
    """
    src, out = Path(src), Path(out)
    categories = cityscapes_categories(use_train_id)
    splits = list(splits)
    for split in splits:  # refuse before writing anything
        json_file = out / "annotations" / f"panoptic_{split}.json"
        if json_file.exists():
            raise FileExistsError(f"{json_file} already exists; remove it to convert again")
        _split_files(src, split)
        try:
            place_images(src / "leftImg8bit" / split, out / split, images, dry_run=True)
        except FileNotFoundError as exc:
            raise DatasetError(f"{exc} (use --images none to convert the annotations only)") from None
    written: list[Path] = []
    for split in splits:
        files = _split_files(src, split)
        png_dir = out / "annotations" / f"panoptic_{split}"
        png_dir.mkdir(parents=True, exist_ok=True)
        image_entries, annotations = [], []
        for f in files:
            city = f.parent.name
            stem = f.name[: -len("_gtFine_instanceIds.png")]
            try:
                with Image.open(f) as im:
                    raw = np.asarray(im).astype(np.int64)
            except OSError as exc:
                raise DatasetError(f"{f}: cannot read ({exc})") from None
            if raw.ndim != 2:
                raise DatasetError(f"{f}: an instanceIds PNG must have one channel, got shape {raw.shape}")
            ids, segments = convert_cityscapes_ids(raw, use_train_id, str(f))
            png_name = f"{stem}_gtFine_panoptic.png"
            write_panoptic_png(png_dir / png_name, ids)
            image_entries.append({"id": stem, "file_name": f"{city}/{stem}_leftImg8bit.png",
                                  "height": int(raw.shape[0]), "width": int(raw.shape[1])})
            annotations.append({"image_id": stem, "file_name": png_name, "segments_info": segments})
            if progress is not None:
                progress(1)
        json_file = out / "annotations" / f"panoptic_{split}.json"
        write_json(json_file, {"images": image_entries, "annotations": annotations, "categories": categories})
        written.append(json_file)
        linked = place_images(src / "leftImg8bit" / split, out / split, images)
        if linked is not None:
            written.append(linked)
        log.info("cityscapes %s: %d images -> %s", split, len(files), json_file)
    return written
