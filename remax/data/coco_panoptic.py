"""The COCO-panoptic reader: one JSON + one PNG per image -> images and compact :class:`PanopticTarget` s.

Every data set remax trains on is read here (COCO itself, converted Cityscapes / ADE20K, the synthetic set and the
user's own data). Categories get contiguous training ids, things first then stuff, each group in JSON order,
unless an order is given (``category_order``, e.g. a checkpoint's categories): the ids then follow that order,
matched by category id, so a model whose classes are not things-first (the reference's Cityscapes and ADE20K
models) reads its own class indices from the data.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remax.data.io import load_json, read_image, read_panoptic_png
from remax.structures import CategoryInfo, PanopticTarget, align_categories

__all__ = ["DatasetError", "DatasetPaths", "dataset_paths", "require_split", "available_splits", "paths_from_config",
           "COCOPanopticDataset", "categories_from_json"]

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, PanopticTarget, int], tuple[torch.Tensor, PanopticTarget]]


class DatasetError(Exception):
    """A data set that cannot be used as it is; the message names the files and the problems."""


@dataclass
class DatasetPaths:
    """The three locations of one COCO-panoptic split."""

    json_file: Path
    png_dir: Path
    image_dir: Path


def _json_minus_suffix(json_file: Path) -> Path:
    return json_file.with_suffix("") if json_file.suffix == ".json" else json_file


# COCO's split names, so that a COCO folder works with the generic names (and the other way round).
SPLIT_ALIASES = {"train": "train2017", "val": "val2017", "train2017": "train", "val2017": "val"}


def available_splits(root: str | os.PathLike[str]) -> list[str]:
    """Split names of ``ROOT/annotations/panoptic_{split}.json``, sorted."""
    ann = Path(root) / "annotations"
    if not ann.is_dir():
        return []
    return sorted(p.name[len("panoptic_"):-len(".json")] for p in ann.glob("panoptic_*.json") if p.is_file())


def _split_in_root(base: Path, split: str) -> str:
    """``split``, or its COCO alias (``val`` <-> ``val2017``) when only the alias exists under ``base``."""
    if (base / "annotations" / f"panoptic_{split}.json").is_file():
        return split
    alias = SPLIT_ALIASES.get(split)
    if alias and (base / "annotations" / f"panoptic_{alias}.json").is_file():
        log.info("%s: split %r not found, using %r", base, split, alias)
        return alias
    return split


def require_split(root: str | os.PathLike[str], split: str) -> DatasetPaths:
    """:func:`dataset_paths` of ``split`` under ``root``, or a :class:`DatasetError` that lists the splits that
    exist there (a typo in ``--split`` then shows its fix)."""
    paths = dataset_paths(root, split)
    if not paths.json_file.is_file():
        found = available_splits(root)
        hint = (f"splits found: {', '.join(found)}" if found else
                f"no annotations/panoptic_<split>.json under {root}")
        raise DatasetError(f"split {split!r} not found ({paths.json_file} does not exist); {hint}")
    return paths


def dataset_paths(root: str | os.PathLike[str] | None, split: str, json_file: str | os.PathLike[str] | None = None,
                  png_dir: str | os.PathLike[str] | None = None,
                  image_dir: str | os.PathLike[str] | None = None) -> DatasetPaths:
    """Paths of ``split`` in COCO's layout under ``root``; explicit paths override the derived ones.

    ``ROOT/annotations/panoptic_{split}.json``, its PNG folder (the JSON path without ``.json``, as in panopticapi,
    or else ``ROOT/panoptic_{split}/`` as in detectron2's layout) and ``ROOT/{split}/`` for the images.
    A split that is missing under its generic name is looked up under COCO's (``val`` -> ``val2017``) and the
    other way round.
    """
    base = Path(root) if root not in (None, "") else None
    if base is not None and split and not json_file:
        split = _split_in_root(base, split)
    if json_file:
        jf = Path(json_file)
    elif base is not None and split:
        jf = base / "annotations" / f"panoptic_{split}.json"
    else:
        raise DatasetError("no annotation file: give a data set root and a split, or the JSON file explicitly")
    pd = Path(png_dir) if png_dir else _json_minus_suffix(jf)
    if not png_dir and not pd.is_dir() and base is not None and (base / f"panoptic_{split}").is_dir():
        pd = base / f"panoptic_{split}"  # detectron2's layout: ROOT/panoptic_{split}/ beside ROOT/annotations/
    if image_dir:
        idir = Path(image_dir)
    elif base is not None and split:
        idir = base / split
    else:
        raise DatasetError(f"no image folder for {jf}: give a data set root and a split, or the image folder "
                           f"explicitly (--image-dir / data.*_image_dir)")
    return DatasetPaths(json_file=jf, png_dir=pd, image_dir=idir)


def paths_from_config(data_cfg: Any, split: str) -> DatasetPaths:
    """Paths of ``split`` from a :class:`~remax.config.DataConfig`: its ``root`` plus the explicit overrides."""
    prefix = None
    if split == data_cfg.train_split:
        prefix = "train"
    elif split == data_cfg.val_split:
        prefix = "val"
    explicit = {}
    if prefix is not None:
        explicit = dict(json_file=getattr(data_cfg, f"{prefix}_json") or None,
                        png_dir=getattr(data_cfg, f"{prefix}_png_dir") or None,
                        image_dir=getattr(data_cfg, f"{prefix}_image_dir") or None)
    try:
        return dataset_paths(data_cfg.root or None, split, **explicit)
    except DatasetError as exc:
        raise DatasetError(f"split {split!r}: {exc}; set data.root (or --data ROOT)") from None


def categories_from_json(categories: Sequence[dict], where: str = "",
                         order: Sequence[CategoryInfo] | None = None) -> tuple[list[CategoryInfo], dict[int, int]]:
    """Contiguous training categories and dataset id -> index: things first, then stuff, each in JSON order, or
    ``order``'s order when given (a :class:`DatasetError` naming the differences if its set is not the JSON's)."""
    things, stuff = [], []
    seen: set[int] = set()
    for c in categories:
        try:
            cid = int(c["id"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{where}: category without an integer 'id': {c!r}") from None
        if cid in seen:
            raise DatasetError(f"{where}: category id {cid} appears twice")
        seen.add(cid)
        colour = c.get("color") or (0, 0, 0)
        info = CategoryInfo(id=cid, name=str(c.get("name", cid)), isthing=bool(c.get("isthing", 0)),
                            color=tuple(int(v) for v in list(colour)[:3]))
        (things if info.isthing else stuff).append(info)
    ordered = things + stuff
    if order is not None:
        ordered = _aligned(ordered, order, where)
    return ordered, {c.id: k for k, c in enumerate(ordered)}


def _aligned(categories: Sequence[CategoryInfo], order: Sequence[CategoryInfo], where: str) -> list[CategoryInfo]:
    try:
        return align_categories(categories, order, own_name=f"{where or 'the data set'}")
    except ValueError as exc:
        raise DatasetError(str(exc)) from None


class _Records(Sequence):
    """Per-image records packed into one byte buffer (decoded on access).

    Pickling a data set for each DataLoader worker then copies one array instead of millions of small Python
    objects, and forked workers do not touch reference counts of shared pages.
    """

    def __init__(self, records: Sequence[dict]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]  # type: ignore[return-value]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for {n} images")
        return pickle.loads(self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes())

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


class COCOPanopticDataset(torch.utils.data.Dataset):
    """One COCO-panoptic split. ``dataset[i]`` is ``{"image": uint8 3×H×W, "target": PanopticTarget, "image_id"}``.

    ``records[i]`` holds ``image_id``, ``file_name`` (image, relative to ``image_dir``), ``png_name``, ``height``,
    ``width`` and ``segments_info`` (as in the JSON); records are decoded on access, so changing one has no effect.
    ``category_order`` (e.g. a checkpoint's categories) sets the contiguous class order; see the module docstring.
    """

    def __init__(self, json_file: str | os.PathLike[str], png_dir: str | os.PathLike[str],
                 image_dir: str | os.PathLike[str], transform: Transform | None = None,
                 category_order: Sequence[CategoryInfo] | None = None) -> None:
        self.json_file = Path(json_file)
        self.png_dir = Path(png_dir)
        self.image_dir = Path(image_dir)
        self.transform = transform
        try:
            data = load_json(self.json_file)
        except (OSError, ValueError) as exc:
            raise DatasetError(str(exc)) from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.json_file}: a COCO-panoptic JSON needs a list '{key}'")
        self.categories, self.category_map = categories_from_json(data["categories"], str(self.json_file),
                                                                  order=category_order)
        images: dict[str, dict] = {}
        for im in data["images"]:
            images.setdefault(str(im.get("id")), im)
        records = []
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            im = images.get(str(image_id))
            if im is None:
                raise DatasetError(f"{self.json_file}: annotation {ann.get('file_name')!r} has image_id "
                                   f"{image_id!r}, which is not in 'images'")
            records.append({"image_id": image_id, "file_name": str(im["file_name"]),
                            "png_name": str(ann["file_name"]), "height": im.get("height"),
                            "width": im.get("width"), "segments_info": list(ann.get("segments_info", []))})
        self.records: Sequence[dict] = _Records(records)
        log.debug("%s: %d images, %d categories", self.json_file, len(self.records), len(self.categories))

    @classmethod
    def from_paths(cls, paths: DatasetPaths, transform: Transform | None = None,
                   category_order: Sequence[CategoryInfo] | None = None) -> "COCOPanopticDataset":
        return cls(paths.json_file, paths.png_dir, paths.image_dir, transform=transform,
                   category_order=category_order)

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], split: str, transform: Transform | None = None,
                  category_order: Sequence[CategoryInfo] | None = None) -> "COCOPanopticDataset":
        """The split ``split`` of a data set in COCO's layout under ``root``."""
        return cls.from_paths(dataset_paths(root, split), transform=transform, category_order=category_order)

    def set_category_order(self, order: Sequence[CategoryInfo]) -> None:
        """Renumber the contiguous class ids to follow ``order`` (matched by id; :class:`DatasetError` naming the
        differences when the sets differ). Targets are built on access, so later items use the new ids."""
        self.categories = _aligned(self.categories, order, str(self.json_file))
        self.category_map = {c.id: k for k, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.records[i]["file_name"]

    def png_path(self, i: int) -> Path:
        return self.png_dir / self.records[i]["png_name"]

    def load_image(self, i: int) -> torch.Tensor:
        """The photo of image ``i`` as uint8 ``3×H×W``."""
        return read_image(self.image_path(i))

    def load_png_ids(self, i: int) -> np.ndarray:
        """The original segment ids of image ``i`` (``H×W`` int64, 0 = void)."""
        path = self.png_path(i)
        try:
            return read_panoptic_png(path)
        except (OSError, ValueError) as exc:
            raise DatasetError(str(exc)) from None

    def segments_info(self, i: int) -> list[dict]:
        """``segments_info`` of image ``i`` exactly as in the JSON."""
        return self.records[i]["segments_info"]

    def target(self, i: int) -> PanopticTarget:
        """Compact ground truth of image ``i``: ``id_map`` 0 = void, ``k + 1`` = ``k``-th JSON segment."""
        return self._target(self.load_png_ids(i), self.segments_info(i), i)

    def _target(self, ids: np.ndarray, segments: list[dict], i: int) -> PanopticTarget:
        seg_ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
        classes = []
        for s in segments:
            cid = int(s["category_id"])
            if cid not in self.category_map:
                raise DatasetError(f"{self.png_path(i)}: segment {s['id']} has unknown category_id {cid}")
            classes.append(self.category_map[cid])
        # id -> k + 1 through a sorted search; ids not in segments_info stay void (the checker reports them).
        order = np.argsort(seg_ids, kind="stable")
        sorted_ids = seg_ids[order]
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids):
            hit = sorted_ids[pos] == ids
            id_map = np.where(hit & (ids != 0), order[pos] + 1, 0)
        else:
            id_map = np.zeros_like(ids)
        cls = torch.tensor(classes, dtype=torch.int64)
        return PanopticTarget(
            id_map=torch.from_numpy(id_map.astype(np.int64)),
            classes=cls,
            is_thing=torch.tensor([self.categories[c].isthing for c in classes], dtype=torch.bool),
            is_crowd=torch.tensor([bool(s.get("iscrowd", 0)) for s in segments], dtype=torch.bool),
            segment_ids=torch.from_numpy(seg_ids),
            areas=torch.tensor([int(s.get("area", -1)) for s in segments], dtype=torch.int64),
        )

    def raw_item(self, i: int) -> tuple[torch.Tensor, PanopticTarget]:
        """Image and target of ``i`` before any transform; refuses an image whose size differs from its PNG."""
        image = self.load_image(i)
        target = self.target(i)
        if tuple(image.shape[1:]) != tuple(target.id_map.shape):
            raise DatasetError(f"{self.image_path(i)}: image is {image.shape[2]}×{image.shape[1]} but its "
                               f"panoptic PNG {self.png_path(i)} is {target.id_map.shape[1]}×"
                               f"{target.id_map.shape[0]} (width×height)")
        return image, target

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, target = self.raw_item(i)
        if self.transform is not None:
            image, target = self.transform(image, target, i)
        return {"image": image, "target": target, "image_id": self.records[i]["image_id"]}
