"""One pass over a COCO-panoptic split that reports every problem with the file it is in.

Used by ``remax data check`` and by ``remax train`` before its first step, so that a broken data set fails with a
list of files to fix instead of a crash deep inside a data-loader worker.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from remax.data.coco_panoptic import DatasetError, available_splits, dataset_paths, paths_from_config
from remax.data.io import image_size, load_json, read_image, read_panoptic_png

__all__ = ["Problem", "find_splits", "check_dataset", "check_root", "validate_config_data"]

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """One problem of a data set: the file it is in and what is wrong."""

    file: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


find_splits = available_splits  # the public name in remax.data; the function lives with the reader


def _ids_text(values: Iterable[int], limit: int = 10) -> str:
    values = sorted(values)
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _reason(exc: BaseException, path: Path) -> str:
    """The cause of an error without the file name the :class:`Problem` already carries."""
    text = str(exc)
    for prefix in (f"cannot read panoptic PNG {path}: ", f"{path}: "):
        text = text.removeprefix(prefix)
    if text.startswith("cannot read image (") and text.endswith(")"):
        text = text[len("cannot read image ("):-1]
    return text


def _check_categories(categories: Any, where: str, problems: list[Problem]) -> dict[int, dict]:
    if not isinstance(categories, list) or not categories:
        problems.append(Problem(where, "no 'categories' (a non-empty list is required)"))
        return {}
    known: dict[int, dict] = {}
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            problems.append(Problem(where, f"category without an integer 'id': {c!r}"))
            continue
        if c["id"] in known:
            problems.append(Problem(where, f"duplicate category id {c['id']}"))
        if c.get("isthing") not in (0, 1, True, False):
            problems.append(Problem(where, f"category {c['id']} ({c.get('name')}): 'isthing' must be 0 or 1, got "
                                           f"{c.get('isthing')!r}"))
        known.setdefault(c["id"], c)
    return known


def _check_segments(segments: Any, png: str, categories: dict[int, dict], problems: list[Problem]) -> dict[int, dict]:
    """Per-segment JSON checks; returns the segments by id (first of duplicates)."""
    if not isinstance(segments, list):
        problems.append(Problem(png, "'segments_info' is missing or not a list"))
        return {}
    by_id: dict[int, dict] = {}
    counts = Counter()
    for s in segments:
        if not isinstance(s, dict) or not isinstance(s.get("id"), int) or isinstance(s.get("id"), bool):
            problems.append(Problem(png, f"segment without an integer 'id': {s!r}"))
            continue
        sid = s["id"]
        counts[sid] += 1
        if sid == 0:
            problems.append(Problem(png, "segment id 0 is reserved for void"))
        cid = s.get("category_id")
        if cid not in categories:
            problems.append(Problem(png, f"segment {sid} has unknown category_id {cid!r}"))
        if s.get("iscrowd", 0) not in (0, 1, True, False):
            problems.append(Problem(png, f"segment {sid}: 'iscrowd' must be 0 or 1, got {s.get('iscrowd')!r}"))
        by_id.setdefault(sid, s)
    dup = [sid for sid, n in counts.items() if n > 1]
    if dup:
        problems.append(Problem(png, f"duplicate segment id(s) in segments_info: {_ids_text(dup)}"))
    return by_id


def _check_png(png_path: Path, segments: dict[int, dict], json_size: tuple[Any, Any],
               problems: list[Problem]) -> tuple[int, int] | None:
    """PNG against ``segments_info``: ids both ways, areas, size; returns the PNG's (H, W) if readable."""
    png = str(png_path)
    if not png_path.is_file():
        problems.append(Problem(png, "panoptic PNG is missing"))
        return None
    try:
        ids = read_panoptic_png(png_path)
    except (OSError, ValueError) as exc:
        problems.append(Problem(png, f"unreadable panoptic PNG ({_reason(exc, png_path)})"))
        return None
    uniq, counts = np.unique(ids, return_counts=True)
    area = dict(zip(uniq.tolist(), counts.tolist()))
    area.pop(0, None)
    extra = set(area) - set(segments)
    if extra:
        problems.append(Problem(png, f"PNG id(s) not in segments_info: {_ids_text(extra)}"))
    absent = [sid for sid in segments if sid not in area and sid != 0]
    if absent:
        problems.append(Problem(png, f"segment(s) of segments_info not in the PNG: {_ids_text(absent)}"))
    for sid, s in segments.items():
        if sid in area:
            json_area = s.get("area")
            if json_area is None:
                problems.append(Problem(png, f"segment {sid} has no 'area' (PNG pixel count {area[sid]})"))
            elif json_area != area[sid]:
                problems.append(Problem(png, f"segment {sid}: JSON area {json_area} differs from the PNG pixel "
                                             f"count {area[sid]}"))
    size = (int(ids.shape[0]), int(ids.shape[1]))
    jh, jw = json_size
    if jh is not None and jw is not None and (jh, jw) != size:
        problems.append(Problem(png, f"PNG is {size[1]}×{size[0]} but the JSON says {jw}×{jh} (width×height)"))
    return size


def _check_image(image_path: Path, png_size: tuple[int, int] | None, json_size: tuple[Any, Any],
                 check_images: bool, problems: list[Problem]) -> None:
    img = str(image_path)
    if not image_path.is_file():
        problems.append(Problem(img, "image is missing"))
        return
    try:
        if check_images:
            size = tuple(int(v) for v in read_image(image_path).shape[1:])
        else:
            size = image_size(image_path)
    except OSError as exc:
        problems.append(Problem(img, f"unreadable or truncated image ({_reason(exc, image_path)})"))
        return
    if png_size is not None and size != png_size:
        problems.append(Problem(img, f"image is {size[1]}×{size[0]} but its panoptic PNG is "
                                     f"{png_size[1]}×{png_size[0]} (width×height)"))
    elif png_size is None:
        jh, jw = json_size
        if jh is not None and jw is not None and size != (jh, jw):
            problems.append(Problem(img, f"image is {size[1]}×{size[0]} but the JSON says {jw}×{jh}"))


