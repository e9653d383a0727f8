"""The reference evaluation protocol (``eval.protocol=reference``): each way it differs from ours, pinned on
hand-made cases, and the default protocol left as it was."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inference_helpers import CATEGORIES, nano_config, nano_model, write_checkpoint, write_gt_root
from PIL import Image

from remax.cli import main
from remax.config import EvalConfig
from remax.data.coco_panoptic import COCOPanopticDataset
from remax.engine.evaluate import evaluate_model
from remax.inference.postprocess import instance_postprocess, panoptic_postprocess
from remax.inference.predictor import (Predictor, mask_logits_to_image, preprocess, reference_crop,
                                       reference_resized_shape, resize_uint8_pil, resized_shape)

# ------------------------------------------------------------------------------------------------ class thresholds


def _one_query_at(score_logits: list[float], height: int = 4, width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Query 0 covers the whole image with the given class logits; query 1 is a void query with no pixels."""
    class_logits = torch.tensor([score_logits, [-9.0] * (len(score_logits) - 1) + [9.0]])
    mask_logits = torch.stack([torch.full((height, width), 8.0), torch.full((height, width), -8.0)])
    return class_logits, mask_logits


@pytest.mark.parametrize("thing", [True, False])
def test_score_exactly_at_the_threshold_is_kept_by_remax_and_dropped_by_reference(thing):
    # Logits 0, 0, -inf: P_cls = [0.5, 0.5] exactly (void 0), so class 0 scores exactly 0.5.
    class_logits, mask_logits = _one_query_at([0.0, 0.0, -math.inf])
    is_thing = torch.tensor([thing, False])
    cfg = EvalConfig(thing_threshold=0.5, stuff_threshold=0.5)
    ours = panoptic_postprocess(class_logits, mask_logits, is_thing, cfg)
    assert [(s["category_id"], s["isthing"], s["area"]) for s in ours.segments_info] == [(0, thing, 20)]
    assert ours.segments_info[0]["score"] == 0.5
    ref = panoptic_postprocess(class_logits, mask_logits, is_thing, EvalConfig(thing_threshold=0.5,
                                                                               stuff_threshold=0.5,
                                                                               protocol="reference"))
    assert ref.segments_info == [] and int(ref.id_map.abs().sum()) == 0
    # Just above the threshold both keep it.
    above = EvalConfig(thing_threshold=0.4999, stuff_threshold=0.4999, protocol="reference")
    assert len(panoptic_postprocess(class_logits, mask_logits, is_thing, above).segments_info) == 1


def test_unknown_protocol_is_refused():
    class_logits, mask_logits = _one_query_at([0.0, 0.0, -math.inf])
    with pytest.raises(ValueError, match="eval.protocol must be one of remax, reference; got 'tf'"):
        panoptic_postprocess(class_logits, mask_logits, torch.tensor([True, False]), EvalConfig(protocol="tf"))
    cfg = nano_config()
    cfg.eval.protocol = "Reference"
    with pytest.raises(ValueError, match="eval.protocol"):
        Predictor(nano_model(cfg), cfg, CATEGORIES)


# ------------------------------------------------------------------------------------------------ instance top-k


