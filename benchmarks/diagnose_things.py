"""Why a trained model does or does not find thing instances: probes on checkpoints of one run (issue 13).

For each checkpoint (e.g. every ``step_*.pt`` of a run, for curves over training) it measures on the validation
split, at the image resolution the evaluation uses:

- **query usage**: queries that win at least one pixel (argmax over queries), per image;
- **class-agnostic recall** of thing instances: a non-crowd GT thing counts as found when some query's argmax
  region overlaps it with IoU > 0.5 (no class, no threshold); plus the median best IoU;
- **pixel embeddings**: whether the final embeddings separate instances (nearest-mean test on the stride-4 grid);
- **classification of the queries that found a thing**: share whose best non-void class is the GT class, median
  probability of the GT class and of void, share that passes the thing threshold;
- **the post-processing funnel**: thing PQ / TP with the real thresholds, then with each threshold switched off in
  turn (a diagnosis of what they remove; the evaluation itself never changes).

Once per run, on the training pipeline (augmentation on, as the trainer sees it):

- **data**: non-crowd things per image in the annotation, after augmentation, and still present on the stride-4
  loss grid; areas on that grid; matched thing masks per batch;
- **gradient share** of each loss term at the last checkpoint: the norm of each term's gradient over all
  parameters, and its share of the sum of the norms, averaged over a few batches.

    python benchmarks/diagnose_things.py --run runs/demo --out runs/demo/diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from remax.checkpoint import checkpoint_categories, checkpoint_config, load_checkpoint
from remax.config import Config
from remax.data.coco_panoptic import COCOPanopticDataset, paths_from_config
from remax.engine.evaluate import evaluate_model
from remax.inference.predictor import Predictor, load_model_from_state, mask_logits_to_image

log = logging.getLogger("diagnose_things")
TERM_GROUPS = ("loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_instance_discrimination", "loss_semantic",
               "loss_remask_semantic")


def checkpoints_of(run: Path) -> list[Path]:
    """``step_*.pt`` in step order, then ``last.pt`` if it is not one of them."""
    folder = run / "checkpoints"
    steps = sorted(folder.glob("step_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    last = folder / "last.pt"
    if last.exists():
        last_step = int(load_checkpoint(last).get("step", -1))
        if not steps or int(re.findall(r"\d+", steps[-1].stem)[0]) != last_step:
            steps.append(last)
    if not steps:
        raise SystemExit(f"no checkpoints under {folder}")
    return steps


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@torch.inference_mode()
def probe_queries(predictor: Predictor, dataset: COCOPanopticDataset, max_images: int) -> dict[str, Any]:
    """Query usage, class-agnostic thing recall and the classes of the queries that found things."""
    cfg = predictor.cfg
    cat_index = {c.id: i for i, c in enumerate(predictor.categories)}
    winners, best_ious, found_cls_ok, found_p_gt, found_p_void, found_pass = [], [], [], [], [], []
    n_things = 0
    for i in range(min(max_images, len(dataset))):
        image = dataset.load_image(i)
        outputs, sizes = predictor.forward_batch([image])
        original = (int(image.shape[1]), int(image.shape[2]))
        masks = mask_logits_to_image(outputs["pred_masks"][0], predictor.input_size, sizes[0], original)
        probs = outputs["pred_logits"][0].float().softmax(-1)  # N×(K+1)
        owner = masks.argmax(0).numpy()
        winners.append(len(np.unique(owner)))
        gt = dataset.load_png_ids(i)
        for seg in dataset.segments_info(i):
            label = cat_index[int(seg["category_id"])]
            if not predictor.categories[label].isthing or seg.get("iscrowd", 0):
                continue
            region = gt == int(seg["id"])
            if not region.any():
                continue
            n_things += 1
            queries, counts = np.unique(owner[region], return_counts=True)
            ious = [(_iou(owner == q, region), q) for q in queries[np.argsort(-counts)][:5]]
            best, q = max(ious)
            best_ious.append(best)
            if best > 0.5:
                p = probs[q]
                non_void = p[:-1]
                found_cls_ok.append(int(non_void.argmax()) == label)
                found_p_gt.append(float(p[label]))
                found_p_void.append(float(p[-1]))
                found_pass.append(float(non_void.max()) >= cfg.eval.thing_threshold)
    found = len(found_cls_ok)
    med = (lambda xs: float(statistics.median(xs)) if xs else float("nan"))
    return {
        "images": len(winners),
        "winning_queries_per_image": float(np.mean(winners)) if winners else float("nan"),
        "things": n_things,
        "things_found_iou50": found,
        "recall_iou50": found / max(n_things, 1),
        "median_best_iou": med(best_ious),
        "found_class_correct": float(np.mean(found_cls_ok)) if found else float("nan"),
        "found_median_p_gt_class": med(found_p_gt),
        "found_median_p_void": med(found_p_void),
        "found_pass_thing_threshold": float(np.mean(found_pass)) if found else float("nan"),
    }


@torch.inference_mode()
def probe_embeddings(model: torch.nn.Module, cfg: Config, max_images: int) -> dict[str, Any]:
    """Do the final pixel embeddings separate instances? On the stride-4 grid of validation images (no
    augmentation): the share of thing pixels whose embedding is nearer (cosine) to their own instance's mean than to
    any other segment's mean, and the median cosine between a thing's mean and the nearest other segment's."""
    from remax.data.loader import build_dataset, collate_panoptic
    from remax.models import normalize_image

    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    captured: list[torch.Tensor] = []
    hook = model.transformer_decoder.predictor.pixel_conv2.register_forward_hook(
        lambda _m, _i, out: captured.append(torch.nn.functional.normalize(out.float(), dim=1)))
    nearest_own, other_cos = [], []
    try:
        model.eval()
        for i in range(min(max_images, len(val))):
            images, targets = collate_panoptic([val[i]], input_size=tuple(cfg.model.input_size),
                                               normalize=normalize_image)
            captured.clear()
            model(images)
            emb = captured[0][0]  # D×h×w
            t = targets[0]
            ids = t.id_map[::4, ::4][: emb.shape[1], : emb.shape[2]]
            segs = [s for s in range(t.num_segments) if not bool(t.is_crowd[s]) and bool((ids == s + 1).any())]
            if len(segs) < 2:
                continue
            means = torch.stack([torch.nn.functional.normalize(emb[:, ids == s + 1].mean(1), dim=0) for s in segs])
            for k, s in enumerate(segs):
                if not bool(t.is_thing[s]):
                    continue
                pix = emb[:, ids == s + 1].T  # n×D
                nearest = (pix @ means.T).argmax(1)
                nearest_own.append(float((nearest == k).float().mean()))
                sims = means @ means[k]
                sims[k] = -2.0
                other_cos.append(float(sims.max()))
    finally:
        hook.remove()
    med = (lambda xs: float(statistics.median(xs)) if xs else float("nan"))
    return {"things": len(nearest_own), "thing_pixels_nearest_own_mean": med(nearest_own),
            "things_mostly_separable": float(np.mean([v > 0.5 for v in nearest_own])) if nearest_own else float("nan"),
            "median_cos_to_nearest_other_segment": med(other_cos)}