def check_dataset(json_file: str | os.PathLike[str], png_dir: str | os.PathLike[str],
                  image_dir: str | os.PathLike[str], progress: Callable[[int], Any] | None = None,
                  check_images: bool = True) -> list[Problem]:
    """Every problem of one split; ``progress(1)`` after each annotation.

    ``check_images=False`` reads only image headers (fast, but blind to truncated image data).
    """
    json_file, png_dir, image_dir = Path(json_file), Path(png_dir), Path(image_dir)
    where = str(json_file)
    try:
        data = load_json(json_file)
    except (OSError, ValueError) as exc:
        return [Problem(where, f"unreadable annotation file ({_reason(exc, json_file)})")]
    problems: list[Problem] = []
    categories = _check_categories(data.get("categories"), where, problems)
    images = data.get("images")
    annotations = data.get("annotations")
    if not isinstance(images, list):
        problems.append(Problem(where, "no 'images' list"))
        images = []
    if not isinstance(annotations, list):
        problems.append(Problem(where, "no 'annotations' list"))
        annotations = []
    if not annotations:
        problems.append(Problem(where, "the split is empty: no annotations"))

    image_by_id: dict[str, dict] = {}
    image_counts = Counter()
    for im in images:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            problems.append(Problem(where, f"image entry without 'id' and 'file_name': {im!r}"))
            continue
        key = str(im["id"])
        image_counts[key] += 1
        image_by_id.setdefault(key, im)
    dup = [k for k, n in image_counts.items() if n > 1]
    if dup:
        problems.append(Problem(where, f"duplicate image id(s): {', '.join(sorted(dup)[:10])}"
                                       f"{f' ... ({len(dup)} in all)' if len(dup) > 10 else ''}"))

    annotated: Counter = Counter()
    png_names: Counter = Counter()
    for ann in annotations:
        try:
            if not isinstance(ann, dict) or "file_name" not in ann or "image_id" not in ann:
                problems.append(Problem(where, f"annotation without 'image_id' and 'file_name': "
                                               f"{str(ann)[:200]}"))
                continue
            png_path = png_dir / str(ann["file_name"])
            key = str(ann["image_id"])
            annotated[key] += 1
            png_names[str(ann["file_name"])] += 1
            im = image_by_id.get(key)
            if im is None:
                problems.append(Problem(str(png_path), f"image_id {ann['image_id']!r} is not in 'images' of "
                                                       f"{json_file.name}"))
            json_size = (im.get("height"), im.get("width")) if im is not None else (None, None)
            segments = _check_segments(ann.get("segments_info"), str(png_path), categories, problems)
            png_size = _check_png(png_path, segments, json_size, problems)
            if im is not None:
                _check_image(image_dir / str(im["file_name"]), png_size, json_size, check_images, problems)
        finally:
            if progress is not None:
                progress(1)
    twice = [k for k, n in annotated.items() if n > 1]
    if twice:
        problems.append(Problem(where, f"image id(s) with more than one annotation: {', '.join(sorted(twice)[:10])}"))
    shared = [k for k, n in png_names.items() if n > 1]
    if shared:
        problems.append(Problem(where, f"PNG file name(s) used by more than one annotation: "
                                       f"{', '.join(sorted(shared)[:10])}"))
    missing = [k for k in image_by_id if k not in annotated]
    if missing:
        names = [str(image_by_id[k]["file_name"]) for k in missing]
        problems.append(Problem(where, f"{len(missing)} image(s) without annotation: {', '.join(names[:10])}"
                                       f"{' ...' if len(names) > 10 else ''}"))
    return problems


def check_root(root: str | os.PathLike[str], splits: Iterable[str] | None = None, check_images: bool = True,
               progress: Callable[[int], Any] | None = None) -> list[Problem]:
    """Problems of every split (default: all ``annotations/panoptic_*.json``) of a data set in COCO layout."""
    names = list(splits) if splits is not None else find_splits(root)
    if not names:
        return [Problem(str(Path(root) / "annotations"), "no panoptic_<split>.json found")]
    problems: list[Problem] = []
    for split in names:
        p = dataset_paths(root, split)
        problems += check_dataset(p.json_file, p.png_dir, p.image_dir, progress=progress, check_images=check_images)
    return problems


def validate_config_data(data_cfg: Any, splits: Iterable[str], check_images: bool = True) -> None:
    """Raise :class:`DatasetError` listing every problem of the config's splits (one per line)."""
    splits = list(splits)
    problems: list[Problem] = []
    for split in splits:
        paths = paths_from_config(data_cfg, split)
        if not paths.json_file.is_file():
            found = available_splits(data_cfg.root) if data_cfg.root else []
            hint = f"; splits found: {', '.join(found)}" if found else ""
            problems.append(Problem(str(paths.json_file), f"annotation file of split {split!r} not found{hint}"))
            continue
        problems += check_dataset(paths.json_file, paths.png_dir, paths.image_dir, check_images=check_images)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise DatasetError(f"the data set has {len(problems)} problem(s); fix them (remax data check lists them "
                           f"too):\n{lines}")
    log.info("data set checked: no problems in split(s) %s", ", ".join(splits))
