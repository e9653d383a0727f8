"""Category order: a model whose classes are not in the data set's (things-first) order is evaluated and
fine-tuned by category id, and a different category set is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from inference_helpers import CATEGORIES, gt_images, nano_config, nano_model, write_gt_root

from remax.checkpoint import categories_to_state, save_checkpoint
from remax.cli import main
from remax.data.coco_panoptic import COCOPanopticDataset, DatasetError
from remax.engine.evaluate import evaluate_model
from remax.engine.trainer import load_init_weights
from remax.models import build_model
from remax.models.heads import KMaXPredictor
from remax.structures import CategoryInfo, category_mismatch

# Interleaved stuff / things, the way the reference orders Cityscapes and ADE20K (not things first).
MIXED_IDS = [15, 10, 16, 11, 17, 12, 18, 13, 14]


def _by_id() -> dict[int, CategoryInfo]:
    return {c.id: c for c in CATEGORIES}


def _write_mixed_json_root(root) -> None:
    """The fixture data set with its JSON categories listed in the interleaved order."""
    write_gt_root(root)
    path = root / "annotations" / "panoptic_val.json"
    data = json.loads(path.read_text())
    by_id = {c["id"]: c for c in data["categories"]}
    data["categories"] = [by_id[i] for i in MIXED_IDS]
    path.write_text(json.dumps(data))


def _permuted_model(model: torch.nn.Module, order: list[CategoryInfo]) -> torch.nn.Module:
    """The same network with its class rows rearranged so that row k predicts ``order[k]`` (void stays last)."""
    index = {c.id: k for k, c in enumerate(CATEGORIES)}
    rows = torch.tensor([index[c.id] for c in order] + [len(CATEGORIES)])
    other = nano_model(nano_config())
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for mod in other.modules():
            if isinstance(mod, KMaXPredictor):
                mod.class_head.weight.copy_(mod.class_head.weight[rows])
                mod.class_head.bias.copy_(mod.class_head.bias[rows])
    return other.eval()


class _GroundTruthModel(torch.nn.Module):
    """Answers image 1 of the fixture perfectly whatever the input: one query per ground-truth segment, its mask
    on the stride-4 grid (which falls on the 24×32 image's pixels at the 129 input) and its class in ``order``.

    Each query is a little more confident than the previous one, so the semantic argmax has no ties that the
    class order could break differently.
    """

    def __init__(self, order: list[CategoryInfo]) -> None:
        super().__init__()
        image = gt_images()[0]
        segments = [s for s in image["segments"] if not s["iscrowd"]]
        index = {c.id: k for k, c in enumerate(order)}
        self.register_buffer("logits", torch.full((len(segments), len(order) + 1), -5.0))
        self.register_buffer("masks", torch.full((len(segments), 33, 33), -50.0))
        ids = torch.from_numpy(image["ids"])
        for q, seg in enumerate(segments):
            self.logits[q, index[seg["category_id"]]] = 8.0 + q
            self.masks[q, :24, :32][ids == seg["id"]] = 50.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        return {"pred_logits": self.logits.expand(b, -1, -1), "pred_masks": self.masks.expand(b, -1, -1, -1)}


def _scores(result: dict) -> tuple:
    pq = result["pq"]
    per_class = {cid: (v["tp"], v["fp"], v["fn"], round(v["iou"], 9)) for cid, v in pq["per_class"].items()}
    return (per_class, round(result["miou"], 12), result["ap"])


def test_dataset_contiguous_ids_follow_a_given_order(tmp_path):
    _write_mixed_json_root(tmp_path / "data")
    plain = COCOPanopticDataset.from_root(tmp_path / "data", "val")
    assert [c.id for c in plain.categories] == [10, 11, 12, 13, 14, 15, 16, 17, 18]  # things first by default
    order = [_by_id()[i] for i in MIXED_IDS]
    ds = COCOPanopticDataset.from_root(tmp_path / "data", "val", category_order=order)
    assert [c.id for c in ds.categories] == MIXED_IDS
    assert ds.category_map == {cid: k for k, cid in enumerate(MIXED_IDS)}
    # Image 1: sky 15, road 16, person 10, car 11, crowd 10 -> contiguous 0, 2, 1, 3, 1 in the mixed order.
    assert ds.target(0).classes.tolist() == [0, 2, 1, 3, 1]
    assert plain.target(0).classes.tolist() == [5, 6, 0, 1, 0]
    assert ds.target(0).is_thing.tolist() == plain.target(0).is_thing.tolist() == [False, False, True, True, True]
    plain.set_category_order(order)
    assert plain.target(0).classes.tolist() == [0, 2, 1, 3, 1]


def test_a_different_category_set_is_one_line_naming_the_ids(tmp_path):
    _write_mixed_json_root(tmp_path / "data")
    order = [c for c in CATEGORIES if c.id != 13] + [CategoryInfo(id=99, name="boat", isthing=True)]
    with pytest.raises(DatasetError) as err:
        COCOPanopticDataset.from_root(tmp_path / "data", "val", category_order=order)
    message = str(err.value)
    assert "\n" not in message
    assert "only in the checkpoint: 99 (boat)" in message and "13 (class3)" in message
    # A category whose thing/stuff kind differs is named too.
    flipped = [CategoryInfo(id=c.id, name=c.name, isthing=not c.isthing if c.id == 15 else c.isthing)
               for c in CATEGORIES]
    assert category_mismatch(flipped, CATEGORIES) == ("the categories of the checkpoint (9) and the data set (9) "
                                                      "differ: thing/stuff differs for: 15 (class5)")
    assert category_mismatch([CATEGORIES[i] for i in (3, 1, 2, 0, 4, 5, 6, 7, 8)], CATEGORIES) is None


def test_evaluation_of_a_reordered_model_scores_the_same_as_the_aligned_one(tmp_path):
    _write_mixed_json_root(tmp_path / "data")
    cfg = nano_config()
    model = nano_model(cfg)
    mixed = [_by_id()[i] for i in MIXED_IDS]
    permuted = _permuted_model(model, mixed)
    plain = COCOPanopticDataset.from_root(tmp_path / "data", "val")
    aligned = evaluate_model(model, plain, cfg, CATEGORIES, progress=False, num_workers=0)
    # The reordered model on the data set in its own order (the metric's class order is the data set's) ...
    reordered = evaluate_model(permuted, plain, cfg, mixed, progress=False, num_workers=0)
    # ... and on the data set renumbered into the model's order, as `remax eval --checkpoint` builds it.
    follows = COCOPanopticDataset.from_root(tmp_path / "data", "val", category_order=mixed)
    renumbered = evaluate_model(permuted, follows, cfg, mixed, progress=False, num_workers=0)
    assert aligned["miou"] > 0
    assert _scores(reordered) == _scores(aligned) == _scores(renumbered)
    assert reordered["pq"]["All"] == pytest.approx(aligned["pq"]["All"])
    # A model whose category set differs is refused in one line naming the ids.
    other = [c for c in CATEGORIES if c.id != 18] + [CategoryInfo(id=42, name="kite", isthing=False)]
    with pytest.raises(ValueError) as err:
        evaluate_model(model, plain, cfg, other, progress=False, num_workers=0)
    assert "\n" not in str(err.value)
    assert "only in the model: 42 (kite)" in str(err.value) and "only in the data set: 18 (class8)" in str(err.value)


def test_a_perfect_answer_in_another_class_order_scores_perfectly(tmp_path):
    _write_mixed_json_root(tmp_path / "data")
    cfg = nano_config()
    mixed = [_by_id()[i] for i in MIXED_IDS]
    results = []
    for order, dataset_order in ((CATEGORIES, None), (mixed, None), (mixed, mixed)):
        dataset = COCOPanopticDataset.from_root(tmp_path / "data", "val", category_order=dataset_order)
        results.append(evaluate_model(_GroundTruthModel(order), dataset, cfg, order, max_images=1, progress=False,
                                      num_workers=0))
    # Every segment is found; bilinear resizing rounds off one convex corner pixel of the person (72 pixels), the
    # car (66) and the road (128) to a neighbouring segment.
    iou = {10: 71 / 72, 11: 65 / 66, 15: 1.0, 16: 127 / 128}
    for result in results:
        pq = result["pq"]
        assert {cid: v["iou"] for cid, v in pq["per_class"].items() if v["tp"]} == pytest.approx(iou)
        assert all(v["tp"] == 1 and v["fp"] == v["fn"] == 0 for cid, v in pq["per_class"].items() if cid in iou)
        assert pq["All"]["pq"] == pytest.approx(sum(iou.values()) / 4) and pq["All"]["n"] == 4
        assert result["ap"] == pytest.approx(1.0) and result["miou"] > 0.85
    assert _scores(results[1]) == _scores(results[0]) == _scores(results[2])


def test_cli_eval_of_a_checkpoint_in_another_order(tmp_path, capsys):
    _write_mixed_json_root(tmp_path / "data")
    cfg = nano_config()
    model = nano_model(cfg)
    mixed = [_by_id()[i] for i in MIXED_IDS]
    results = {}
    for name, net, cats in (("aligned", model, CATEGORIES), ("mixed", _permuted_model(model, mixed), mixed)):
        ckpt = save_checkpoint(tmp_path / f"{name}.pt", {"model": net.state_dict(), "config": cfg.to_dict(),
                                                        "categories": categories_to_state(cats)})
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--device", "cpu",
                     "--no-progress", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert results["mixed"]["per_class"] == results["aligned"]["per_class"]
    assert results["mixed"]["miou"] == pytest.approx(results["aligned"]["miou"], abs=1e-12)
    wrong = [c for c in CATEGORIES if c.id != 18] + [CategoryInfo(id=42, name="kite", isthing=False)]
    ckpt = save_checkpoint(tmp_path / "wrong.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                                   "categories": categories_to_state(wrong)})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "42 (kite)" in err and "18 (class8)" in err


def test_init_from_loads_class_heads_only_for_the_same_categories_in_the_same_order(tmp_path):
    cfg = nano_config()
    source = build_model(cfg.model, with_training_heads=True)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = save_checkpoint(tmp_path / "init.pt", {"model": source.state_dict(), "config": cfg.to_dict(),
                                                 "categories": categories_to_state(CATEGORIES)})
    class_keys = {k for k in source.state_dict() if ".class_head." in k or "classifier." in k}
    assert any(k.startswith("aux_semantic_head.") for k in class_keys)

    same = build_model(cfg.model, with_training_heads=True)
    report = load_init_weights(same, path, categories=list(CATEGORIES))
    assert report["reinitialised"] == [] and class_keys <= set(report["loaded"])
    assert all(torch.equal(same.state_dict()[k], source.state_dict()[k]) for k in class_keys)

    # Another category set of the same size: the class rows would mean other classes, so they start fresh.
    other = [c for c in CATEGORIES if c.id != 18] + [CategoryInfo(id=42, name="kite", isthing=False)]
    fresh = build_model(cfg.model, with_training_heads=True)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_init_weights(fresh, path, categories=other)
    assert set(report["reinitialised"]) == class_keys
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in class_keys)
    body = "transformer_decoder.class_embedding.conv.weight"
    assert body in report["loaded"] and torch.equal(fresh.state_dict()[body], source.state_dict()[body])


def test_build_parts_puts_the_training_data_in_the_init_checkpoint_order(tmp_path):
    from remax.config import get_config
    from remax.data.synthetic import write_synthetic_dataset
    from remax.engine import build_parts

    root = tmp_path / "synthetic"
    write_synthetic_dataset(root, 2, 1, size=32, seed=0)
    cfg = get_config("nano").override([f"data.root={root}", "data.num_workers=0", "model.input_size=[33,33]",
                                       "data.crop_size=[33,33]", "data.resize_longer_side=32"])
    own = build_parts(cfg, progress=False).categories
    assert not any(a.isthing is False and b.isthing for a, b in zip(own, own[1:]))  # things first
    reordered = own[::-1]  # stuff first
    parts = build_parts(cfg, progress=False, init_categories=reordered)
    assert [c.id for c in parts.categories] == [c.id for c in reordered]
    assert [c.id for c in parts.train_dataset.categories] == [c.id for c in reordered]
    # A different set keeps the data set's own order (the class heads then start fresh).
    other = own[:-1] + [CategoryInfo(id=999, name="kite", isthing=False)]
    assert [c.id for c in build_parts(cfg, progress=False, init_categories=other).categories] == [c.id for c in own]
