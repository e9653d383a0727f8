"""Panoptic quality (PQ, SQ, RQ) with the exact rules of the official panopticapi, computed in memory.

Per image, one ``np.bincount`` over ``dense_gt · (K_pred + 2) + dense_pred`` gives every (ground-truth segment,
predicted segment) intersection; the matching then runs on that small matrix, never over pixels. The rules are
panopticapi's (``panopticapi/evaluation.py``, ``pq_compute_single_core``):

- a (GT, prediction) pair of the same category, the GT not crowd, is a true positive when IoU > 0.5 (strict), with
  ``union = pred_area + gt_area - intersection - |pred ∩ GT-void|`` (predicted void inside a GT stays in the union);
- the GT area comes from ``segments_info`` (stale areas included, as panopticapi reads them), falling back to the
  pixel count when a segment has no ``area``; the predicted area is always the pixel count;
- an unmatched non-crowd GT segment is a false negative; crowd segments are never matched nor counted, and only the
  last crowd segment of each category (in ``segments_info`` order) is kept as that category's crowd region;
- an unmatched prediction is a false positive unless ``(|pred ∩ void| + |pred ∩ crowd of its category|) / area``
  exceeds 0.5;
- GT pixels whose id is not in ``segments_info`` are ignored (neither void nor a segment), as in panopticapi.

True-positive IoUs are added to the per-category float64 sums one by one, in the order panopticapi adds them
(sorted (GT id, predicted id) within an image, images in update order), so a single-process evaluation reproduces
panopticapi's sums bit for bit.

Where panopticapi would crash or be silently wrong, this module raises a ``ValueError`` naming the image: a
predicted id missing from ``segments_info`` or the reverse, an unknown category (predicted or GT), duplicate or
non-positive segment ids, id maps of different sizes. An empty split (e.g. no thing category) reports
``pq = sq = rq = 0.0`` with ``n = 0`` instead of panopticapi's ``ZeroDivisionError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remax.evaluation.io import default_png_folder, load_json, read_panoptic_png

logger = logging.getLogger(__name__)

# Id maps whose largest id is at most this index a lookup table directly; larger ids (COCO PNG ids reach
# 256³ − 1) are hashed, see _densify.
_LUT_MAX_ID = 1 << 16

SPLITS: tuple[tuple[str, bool | None], ...] = (("All", None), ("Things", True), ("Stuff", False))


def normalize_categories(categories: Any) -> dict[int, dict[str, Any]]:
    """Categories as ``{data-set id: {"name", "isthing", ...}}``, in the given order.

    Accepts that mapping, a COCO-style list of dicts with ``id``, or objects with ``id``/``name``/``isthing``
    attributes (``remax.structures.CategoryInfo``).
    """
    out: dict[int, dict[str, Any]] = {}
    items: Iterable[tuple[Any, Any]]
    if isinstance(categories, Mapping):
        items = categories.items()
    else:
        items = ((c["id"] if isinstance(c, Mapping) else c.id, c) for c in categories)
    for cid, info in items:
        if not isinstance(info, Mapping):
            info = {"id": info.id, "name": getattr(info, "name", str(info.id)), "isthing": info.isthing}
        if "isthing" not in info:
            raise ValueError(f"category {cid} has no 'isthing' field; PQ needs it for the Things/Stuff split")
        cid = int(cid)
        if cid in out:
            raise ValueError(f"category id {cid} is listed twice")
        out[cid] = {**info, "name": str(info.get("name", cid)), "isthing": int(bool(info["isthing"]))}
    if not out:
        raise ValueError("PanopticQuality needs at least one category")
    return out


def _as_id_map(x: Any, what: str, where: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{where}{what} id map must be 2-D (H×W), got shape {tuple(x.shape)}")
    if x.dtype == np.bool_ or x.dtype.kind not in "iu":
        raise ValueError(f"{where}{what} id map must have an integer dtype, got {x.dtype}")
    if x.dtype == np.uint64:  # mixing uint64 with signed ints promotes to float64 in numpy
        if x.size and int(x.max()) >= 2**62:
            raise ValueError(f"{where}{what} id map has ids ≥ 2^62 ({int(x.max())})")
        x = x.astype(np.int64)
    return x


def _hash_bits(sorted_ids: np.ndarray) -> int | None:
    """Smallest ``b`` such that ``id mod 2^b`` is distinct for void (0) and every segment id, if ``b ≤ 16``."""
    k = len(sorted_ids)
    for bits in range(max(4, int(np.ceil(np.log2(2 * (k + 1))))), 17):
        residues = sorted_ids & ((1 << bits) - 1)
        if residues.all() and len(np.unique(residues)) == k:
            return bits
    return None


def _densify(id_map: np.ndarray, sorted_ids: np.ndarray, scale: int = 1) -> np.ndarray:
    """Map ids to ``0`` (void), ``1..K`` (position in ``sorted_ids`` plus one) or ``K + 1`` (unknown id), times
    ``scale`` (so that a GT map densified with ``scale = K_pred + 2`` plus a dense prediction is a bincount key).

    Small ids index a lookup table directly. Large ids (COCO PNG ids reach 256³ − 1) are hashed by their low bits
    into a small table, then every pixel is checked against the id its slot stands for, so an unknown id can
    never pass for a known one; if no collision-free table of ≤ 2^16 slots exists, a binary search is used.
    """
    k = len(sorted_ids)
    unknown = k + 1
    if id_map.size == 0:
        return np.zeros(id_map.shape, dtype=np.intp)
    hi = int(id_map.max())
    if hi <= _LUT_MAX_ID:
        lut = np.full(hi + 1, unknown * scale, dtype=np.intp)
        lut[0] = 0
        n_in = int(np.searchsorted(sorted_ids, hi, side="right"))
        lut[sorted_ids[:n_in]] = np.arange(1, n_in + 1) * scale
        # Fancy indexing is several times faster with intp indices than with (u)int32 ones.
        return lut[id_map.astype(np.intp, copy=False)]
    bits = _hash_bits(sorted_ids)
    if bits is not None:
        mask = (1 << bits) - 1
        low = np.bitwise_and(id_map, mask, dtype=np.intp)
        slot_id = np.zeros(1 << bits, dtype=id_map.dtype)  # the id each slot stands for (0: void)
        slot_id[sorted_ids & mask] = sorted_ids
        lut = np.full(1 << bits, unknown * scale, dtype=np.intp)
        lut[0] = 0
        lut[sorted_ids & mask] = np.arange(1, k + 1) * scale
        dense = lut[low]
        wrong = slot_id[low] != id_map
        if wrong.any():
            dense[wrong] = unknown * scale
        return dense
    flat = id_map.astype(np.int64, copy=False)
    pos = np.minimum(np.searchsorted(sorted_ids, flat), max(k - 1, 0))
    dense = np.where(sorted_ids[pos] == flat, pos + 1, unknown) if k else np.full(flat.shape, unknown)
    dense[flat == 0] = 0
    return (dense * scale).astype(np.intp, copy=False)


def _confusion(gt: np.ndarray, gt_ids: np.ndarray, pred: np.ndarray, pred_ids: np.ndarray) -> np.ndarray:
    """Pixel counts ``(K_gt + 2) × (K_pred + 2)``: row/column 0 void, then the sorted segment ids, last unknown ids."""
    kg, kp = len(gt_ids), len(pred_ids)
    hg = int(gt.max()) if gt.size else 0
    hp = int(pred.max()) if pred.size else 0
    if (hg + 1) * (hp + 1) <= max(1 << 16, gt.size):
        # Small ids (remax's own targets and predictions number segments 1..S): count raw id pairs directly,
        # then pick the rows and columns of the known ids; everything else is the "unknown" row / column.
        key = np.multiply(gt, hp + 1, dtype=np.intp)
        key += pred
        raw = np.bincount(key.ravel(), minlength=(hg + 1) * (hp + 1)).reshape(hg + 1, hp + 1)
        raw = np.pad(raw, ((0, 1), (0, 1)))  # a zero row / column for ids absent from the map
        rows = np.concatenate([[0], np.where(gt_ids <= hg, gt_ids, hg + 1)])
        cols = np.concatenate([[0], np.where(pred_ids <= hp, pred_ids, hp + 1)])
        conf = np.zeros((kg + 2, kp + 2), dtype=np.int64)
        conf[: kg + 1, : kp + 1] = raw[np.ix_(rows, cols)]
        known = conf[: kg + 1, : kp + 1]
        conf[kg + 1, : kp + 1] = raw[:, cols].sum(axis=0) - known.sum(axis=0)  # unknown GT ids
        conf[: kg + 1, kp + 1] = raw[rows, :].sum(axis=1) - known.sum(axis=1)  # unknown predicted ids
        conf[kg + 1, kp + 1] = raw.sum() - conf.sum()
        return conf
    key = _densify(gt, gt_ids, scale=kp + 2)
    key += _densify(pred, pred_ids)
    return np.bincount(key.ravel(), minlength=(kg + 2) * (kp + 2)).reshape(kg + 2, kp + 2)


class PanopticQuality:
    """Accumulates panopticapi's per-category TP / FP / FN / IoU sums over images and reports PQ, SQ, RQ.

    ``categories`` maps data-set category ids to dicts with ``isthing`` (and ``name``); the order given is the
    order of the per-class output and of the averages, as panopticapi uses the GT JSON's category order.
    """

    def __init__(self, categories: Any) -> None:
        self.categories = normalize_categories(categories)
        self.category_ids: list[int] = list(self.categories)
        self._index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.isthing = np.array([self.categories[c]["isthing"] == 1 for c in self.category_ids], dtype=bool)
        n = len(self.category_ids)
        self.tp = np.zeros(n, dtype=np.int64)
        self.fp = np.zeros(n, dtype=np.int64)
        self.fn = np.zeros(n, dtype=np.int64)
        self.iou = np.zeros(n, dtype=np.float64)
        self.num_images = 0

    def reset(self) -> None:
        for a in (self.tp, self.fp, self.fn, self.iou):
            a[...] = 0
        self.num_images = 0

    # ------------------------------------------------------------------ per image
    def _parse_segments(
        self, segments: Sequence[Mapping[str, Any]], side: str, where: str
    ) -> tuple[np.ndarray, np.ndarray, list[Mapping[str, Any]]]:
        """Segment ids sorted ascending, their category indices and the segments in that order."""
        ids, cats = [], []
        for seg in segments:
            try:
                sid = int(seg["id"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}{side} segment without an integer 'id': {seg!r}") from None
            cid = seg.get("category_id")
            c = self._index.get(cid) if type(cid) is int else None
            if c is None:
                try:
                    c = self._index[int(cid)]  # type: ignore[arg-type]
                except (KeyError, TypeError, ValueError):
                    raise ValueError(
                        f"{where}{side} segment {sid} has unknown category_id {cid!r} "
                        f"(known: {self.category_ids[:10]}{'…' if len(self.category_ids) > 10 else ''})"
                    ) from None
            ids.append(sid)
            cats.append(c)
        ids_arr = np.asarray(ids, dtype=np.int64)
        if len(ids_arr) and ids_arr.min() <= 0:
            raise ValueError(f"{where}{side} segment id {int(ids_arr.min())} is not positive (0 is void)")
        order = np.argsort(ids_arr, kind="stable")
        sorted_ids = ids_arr[order]
        if len(sorted_ids) > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
            dup = sorted(set(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]].tolist()))
            raise ValueError(f"{where}{side} segment ids {dup} appear more than once in segments_info")
        cat_idx = np.asarray(cats, dtype=np.intp)[order]
        return sorted_ids, cat_idx, [segments[i] for i in order.tolist()]

    def update(
        self,
        gt_id_map: np.ndarray | torch.Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
        pred_id_map: np.ndarray | torch.Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        image_id: Any = None,
    ) -> None:
        """Add one image: id maps (``H×W`` ints, ``0`` = void) with their COCO-panoptic ``segments_info``."""
        where = f"image {image_id!r}: " if image_id is not None else ""
        gt = _as_id_map(gt_id_map, "ground-truth", where)
        pred = _as_id_map(pred_id_map, "predicted", where)
        if gt.shape != pred.shape:
            raise ValueError(f"{where}ground-truth id map is {gt.shape[0]}×{gt.shape[1]} but the prediction is "
                             f"{pred.shape[0]}×{pred.shape[1]}; they must have the same size")
        for m, what in ((gt, "ground-truth"), (pred, "predicted")):
            if m.size and m.dtype.kind == "i" and int(m.min()) < 0:
                raise ValueError(f"{where}{what} id map has negative ids ({int(m.min())}); void must be 0")

        gt_ids, gt_cat, gt_segs = self._parse_segments(gt_segments, "ground-truth", where)
        pred_ids, pred_cat, _ = self._parse_segments(pred_segments, "predicted", where)
        kg, kp = len(gt_ids), len(pred_ids)

        conf = _confusion(gt, gt_ids, pred, pred_ids)
        if conf[:, kp + 1].any():
            unknown = np.setdiff1d(np.unique(pred), np.concatenate([[0], pred_ids]))
            raise ValueError(f"{where}predicted segment ids {unknown[:10].tolist()} are in the id map but not in "
                             f"segments_info")
        pred_area = conf[:, 1 : kp + 1].sum(axis=0)
        if kp and not pred_area.all():
            missing = pred_ids[pred_area == 0]
            raise ValueError(f"{where}predicted segment ids {missing[:10].tolist()} are in segments_info but not "
                             f"in the id map")

        gt_pixels = conf[1 : kg + 1, :].sum(axis=1)
        gt_area = np.array(
            [float(s["area"]) if s.get("area") is not None else float(gt_pixels[k]) for k, s in enumerate(gt_segs)],
            dtype=np.float64,
        )
        gt_crowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in gt_segs], dtype=bool)
        inter = conf[1 : kg + 1, 1 : kp + 1]
        pred_void = conf[0, 1 : kp + 1]

        # True positives: same category, GT not crowd, IoU > 0.5. np.nonzero walks row-major, i.e. sorted
        # (GT id, predicted id), which is the order panopticapi adds the IoUs in.
        cand = (inter > 0) & (gt_cat[:, None] == pred_cat[None, :]) & ~gt_crowd[:, None]
        gi, pj = np.nonzero(cand)
        union = pred_area[pj] + gt_area[gi] - inter[gi, pj] - pred_void[pj]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter[gi, pj] / union
        hit = iou > 0.5
        gi, pj, iou = gi[hit], pj[hit], iou[hit]
        np.add.at(self.iou, gt_cat[gi], iou)  # unbuffered: sequential adds, panopticapi's float order
        np.add.at(self.tp, gt_cat[gi], 1)
        gt_matched = np.zeros(kg, dtype=bool)
        gt_matched[gi] = True
        pred_matched = np.zeros(kp, dtype=bool)
        pred_matched[pj] = True

        np.add.at(self.fn, gt_cat[~gt_matched & ~gt_crowd], 1)

        # The crowd region of a category is its last crowd segment in segments_info order.
        crowd_row = np.full(len(self.category_ids), -1, dtype=np.intp)
        rank = {int(s["id"]): k for k, s in enumerate(gt_segs)}
        for seg in gt_segments:
            k = rank[int(seg["id"])]
            if gt_crowd[k]:
                crowd_row[gt_cat[k]] = k
        ignored = pred_void.astype(np.float64)
        rows = crowd_row[pred_cat]
        has_crowd = rows >= 0
        ignored[has_crowd] += inter[rows[has_crowd], np.nonzero(has_crowd)[0]]
        with np.errstate(divide="ignore", invalid="ignore"):
            is_fp = ~pred_matched & ~(ignored / pred_area > 0.5)
        np.add.at(self.fp, pred_cat[is_fp], 1)
        self.num_images += 1

    # ------------------------------------------------------------------ accumulation
    def _check_same(self, other: "PanopticQuality") -> None:
        if other.category_ids != self.category_ids:
            raise ValueError("cannot merge PanopticQuality objects built with different categories")

    def merge(self, other: "PanopticQuality") -> "PanopticQuality":
        """Add the statistics of ``other`` (e.g. another worker's share of the images) to this one."""
        self._check_same(other)
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.num_images += other.num_images
        return self

    def all_reduce(self, group: Any = None) -> "PanopticQuality":
        """Sum the statistics over the ranks of ``group`` in place (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.from_numpy(np.concatenate([self.tp, self.fp, self.fn, [self.num_images]])).to(device)
        iou = torch.from_numpy(self.iou.copy()).to(device)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(iou, group=group)
        counts_np = counts.cpu().numpy()
        n = len(self.category_ids)
        self.tp[:], self.fp[:], self.fn[:] = counts_np[:n], counts_np[n : 2 * n], counts_np[2 * n : 3 * n]
        self.num_images = int(counts_np[3 * n])
        self.iou[:] = iou.cpu().numpy()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only, so the state loads with ``torch.load(weights_only=True)``."""
        return {
            "category_ids": torch.tensor(self.category_ids, dtype=torch.int64),
            "tp": torch.from_numpy(self.tp.copy()),
            "fp": torch.from_numpy(self.fp.copy()),
            "fn": torch.from_numpy(self.fn.copy()),
            "iou": torch.from_numpy(self.iou.copy()),
            "num_images": self.num_images,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ids = [int(c) for c in torch.as_tensor(state["category_ids"]).tolist()]
        if ids != self.category_ids:
            raise ValueError(f"state was saved for categories {ids[:10]}…, this metric has {self.category_ids[:10]}…")
        for name in ("tp", "fp", "fn", "iou"):
            getattr(self, name)[:] = torch.as_tensor(state[name]).numpy()
        self.num_images = int(state["num_images"])

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, Any]:
        """panopticapi's result dict (fractions): ``All``/``Things``/``Stuff`` → ``{pq, sq, rq, n}``, plus
        ``per_class`` → ``{category_id: {pq, sq, rq, tp, fp, fn, iou, name, isthing}}``.

        Categories with TP + FP + FN = 0 are left out of the averages (their per-class values are 0.0); a split
        with no such category reports 0.0 with ``n = 0``.
        """
        per_class: dict[int, dict[str, Any]] = {}
        for i, cid in enumerate(self.category_ids):
            tp, fp, fn, iou = int(self.tp[i]), int(self.fp[i]), int(self.fn[i]), float(self.iou[i])
            denom = tp + 0.5 * fp + 0.5 * fn
            per_class[cid] = {
                "pq": iou / denom if denom else 0.0,
                "sq": iou / tp if tp else 0.0,
                "rq": tp / denom if denom else 0.0,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "iou": iou,
                "name": self.categories[cid]["name"],
                "isthing": bool(self.isthing[i]),
            }
        results: dict[str, Any] = {}
        for split, isthing in SPLITS:
            pq = sq = rq = 0.0
            n = 0
            for i, cid in enumerate(self.category_ids):
                if isthing is not None and bool(self.isthing[i]) != isthing:
                    continue
                c = per_class[cid]
                if c["tp"] + c["fp"] + c["fn"] == 0:
                    continue
                n += 1
                pq += c["pq"]
                sq += c["sq"]
                rq += c["rq"]
            results[split] = {"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0,
                              "n": n}
        results["per_class"] = per_class
        return results


# ---------------------------------------------------------------------- files
def _evaluate_pairs(
    categories: dict[int, dict[str, Any]],
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    gt_folder: str,
    pred_folder: str,
) -> dict[str, Any]:
    metric = PanopticQuality(categories)
    for gt_ann, pred_ann in pairs:
        image_id = gt_ann["image_id"]
        gt_map = read_panoptic_png(os.path.join(gt_folder, gt_ann["file_name"]))
        pred_path = os.path.join(pred_folder, pred_ann["file_name"])
        pred_map = read_panoptic_png(pred_path)
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"image {image_id!r}: {pred_path} is {pred_map.shape[0]}×{pred_map.shape[1]} but its "
                             f"ground truth is {gt_map.shape[0]}×{gt_map.shape[1]}")
        metric.update(gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"], image_id=image_id)
    return metric.state_dict()


def pq_compute_files(
    gt_json: str | os.PathLike[str],
    gt_folder: str | os.PathLike[str] | None,
    pred_json: str | os.PathLike[str],
    pred_folder: str | os.PathLike[str] | None,
    workers: int = 0,
) -> dict[str, Any]:
    """Evaluate COCO-panoptic JSON + PNG predictions on disk; same result dict as ``PanopticQuality.compute``.

    As panopticapi: categories come from the GT JSON, predictions are matched by ``image_id`` (a GT image without a
    prediction raises, extra predictions are ignored), a folder left ``None`` is the JSON path without ``.json``.
    ``workers > 0`` splits the images over that many processes; the per-category IoU sums are then added chunk
    by chunk, which can differ from the sequential sum in the last bits (≤ 1e-12 relative).
    """
    gt_data, pred_data = load_json(gt_json), load_json(pred_json)
    gt_dir = str(gt_folder) if gt_folder is not None else str(default_png_folder(gt_json))
    pred_dir = str(pred_folder) if pred_folder is not None else str(default_png_folder(pred_json))
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{what} PNG folder {d} does not exist")
    if "categories" not in gt_data:
        raise ValueError(f"{gt_json}: the ground-truth JSON has no 'categories'")
    categories = normalize_categories(gt_data["categories"])
    preds = {ann["image_id"]: ann for ann in pred_data["annotations"]}
    pairs = []
    for gt_ann in gt_data["annotations"]:
        if gt_ann["image_id"] not in preds:
            raise ValueError(f"{pred_json}: no prediction for the ground-truth image with image_id "
                             f"{gt_ann['image_id']!r}")
        pairs.append((gt_ann, preds[gt_ann["image_id"]]))

    metric = PanopticQuality(categories)
    if workers and workers > 0 and len(pairs) > 1:
        chunks = [list(c) for c in np.array_split(np.arange(len(pairs)), min(workers, len(pairs)))]
        with ProcessPoolExecutor(max_workers=len(chunks)) as pool:
            futures = [pool.submit(_evaluate_pairs, categories, [pairs[i] for i in c], gt_dir, pred_dir)
                       for c in chunks]
            for fut in futures:
                part = PanopticQuality(categories)
                part.load_state_dict(fut.result())
                metric.merge(part)
    else:
        metric.load_state_dict(_evaluate_pairs(categories, pairs, gt_dir, pred_dir))
    logger.info("panoptic quality: evaluated %d images from %s", metric.num_images, pred_json)
    return metric.compute()


def format_pq_table(result: Mapping[str, Any], per_class: bool = True) -> str:
    """A text table of a ``compute()`` result in percent, as panopticapi prints it, plus optional per-class rows."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
    for split, _ in SPLITS:
        r = result[split]
        lines.append(f"{split:10s}| {100 * r['pq']:6.2f} {100 * r['sq']:6.2f} {100 * r['rq']:6.2f} {r['n']:5d}")
    if per_class and result.get("per_class"):
        width = max(8, *(len(str(c.get("name", k))) for k, c in result["per_class"].items()))
        lines += ["", f"{'id':>5s} {'category':{width}s} {'kind':5s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} "
                      f"{'TP':>6s} {'FP':>6s} {'FN':>6s}", "-" * (width + 56)]
        for cid, c in result["per_class"].items():
            kind = "thing" if c.get("isthing") else "stuff"
            counts = "".join(f" {c[k]:6d}" if k in c else f" {'':6s}" for k in ("tp", "fp", "fn"))
            lines.append(f"{cid!s:>5s} {str(c.get('name', cid)):{width}s} {kind:5s} | {100 * c['pq']:6.2f} "
                         f"{100 * c['sq']:6.2f} {100 * c['rq']:6.2f}{counts}")
    return "\n".join(lines)
