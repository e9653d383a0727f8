"""Fixtures for the PQ parity tests: COCO-panoptic PNG + JSON writers (own id→colour code), random GT/prediction
pairs made by perturbing GT, and the two oracles (panopticapi's single-core function and hotcoco)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

# Things 1-3, stuff 10-12; 3 (thing) and 12 (stuff) never appear in the hand-made fixtures.
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "bicycle", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "road", "isthing": 0},
    {"id": 12, "name": "grass", "isthing": 0},
]
THING_IDS = [1, 2, 3]
STUFF_IDS = [10, 11, 12]

Case = tuple[np.ndarray, list[dict[str, Any]], np.ndarray, list[dict[str, Any]]]


def to_png_rgb(id_map: np.ndarray) -> np.ndarray:
    """Written here independently of remax: R = id mod 256, G = (id // 256) mod 256, B = id // 65536."""
    id_map = np.asarray(id_map, dtype=np.int64)
    assert id_map.min() >= 0 and id_map.max() < 256**3
    return np.dstack([id_map % 256, (id_map // 256) % 256, id_map // 65536]).astype(np.uint8)


def write_dataset(root: Path, cases: list[Case], categories: list[dict[str, Any]] = CATEGORIES) -> dict[str, Path]:
    """Write ``cases`` as COCO-panoptic GT and prediction JSON + PNG folders under ``root``."""
    paths = {"gt_json": root / "gt.json", "gt_dir": root / "gt", "pred_json": root / "pred.json",
             "pred_dir": root / "pred"}
    paths["gt_dir"].mkdir(parents=True, exist_ok=True)
    paths["pred_dir"].mkdir(parents=True, exist_ok=True)
    images, gt_anns, pred_anns = [], [], []
    for i, (gt, gt_segs, pred, pred_segs) in enumerate(cases):
        name = f"img{i:04d}"
        Image.fromarray(to_png_rgb(gt)).save(paths["gt_dir"] / f"{name}.png")
        Image.fromarray(to_png_rgb(pred)).save(paths["pred_dir"] / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.jpg", "height": gt.shape[0], "width": gt.shape[1]})
        gt_anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": pred_segs})
    paths["gt_json"].write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": categories}))
    paths["pred_json"].write_text(json.dumps({"annotations": pred_anns}))
    return paths


def panopticapi_stats(paths: dict[str, Path]) -> dict[int, tuple[int, int, int, float]]:
    """Per-category (tp, fp, fn, iou) from panopticapi's own pq_compute_single_core (single process)."""
    from panopticapi.evaluation import pq_compute_single_core

    gt = json.loads(paths["gt_json"].read_text())
    pred = json.loads(paths["pred_json"].read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = pq_compute_single_core(0, pairs, str(paths["gt_dir"]), str(paths["pred_dir"]), categories)
    return {int(c): (int(s.tp), int(s.fp), int(s.fn), float(s.iou)) for c, s in stat.pq_per_cat.items()}


def hotcoco_result(paths: dict[str, Path]) -> dict[str, Any]:
    from hotcoco import panoptic

    with contextlib.redirect_stdout(io.StringIO()):
        ev = panoptic.PanopticEval(str(paths["gt_json"]), str(paths["pred_json"]), gt_folder=str(paths["gt_dir"]),
                                   pred_folder=str(paths["pred_dir"]))
        ev.evaluate()
        return ev.results()


def hotcoco_stats(paths: dict[str, Path]) -> dict[int, tuple[int, int, int, float]]:
    res = hotcoco_result(paths)
    return {int(c): (int(v["tp"]), int(v["fp"]), int(v["fn"]), float(v["iou"])) for c, v in res["per_class"].items()}


def ours_stats(result: dict[str, Any]) -> dict[int, tuple[int, int, int, float]]:
    return {int(c): (v["tp"], v["fp"], v["fn"], v["iou"]) for c, v in result["per_class"].items()}


def assert_same_stats(ours: dict, oracle: dict, tol: float = 1e-9, label: str = "") -> None:
    """Identical TP/FP/FN per category, IoU sums within ``tol``; categories the oracle never saw must be empty."""
    for cid, (tp, fp, fn, iou) in ours.items():
        o = oracle.get(cid, (0, 0, 0, 0.0))
        assert (tp, fp, fn) == o[:3], f"{label} category {cid}: ours tp/fp/fn {(tp, fp, fn)} vs oracle {o[:3]}"
        assert abs(iou - o[3]) <= tol, f"{label} category {cid}: IoU sum {iou!r} vs oracle {o[3]!r}"
    for cid, o in oracle.items():
        assert cid in ours or o[:3] == (0, 0, 0), f"{label} oracle has stats for unknown category {cid}"


# ---------------------------------------------------------------------------------------------- random pairs
def random_gt(rng: np.random.Generator, h: int, w: int, big_ids: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A GT id map of rectangles and ellipses over a stuff background, with void and some crowd segments."""
    sem = np.full((h, w), -1, dtype=np.int64)  # segment index per pixel, -1 void
    segs: list[dict[str, Any]] = []
    yy, xx = np.mgrid[:h, :w]
    # stuff background bands
    cuts = sorted(rng.choice(np.arange(4, h - 4), size=rng.integers(1, 3), replace=False).tolist())
    edges = [0, *cuts, h]
    for a, b in zip(edges[:-1], edges[1:]):
        sem[a:b] = len(segs)
        segs.append({"category_id": int(rng.choice(STUFF_IDS[:2])), "iscrowd": 0})
    for _ in range(rng.integers(2, 8)):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(3, max(4, h // 3)), rng.integers(3, max(4, w // 3))
        if rng.random() < 0.5:
            region = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        sem[region] = len(segs)
        segs.append({"category_id": int(rng.choice(THING_IDS[:2])), "iscrowd": int(rng.random() < 0.15)})
    # void blobs
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        sem[(np.abs(yy - cy) <= rng.integers(1, 5)) & (np.abs(xx - cx) <= rng.integers(1, 5))] = -1
    return _assign_ids(rng, sem, segs, big_ids, gt=True)


def _assign_ids(rng, sem, segs, big_ids, gt):
    present = [k for k in range(len(segs)) if (sem == k).any()]
    ids = rng.choice(np.arange(1, 256**3) if big_ids else np.arange(1, 1000), size=len(present), replace=False)
    id_map = np.zeros(sem.shape, dtype=np.int64)
    out = []
    for k, sid in zip(present, ids.tolist()):
        id_map[sem == k] = sid
        seg = {"id": sid, "category_id": segs[k]["category_id"]}
        if gt:
            seg["iscrowd"] = segs[k]["iscrowd"]
            seg["area"] = int((sem == k).sum())
        out.append(seg)
    return id_map, out


def perturb(rng: np.random.Generator, gt: np.ndarray, gt_segs: list[dict[str, Any]], big_ids: bool):
    """A prediction made from GT by eroding, dilating, splitting, merging, relabelling and voiding segments."""
    h, w = gt.shape
    idx = {s["id"]: k for k, s in enumerate(gt_segs)}
    sem = np.full(gt.shape, -1, dtype=np.int64)
    for sid, k in idx.items():
        sem[gt == sid] = k
    segs = [{"category_id": s["category_id"], "iscrowd": 0} for s in gt_segs]
    struct = np.ones((3, 3), dtype=bool)
    for k in range(len(segs)):
        op = rng.choice(["keep", "erode", "dilate", "split", "relabel", "drop", "shift"])
        mask = sem == k
        if op == "erode":
            sem[mask & ~ndimage.binary_erosion(mask, struct, iterations=int(rng.integers(1, 3)))] = -1
        elif op == "dilate":
            grown = ndimage.binary_dilation(mask, struct, iterations=int(rng.integers(1, 4)))
            sem[grown] = k
        elif op == "split":
            ys, xs = np.nonzero(mask)
            if len(ys) > 2:
                cut = int(rng.integers(xs.min(), xs.max() + 1))
                part = mask & (np.arange(w)[None, :] >= cut)
                sem[part] = len(segs)
                segs.append({"category_id": segs[k]["category_id"], "iscrowd": 0})
        elif op == "relabel":
            pool = THING_IDS[:2] if segs[k]["category_id"] in THING_IDS else STUFF_IDS[:2]
            segs[k]["category_id"] = int(rng.choice(pool))
        elif op == "drop":
            sem[mask] = -1
        elif op == "shift":
            dy, dx = rng.integers(-3, 4, size=2)
            moved = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
            sem[mask] = -1
            sem[moved] = k
    # merge: a pair of segments with the same category becomes one
    for _ in range(rng.integers(0, 2)):
        a, b = rng.choice(len(segs), size=2, replace=False)
        if segs[a]["category_id"] == segs[b]["category_id"]:
            sem[sem == b] = a
    # predicted void speckle
    if rng.random() < 0.5:
        sem[rng.random(gt.shape) < 0.03] = -1
    return _assign_ids(rng, sem, segs, big_ids, gt=False)


def random_cases(n: int, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        h, w = int(rng.integers(24, 49)), int(rng.integers(24, 65))
        big = bool(i % 2)
        gt, gt_segs = random_gt(rng, h, w, big)
        pred, pred_segs = perturb(rng, gt, gt_segs, big)
        if rng.random() < 0.2 and gt_segs:  # a stale area now and then
            seg = gt_segs[int(rng.integers(len(gt_segs)))]
            seg["area"] = max(1, seg["area"] + int(rng.integers(-seg["area"] // 2, seg["area"] // 2 + 2)))
        cases.append((gt, gt_segs, pred, pred_segs))
    return cases


def copy_cases(cases: list[Case]) -> list[Case]:
    return copy.deepcopy(cases)
