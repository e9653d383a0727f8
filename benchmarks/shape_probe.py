"""How fast can a backbone learn the synthetic shapes at all? Semantic segmentation alone, no mask transformer.

Trains a model preset's backbone with the kMaX auxiliary semantic decoder on top, by per-pixel cross-entropy on
the synthetic training split (the training augmentation on), and reports on the validation split every
``--eval-every`` steps: the IoU of the thing and stuff classes, the share of thing pixels labelled as some thing,
and among those the share labelled with the right shape. It isolates the classification of shapes from the
matching, the queries and the post-processing (docs/convergence.md, "Why things were not learned").

    python benchmarks/shape_probe.py --steps 3000 --data data/synthetic128 --size 128 --thing-weight 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from remax.config import get_config
from remax.data.loader import build_dataset, collate_panoptic
from remax.losses.targets import build_dense_targets
from remax.models import build_model, normalize_image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--backbone", default=None, help="timm backbone instead of the preset's")
    p.add_argument("--data", default="data/synthetic128")
    p.add_argument("--size", type=int, default=128, help="image side; the input is size + 1")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.004)
    p.add_argument("--thing-weight", type=float, default=1.0, help="cross-entropy weight of the thing classes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    side = args.size + 1
    cfg = get_config(args.preset, data="synthetic").override([
        f"data.root={args.data}", f"model.input_size=[{side},{side}]", f"data.crop_size=[{side},{side}]",
        f"data.resize_longer_side={args.size}", "data.num_workers=0"])
    if args.backbone:
        cfg.model.backbone = args.backbone
    train, val = build_dataset(cfg.data, "train", train=True), build_dataset(cfg.data, "val", train=False)
    is_thing = np.array([c.isthing for c in train.categories])
    K = cfg.model.num_classes = len(train.categories)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, with_training_heads=True)
    net = torch.nn.ModuleDict({"backbone": model.backbone, "head": model.aux_semantic_head})
    optim = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.005)
    weights = torch.tensor([args.thing_weight if t else 1.0 for t in is_thing], dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)

    def logits_and_labels(items):
        images, targets = collate_panoptic(items, input_size=tuple(cfg.model.input_size), normalize=normalize_image)
        logits = net["head"](net["backbone"](images))
        h, w = logits.shape[-2:]
        return logits, build_dense_targets(targets, (h, w), K).semantic()

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        net.eval()
        conf = np.zeros((K, K), dtype=np.int64)
        for start in range(0, len(val), 10):
            logits, labels = logits_and_labels([val[i] for i in range(start, min(start + 10, len(val)))])
            pred, labels = logits.argmax(1).flatten(1), labels
            ok = labels < K
            np.add.at(conf, (labels[ok].numpy(), pred[ok].numpy()), 1)
        net.train()
        iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
        thing_rows = conf[is_thing]
        as_thing = thing_rows[:, is_thing]
        return {"thing_iou": 100 * float(iou[is_thing].mean()), "stuff_iou": 100 * float(iou[~is_thing].mean()),
                "thing_pixels_as_thing": 100 * float(as_thing.sum() / max(thing_rows.sum(), 1)),
                "shape_accuracy": 100 * float(np.trace(as_thing) / max(as_thing.sum(), 1))}

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        logits, labels = logits_and_labels([train[i] for i in idx])
        loss = torch.nn.functional.cross_entropy(logits.flatten(2), labels, weight=weights, ignore_index=K)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % args.eval_every == 0 or step == args.steps:
            scores = {k: round(v, 1) for k, v in evaluate().items()}
            row = {"step": step, "loss": round(float(loss.detach()), 4), **scores,
                   "seconds": round(time.perf_counter() - start)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
