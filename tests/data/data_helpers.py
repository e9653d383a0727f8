"""Small hand-made COCO-panoptic data sets for the data tests, written with our own id encoding (not remax's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# JSON order interleaves stuff and things on purpose, with non-contiguous ids: training order must become
# things first (in JSON order: 7 "cat", 3 "dog"), then stuff (20 "floor", 5 "wall").
CATEGORIES = [
    {"id": 20, "name": "floor", "isthing": 0, "color": [10, 200, 10]},
    {"id": 7, "name": "cat", "isthing": 1, "color": [200, 10, 10]},
    {"id": 5, "name": "wall", "isthing": 0, "color": [10, 10, 200]},
    {"id": 3, "name": "dog", "isthing": 1, "color": [200, 200, 10]},
]


def encode_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids -> RGB, written out here independently of remax.data.io."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def scene(h: int = 24, w: int = 32, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """An id map with wall (top), floor (bottom), two cats, a dog, a crowd of dogs and void pixels.

    Ids are large so that all three colour channels are used.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((h, w), np.int64)
    ids[: h // 2] = 70001  # wall
    ids[h // 2:] = 300  # floor
    y, x = int(rng.integers(1, h - 8)), int(rng.integers(1, w // 2 - 6))
    ids[y:y + 6, x:x + 5] = 65536 * 2 + 5  # cat 1
    ids[2:6, w - 8:w - 3] = 1000  # cat 2
    ids[h - 6:h - 2, w // 2:w // 2 + 4] = 12  # dog
    ids[h - 3:h, w - 6:w] = 999  # crowd of dogs
    ids[0, :3] = 0  # void
    segs = [(70001, 5, 0), (300, 20, 0), (65536 * 2 + 5, 7, 0), (1000, 7, 0), (12, 3, 0), (999, 3, 1)]
    segments = [{"id": sid, "category_id": cat, "iscrowd": crowd, "area": int((ids == sid).sum()),
                 "bbox": [0, 0, 1, 1]} for sid, cat, crowd in segs]
    return ids, segments


def image_for(ids: np.ndarray) -> np.ndarray:
    """A photo whose colour is a function of the segment (so pixels can be traced through transforms)."""
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    for k, v in enumerate(np.unique(ids)):
        rgb[ids == v] = ((37 * k + 20) % 256, (91 * k + 50) % 256, (53 * k + 90) % 256)
    return rgb


def write_dataset(root: Path, split: str = "train", n: int = 3, string_ids: bool = False,
                  ext: str = "png", size: tuple[int, int] = (24, 32)) -> dict:
    """A COCO-layout split under ``root``; returns the JSON written."""
    img_dir = root / split
    png_dir = root / "annotations" / f"panoptic_{split}"
    img_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        ids, segments = scene(*size, seed=i)
        image_id = f"img-{i}" if string_ids else 100 + i
        name = f"sub/photo_{i}" if i == 1 else f"photo_{i}"  # one image in a sub-folder
        (img_dir / name).parent.mkdir(parents=True, exist_ok=True)
        options = {"quality": 100, "subsampling": 0} if ext == "jpg" else {}
        Image.fromarray(image_for(ids)).save(img_dir / f"{name}.{ext}", **options)
        Image.fromarray(encode_rgb(ids)).save(png_dir / f"pan_{i}.png")
        images.append({"id": image_id, "file_name": f"{name}.{ext}", "height": size[0], "width": size[1]})
        anns.append({"image_id": image_id, "file_name": f"pan_{i}.png", "segments_info": segments})
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(data))
    return data