def test_reference_takes_the_top_k_over_all_classes_before_dropping_stuff():
    # Classes: 0 thing, 1 stuff; void last. Queries 0 and 1 are confident stuff, query 2 a thing.
    probs = torch.tensor([[0.05, 0.90, 0.05],
                          [0.10, 0.80, 0.10],
                          [0.70, 0.20, 0.10]])
    class_logits = probs.log()
    mask_logits = torch.full((3, 2, 4), -5.0)
    mask_logits[0, 0, :2] = 5.0  # query 0 owns 2 pixels, query 1 two others, query 2 the bottom row
    mask_logits[1, 0, 2:] = 5.0
    mask_logits[2, 1, :] = 5.0
    is_thing = torch.tensor([True, False])
    ours = instance_postprocess(class_logits, mask_logits, is_thing, EvalConfig(), topk=2)
    # Ours: the two best (query, thing) pairs: query 2 (0.70), then query 1 (0.10).
    assert ours.labels.tolist() == [0, 0]
    p_mask = mask_logits.softmax(0)
    binary = p_mask > 0.4
    mean = [(p_mask[q] * binary[q]).sum() / binary[q].sum() for q in range(3)]
    assert ours.scores.tolist() == pytest.approx([0.70 * float(mean[2]), 0.10 * float(mean[1])], rel=1e-6)
    assert torch.equal(ours.masks, binary[[2, 1]])
    # Reference: the top 2 over all classes are the two stuff pairs (0.90, 0.80); dropping stuff leaves nothing.
    ref = instance_postprocess(class_logits, mask_logits, is_thing, EvalConfig(protocol="reference"), topk=2)
    assert len(ref) == 0
    # With room for the thing pair it comes third and alone survives; its mean divides by pixels + 1e-6.
    ref3 = instance_postprocess(class_logits, mask_logits, is_thing, EvalConfig(protocol="reference"), topk=3)
    assert ref3.labels.tolist() == [0]
    inside = float((p_mask[2] * binary[2]).sum())
    assert ref3.scores.tolist() == pytest.approx([0.70 * inside / (4 + 1e-6)], rel=1e-7)
    assert torch.equal(ref3.masks, binary[[2]])


# ------------------------------------------------------------------------------------------------ input resize


def test_resized_input_size_under_each_protocol():
    # COCO 640×480 in the 1281 input: ours fills 1280 and pads one pixel, the reference stretches to 1281.
    assert resized_shape(480, 640, (1281, 1281)) == (960, 1280)
    assert resized_shape(427, 640, (1281, 1281)) == (854, 1280)
    assert resized_shape(300, 400, (1281, 1281)) == (960, 1280)
    assert reference_resized_shape(480, 640, (1281, 1281)) == (961, 1281)
    assert reference_resized_shape(427, 640, (1281, 1281)) == (855, 1281)  # 854.6 rounds half up
    assert reference_resized_shape(300, 400, (1281, 1281)) == (961, 1281)
    # The synthetic 128 px images in the 129 input used for the nano runs.
    assert resized_shape(128, 128, (129, 129)) == (128, 128)
    assert reference_resized_shape(128, 128, (129, 129)) == (129, 129)
    # Cityscapes 1024×2048 in 1025×2049: ours pads, the reference stretches, then crops 1024 rows (round half even).
    assert resized_shape(1024, 2048, (1025, 2049)) == (1024, 2048)
    assert reference_resized_shape(1024, 2048, (1025, 2049)) == (1025, 2049)
    assert reference_crop(1024, 2048, (1025, 2049)) == (1024, 2049)
    assert reference_crop(480, 640, (1281, 1281)) == (961, 1281)
    # An image the reference would run beyond the fixed input is fitted instead.
    assert reference_resized_shape(2048, 1024, (1025, 2049)) == (1025, 513)


def test_reference_preprocess_uses_pil_bilinear_on_uint8():
    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.integers(0, 256, (3, 128, 128), dtype=np.uint8))
    batch, sizes = preprocess([img], (129, 129), protocol="reference")
    assert sizes == [(129, 129)]
    arr = np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((129, 129), Image.BILINEAR))
    expected = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(batch[0], expected)
    assert torch.equal(resize_uint8_pil(img, (129, 129)), torch.from_numpy(arr.copy()).permute(2, 0, 1))
    # Ours keeps the image as it is and pads the last row and column with exact zeros.
    ours, sizes = preprocess([img], (129, 129))
    assert sizes == [(128, 128)]
    assert torch.equal(ours[0, :, :128, :128], img.float() / 127.5 - 1.0)
    assert int(ours[0, :, 128].abs().sum()) == 0 and int(ours[0, :, :, 128].abs().sum()) == 0


# ------------------------------------------------------------------------------------------------ logits resize


