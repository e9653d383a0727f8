"""Overfitting: ``nano`` trained on 2 synthetic images memorises them.

This is the whole stack in one test: data reading, targets, matching, every loss term, the optimiser, the
post-processing merge and the PQ evaluation. A model that cannot memorise two images has a bug somewhere.
Augmentation is off and the two training images are also the validation split (``data.val_split=train``).

Geometry: the losses see the ground truth sub-sampled at stride 4 (kMaX-DeepLab), so 32 px images are trained
and evaluated at 4× (input 129, images filled to 128 and padded) and every original pixel has one supervised grid
point. Two numbers are checked:

- PQ at the supervised resolution (the stride-4 grid against the ground truth sampled as the losses see it): the
  memorisation itself, issue 6's bar of 90;
- PQ of the full pipeline at the image resolution (``remax eval``'s number). It plateaus near 85–86 here
  (measured 85.2 after 600 steps with the default softmax activations; 85.3 with sigmoid, 86.4 after 1500
  steps): with every grid point right (grid PQ 100), the bilinear upsampling of the logits between grid points
  still moves the boundaries of these 10-pixel shapes. The bar of 80 guards against regressions;
  the gap to 90 is reported in the issue, not hidden by this test.
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


def test_nano_overfits_two_images(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synthetic", num_train=2, num_val=0, size=SIZE, seed=0)
    cfg = get_config("nano").override([
        f"data.root={root}", "data.val_split=train", "data.num_workers=0",
        f"model.input_size=[{SIDE},{SIDE}]", f"data.crop_size=[{SIDE},{SIDE}]", f"data.resize_longer_side={SIDE - 1}",
        "data.min_scale=1", "data.max_scale=1", "data.hflip=false", "data.color_jitter=false",
        "data.copy_paste=false",
        "train.batch_size=2", "train.base_batch_size=2", "train.lr=0.003", f"train.max_steps={STEPS}",
        "train.warmup_steps=20", "train.log_every=100", "train.eval_every=0", "train.checkpoint_every=0",
        "train.keep_checkpoints=0", "train.device=cpu",
    ])
    assert cfg.model.drop_path == 0.0 and cfg.model.backbone_drop_path == 0.0
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "completed" and result["step"] == STEPS
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [STEPS]
    pq = evals[-1]["pq"]
    assert pq == pytest.approx(100 * result["eval"]["pq"]["All"]["pq"])
    # The mask terms collapse when the masks are memorised (measured: mask-ID 0.72 -> 0.01, dice 0.34 -> 0.02);
    # the total is dominated by instance discrimination, whose floor is the log of the pixels per mask.
    logged = [r for r in records if r["kind"] == "train"]
    for term in ("loss/loss_mask_id/final", "loss/loss_pq_dice/final"):
        assert logged[-1][term] < 0.1 * logged[0][term], term

    memorised = grid_pq(cfg, tmp_path / "run" / "checkpoints" / "last.pt")
    assert memorised >= 90.0, f"PQ {memorised:.1f} at the supervised stride-4 resolution"
    assert pq >= 80.0, f"PQ {pq:.1f} at the image resolution (SQ {evals[-1]['sq']:.1f}, RQ {evals[-1]['rq']:.1f})"
