"""ADE20K (SceneParsing, 150 classes) -> COCO panoptic, in the Mask2Former / kMaX convention.

Inputs under ``SRC`` (``ADEChallengeData2016``): ``images/{split}/*.jpg``, the semantic maps
``annotations/{split}/*.png`` (0 = unlabelled, ``k`` = class ``k - 1``) and the instance maps
``annotations_instance/{split}/*.png`` of the SceneParsing 2017 release (R = instance class 1–100, G = instance
number, 0 = none), plus ``ade20k_instance_catid_mapping.txt`` (a header line, then ``<instance class> <semantic
class> <full ADE20K class>``; ids 1-based).

Rules: category ids are 0–149; the semantic classes named in the mapping are things, the other 50 stuff. Stuff
segments come from the semantic map, then each instance (one G value) is pasted over it as a thing segment of its
mapped class; thing-class pixels without an instance are void; nothing is crowd; image ids are file stems.
Segment ids are deterministic: ``(category + 1) · 1000`` for stuff, ``(category + 1) · 1000 + k`` for the k-th
thing of a class. Stuff ``area`` / ``bbox`` are counted after things are pasted (so the JSON agrees with the PNGs)
unless ``stale_stuff_areas``, which reproduces the reference script (counted before).
"""

from __future__ import annotations

import colorsys
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from remax.data.coco_panoptic import DatasetError
from remax.data.io import place_images, segment_stats, write_json, write_panoptic_png

__all__ = ["ADE20K_CLASSES", "read_instance_mapping", "ade20k_categories", "convert_ade20k_maps", "convert_ade20k"]

log = logging.getLogger(__name__)

# The 150 SceneParsing classes in id order (first name of each objectInfo150 entry).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "window", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


def read_instance_mapping(path: str | os.PathLike[str]) -> dict[int, int]:
    """``ade20k_instance_catid_mapping.txt`` -> {instance class (1-based) : semantic class (0-based)}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the instance class mapping ({exc})") from None
    mapping: dict[int, int] = {}
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        try:
            ins, sem = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise DatasetError(f"{path}:{n}: expected '<instance class> <semantic class> ...', got {line!r}") \
                from None
        if not 1 <= sem <= len(ADE20K_CLASSES):
            raise DatasetError(f"{path}:{n}: semantic class {sem} is outside 1..{len(ADE20K_CLASSES)}")
        if mapping.get(ins, sem - 1) != sem - 1:
            raise DatasetError(f"{path}:{n}: instance class {ins} is mapped to two semantic classes")
        mapping[ins] = sem - 1
    if not mapping:
        raise DatasetError(f"{path}: no mapping lines after the header")
    return mapping


def _colour(k: int) -> list[int]:
    """A display colour per class, spread around the hue circle (golden-ratio steps)."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65 + 0.35 * (k % 2), 0.75 + 0.25 * (k % 3 == 0))
    return [int(round(255 * v)) for v in (r, g, b)]


def ade20k_categories(mapping: dict[int, int]) -> list[dict[str, Any]]:
    """The 150 categories with ids 0–149; things are the semantic classes the instance mapping names."""
    things = set(mapping.values())
    return [{"id": k, "name": name, "isthing": int(k in things), "color": _colour(k)}
            for k, name in enumerate(ADE20K_CLASSES)]