def test_logits_back_to_the_image_with_align_corners_under_reference():
    # Stride-4 logits of a 5×5 input: 2×2. With align_corners the 5×5 upsampling is v(i, j) = i/2 + j/4.
    logits = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    up = F.interpolate(logits[None], size=(5, 5), mode="bilinear", align_corners=True)[0, 0]
    assert up[4, 4] == 3.0 and up[2, 2] == pytest.approx(1.5)
    # Reference, 3×3 image: align_corners again samples rows/columns 0, 2, 4 of that grid: i + j/2.
    ref = mask_logits_to_image(logits, (5, 5), (5, 5), (3, 3), protocol="reference")[0]
    assert ref.tolist() == [[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]
    # Ours: pixel centres (k + 0.5)·5/3 - 0.5 = 1/3, 2, 11/3 of the 5×5 grid, value p_row/2 + p_col/4.
    ours = mask_logits_to_image(logits, (5, 5), (5, 5), (3, 3))[0]
    pos = [1 / 3, 2.0, 11 / 3]
    assert ours.flatten().tolist() == pytest.approx([r / 2 + c / 4 for r in pos for c in pos], abs=1e-6)
    # Same size: both protocols leave the crop unchanged.
    assert torch.equal(mask_logits_to_image(logits, (5, 5), (5, 5), (5, 5), protocol="reference"), up[None])


# ------------------------------------------------------------------------------------------------ end to end


def test_default_protocol_is_remax_and_unchanged_by_the_option():
    cfg = nano_config()
    assert cfg.eval.protocol == "remax" and EvalConfig().protocol == "remax"
    model = nano_model(cfg)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 96, 128), dtype=np.uint8))
    default = Predictor(model, cfg, CATEGORIES).predict_tensors([image])[0]
    # The default path by hand: fit 128 (padded to 129), align_corners up, crop, align_corners=False back.
    batch, sizes = preprocess([image], (129, 129))
    assert sizes == [(96, 128)]
    with torch.inference_mode():
        out = model(batch)
    masks = mask_logits_to_image(out["pred_masks"][0], (129, 129), (96, 128), (96, 128))
    by_hand = panoptic_postprocess(out["pred_logits"][0].float(), masks, torch.tensor([c.isthing for c in CATEGORIES]),
                                   cfg.eval)
    assert torch.equal(default.id_map, by_hand.id_map)
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.eval.protocol = "reference"
    ref = Predictor(model, ref_cfg, CATEGORIES).predict_tensors([image])[0]
    assert ref.id_map.shape == default.id_map.shape == (96, 128)
    assert not torch.equal(ref.id_map, default.id_map)  # the stretched input moves the masks


def test_evaluate_and_cli_select_the_reference_protocol(tmp_path, capsys):
    root = tmp_path / "data"
    write_gt_root(root)
    cfg = nano_config()
    model = nano_model(cfg)
    dataset = COCOPanopticDataset.from_root(root, "val")
    ref_cfg = cfg.override(["eval.protocol=reference"])
    api = evaluate_model(model, dataset, ref_cfg, CATEGORIES, progress=False, num_workers=0)
    ckpt = write_checkpoint(tmp_path / "model.pt")
    results = {}
    for name, extra in (("flag", ["--protocol", "reference"]), ("set", ["--set", "eval.protocol=reference"]),
                        ("default", [])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu", "--no-progress",
                     "--json", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    capsys.readouterr()
    assert results["flag"] == results["set"]
    for split in ("All", "Things", "Stuff"):
        assert results["flag"][split]["pq"] == pytest.approx(api["pq"][split]["pq"])
    assert results["flag"]["miou"] == pytest.approx(api["miou"])
    # Scoring predictions on disk has no protocol to choose.
    assert main(["eval", "--pred-json", str(tmp_path / "x.json"), "--gt", str(root), "--protocol", "reference"]) != 0
    assert "--protocol only apply to --checkpoint" in capsys.readouterr().err
