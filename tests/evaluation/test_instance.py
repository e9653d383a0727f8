"""InstanceAP equals pycocotools' COCOeval run directly on the same RLEs; edge cases behave clearly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from remax.evaluation import InstanceAP

CATS = {1: {"name": "person", "isthing": 1}, 2: {"name": "car", "isthing": 1}, 10: {"name": "sky", "isthing": 0}}


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def fixture():
    """Two 40×48 images: GT things (one crowd) and stuff; scored predictions, some good, some poor."""
    h, w = 40, 48
    images = []
    gt0 = np.zeros((h, w), dtype=np.int64)
    gt0[:10] = 1  # sky
    gt0[12:30, 2:14] = 2  # person
    gt0[12:30, 20:30] = 3  # person
    gt0[32:40, 30:46] = 4  # car
    gt0[2:8, 36:46] = 5  # person crowd
    segs0 = [{"id": 1, "category_id": 10, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
             {"id": 3, "category_id": 1, "iscrowd": 0}, {"id": 4, "category_id": 2, "iscrowd": 0},
             {"id": 5, "category_id": 1, "iscrowd": 1}]
    preds0 = [(box(h, w, 12, 30, 2, 13), 0.9, 1), (box(h, w, 14, 30, 22, 30), 0.6, 1),
              (box(h, w, 30, 40, 28, 46), 0.8, 2), (box(h, w, 2, 8, 36, 44), 0.7, 1),
              (box(h, w, 0, 6, 0, 6), 0.95, 1), (box(h, w, 0, 10, 0, 48), 0.99, 10)]
    images.append((gt0, segs0, preds0))
    gt1 = np.zeros((h, w), dtype=np.int64)
    gt1[5:25, 5:25] = 7  # car
    gt1[26:36, 30:44] = 9  # person
    segs1 = [{"id": 7, "category_id": 2, "iscrowd": 0}, {"id": 9, "category_id": 1, "iscrowd": 0}]
    preds1 = [(box(h, w, 5, 25, 5, 22), 0.5, 2), (box(h, w, 26, 36, 30, 44), 0.3, 2),
              (box(h, w, 26, 36, 32, 44), 0.4, 1)]
    images.append((gt1, segs1, preds1))
    return images


def pycocotools_direct(images):
    """Build the COCO GT/result structures by hand from the same masks and run COCOeval."""
    gt_anns, results, imgs = [], [], []
    for image_id, (gt, segs, preds) in enumerate(images):
        imgs.append({"id": image_id, "height": gt.shape[0], "width": gt.shape[1]})
        for s in segs:
            if CATS[s["category_id"]]["isthing"]:
                rle = mask_utils.encode(np.asfortranarray((gt == s["id"]).astype(np.uint8)))
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": s["category_id"],
                                "segmentation": rle, "area": float(mask_utils.area(rle)), "iscrowd": s["iscrowd"],
                                "bbox": list(mask_utils.toBbox(rle))})
        for m, score, cid in preds:
            if CATS[cid]["isthing"]:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                results.append({"image_id": image_id, "category_id": cid, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": imgs, "annotations": gt_anns,
                           "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def run_ours(images, as_tensor=False):
    metric = InstanceAP(CATS)
    for image_id, (gt, segs, preds) in enumerate(images):
        metric.add_ground_truth(image_id, torch.from_numpy(gt) if as_tensor else gt, segs)
        masks = np.stack([m for m, _, _ in preds])
        scores = [s for _, s, _ in preds]
        cids = [c for _, _, c in preds]
        if as_tensor:
            masks, scores, cids = torch.from_numpy(masks), torch.tensor(scores), torch.tensor(cids)
        metric.add_prediction(image_id, masks, scores, cids)
    return metric.compute()


def test_ap_equals_pycocotools_direct(capsys):
    images = fixture()
    ours = run_ours(images, as_tensor=True)
    assert capsys.readouterr().out == ""  # COCOeval's prints are swallowed
    stats = pycocotools_direct(images)
    keys = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
            "ar_medium", "ar_large"]
    for key, ref in zip(keys, stats):
        if ref < 0:
            assert ours[key] is None, key
        else:
            assert ours[key] == pytest.approx(ref, abs=1e-12), key
    assert 0.2 < ours["ap"] < 0.9  # a non-trivial fixture: neither perfect nor empty
    assert set(ours["per_class"]) == {1, 2}


def test_perfect_predictions_give_ap_1_and_no_predictions_give_0():
    gt = np.zeros((20, 20), dtype=np.int64)
    gt[2:12, 2:12] = 3
    segs = [{"id": 3, "category_id": 2, "iscrowd": 0}]
    metric = InstanceAP(CATS)
    metric.add_ground_truth("a", gt, segs)
    assert metric.compute()["ap"] == 0.0  # GT but no predictions: every GT missed
    metric.add_prediction("a", (gt == 3)[None], [0.9], [2])
    out = metric.compute()
    assert out["ap"] == pytest.approx(1.0) and out["ap50"] == pytest.approx(1.0)
    assert out["per_class"] == {1: None, 2: pytest.approx(1.0)}


def test_no_things_or_no_gt_is_undefined_not_an_error():
    stuff_only = InstanceAP({10: {"name": "sky", "isthing": 0}})
    out = stuff_only.compute()
    assert out["ap"] is None and out["per_class"] == {}
    empty = InstanceAP(CATS)
    empty.add_prediction(0, np.ones((1, 4, 4), bool), [0.5], [1])
    assert empty.compute()["ap"] is None


def test_bad_input_raises():
    metric = InstanceAP(CATS)
    with pytest.raises(ValueError, match="unknown category_id 99"):
        metric.add_prediction(0, np.ones((1, 4, 4), bool), [0.5], [99])
    with pytest.raises(ValueError, match="1 masks, 2 scores"):
        metric.add_prediction(0, np.ones((1, 4, 4), bool), [0.5, 0.1], [1])
    metric.add_ground_truth(1, np.zeros((4, 4), int), [])
    with pytest.raises(ValueError, match="registered as 4×4"):
        metric.add_prediction(1, np.ones((1, 5, 4), bool), [0.5], [1])