def convert_ade20k_maps(semantic: np.ndarray, instance: np.ndarray, mapping: dict[int, int],
                        stale_stuff_areas: bool = False, where: str = "") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One semantic map (H×W, 0 = unlabelled) and instance map (H×W×3) -> (segment ids, ``segments_info``)."""
    if instance.ndim != 3 or instance.shape[2] < 2 or instance.shape[:2] != semantic.shape:
        raise DatasetError(f"{where}: instance map of shape {instance.shape} does not fit the semantic map "
                           f"{semantic.shape} (expected H×W×3 of the same size)")
    things = set(mapping.values())
    ids = np.zeros(semantic.shape, np.int64)
    stale: dict[int, tuple[int, list[int]]] = {}
    meta: dict[int, int] = {}
    sem = semantic.astype(np.int64) - 1  # -1 = unlabelled
    for c in np.unique(sem).tolist():
        if c < 0 or c in things:
            continue
        if c >= len(ADE20K_CLASSES):
            raise DatasetError(f"{where}: semantic value {c + 1} is outside 0..{len(ADE20K_CLASSES)}")
        sid = (c + 1) * 1000
        ids[sem == c] = sid
        meta[sid] = c
    if stale_stuff_areas:
        stale = segment_stats(ids)
    ins_class = instance[..., 0].astype(np.int64)
    ins_num = instance[..., 1].astype(np.int64)
    counters: dict[int, int] = {}
    for g in np.unique(ins_num).tolist():
        if g == 0:
            continue
        mask = ins_num == g
        classes = np.unique(ins_class[mask]).tolist()
        for r in classes:  # one class per instance in the release; split defensively if not
            if r == 0:
                continue  # instance pixels without a class: void
            if r not in mapping:
                raise DatasetError(f"{where}: instance class {r} is not in the instance class mapping")
            c = mapping[r]
            counters[c] = counters.get(c, 0) + 1
            if counters[c] >= 1000:
                raise DatasetError(f"{where}: more than 999 instances of class {c}")
            sid = (c + 1) * 1000 + counters[c]
            ids[mask & (ins_class == r)] = sid
            meta[sid] = c
    stats = segment_stats(ids)
    segments = []
    for sid in sorted(meta):
        c = meta[sid]
        if stale_stuff_areas and c not in things:
            area, bbox = stale[sid]
        elif sid in stats:
            area, bbox = stats[sid]
        else:
            continue  # a stuff segment entirely covered by things
        segments.append({"id": sid, "category_id": c, "area": area, "bbox": bbox, "iscrowd": 0})
    return ids, segments


def _default_instance_dir(src: Path) -> Path:
    for cand in (src / "annotations_instance", src.parent / "annotations_instance"):
        if cand.is_dir():
            return cand
    raise DatasetError(f"annotations_instance/ not found in {src} or beside it; pass --instance-dir")


def convert_ade20k(src: str | os.PathLike[str], out: str | os.PathLike[str], mapping: str | os.PathLike[str],
                   splits: Iterable[str] = ("training", "validation"),
                   instance_dir: str | os.PathLike[str] | None = None, images: str = "link",
                   stale_stuff_areas: bool = False, progress: Callable[[int], Any] | None = None) -> list[Path]:
    """Convert ADE20K splits under ``src`` into a COCO-panoptic root ``out``; returns the files written."""
    src, out = Path(src), Path(out)
    inst_root = Path(instance_dir) if instance_dir else _default_instance_dir(src)
    class_map = read_instance_mapping(mapping)
    categories = ade20k_categories(class_map)
    splits = list(splits)
    listing: dict[str, list[Path]] = {}
    for split in splits:  # check everything before writing anything
        json_file = out / "annotations" / f"panoptic_{split}.json"
        if json_file.exists():
            raise FileExistsError(f"{json_file} already exists; remove it to convert again")
        image_dir = src / "images" / split
        if not image_dir.is_dir():
            raise DatasetError(f"{image_dir}: folder not found (expected SRC/images/{split}/*.jpg)")
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise DatasetError(f"{image_dir}: no images")
        for folder in (src / "annotations" / split, inst_root / split):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder not found")
        place_images(image_dir, out / split, images, dry_run=True)
        listing[split] = files
    written: list[Path] = []
    for split in splits:
        png_dir = out / "annotations" / f"panoptic_{split}"
        png_dir.mkdir(parents=True, exist_ok=True)
        image_entries, annotations = [], []
        for image_path in listing[split]:
            stem = image_path.stem
            sem_path = src / "annotations" / split / f"{stem}.png"
            ins_path = inst_root / split / f"{stem}.png"
            maps = []
            for path, mode in ((sem_path, "L"), (ins_path, "RGB")):
                try:
                    with Image.open(path) as im:
                        if im.mode != mode:
                            raise DatasetError(f"{path}: expected a PIL {mode} image, got mode {im.mode}")
                        maps.append(np.asarray(im))
                except FileNotFoundError:
                    raise DatasetError(f"{path}: annotation of {image_path.name} not found") from None
                except OSError as exc:
                    raise DatasetError(f"{path}: cannot read ({exc})") from None
            ids, segments = convert_ade20k_maps(maps[0], maps[1], class_map, stale_stuff_areas, str(ins_path))
            write_panoptic_png(png_dir / f"{stem}.png", ids)
            h, w = ids.shape
            image_entries.append({"id": stem, "file_name": image_path.name, "height": int(h), "width": int(w)})
            annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
            if progress is not None:
                progress(1)
        json_file = out / "annotations" / f"panoptic_{split}.json"
        write_json(json_file, {"images": image_entries, "annotations": annotations, "categories": categories})
        written.append(json_file)
        linked = place_images(src / "images" / split, out / split, images)
        if linked is not None:
            written.append(linked)
        log.info("ade20k %s: %d images -> %s", split, len(listing[split]), json_file)
    return written
