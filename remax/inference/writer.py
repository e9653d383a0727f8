"""Write predictions as COCO-panoptic files (PNG per image + one JSON) with overlay pictures.

Layout of an output folder (panopticapi's convention: the PNG folder is the JSON path without ``.json``)::

    OUT/predictions.json        images, annotations (segments_info with scores), categories
    OUT/predictions/NAME.png    segment ids as R + 256·G + 256²·B
    OUT/overlays/NAME.jpg       coloured overlay (optional)
    OUT/semantic/NAME.png       16-bit data-set category id per pixel (optional)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
from PIL import Image

from remax.evaluation.io import write_panoptic_png
from remax.structures import CategoryInfo

from .predictor import PredictionResult, Predictor, load_image
from .visualize import overlay_panoptic

log = logging.getLogger(__name__)


def image_id_for(stem: str) -> int | str:
    """COCO's convention: ``000000000139.jpg`` has image id 139; other names keep their stem as a string id."""
    return int(stem) if stem.isdigit() else stem


def segment_boxes(id_map: np.ndarray, ids: Sequence[int]) -> dict[int, list[int]]:
    """COCO ``[x, y, w, h]`` boxes of the given segment ids, from row/column occupancy (one pass per segment
    over a row and a column profile, not over pixels)."""
    boxes = {}
    for sid in ids:
        mask = id_map == sid
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            boxes[sid] = [0, 0, 0, 0]
        else:
            boxes[sid] = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return boxes


@dataclass
class PredictionWriter:
    """Accumulates annotations while writing per-image files; :meth:`close` writes the JSON."""

    out_dir: Path
    categories: list[CategoryInfo]
    overlays: bool = True
    semantic: bool = False
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.png_dir.mkdir(parents=True, exist_ok=True)
        if self.overlays:
            (self.out_dir / "overlays").mkdir(exist_ok=True)
        if self.semantic:
            (self.out_dir / "semantic").mkdir(exist_ok=True)

    @property
    def png_dir(self) -> Path:
        return self.out_dir / "predictions"

    @property
    def json_path(self) -> Path:
        return self.out_dir / "predictions.json"

    def _unique_name(self, source: Path) -> str:
        name = source.stem
        if name in self._names:  # a.jpg and a.png in one folder
            name = f"{source.stem}_{source.suffix.lstrip('.')}"
            k = 1
            while name in self._names:
                k += 1
                name = f"{source.stem}_{source.suffix.lstrip('.')}{k}"
        self._names.add(name)
        return name

    def add(self, source: Path, image: torch.Tensor, result: PredictionResult) -> str:
        """Write one image's PNG (and overlay / semantic map) and record its annotation; returns the name used."""
        name = self._unique_name(source)
        ids = result.id_map.numpy()
        write_panoptic_png(self.png_dir / f"{name}.png", ids)
        boxes = segment_boxes(ids, [s["id"] for s in result.segments_info])
        segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0, "area": int(s["area"]),
                     "bbox": boxes[s["id"]], "isthing": int(s["isthing"]), "score": round(float(s["score"]), 6)}
                    for s in result.segments_info]
        image_id = image_id_for(name)
        self.images.append({"id": image_id, "file_name": source.name, "height": result.height,
                            "width": result.width})
        self.annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
        if self.overlays:
            picture = overlay_panoptic(image, ids, result.segments_info, self.categories)
            picture.save(self.out_dir / "overlays" / f"{name}.jpg", quality=90)
        if self.semantic and result.semantic is not None:
            cat_ids = np.array([c.id for c in self.categories], dtype=np.uint16)
            Image.fromarray(cat_ids[result.semantic.numpy()]).save(self.out_dir / "semantic" / f"{name}.png")
        return name

    def close(self) -> Path:
        categories = [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
                      for c in self.categories]
        data = {"images": self.images, "annotations": self.annotations, "categories": categories}
        tmp = self.json_path.with_name(self.json_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.json_path)
        return self.json_path


@dataclass
class PredictSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    json_path: Path | None = None


def predict_files(predictor: Predictor, paths: Sequence[Path], out_dir: Path, batch_size: int = 1,
                  overlays: bool = True, semantic: bool = False, progress: bool = True,
                  on_skip: Callable[[Path, str], None] | None = None) -> PredictSummary:
    """Predict every readable image of ``paths`` (``batch_size`` per forward pass) and write the outputs.

    Files that cannot be read as images are skipped and reported through ``on_skip`` (and the summary).
    """
    from tqdm.auto import tqdm

    writer = PredictionWriter(Path(out_dir), predictor.categories, overlays=overlays, semantic=semantic)
    summary = PredictSummary()
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        results = predictor.predict_tensors([t for _, t in pending])
        for (path, tensor), res in zip(pending, results):
            summary.written.append(writer.add(path, tensor, res))
        bar.update(len(pending))
        pending.clear()

    try:
        for path in paths:
            try:
                tensor = load_image(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                summary.skipped.append((str(path), reason))
                if on_skip is not None:
                    on_skip(path, reason)
                bar.update(1)
                continue
            pending.append((path, tensor))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
    summary.json_path = writer.close()
    return summary

