"""A tiny nano model with random but decisive weights, and its checkpoint, for inference tests."""

from __future__ import annotations

from pathlib import Path

import torch

from remax.checkpoint import categories_to_state, save_checkpoint
from remax.config import Config, get_config
from remax.models import build_model
from remax.models.heads import KMaXPredictor
from remax.structures import CategoryInfo

INPUT = (129, 129)
CATEGORIES = [CategoryInfo(id=10 + i, name=f"class{i}", isthing=i < 5, color=(20 * i, 255 - 20 * i, 100))
              for i in range(9)]


def nano_config() -> Config:
    cfg = get_config("nano")
    cfg.model.input_size = INPUT
    cfg.data.crop_size = INPUT
    # Random heads are unsure of every class: accept any class score so that segments appear.
    cfg.eval.thing_threshold = 0.0
    cfg.eval.stuff_threshold = 0.0
    return cfg


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the random mask/class heads so that masks pass the 0.4 pixel threshold and classes differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, KMaXPredictor):
                mod.mask_bn.weight.fill_(20.0)
                mod.class_head.weight.copy_(torch.randn(mod.class_head.weight.shape, generator=g) * 2.0)
    return model


def nano_model(cfg: Config, with_training_heads: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return sharpen(build_model(cfg.model, with_training_heads=with_training_heads)).eval()


def write_checkpoint(path: Path, cfg: Config | None = None) -> Path:
    """A training-style checkpoint (training heads included) the way the trainer writes one."""
    cfg = cfg or nano_config()
    model = nano_model(cfg, with_training_heads=True)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "categories": categories_to_state(CATEGORIES)}
    return save_checkpoint(path, state)


def gt_images() -> list[dict]:
    """Two small ground-truth images in COCO-panoptic form (ids as panopticapi's IdGenerator makes them)."""
    import numpy as np

    out = []
    # Image 1 (integer id 1): sky (stuff 15) above road (stuff 16), a person (thing 10), a car (thing 11),
    # a void band and a crowd of people.
    ids = np.zeros((24, 32), np.int64)
    ids[:10] = 3937500
    ids[12:] = 1234567
    ids[8:20, 3:9] = 2000001
    ids[14:20, 15:26] = 2000002
    ids[20:24, 28:32] = 2000003
    segs = [{"id": 3937500, "category_id": 15, "iscrowd": 0}, {"id": 1234567, "category_id": 16, "iscrowd": 0},
            {"id": 2000001, "category_id": 10, "iscrowd": 0}, {"id": 2000002, "category_id": 11, "iscrowd": 0},
            {"id": 2000003, "category_id": 10, "iscrowd": 1}]
    out.append({"image_id": 1, "name": "000000000001", "ids": ids, "segments": segs})
    # Image 2 (string id): two people on a road.
    ids = np.full((20, 28), 7, np.int64)
    ids[2:10, 2:10] = 8
    ids[5:15, 15:25] = 9
    segs = [{"id": 7, "category_id": 16, "iscrowd": 0}, {"id": 8, "category_id": 10, "iscrowd": 0},
            {"id": 9, "category_id": 10, "iscrowd": 0}]
    out.append({"image_id": "street_a", "name": "street_a", "ids": ids, "segments": segs})
    return out


def write_panoptic_set(json_path: Path, png_dir: Path, images: list[dict], with_area: bool = True) -> None:
    """Write COCO-panoptic JSON + PNGs (categories = CATEGORIES) for ``images`` as made by :func:`gt_images`."""
    import json

    from remax.evaluation import write_panoptic_png

    png_dir.mkdir(parents=True, exist_ok=True)
    anns, imgs = [], []
    for im in images:
        write_panoptic_png(png_dir / f"{im['name']}.png", im["ids"])
        segs = []
        for s in im["segments"]:
            s = dict(s)
            if with_area:
                s["area"] = int((im["ids"] == s["id"]).sum())
            segs.append(s)
        h, w = im["ids"].shape
        imgs.append({"id": im["image_id"], "file_name": f"{im['name']}.png", "height": h, "width": w})
        anns.append({"image_id": im["image_id"], "file_name": f"{im['name']}.png", "segments_info": segs})
    cats = [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)} for c in CATEGORIES]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))


def write_gt_root(root: Path, split: str = "val") -> list[dict]:
    """A COCO-layout data set: annotations JSON + PNGs and RGB pictures under ROOT/split."""
    import numpy as np
    from PIL import Image

    images = gt_images()
    write_panoptic_set(root / "annotations" / f"panoptic_{split}.json", root / "annotations" / f"panoptic_{split}",
                       images)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        h, w = im["ids"].shape
        # Colour by segment so the picture has structure, plus noise.
        base = (im["ids"] * 2654435761 % 251).astype(np.int64)
        rgb = np.stack([base, (base * 3) % 256, (base * 7) % 256], axis=-1) + rng.integers(-15, 16, (h, w, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / split / f"{im['name']}.png")
    return images
