"""Score a model (or predictions on disk) on a COCO-panoptic split: PQ, mIoU and instance mask AP.

Used by ``remax eval`` and by the trainer's validation. Both paths evaluate at the original image resolution, with
ground truth read exactly as panopticapi reads it (PNG ids, ``segments_info`` with JSON areas), so
``evaluate_model`` agrees with writing the predictions out and running panopticapi on them.

Result dict (what :func:`evaluate_model` and :func:`evaluate_files` return)::

    {"pq": {"All": {pq, sq, rq, n}, "Things": ..., "Stuff": ..., "per_class": {...}},
     "miou": float | None, "semantic": {...} | None, "ap": float | None, "ap_detail": {...} | None,
     "num_images": int}

:func:`result_to_json` turns it into the flat file format (panopticapi's keys plus ``miou`` and ``ap``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remax.config import Config
from remax.evaluation import ConfusionMatrix, InstanceAP, PanopticQuality, read_panoptic_png
from remax.evaluation.io import default_png_folder, load_json
from remax.structures import CategoryInfo, category_mismatch

log = logging.getLogger(__name__)

IGNORE = -1  # semantic ground-truth label of void pixels (never a class id, whatever the class count)


def semantic_from_panoptic(id_map: np.ndarray, segments: Sequence[Mapping[str, Any]],
                           category_to_label: Mapping[int, int], void: int = IGNORE) -> np.ndarray:
    """Per-pixel contiguous class from a panoptic id map and its ``segments_info`` (crowd keeps its class)."""
    ids = np.asarray(id_map)
    uniq, inverse = np.unique(ids, return_inverse=True)
    seg_label = {int(s["id"]): category_to_label.get(int(s["category_id"]), void) for s in segments}
    lut = np.array([seg_label.get(int(v), void) for v in uniq.tolist()], dtype=np.int64)
    return lut[inverse].reshape(ids.shape)


class _Metrics:
    """PQ + confusion matrix + AP accumulated together, keyed by data-set category ids."""

    def __init__(self, categories: Sequence[CategoryInfo] | Sequence[Mapping], compute_miou: bool,
                 compute_ap: bool) -> None:
        self.pq = PanopticQuality(categories)
        ids = list(self.pq.category_ids)
        self.label_of = {cid: i for i, cid in enumerate(ids)}
        names = [str(self.pq.categories[c]["name"]) for c in ids]
        self.confusion = ConfusionMatrix(len(ids), ignore_index=IGNORE, class_names=names) if compute_miou else None
        self.ap = InstanceAP(categories) if compute_ap else None
        self._ap_ids: dict[str, int] = {}

    def update(self, image_id: Any, gt_map: np.ndarray, gt_segments: Sequence[Mapping], pred_map: np.ndarray,
               pred_segments: Sequence[Mapping], pred_semantic: np.ndarray | None = None,
               instances: tuple[Any, Any, Any] | None = None) -> None:
        self.pq.update(gt_map, gt_segments, pred_map, pred_segments, image_id=image_id)
        if self.confusion is not None:
            gt_sem = semantic_from_panoptic(gt_map, gt_segments, self.label_of)
            if pred_semantic is None:
                pred_semantic = semantic_from_panoptic(pred_map, pred_segments, self.label_of,
                                                       void=len(self.label_of))
            self.confusion.update(gt_sem, pred_semantic)
        if self.ap is not None:
            # pycocotools sorts image ids, which fails on data sets that mix integer and string ids; AP does not
            # need the real ids, so each image gets a running number.
            ap_id = self._ap_ids.setdefault(str(image_id), len(self._ap_ids) + 1)
            self.ap.add_ground_truth(ap_id, gt_map, gt_segments)
            if instances is None:
                instances = _instances_from_panoptic(pred_map, pred_segments)
            self.ap.add_prediction(ap_id, *instances)

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pq": self.pq.compute(), "num_images": self.pq.num_images,
                               "miou": None, "semantic": None, "ap": None, "ap_detail": None}
        if self.confusion is not None:
            sem = self.confusion.compute()
            out["semantic"] = sem
            out["miou"] = sem["miou"]
        if self.ap is not None:
            detail = self.ap.compute()
            out["ap_detail"] = detail
            out["ap"] = detail.get("ap")
        return out


def _instances_from_panoptic(id_map: np.ndarray, segments: Sequence[Mapping]) -> tuple[Any, Any, Any]:
    """Thing masks of a panoptic prediction, scored by their ``score`` (1.0 when the file has none)."""
    h, w = id_map.shape
    things = [s for s in segments if s.get("isthing", True)]
    masks = np.zeros((len(things), h, w), dtype=bool)
    for k, s in enumerate(things):
        masks[k] = id_map == int(s["id"])
    scores = np.array([float(s.get("score", 1.0)) for s in things], dtype=np.float64)
    cats = np.array([int(s["category_id"]) for s in things], dtype=np.int64)
    return masks, scores, cats


def _check_categories(model_categories: Sequence[CategoryInfo], gt_categories: Mapping[int, Mapping]) -> None:
    """Refuse, in one line, a model whose category set is not the data set's (ids and thing/stuff kinds); the
    order may differ, predictions are matched to the ground truth by category id."""
    data = [CategoryInfo(id=int(cid), name=str(c.get("name", cid)), isthing=bool(c["isthing"]))
            for cid, c in gt_categories.items()]
    problem = category_mismatch(model_categories, data, "the model", "the data set")
    if problem:
        raise ValueError(f"{problem} (category ids are compared; the checkpoint was trained on other categories)")


def _ground_truth(dataset: Any, index: int) -> tuple[torch.Tensor, np.ndarray, list[dict], Any]:
    """Image, GT PNG id map, GT segments_info and image id of one data set entry, at the original size."""
    if all(hasattr(dataset, a) for a in ("load_image", "load_png_ids", "segments_info", "records")):
        return (dataset.load_image(index), np.asarray(dataset.load_png_ids(index)),
                list(dataset.segments_info(index)), dataset.records[index]["image_id"])
    item = dataset[index]
    target = item["target"]
    categories = dataset.categories
    seg_ids = target.segment_ids if target.segment_ids is not None else torch.arange(1, target.num_segments + 1)
    lut = torch.cat([torch.zeros(1, dtype=torch.int64), seg_ids.to(torch.int64)])
    gt_map = lut[target.id_map].numpy()
    segments = []
    for k in range(target.num_segments):
        seg = {"id": int(seg_ids[k]), "category_id": categories[int(target.classes[k])].id,
               "iscrowd": int(bool(target.is_crowd[k]))}
        if target.areas is not None and int(target.areas[k]) >= 0:
            seg["area"] = int(target.areas[k])
        segments.append(seg)
    return item["image"], gt_map, segments, item["image_id"]


class _Loader(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray, list[dict], Any]:
        return _ground_truth(self.dataset, self.indices[i])


def _batches(dataset: Any, indices: list[int], batch_size: int, workers: int) -> Iterator[list]:
    loader = torch.utils.data.DataLoader(_Loader(dataset, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=list)
    yield from loader


@torch.inference_mode()
def evaluate_model(model: torch.nn.Module, dataset: Any, cfg: Config, categories: Sequence[CategoryInfo],
                   device: str | torch.device = "cpu", max_images: int = 0, progress: bool = True,
                   batch_size: int | None = None, num_workers: int | None = None) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` (a COCO-panoptic data set without training transforms) and score it.

    ``categories`` are the model's classes in contiguous order; they must be the data set's categories (same ids,
    same thing/stuff kinds) in any order: predictions are matched to the ground truth by category id, and the
    model's semantic labels are renumbered into the metric's class order. ``max_images > 0`` evaluates the first
    that many images only. ``cfg.eval.protocol`` selects our pre-/post-processing or the reference's. Returns the
    result dict described in the module docstring.
    """
    from tqdm.auto import tqdm

    from remax.inference.predictor import Predictor

    was_training = model.training
    predictor = Predictor(model, cfg, categories, device=device, semantic=cfg.eval.compute_miou,
                          instances=cfg.eval.compute_ap)
    metrics = _Metrics(dataset.categories if hasattr(dataset, "categories") else categories,
                       cfg.eval.compute_miou, cfg.eval.compute_ap)
    _check_categories(categories, metrics.pq.categories)
    # The model's contiguous label k is category categories[k].id; the confusion matrix counts in its own order.
    semantic_lut = torch.tensor([metrics.label_of[c.id] for c in categories], dtype=torch.int64)
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    bs = max(1, batch_size or min(cfg.train.batch_size, 8))
    workers = cfg.data.num_workers if num_workers is None else num_workers
    bar = tqdm(total=n, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for batch in _batches(dataset, list(range(n)), bs, workers):
            results = predictor.predict_tensors([b[0] for b in batch])
            for (_, gt_map, gt_segments, image_id), res in zip(batch, results):
                instances = None
                if res.instances is not None:
                    instances = (res.instances.masks, res.instances.scores, res.instance_category_ids)
                semantic = semantic_lut[res.semantic].numpy() if res.semantic is not None else None
                metrics.update(image_id, gt_map, gt_segments, res.id_map.numpy(), res.segments_info, semantic,
                               instances)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    result = metrics.compute()
    log.info("evaluated %d images: PQ %.2f, mIoU %s, AP %s", n, 100 * result["pq"]["All"]["pq"],
             _pct(result["miou"]), _pct(result["ap"]))
    return result


def evaluate_files(gt_json: str | os.PathLike, pred_json: str | os.PathLike,
                   gt_folder: str | os.PathLike | None = None, pred_folder: str | os.PathLike | None = None,
                   compute_miou: bool = True, compute_ap: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score COCO-panoptic predictions on disk (JSON + PNGs, from any model) against COCO-panoptic ground truth.

    Matching follows panopticapi: categories from the GT JSON, predictions found by ``image_id`` (compared as
    text, so ``1`` and ``"1"`` match), a GT image without a prediction is an error, extra predictions are ignored.
    mIoU uses the panoptic maps (void predictions count as misses); AP uses the predicted thing segments with their
    ``score`` (1.0 if absent).
    """
    from tqdm.auto import tqdm

    gt_data, pred_data = load_json(gt_json), load_json(pred_json)
    gt_dir = Path(gt_folder) if gt_folder else default_png_folder(gt_json)
    pred_dir = Path(pred_folder) if pred_folder else default_png_folder(pred_json)
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} PNG folder {d} does not exist")
    if "categories" not in gt_data:
        raise ValueError(f"{gt_json}: the ground-truth JSON has no 'categories'")
    metrics = _Metrics(gt_data["categories"], compute_miou, compute_ap)
    preds = {str(a["image_id"]): a for a in pred_data["annotations"]}
    pairs = []
    for gt_ann in gt_data["annotations"]:
        pred_ann = preds.get(str(gt_ann["image_id"]))
        if pred_ann is None:
            raise ValueError(f"{pred_json}: no prediction for the ground-truth image with image_id "
                             f"{gt_ann['image_id']!r}")
        pairs.append((gt_ann, pred_ann))
    for gt_ann, pred_ann in tqdm(pairs, desc="eval", unit="img", disable=not progress, dynamic_ncols=True):
        image_id = gt_ann["image_id"]
        gt_map = read_panoptic_png(gt_dir / gt_ann["file_name"])
        pred_path = pred_dir / pred_ann["file_name"]
        pred_map = read_panoptic_png(pred_path)
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"image {image_id!r}: {pred_path} is {pred_map.shape[0]}×{pred_map.shape[1]} but its "
                             f"ground truth is {gt_map.shape[0]}×{gt_map.shape[1]}")
        pred_segments = [_with_isthing(s, metrics.pq.categories) for s in pred_ann["segments_info"]]
        metrics.update(image_id, gt_map, gt_ann["segments_info"], pred_map, pred_segments)
    return metrics.compute()


def _with_isthing(seg: Mapping[str, Any], categories: Mapping[int, Mapping]) -> dict[str, Any]:
    out = dict(seg)
    info = categories.get(int(seg.get("category_id", -1)))
    if info is not None:
        out["isthing"] = bool(info["isthing"])
    return out


def result_to_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The file format of ``remax eval --json``: panopticapi's ``All``/``Things``/``Stuff`` (``pq, sq, rq, n`` as
    fractions) and ``per_class`` (keyed by category id), plus ``miou``, ``ap`` and their details."""
    pq = result["pq"]
    out: dict[str, Any] = {k: dict(pq[k]) for k in ("All", "Things", "Stuff")}
    out["per_class"] = {str(cid): dict(v) for cid, v in pq["per_class"].items()}
    out["miou"] = result.get("miou")
    out["ap"] = result.get("ap")
    if result.get("semantic") is not None:
        sem = result["semantic"]
        out["semantic"] = {"miou": sem["miou"], "pixel_accuracy": sem["pixel_accuracy"],
                           "per_class_iou": sem["per_class_iou"]}
    if result.get("ap_detail") is not None:
        out["ap_detail"] = {k: v for k, v in result["ap_detail"].items() if k != "per_class"}
        out["ap_detail"]["per_class"] = {str(k): v for k, v in result["ap_detail"].get("per_class", {}).items()}
    out["num_images"] = result.get("num_images")
    return out


def format_result(result: Mapping[str, Any], per_class: bool = True) -> str:
    """The PQ table (All / Things / Stuff, per class) followed by mIoU and AP lines, in percent."""
    from remax.evaluation import format_pq_table

    lines = [format_pq_table(result["pq"], per_class=per_class), ""]
    lines.append(f"mIoU: {_pct(result.get('miou'))}")
    detail = result.get("ap_detail") or {}
    ap_line = f"AP (mask): {_pct(result.get('ap'))}"
    if detail.get("ap50") is not None:
        ap_line += f"  AP50: {_pct(detail.get('ap50'))}  AP75: {_pct(detail.get('ap75'))}"
    lines.append(ap_line)
    lines.append(f"images: {result.get('num_images')}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"
