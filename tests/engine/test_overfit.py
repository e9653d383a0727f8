"""Overfitting: ``nano`` trained on 2 synthetic images memorises them.

This is the whole stack in one test: data reading, targets, matching, every loss term, the optimiser, the
post-processing merge and the PQ evaluation. A model that cannot memorise two images has a bug somewhere.
Augmentation is off and the two training images are also the validation split (``data.val_split=train``).

Geometry: 32 px images are trained and evaluated at 4× (input 129, images filled to 128 and padded), so every
original pixel has one stride-4 grid point. Two supervisions are run:

- kMaX-DeepLab's (``loss.mask_loss_stride=4``, the default): the losses see the ground truth sub-sampled at the
  grid points only. The memorisation is checked where it is supervised (PQ of the grid predictions against the
  grid ground truth, measured 100). At the image resolution (``remax eval``'s number) it measured 85.2: each
  grid point sits 3/8 of a pixel from its pixel's centre, the unsupervised boundaries between grid points fall
  midway, and the bilinear upsampling moves the edges of these 10-pixel shapes (measured by re-sampling the
  same logits: PQ 100 on the grid points, 99.2 at 1/4 of a cell, 85.2 at the pixel centres, 71.0 at 1/2).
- Upsampled supervision (``loss.mask_loss_stride=1``): the mask terms see every input pixel, so the boundaries
  between grid points are learned too; measured PQ 98.6 at the image resolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from remax.checkpoint import load_checkpoint
from remax.config import get_config
from remax.data.loader import build_dataset, collate_panoptic
from remax.data.synthetic import write_synthetic_dataset
from remax.engine import train
from remax.evaluation import PanopticQuality
from remax.inference.postprocess import panoptic_postprocess
from remax.models import build_model, normalize_image

SIZE = 32  # image side
SIDE = 129  # model input: the image filled to 128 (4×) and padded by one pixel
STEPS = 600


def grid_pq(cfg, checkpoint: Path) -> float:
    """PQ (%) of the stride-4 predictions against the stride-4 ground truth of the training images."""
    model = build_model(cfg.model, with_training_heads=True)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    dataset = build_dataset(cfg.data, "train", train=True)  # augmentation is off: the training view
    images, targets = collate_panoptic([dataset[i] for i in range(len(dataset))], input_size=(SIDE, SIDE),
                                       normalize=normalize_image)
    with torch.no_grad():
        out = model(images)
    is_thing = torch.tensor([c.isthing for c in dataset.categories])
    pq = PanopticQuality([{"id": k, "name": c.name, "isthing": int(c.isthing)}
                          for k, c in enumerate(dataset.categories)])
    cells = (SIDE - 1) // 4  # grid points inside the 128-pixel image
    for b, target in enumerate(targets):
        pred = panoptic_postprocess(out["pred_logits"][b], out["pred_masks"][b, :, :cells, :cells], is_thing,
                                    cfg.eval)
        gt = target.id_map[::4, ::4][:cells, :cells]
        gt_segments = [{"id": k + 1, "category_id": int(target.classes[k]), "iscrowd": int(target.is_crowd[k])}
                       for k in range(target.num_segments) if bool((gt == k + 1).any())]
        pq.update(gt.numpy(), gt_segments, pred.id_map.numpy(), pred.segments_info, image_id=b)
    return 100 * pq.compute()["All"]["pq"]


def train_on_two_images(tmp_path: Path, *overrides: str):
    """Train nano on 2 synthetic images (also the validation split); returns (config, metrics records)."""
    root = write_synthetic_dataset(tmp_path / "synthetic", num_train=2, num_val=0, size=SIZE, seed=0)
    cfg = get_config("nano").override([
        f"data.root={root}", "data.val_split=train", "data.num_workers=0",
        f"model.input_size=[{SIDE},{SIDE}]", f"data.crop_size=[{SIDE},{SIDE}]", f"data.resize_longer_side={SIDE - 1}",
        "data.min_scale=1", "data.max_scale=1", "data.hflip=false", "data.color_jitter=false",
        "data.copy_paste=false",
        "train.batch_size=2", "train.base_batch_size=2", "train.lr=0.003", f"train.max_steps={STEPS}",
        "train.warmup_steps=20", "train.log_every=100", "train.eval_every=0", "train.checkpoint_every=0",
        "train.keep_checkpoints=0", "train.device=cpu", *overrides,
    ])
    assert cfg.model.drop_path == 0.0 and cfg.model.backbone_drop_path == 0.0
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "completed" and result["step"] == STEPS
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [STEPS]
    assert evals[-1]["pq"] == pytest.approx(100 * result["eval"]["pq"]["All"]["pq"])
    return cfg, records


def test_nano_overfits_two_images(tmp_path: Path) -> None:
    """kMaX-DeepLab's stride-4 supervision: memorised at the grid points, within 15 PQ of it at the pixels."""
    cfg, records = train_on_two_images(tmp_path)
    last = [r for r in records if r["kind"] == "eval"][-1]
    # The mask terms collapse when the grid is memorised (measured: mask-ID 0.72 -> 0.01, dice 0.34 -> 0.02);
    # the total is dominated by instance discrimination, whose floor is the log of the pixels per mask.
    # (Supervised at every pixel they fall less, 0.75 -> 0.06 and 0.35 -> 0.08: the logits interpolated across
    # a boundary keep soft probabilities on the pixels next to it.)
    logged = [r for r in records if r["kind"] == "train"]
    for term in ("loss/loss_mask_id/final", "loss/loss_pq_dice/final"):
        assert logged[-1][term] < 0.1 * logged[0][term], term
    memorised = grid_pq(cfg, tmp_path / "run" / "checkpoints" / "last.pt")
    assert memorised >= 90.0, f"PQ {memorised:.1f} at the supervised stride-4 resolution"
    assert last["pq"] >= 80.0, f"PQ {last['pq']:.1f} at the image resolution (SQ {last['sq']:.1f})"


def test_nano_overfits_two_images_at_image_resolution(tmp_path: Path) -> None:
    """Supervising every input pixel (``loss.mask_loss_stride=1``): memorised at the image resolution."""
    cfg, records = train_on_two_images(tmp_path, "loss.mask_loss_stride=1")
    last = [r for r in records if r["kind"] == "eval"][-1]
    assert last["pq"] >= 90.0, f"PQ {last['pq']:.1f} at the image resolution (SQ {last['sq']:.1f})"
    memorised = grid_pq(cfg, tmp_path / "run" / "checkpoints" / "last.pt")
    assert memorised >= 90.0, f"PQ {memorised:.1f} at the stride-4 grid points"
