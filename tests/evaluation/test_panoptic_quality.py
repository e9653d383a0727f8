"""PanopticQuality: hand-computed rule cases, parity with panopticapi and hotcoco, file path, errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from pq_fixtures import (
    CATEGORIES,
    assert_same_stats,
    hotcoco_result,
    hotcoco_stats,
    ours_stats,
    panopticapi_stats,
    random_cases,
    write_dataset,
)

from remax.evaluation import PanopticQuality, format_pq_table, pq_compute_files


def seg(sid, cat, area=None, crowd=0):
    d = {"id": sid, "category_id": cat, "iscrowd": crowd}
    if area is not None:
        d["area"] = area
    return d


def area_of(m, sid):
    return int((m == sid).sum())


def case_crowd():
    """Two person crowds (only the last one absorbs predictions), a car, sky."""
    gt = np.full((10, 20), 5)
    gt[0:5, 0:4] = 7  # person crowd, listed first
    gt[5:10, 0:4] = 8  # person crowd, listed last: the category's crowd region
    gt[0:4, 10:15] = 9  # car
    pred = np.full((10, 20), 35)  # sky
    pred[5:10, 0:3] = 31  # person inside the last crowd: ignored
    pred[0:5, 0:3] = 32  # person inside the first crowd: a false positive (panopticapi keeps only the last)
    pred[0:4, 10:15] = 33  # car, exact
    pred[5:10, 3] = 34  # car inside a person crowd: a false positive
    gt_segs = [seg(5, 10, area_of(gt, 5)), seg(7, 1, 20, 1), seg(8, 1, 20, 1), seg(9, 2, 20)]
    pred_segs = [seg(31, 1), seg(32, 1), seg(33, 2), seg(34, 2), seg(35, 10)]
    return gt, gt_segs, pred, pred_segs


def case_void():
    """GT void is removed from the union, predicted void inside a GT segment is not; the 0.5 ignore test."""
    gt = np.zeros((10, 20), dtype=np.int64)
    gt[:, 10:20] = 1  # road, 100 px
    gt[0:2, 0:5] = 2  # person, 10 px
    gt[4:6, 0:5] = 3  # car, 10 px
    pred = np.zeros((10, 20), dtype=np.int64)
    pred[:, 10:20] = 13
    pred[0:2, 0:3] = 11  # person: 6 px inside the GT person ...
    pred[2, 0:4] = 11  # ... + 4 px on GT void; union = 10 + 10 - 6 - 4 = 10 -> IoU 0.6
    pred[4:6, 0:3] = 12  # car: 6 px, the rest of the GT car predicted void -> union 10, IoU 0.6
    pred[7:10, 0:3] = 14  # person entirely on void: ignored
    pred[8:10, 8:12] = 15  # car, half on void, half on road: 4/8 = 0.5 is not > 0.5 -> FP
    gt_segs = [seg(1, 11, 100), seg(2, 1, 10), seg(3, 2, 10)]
    pred_segs = [seg(11, 1), seg(12, 2), seg(13, 11), seg(14, 1), seg(15, 2)]
    return gt, gt_segs, pred, pred_segs


def case_half():
    """IoU exactly 0.5 (no match, also through the void term) and just above."""
    gt = np.zeros((10, 20), dtype=np.int64)
    gt[0:2, 0:4] = 1  # person 8 px
    gt[4, 0:9] = 2  # car 9 px
    gt[7, 0:10] = 3  # car 10 px
    pred = np.zeros((10, 20), dtype=np.int64)
    pred[0, 0:4] = 21  # 4/8 = 0.5: FN + FP
    pred[4, 0:5] = 22  # 5/9 > 0.5: TP
    pred[7, 0:5] = 23  # 5 px inside ...
    pred[8, 0:3] = 23  # ... + 3 on void: union = 8 + 10 - 5 - 3 = 10 -> 0.5: FN, and 3/8 void -> FP
    gt_segs = [seg(1, 1, 8), seg(2, 2, 9), seg(3, 2, 10)]
    pred_segs = [seg(21, 1), seg(22, 2), seg(23, 2)]
    return gt, gt_segs, pred, pred_segs


def case_split_stuff():
    gt = np.ones((10, 20), dtype=np.int64)
    gt[5:] = 2
    pred = np.full((10, 20), 31)
    pred[3:5] = 32  # sky split 60 + 40: one TP (IoU 0.6), one FP
    pred[5:] = 33
    return gt, [seg(1, 10, 100), seg(2, 11, 100)], pred, [seg(31, 10), seg(32, 10), seg(33, 11)]


def case_stale_area():
    gt = np.zeros((10, 20), dtype=np.int64)
    gt[0:2, 0:5] = 1  # person, 10 px, JSON says 20: union 20 -> IoU 0.5 -> FN + FP
    gt[4:6, 0:5] = 2  # car, 10 px, JSON says 4: pred 6 px inside -> union 4 -> IoU 1.5
    gt[7:10] = 3  # sky 60 px
    pred = np.zeros((10, 20), dtype=np.int64)
    pred[0:2, 0:5] = 41
    pred[4:6, 0:3] = 42
    pred[7:10] = 43
    return gt, [seg(1, 1, 20), seg(2, 2, 4), seg(3, 10, 60)], pred, [seg(41, 1), seg(42, 2), seg(43, 10)]


RULE_CASES = [case_crowd, case_void, case_half, case_split_stuff, case_stale_area]

# Hand-computed per-category (tp, fp, fn, iou sum) over RULE_CASES.
EXPECTED = {
    1: (1, 3, 2, 0.6),  # person: crowd FP; void TP 0.6; 0.5 -> FP+FN; stale -> FP+FN
    2: (4, 3, 1, 1.0 + 0.6 + 5 / 9 + 1.5),  # car
    3: (0, 0, 0, 0.0),  # bicycle: absent everywhere
    10: (3, 1, 0, 140 / 145 + 0.6 + 1.0),  # sky
    11: (2, 0, 0, 0.96 + 1.0),  # road
    12: (0, 0, 0, 0.0),  # grass: absent everywhere
}


def make_cases(fns):
    return [f() for f in fns]


def evaluate_in_memory(cases, categories=CATEGORIES, as_tensor=False):
    metric = PanopticQuality({c["id"]: c for c in categories})
    for i, (gt, gt_segs, pred, pred_segs) in enumerate(copy.deepcopy(cases)):
        if as_tensor:
            gt, pred = torch.from_numpy(gt), torch.from_numpy(pred)
        metric.update(gt, gt_segs, pred, pred_segs, image_id=i)
    return metric


def test_rule_cases_hand_computed_and_both_oracles(tmp_path):
    cases = make_cases(RULE_CASES)
    result = evaluate_in_memory(cases).compute()
    ours = ours_stats(result)
    for cid, (tp, fp, fn, iou) in EXPECTED.items():
        assert ours[cid][:3] == (tp, fp, fn), cid
        assert ours[cid][3] == pytest.approx(iou, abs=1e-12), cid

    paths = write_dataset(tmp_path, cases)
    assert_same_stats(ours, panopticapi_stats(paths), label="panopticapi")
    assert_same_stats(ours, hotcoco_stats(paths), label="hotcoco")

    # Averages: absent categories (3, 12) are left out, so n = 4 of 6.
    per = {c: (iou / (tp + 0.5 * fp + 0.5 * fn), iou / tp, tp / (tp + 0.5 * fp + 0.5 * fn))
           for c, (tp, fp, fn, iou) in EXPECTED.items() if tp + fp + fn}
    for split, members in (("All", [1, 2, 10, 11]), ("Things", [1, 2]), ("Stuff", [10, 11])):
        assert result[split]["n"] == len(members)
        for k, name in enumerate(("pq", "sq", "rq")):
            assert result[split][name] == pytest.approx(np.mean([per[c][k] for c in members]), abs=1e-12)
    assert result["per_class"][10]["pq"] == pytest.approx((140 / 145 + 0.6 + 1.0) / 3.5)
    assert result["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0, "iou": 0.0,
                                      "name": "bicycle", "isthing": True}
    # The same numbers as hotcoco's averages (its -1.0 convention only concerns absent categories / empty splits).
    hc = hotcoco_result(paths)
    for split in ("All", "Things", "Stuff"):
        for k in ("pq", "sq", "rq", "n"):
            assert result[split][k] == pytest.approx(hc[split][k], abs=1e-12)


def test_split_stuff_pq_is_0_4():
    result = evaluate_in_memory([case_split_stuff()]).compute()
    assert result["per_class"][10]["pq"] == pytest.approx(0.4)
    assert result["per_class"][11]["pq"] == 1.0


def test_empty_things_split_reports_zero_with_n_0(tmp_path):
    cases = [case_split_stuff()]
    result = evaluate_in_memory(cases).compute()
    assert result["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert result["Stuff"]["n"] == 2 and result["All"]["n"] == 2
    assert result["All"]["pq"] == pytest.approx((0.4 + 1.0) / 2)
    paths = write_dataset(tmp_path, cases)
    assert_same_stats(ours_stats(result), panopticapi_stats(paths), label="panopticapi")
    assert_same_stats(ours_stats(result), hotcoco_stats(paths), label="hotcoco")
    assert hotcoco_result(paths)["Things"]["n"] == 0
    # Stuff-only categories: Things has no category at all.
    stuff = [c for c in CATEGORIES if not c["isthing"]]
    result = evaluate_in_memory(cases, categories=stuff).compute()
    assert result["Things"]["n"] == 0 and result["Things"]["pq"] == 0.0


def test_random_perturbed_pairs_match_both_oracles(tmp_path):
    cases = random_cases(60, seed=1)
    ours = ours_stats(evaluate_in_memory(cases).compute())
    # The perturbations must actually exercise every outcome.
    totals = np.sum([v[:3] for v in ours.values()], axis=0)
    assert (totals > 20).all(), totals
    paths = write_dataset(tmp_path, cases)
    api = panopticapi_stats(paths)
    assert_same_stats(ours, api, label="panopticapi")
    # Same per-image order as panopticapi: the IoU sums agree to the last bit.
    assert all(ours[c][3] == api[c][3] for c in api)
    assert_same_stats(ours, hotcoco_stats(paths), label="hotcoco")


def test_in_memory_equals_file_path(tmp_path):
    cases = make_cases(RULE_CASES) + random_cases(12, seed=2)
    paths = write_dataset(tmp_path, cases)
    from_files = pq_compute_files(paths["gt_json"], paths["gt_dir"], paths["pred_json"], paths["pred_dir"])
    in_memory = evaluate_in_memory(cases, as_tensor=True).compute()
    assert from_files == in_memory
    # Default folders (JSON path without .json), and the worker-pool path.
    assert pq_compute_files(paths["gt_json"], None, paths["pred_json"], None) == in_memory
    pooled = pq_compute_files(paths["gt_json"], None, paths["pred_json"], None, workers=2)
    assert_same_stats(ours_stats(pooled), ours_stats(in_memory), tol=1e-12)


def test_missing_gt_area_falls_back_to_pixel_count():
    gt, gt_segs, pred, pred_segs = case_split_stuff()
    with_area = evaluate_in_memory([(gt, gt_segs, pred, pred_segs)]).compute()
    no_area = [{k: v for k, v in s.items() if k != "area"} for s in gt_segs]
    without = evaluate_in_memory([(gt, no_area, pred, pred_segs)]).compute()
    assert with_area == without


def test_merge_state_dict_and_reset():
    cases = random_cases(8, seed=3)
    full = evaluate_in_memory(cases)
    a, b = evaluate_in_memory(cases[:5]), evaluate_in_memory(cases[5:])
    a.merge(b)
    assert np.array_equal(a.tp, full.tp) and np.array_equal(a.fp, full.fp) and np.array_equal(a.fn, full.fn)
    np.testing.assert_allclose(a.iou, full.iou, rtol=1e-12)
    assert a.num_images == 8
    restored = PanopticQuality({c["id"]: c for c in CATEGORIES})
    state = full.state_dict()
    restored.load_state_dict(state)
    assert restored.compute() == full.compute()
    other = PanopticQuality({1: {"isthing": 1}})
    with pytest.raises(ValueError, match="categories"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="different categories"):
        other.merge(full)
    full.reset()
    assert full.num_images == 0 and full.compute()["All"]["n"] == 0


def _remap(case, f):
    gt, gt_segs, pred, pred_segs = case
    return (np.where(gt > 0, f(gt), 0), [{**s, "id": int(f(s["id"]))} for s in gt_segs],
            np.where(pred > 0, f(pred), 0), [{**s, "id": int(f(s["id"]))} for s in pred_segs])


@pytest.mark.parametrize(
    "ids",
    [
        lambda x: x * 300,  # ids ≤ 2^16 but too many id pairs for a raw count: lookup table
        lambda x: x + 5_000_000,  # PNG-sized ids: hashed by their low bits
        lambda x: x * 65536 + 77,  # low 16 bits identical for every id: binary-search fallback
    ],
    ids=["lookup", "hash", "search"],
)
def test_every_id_range_gives_the_same_result(ids):
    """The id-densifying paths must agree with the small-id path, including unknown GT ids (ignored) and
    unknown predicted ids (an error)."""
    for make in RULE_CASES:
        case = make()
        gt = case[0].copy()
        gt[-1, -1] = 99  # a GT id that is not in segments_info: ignored
        case = (gt, *case[1:])
        small = evaluate_in_memory([case]).compute()
        assert evaluate_in_memory([_remap(case, ids)]).compute() == small
    gt, gt_segs, pred, pred_segs = _remap(case_split_stuff(), ids)
    pred = pred.copy()
    pred[0, 0] = ids(np.int64(98))
    with pytest.raises(ValueError, match=rf"\[{int(ids(98))}\] are in the id map but not in segments_info"):
        _update(PanopticQuality(CATEGORIES), gt, gt_segs, pred, pred_segs)


def test_gt_ids_missing_from_segments_are_ignored_like_panopticapi(tmp_path):
    gt, gt_segs, pred, pred_segs = case_split_stuff()
    gt = gt.copy()
    gt[0, :5] = 99  # id not in segments_info: neither void nor a segment
    cases = [(gt, gt_segs, pred, pred_segs)]
    ours = ours_stats(evaluate_in_memory(cases).compute())
    assert_same_stats(ours, panopticapi_stats(write_dataset(tmp_path, cases)))


def _update(metric, gt, gt_segs, pred, pred_segs):
    metric.update(gt, gt_segs, pred, pred_segs, image_id="img-7")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c[3].append(seg(77, 10)), r"image 'img-7'.*\[77\] are in segments_info but not in the id map"),
        (lambda c: c[3].pop(), r"image 'img-7'.*\[33\] are in the id map but not in segments_info"),
        (lambda c: c[3][0].update(category_id=999), r"image 'img-7'.*unknown category_id 999"),
        (lambda c: c[1][0].update(category_id=999), r"image 'img-7'.*ground-truth segment 1 has unknown"),
        (lambda c: c[3].append(seg(31, 10)), r"image 'img-7'.*\[31\] appear more than once"),
    ],
)
def test_bad_input_raises_naming_the_image(mutate, message):
    case = list(copy.deepcopy(case_split_stuff()))
    mutate(case)
    with pytest.raises(ValueError, match=message):
        _update(PanopticQuality(CATEGORIES), *case)


def test_size_mismatch_and_dtype_errors():
    gt, gt_segs, pred, pred_segs = case_split_stuff()
    metric = PanopticQuality(CATEGORIES)
    with pytest.raises(ValueError, match=r"image 'img-7'.*10×20 but the prediction is 10×19"):
        _update(metric, gt, gt_segs, pred[:, :19], pred_segs)
    with pytest.raises(ValueError, match="integer dtype"):
        _update(metric, gt.astype(np.float32), gt_segs, pred, pred_segs)
    assert metric.num_images == 0 and metric.tp.sum() == 0  # failed updates leave no partial statistics
    with pytest.raises(ValueError, match="isthing"):
        PanopticQuality({1: {"name": "x"}})


def test_files_missing_prediction_raises(tmp_path):
    paths = write_dataset(tmp_path, [case_split_stuff(), case_half()])
    pred = json.loads(paths["pred_json"].read_text())
    pred["annotations"] = pred["annotations"][:1]
    paths["pred_json"].write_text(json.dumps(pred))
    with pytest.raises(ValueError, match="no prediction for the ground-truth image with image_id 1"):
        pq_compute_files(paths["gt_json"], None, paths["pred_json"], None)


def test_format_pq_table():
    result = evaluate_in_memory(make_cases(RULE_CASES)).compute()
    table = format_pq_table(result)
    assert table.splitlines()[2].split() == ["All", "|", *(f"{100 * result['All'][k]:.2f}" for k in
                                                           ("pq", "sq", "rq")), "4"]
    assert "person" in table and "grass" in table
    assert "person" not in format_pq_table(result, per_class=False)
