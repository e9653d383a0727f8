"""Instance mask AP with the COCO protocol (pycocotools ``COCOeval``, ``iouType="segm"``), built in memory."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from remax.evaluation.panoptic_quality import normalize_categories

logger = logging.getLogger(__name__)

# COCOeval.stats, in order.
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
              "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean ``H×W`` mask as a COCO RLE (the form pycocotools reads)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


class InstanceAP:
    """Collects thing ground truth and scored instance masks per image, then runs COCOeval once.

    Only thing categories are evaluated; GT crowd segments become COCO ``iscrowd`` annotations (matched without
    penalty), stuff segments and predictions of stuff categories are skipped. GT areas (used for the
    small/medium/large ranges) are pixel counts.
    """

    def __init__(self, categories: Any) -> None:
        self.categories = normalize_categories(categories)
        self.thing_ids = [c for c, info in self.categories.items() if info["isthing"] == 1]
        self._images: dict[Any, dict[str, Any]] = {}
        self._gt: list[dict[str, Any]] = []
        self._dt: list[dict[str, Any]] = []

    def reset(self) -> None:
        self._images.clear()
        self._gt.clear()
        self._dt.clear()

    def _register_image(self, image_id: Any, shape: tuple[int, ...]) -> None:
        h, w = int(shape[-2]), int(shape[-1])
        info = self._images.setdefault(image_id, {"id": image_id, "height": h, "width": w})
        if (info["height"], info["width"]) != (h, w):
            raise ValueError(f"image {image_id!r}: masks are {h}×{w} but the image was registered as "
                             f"{info['height']}×{info['width']}")

    def add_ground_truth(self, image_id: Any, gt_id_map: Any, gt_segments: Sequence[dict[str, Any]]) -> None:
        """Add the thing segments of one GT image (``segments_info`` with ``id``, ``category_id``, ``iscrowd``)."""
        id_map = _numpy(gt_id_map)
        if id_map.ndim != 2:
            raise ValueError(f"image {image_id!r}: ground-truth id map must be H×W, got {id_map.shape}")
        self._register_image(image_id, id_map.shape)
        for seg in gt_segments:
            cid = int(seg["category_id"])
            if cid not in self.categories:
                raise ValueError(f"image {image_id!r}: ground-truth segment {seg['id']} has unknown category_id "
                                 f"{cid}")
            if self.categories[cid]["isthing"] != 1:
                continue
            mask = id_map == int(seg["id"])
            if not mask.any():
                continue
            rle = encode_mask(mask)
            self._gt.append({
                "id": len(self._gt) + 1, "image_id": image_id, "category_id": cid, "segmentation": rle,
                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": int(int(seg.get("iscrowd", 0)) == 1),
            })

    def add_prediction(self, image_id: Any, masks: Any, scores: Any, category_ids: Any) -> None:
        """Add one image's predicted instances: boolean masks ``N×H×W``, scores ``N``, data-set category ids ``N``."""
        m = _numpy(masks).astype(bool, copy=False)
        s = _numpy(scores).reshape(-1)
        c = _numpy(category_ids).reshape(-1)
        if m.ndim != 3:
            raise ValueError(f"image {image_id!r}: predicted masks must be N×H×W, got {m.shape}")
        if not (len(m) == len(s) == len(c)):
            raise ValueError(f"image {image_id!r}: {len(m)} masks, {len(s)} scores, {len(c)} category ids")
        self._register_image(image_id, m.shape)
        for mask, score, cid in zip(m, s, c):
            cid = int(cid)
            if cid not in self.categories:
                raise ValueError(f"image {image_id!r}: predicted instance has unknown category_id {cid}")
            if self.categories[cid]["isthing"] != 1 or not mask.any():
                continue
            rle = encode_mask(mask)
            self._dt.append({
                "id": len(self._dt) + 1, "image_id": image_id, "category_id": cid, "segmentation": rle,
                "score": float(score), "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": 0,
            })

    def compute(self) -> dict[str, Any]:
        """COCO mask AP/AR as fractions (keys ``ap, ap50, ap75, ap_small, …, ar100, …``) and ``per_class`` AP.

        A value COCOeval leaves undefined (-1: no GT in that range, or no thing category / no GT at all) is
        reported as ``None``.
        """
        empty = {name: None for name in STAT_NAMES} | {"per_class": {}}
        if not self.thing_ids:
            logger.warning("instance AP: no thing category, nothing to evaluate")
            return empty
        if not self._gt:
            logger.warning("instance AP: no thing ground truth was added; AP is undefined")
            return empty
        cats = [{"id": c, "name": self.categories[c]["name"]} for c in self.thing_ids]
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            gt = COCO()
            gt.dataset = {"images": list(self._images.values()), "annotations": self._gt, "categories": cats}
            gt.createIndex()
            dt = COCO()
            dt.dataset = {"images": list(self._images.values()), "annotations": self._dt, "categories": cats}
            dt.createIndex()
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.imgIds = sorted(self._images, key=str)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out: dict[str, Any] = {name: (float(v) if v >= 0 else None) for name, v in zip(STAT_NAMES, ev.stats)}
        # precision: [T (IoU thresholds), R (recall points), K (categories), A (area ranges), M (max dets)]
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cid in enumerate(ev.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            per_class[cid] = float(p.mean()) if p.size else None
        out["per_class"] = per_class
        return out