def postprocessing_funnel(model: torch.nn.Module, cfg: Config, categories: list, dataset: COCOPanopticDataset,
                          max_images: int) -> dict[str, Any]:
    """Thing TP/FP/FN and PQ with the real post-processing, then with one threshold switched off at a time."""
    variants = {"default": [], "no_thing_threshold": ["eval.thing_threshold=0.0"],
                "no_pixel_threshold": ["eval.pixel_confidence_threshold=0.0"],
                "no_overlap_rule": ["eval.overlap_threshold=0.0"]}
    out = {}
    for name, overrides in variants.items():
        vcfg = cfg.override(overrides + ["eval.compute_ap=false", "eval.compute_miou=false"])
        res = evaluate_model(model, dataset, vcfg, categories, max_images=max_images, progress=False,
                             num_workers=0)
        things = res["pq"]["Things"]
        per = res["pq"]["per_class"]
        tp = sum(v.get("tp", 0) for k, v in per.items() if v.get("isthing"))
        fp = sum(v.get("fp", 0) for k, v in per.items() if v.get("isthing"))
        fn = sum(v.get("fn", 0) for k, v in per.items() if v.get("isthing"))
        out[name] = {"pq": 100 * res["pq"]["All"]["pq"], "thing_pq": 100 * things["pq"],
                     "stuff_pq": 100 * res["pq"]["Stuff"]["pq"], "thing_tp": tp, "thing_fp": fp, "thing_fn": fn}
    return out


