"""evaluate_files / evaluate_model on tiny COCO-panoptic fixtures with known answers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from inference_helpers import CATEGORIES, gt_images, nano_config, nano_model, write_gt_root, write_panoptic_set

from remax.data.coco_panoptic import COCOPanopticDataset
from remax.engine.evaluate import evaluate_files, evaluate_model, format_result, result_to_json
from remax.evaluation import pq_compute_files


def test_predictions_equal_to_ground_truth_score_one(tmp_path):
    images = gt_images()
    write_panoptic_set(tmp_path / "gt.json", tmp_path / "gt", images)
    preds = copy.deepcopy(images)
    for im in preds:  # predictions have no areas / iscrowd (scores are optional); crowd regions left void
        for s in im["segments"]:
            if s["iscrowd"]:
                im["ids"][im["ids"] == s["id"]] = 0
        im["segments"] = [{"id": s["id"], "category_id": s["category_id"]} for s in im["segments"]
                          if not s["iscrowd"]]
    write_panoptic_set(tmp_path / "pred.json", tmp_path / "pred", preds, with_area=False)
    result = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", progress=False)
    pq = result["pq"]
    for split, n in (("All", 4), ("Things", 2), ("Stuff", 2)):
        assert pq[split]["pq"] == pytest.approx(1.0) and pq[split]["n"] == n
    assert pq["per_class"][10]["tp"] == 3 and pq["per_class"][11]["tp"] == 1
    # mIoU over the classes present: every non-void GT pixel of a class is predicted as it; the crowd pixels
    # (class 10 in GT, void in the prediction) are misses: IoU(10) = 8·8+10·10+12·6 / (that + 16).
    person = 64 + 100 + 72
    assert result["miou"] == pytest.approx((1 + 1 + 1 + person / (person + 16)) / 4)
    assert result["ap"] == pytest.approx(1.0)
    assert result["num_images"] == 2


def test_known_pq_and_agreement_with_file_evaluation(tmp_path):
    images = gt_images()
    write_panoptic_set(tmp_path / "gt.json", tmp_path / "gt", images)
    preds = copy.deepcopy(images)
    # Image 1: the person is called a car (person FN, car FP); the crowd stays out of the prediction.
    preds[0]["segments"] = [dict(s) for s in preds[0]["segments"] if not s["iscrowd"]]
    preds[0]["ids"][preds[0]["ids"] == 2000003] = 0
    preds[0]["segments"][2]["category_id"] = 11
    # Image 2: the second person shrunk to 40 of its 100 pixels (IoU 0.4 -> FN + FP for class 10).
    preds[1]["ids"][preds[1]["ids"] == 9] = 7
    preds[1]["ids"][5:9, 15:25] = 9
    write_panoptic_set(tmp_path / "pred.json", tmp_path / "pred", preds, with_area=False)
    result = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", compute_ap=False, progress=False)
    pc = result["pq"]["per_class"]
    assert (pc[10]["tp"], pc[10]["fp"], pc[10]["fn"]) == (1, 1, 2)
    assert (pc[11]["tp"], pc[11]["fp"], pc[11]["fn"]) == (1, 1, 0)
    assert pc[15]["tp"] == 1 and pc[16]["tp"] == 2
    # The road of image 2 grew by the 60 pixels taken from the person: IoU 456/516 there, 1.0 in image 1.
    road_iou = 1.0 + (20 * 28 - 64 - 100) / (20 * 28 - 64 - 40)
    assert pc[16]["iou"] == pytest.approx(road_iou)
    expected_things = (1.0 / (1 + 0.5 + 1.0) + 1.0 / (1 + 0.5)) / 2
    assert result["pq"]["Things"]["pq"] == pytest.approx(expected_things)
    assert result["pq"]["Stuff"]["pq"] == pytest.approx((1.0 + road_iou / 2) / 2)
    # The same numbers as the evaluation package's file path (itself checked against panopticapi).
    reference = pq_compute_files(tmp_path / "gt.json", None, tmp_path / "pred.json", None)
    for split in ("All", "Things", "Stuff"):
        assert result["pq"][split] == pytest.approx(reference[split])
    # mIoU from the id maps against an independent numpy computation.
    lut = {c.id: i for i, c in enumerate(CATEGORIES)}
    inter, union = np.zeros(9), np.zeros(9)
    for gt, pr in zip(images, preds):
        def sem(im):
            out = np.full(im["ids"].shape, -1)
            for s in im["segments"]:
                out[im["ids"] == s["id"]] = lut[s["category_id"]]
            return out
        g, p = sem(gt), sem(pr)
        valid = g >= 0
        for c in range(9):
            inter[c] += np.sum((g == c) & (p == c) & valid)
            union[c] += np.sum(((g == c) | (p == c)) & valid)
    assert result["miou"] == pytest.approx(np.mean(inter[union > 0] / union[union > 0]))
    # Output formats.
    js = result_to_json(result)
    assert set(js) >= {"All", "Things", "Stuff", "per_class", "miou", "ap"}
    assert js["ap"] is None and js["All"]["n"] == 4
    table = format_result(result)
    assert "Things" in table and "mIoU" in table and "class0" in table


def test_missing_prediction_is_an_error(tmp_path):
    images = gt_images()
    write_panoptic_set(tmp_path / "gt.json", tmp_path / "gt", images)
    write_panoptic_set(tmp_path / "pred.json", tmp_path / "pred", images[:1])
    with pytest.raises(ValueError, match="street_a"):
        evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", progress=False)


def test_evaluate_model_runs_and_is_consistent(tmp_path):
    write_gt_root(tmp_path / "data")
    cfg = nano_config()
    model = nano_model(cfg)
    dataset = COCOPanopticDataset.from_root(tmp_path / "data", "val")
    result = evaluate_model(model, dataset, cfg, CATEGORIES, progress=False, num_workers=0)
    assert result["num_images"] == 2
    for split in ("All", "Things", "Stuff"):
        assert 0.0 <= result["pq"][split]["pq"] <= 1.0
    assert 0.0 <= result["miou"] <= 1.0
    assert result["ap"] is None or 0.0 <= result["ap"] <= 1.0
    once = evaluate_model(model, dataset, cfg, CATEGORIES, max_images=1, progress=False, num_workers=0)
    assert once["num_images"] == 1
    # Categories the data set does not know are refused up front.
    from remax.structures import CategoryInfo

    other = [CategoryInfo(id=100 + i, name="x", isthing=True) for i in range(9)]
    with pytest.raises(ValueError, match="category ids"):
        evaluate_model(model, dataset, cfg, other, progress=False, num_workers=0)
