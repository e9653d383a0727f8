"""Panoptic quality evaluation speed: remax (in memory and from files) vs panopticapi vs hotcoco.

Builds N synthetic ground-truth / prediction pairs (256-640 px, COCO-like segment counts, large PNG-style ids,
predictions made by perturbing the GT), writes them as COCO-panoptic JSON + PNG to a temporary folder, times each
evaluator on the same data, checks that all of them report identical per-category TP/FP/FN and IoU sums (1e-9)
and prints a table.

    python benchmarks/pq_speed.py --num-images 200 --repeat 3

panopticapi is timed through its ``pq_compute_single_core`` in one process (its ``pq_compute`` forks a pool of
``cpu_count()`` workers, which would measure the machine's core count rather than the code). hotcoco runs as it
ships (its own threads). "remax in memory" starts from id maps already in memory (what the training loop and the
Predictor hand over); "remax files" reads the same PNGs and JSONs as the other two.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from remax.evaluation import PanopticQuality, id2rgb, pq_compute_files, read_panoptic_png

THINGS = list(range(1, 21))
STUFF = list(range(100, 111))
CATEGORIES = [{"id": c, "name": f"thing{c}", "isthing": 1} for c in THINGS] + \
             [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in STUFF]


def synth_pair(rng: np.random.Generator, png_ids: bool) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    h, w = int(rng.integers(256, 481)), int(rng.integers(320, 641))
    seg_of = np.full((h, w), -1, dtype=np.int32)
    cats, crowd = [], []
    # stuff: a few horizontal bands with wavy borders
    n_stuff = int(rng.integers(2, 6))
    yy, xx = np.mgrid[:h, :w]
    border = np.sort(rng.integers(0, h, size=n_stuff - 1))
    wave = (8 * np.sin(xx / rng.uniform(20, 60) + rng.uniform(0, 6))).astype(np.int32)
    band = np.searchsorted(border, yy + wave)
    for k in range(n_stuff):
        seg_of[band == k] = len(cats)
        cats.append(int(rng.choice(STUFF)))
        crowd.append(0)
    # things: ellipses and boxes of varied size
    for _ in range(int(rng.integers(3, 16))):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(6, h // 4), rng.integers(6, w // 4)
        if rng.random() < 0.5:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            region = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        seg_of[region] = len(cats)
        cats.append(int(rng.choice(THINGS)))
        crowd.append(int(rng.random() < 0.05))
    # void borders between segments, as in COCO annotations
    edges = ndimage.morphological_gradient(seg_of, size=3) > 0
    seg_of[edges & (rng.random((h, w)) < 0.7)] = -1

    pred_of = seg_of.copy()
    pred_cats = list(cats)
    for k in range(len(cats)):
        mask = seg_of == k
        op = rng.choice(["keep", "erode", "dilate", "split", "relabel", "drop", "shift"], p=[.3, .15, .15, .1, .1, .1, .1])
        if op == "erode":
            pred_of[mask & ~ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 6)))] = -1
        elif op == "dilate":
            pred_of[ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 6)))] = k
        elif op == "split":
            xs = np.nonzero(mask)[1]
            if xs.size:
                pred_of[mask & (xx >= rng.integers(xs.min(), xs.max() + 1))] = len(pred_cats)
                pred_cats.append(pred_cats[k])
        elif op == "relabel":
            pred_cats[k] = int(rng.choice(THINGS if cats[k] in THINGS else STUFF))
        elif op == "drop":
            pred_of[mask] = -1
        elif op == "shift":
            pred_of[mask] = -1
            pred_of[np.roll(mask, tuple(int(v) for v in rng.integers(-12, 13, size=2)), axis=(0, 1))] = k
    return (*_to_ids(rng, seg_of, cats, crowd, png_ids), *_to_ids(rng, pred_of, pred_cats, None, png_ids))


def _to_ids(rng, seg_of, cats, crowd, png_ids):
    """Segment ids 1..S (as remax's data loader and Predictor number them) or random 24-bit ids (as in COCO's
    PNGs, where panopticapi's IdGenerator derives them from category colours)."""
    present = np.unique(seg_of[seg_of >= 0])
    if png_ids:
        ids = rng.choice(np.arange(1, 256**3), size=len(present), replace=False)
    else:
        ids = rng.permutation(len(present)) + 1
    lut = np.zeros(len(cats) + 1, dtype=np.int64)
    lut[present + 1] = ids
    id_map = lut[seg_of + 1]
    counts = np.bincount(seg_of[seg_of >= 0].ravel(), minlength=len(cats))
    segs = []
    for k, sid in zip(present.tolist(), ids.tolist()):
        s = {"id": sid, "category_id": cats[k]}
        if crowd is not None:
            s.update(iscrowd=crowd[k], area=int(counts[k]))
        segs.append(s)
    return id_map, segs


def write_set(root: Path, n: int, seed: int, png_ids: bool) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    images, gt_anns, pred_anns = [], [], []
    for i in range(n):
        gt, gt_segs, pred, pred_segs = synth_pair(rng, png_ids)
        Image.fromarray(id2rgb(gt)).save(root / "gt" / f"{i:06d}.png")
        Image.fromarray(id2rgb(pred)).save(root / "pred" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "height": gt.shape[0], "width": gt.shape[1]})
        gt_anns.append({"image_id": i, "file_name": f"{i:06d}.png", "segments_info": gt_segs})
        pred_anns.append({"image_id": i, "file_name": f"{i:06d}.png", "segments_info": pred_segs})
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return {"gt_json": root / "gt.json", "gt_dir": root / "gt", "pred_json": root / "pred.json",
            "pred_dir": root / "pred"}