def probe_data(cfg: Config, num_batches: int) -> dict[str, Any]:
    """Things per image through the training pipeline and on the stride-4 loss grid."""
    from remax.data.loader import build_dataset, collate_panoptic
    from remax.losses.targets import build_dense_targets
    from remax.models import normalize_image

    train = build_dataset(cfg.data, cfg.data.train_split, train=True)
    raw = build_dataset(cfg.data, cfg.data.train_split, train=False)
    bs = cfg.train.batch_size
    is_thing = torch.tensor([c.isthing for c in train.categories])
    h = -(-cfg.model.input_size[0] // 4)
    w = -(-cfg.model.input_size[1] // 4)
    annotated, augmented, on_grid, grid_areas, per_batch = [], [], [], [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(num_batches):
        idx = torch.randint(len(train), (bs,), generator=g).tolist()
        items = [train[i] for i in idx]
        for i in idx:
            t = raw[i]["target"]
            annotated.append(int((t.is_thing & ~t.is_crowd).sum()))
        images, targets = collate_panoptic(items, input_size=tuple(cfg.model.input_size), normalize=normalize_image)
        dense = build_dense_targets(targets, (h, w), cfg.model.num_classes)
        per_batch.append(int((is_thing[dense.classes.clamp(max=len(is_thing) - 1)] & dense.segment_valid).sum()))
        for t in targets:
            present = torch.unique(t.id_map[t.id_map > 0]) - 1
            things = [int(s) for s in present.tolist() if bool(t.is_thing[s]) and not bool(t.is_crowd[s])]
            augmented.append(len(things))
            grid_ids = t.id_map[::4, ::4]
            kept = [s for s in things if bool((grid_ids == s + 1).any())]
            on_grid.append(len(kept))
            grid_areas += [int((grid_ids == s + 1).sum()) for s in kept]
    areas = np.array(grid_areas) if grid_areas else np.zeros(1)
    return {
        "images": len(augmented),
        "things_per_image_annotated": float(np.mean(annotated)),
        "things_per_image_after_augmentation": float(np.mean(augmented)),
        "things_per_image_on_loss_grid": float(np.mean(on_grid)),
        "grid_area_percentiles_5_25_50_75_95": np.percentile(areas, [5, 25, 50, 75, 95]).round(1).tolist(),
        "grid_area_share_below_4_cells": float((areas < 4).mean()),
        "matched_things_per_batch": float(np.mean(per_batch)),
    }


def gradient_share(state: dict[str, Any], cfg: Config, num_batches: int) -> dict[str, float]:
    """Norm of each loss group's gradient over all parameters, and its share of the summed norms."""
    from remax.engine import build_parts
    from remax.engine.trainer import unpack_batch

    parts = build_parts(cfg, progress=False)
    parts.model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
    model = parts.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    norms: dict[str, list[float]] = {k: [] for k in TERM_GROUPS}
    for _ in range(num_batches):
        idx = torch.randint(len(parts.train_dataset), (cfg.train.batch_size,), generator=g).tolist()
        images, targets = unpack_batch(parts.collate_fn([parts.train_dataset[i] for i in idx]))
        kwargs = parts.forward_kwargs(targets) if parts.forward_kwargs else {}
        terms = parts.criterion.loss_terms(model(images, **kwargs), targets)
        for group in TERM_GROUPS:
            chosen = [v for k, v in terms.items() if k.split("/")[0] == group]
            if not chosen:
                continue
            grads = torch.autograd.grad(torch.stack(chosen).sum(), params, retain_graph=True, allow_unused=True)
            norms[group].append(float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads if gr is not None))))
    mean = {k: float(np.mean(v)) for k, v in norms.items() if v}
    total = sum(mean.values())
    return {k: {"grad_norm": v, "share": v / total} for k, v in mean.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="run folder (config.yaml, checkpoints/)")
    p.add_argument("--out", type=Path, help="JSON file for the results (default RUN/diagnosis.json)")
    p.add_argument("--max-images", type=int, default=50)
    p.add_argument("--data-batches", type=int, default=20)
    p.add_argument("--grad-batches", type=int, default=3)
    p.add_argument("--last-only", action="store_true", help="probe only the newest checkpoint")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    ckpts = checkpoints_of(args.run)
    if args.last_only:
        ckpts = ckpts[-1:]
    result: dict[str, Any] = {"run": str(args.run), "checkpoints": []}
    state = cfg = None
    for path in ckpts:
        state = load_checkpoint(path)
        cfg = checkpoint_config(state)
        categories = checkpoint_categories(state)
        model = load_model_from_state(state, cfg, where=str(path))
        predictor = Predictor(model, cfg, categories, semantic=False, instances=False)
        val = COCOPanopticDataset.from_paths(paths_from_config(cfg.data, cfg.data.val_split))
        row = {"checkpoint": path.name, "step": int(state.get("step", -1))}
        row.update(probe_queries(predictor, val, args.max_images))
        row["embeddings"] = probe_embeddings(model, cfg, args.max_images)
        row["funnel"] = postprocessing_funnel(model, cfg, categories, val, args.max_images)
        result["checkpoints"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("funnel", "embeddings")}), flush=True)
        print("  embeddings", json.dumps(row["embeddings"]), flush=True)
        print("  funnel", json.dumps(row["funnel"]), flush=True)
    result["data"] = probe_data(cfg, args.data_batches)
    print("data", json.dumps(result["data"]), flush=True)
    if args.grad_batches > 0:
        result["gradient_share"] = gradient_share(state, cfg, args.grad_batches)
        print("gradient share", json.dumps(result["gradient_share"]), flush=True)
    out = args.out or args.run / "diagnosis.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