def best_of(fn, repeat: int):
    """Best wall-clock and best CPU time (all threads of this process) over ``repeat`` runs, and the result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return (min(walls), min(cpus)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per evaluator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png-ids", action="store_true",
                    help="random 24-bit segment ids as in COCO's PNGs instead of 1..S per image")
    args = ap.parse_args()

    from hotcoco import panoptic as hc_panoptic
    from panopticapi.evaluation import pq_compute_single_core

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = write_set(Path(tmp), args.num_images, args.seed, args.png_ids)
        print(f"wrote {args.num_images} synthetic pairs in {time.perf_counter() - t0:.1f} s to {tmp}")
        gt_json = json.loads(p["gt_json"].read_text())
        pred_json = json.loads(p["pred_json"].read_text())
        pixels = sum(a["height"] * a["width"] for a in gt_json["images"])
        nseg = sum(len(a["segments_info"]) for a in gt_json["annotations"])
        print(f"{pixels / args.num_images / 1e3:.0f} kpx and {nseg / args.num_images:.1f} GT segments per image, "
              f"segment ids {'random 24-bit (COCO PNG style)' if args.png_ids else '1..S'}")

        # remax in memory: id maps already decoded
        maps = [(read_panoptic_png(p["gt_dir"] / a["file_name"]), read_panoptic_png(p["pred_dir"] / b["file_name"]))
                for a, b in zip(gt_json["annotations"], pred_json["annotations"])]

        def ours_memory():
            m = PanopticQuality(gt_json["categories"])
            for (g, pr), a, b in zip(maps, gt_json["annotations"], pred_json["annotations"]):
                m.update(g, a["segments_info"], pr, b["segments_info"], image_id=a["image_id"])
            return m.compute()

        def ours_files():
            return pq_compute_files(p["gt_json"], p["gt_dir"], p["pred_json"], p["pred_dir"])

        def panopticapi():
            gt = json.loads(p["gt_json"].read_text())
            pr = json.loads(p["pred_json"].read_text())
            cats = {c["id"]: c for c in gt["categories"]}
            preds = {a["image_id"]: a for a in pr["annotations"]}
            pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
            with contextlib.redirect_stdout(io.StringIO()):
                stat = pq_compute_single_core(0, pairs, str(p["gt_dir"]), str(p["pred_dir"]), cats)
            return {c: (s.tp, s.fp, s.fn, float(s.iou)) for c, s in stat.pq_per_cat.items()}

        def hotcoco():
            with contextlib.redirect_stdout(io.StringIO()):
                return hc_panoptic.pq_compute(str(p["gt_json"]), str(p["pred_json"]), str(p["gt_dir"]),
                                              str(p["pred_dir"]))

        rows = []
        t_mem, r_mem = best_of(ours_memory, args.repeat)
        t_files, r_files = best_of(ours_files, args.repeat)
        t_api, r_api = best_of(panopticapi, args.repeat)
        t_hc, r_hc = best_of(hotcoco, args.repeat)

        # identical numbers
        ours = {c: (v["tp"], v["fp"], v["fn"], v["iou"]) for c, v in r_mem["per_class"].items()}
        assert r_files == r_mem, "remax file path differs from the in-memory path"
        worst_api = worst_hc = 0.0
        for c, (tp, fp, fn, iou) in ours.items():
            a = r_api.get(c, (0, 0, 0, 0.0))
            h = r_hc["per_class"][c]
            assert (tp, fp, fn) == tuple(a[:3]), f"category {c}: remax {(tp, fp, fn)} vs panopticapi {a[:3]}"
            assert (tp, fp, fn) == (h["tp"], h["fp"], h["fn"]), f"category {c}: remax vs hotcoco counts"
            worst_api, worst_hc = max(worst_api, abs(iou - a[3])), max(worst_hc, abs(iou - h["iou"]))
        assert worst_api <= 1e-9 and worst_hc <= 1e-9, (worst_api, worst_hc)
        for split in ("All", "Things", "Stuff"):
            for k in ("pq", "sq", "rq", "n"):
                assert abs(r_mem[split][k] - r_hc[split][k]) <= 1e-12, (split, k)

        rows = [("remax, in memory (id maps given)", t_mem), ("remax, files (PNG + JSON)", t_files),
                ("panopticapi pq_compute_single_core (1 process)", t_api), ("hotcoco pq_compute", t_hc)]
        n = args.num_images
        print(f"\nPQ evaluation of {n} images, best of {args.repeat} ({platform.machine()}, {os.cpu_count()} cores, "
              f"numpy {np.__version__})")
        print(f"{'evaluator':48s} {'wall s':>7s} {'ms/img':>7s} {'speed-up':>8s} | {'CPU s':>6s} {'ms/img':>7s} "
              f"{'speed-up':>8s}")
        for name, (wall, cpu) in rows:
            print(f"{name:48s} {wall:7.2f} {1e3 * wall / n:7.2f} {t_api[0] / wall:7.1f}× | {cpu:6.2f} "
                  f"{1e3 * cpu / n:7.2f} {t_api[1] / cpu:7.1f}×")
        print("(speed-up: panopticapi's time divided by the evaluator's; CPU time counts every thread of the process)")
        tot = {k: sum(v[i] for v in ours.values()) for i, k in enumerate(("tp", "fp", "fn"))}
        print(f"\nidentical numbers: PQ {100 * r_mem['All']['pq']:.3f} (Things {100 * r_mem['Things']['pq']:.3f}, "
              f"Stuff {100 * r_mem['Stuff']['pq']:.3f}); TP/FP/FN {tot['tp']}/{tot['fp']}/{tot['fn']} equal in all "
              f"four; max |ΔIoU sum| vs panopticapi {worst_api:.1e}, vs hotcoco {worst_hc:.1e}")


if __name__ == "__main__":
    main()
