"""Converting the reference's Cityscapes (and ADE20K) R50 checkpoints, and evaluating a converted Cityscapes
checkpoint on a Cityscapes-format data set with the right class mapping.

No reference outputs exist for these configurations (the parity fixture covers the COCO R50 / ConvNeXt-T models
only), so there is no numerical parity here. What is checked instead: the key lists derived from the reference's
code (:func:`reference_parity.cityscapes_r50_reference_keys`, ``ade20k_r50_reference_keys``) map completely and
strictly onto the presets, the converted model runs, individual class rows land where the categories say, and an
evaluation on a small fabricated Cityscapes set reports the class the planted weights predict under its Cityscapes
label id, i.e. the checkpoint's train-id order is matched to the data set by id, not by position.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_parity import (ade20k_r50_reference_keys, cityscapes_r50_reference_keys, coco_r50_reference_keys,
                              state_dict_from_keys)

from remax.checkpoint import checkpoint_config, load_checkpoint
from remax.cli import main
from remax.convert import reference_categories, reference_config
from remax.data.cityscapes import convert_cityscapes
from remax.models import normalize_image
from remax.models.convert_reference import plan_reference_conversion
from remax.models.kmax_deeplab import KMaXDeepLab

pytestmark = pytest.mark.usefixtures("one_thread")

# A small input of the Cityscapes aspect ratio. The reference bakes the input size into its axial attention
# (``query_shape = size // stride + size % 2`` per axis: 3 x 5 at stride 32 and 5 x 9 at stride 16 for 65 x 129),
# which is exactly the feature size its ResNet gives (and ours: ceil-halving), so the converted weights compute
# the same function at this size; the 509-row relative-position tables do not depend on it.
SIZE = (65, 129)
SMALL = f"model.input_size=[{SIZE[0]},{SIZE[1]}]"
CAR = 13  # Cityscapes train id of "car": its row in the reference's class heads; label id 26
CAR_ID = 26
_FINAL = "sem_seg_head.predictor._predcitor."
_AUX = "sem_seg_head.predictor._auxiliary_semantic_predictor."


@pytest.fixture(scope="module")
def city_weights() -> dict[str, torch.Tensor]:
    """The reference-format Cityscapes R50 state_dict, every tensor made by the fixture's weight rule."""
    return state_dict_from_keys(cityscapes_r50_reference_keys())


@pytest.fixture(scope="module")
def converted(city_weights, tmp_path_factory) -> Path:
    """`remax convert-checkpoint` of a detectron2-style Cityscapes R50 file at 65 x 129, aux head kept."""
    folder = tmp_path_factory.mktemp("cityscapes")
    src = folder / "kmax_r50_cityscapes.pth"
    torch.save({"model": city_weights, "iteration": 60000}, src)
    dst = folder / "converted.pt"
    assert main(["convert-checkpoint", str(src), str(dst), "--preset", "kmax_cityscapes_r50",
                 "--dataset", "cityscapes", "--set", SMALL]) == 0
    src.unlink()  # 230 MB; the converted file is all the tests need
    return dst


def _zeros(keys: list[dict]) -> dict[str, torch.Tensor]:
    return {k["name"]: torch.zeros(k["shape"], dtype=torch.int64 if k["dtype"] == "int64" else torch.float32)
            for k in keys}


# ------------------------------------------------------------------------------------------------ key lists


def test_derived_key_lists_encode_the_reference_configurations():
    coco, city, ade = coco_r50_reference_keys(), cityscapes_r50_reference_keys(), ade20k_r50_reference_keys()
    assert (len(coco), len(city), len(ade)) == (1417, 1377, 1417)
    for keys in (city, ade):
        names = [k["name"] for k in keys]
        assert len(set(names)) == len(names)
    shape = {k["name"]: k["shape"] for k in city}
    heads = [n for n in shape if n.endswith("_transformer_class_head.conv.weight")]
    assert len(heads) == 7 and all(shape[n] == [20, 256, 1] for n in heads)  # 6 k-means layers + final, 19 + void
    assert shape["sem_seg_head.predictor._cluster_centers.weight"] == [256, 256]
    assert shape[_FINAL + "_pixel_space_head_conv0bnact.conv.weight"] == [128, 1, 5, 5]
    assert [shape[f"sem_seg_head.pixel_decoder._in_norms.{i}.weight"] for i in range(5)] == [
        [2048], [1024], [512], [64], [256]]  # res5, res4, res3, stem, res2
    assert "sem_seg_head.pixel_decoder._resized_fuses.2._conv_bn_high.conv.weight" not in shape
    aux = {n: s for n, s in shape.items() if n.startswith(_AUX)}
    assert len(aux) == 14 and aux[_AUX + "2.conv.weight"] == [19, 256, 1, 1] and aux[_AUX + "2.conv.bias"] == [19]
    ade_shape = {k["name"]: k["shape"] for k in ade}
    assert ade_shape[_AUX + "final_conv.conv.weight"] == [151, 256, 1, 1]
    assert ade_shape[_FINAL + "_transformer_class_head.conv.bias"] == [151]


@pytest.mark.parametrize("dataset,preset,keys,classes", [
    ("cityscapes", "kmax_cityscapes_r50", cityscapes_r50_reference_keys, 19),
    ("ade20k", "kmax_ade20k_r50", ade20k_r50_reference_keys, 150)])
def test_every_reference_key_maps_onto_the_preset(dataset, preset, keys, classes):
    src = _zeros(keys())
    cfg = reference_config(preset, dataset, [SMALL])
    plan = plan_reference_conversion(src, cfg.model)  # strict: raises on any unused source / unfilled target
    assert len(plan.state_dict) == len(src) and plan.dropped == {} and plan.num_classes == classes
    # Only ADE20K's full aux decoder has a void row to drop; the light Cityscapes head has K rows already.
    expected = {} if dataset == "cityscapes" else {"aux_semantic_head.classifier.weight": "void row dropped",
                                                   "aux_semantic_head.classifier.bias": "void row dropped"}
    assert plan.adjusted == expected
    assert plan.state_dict["aux_semantic_head.classifier.weight"].shape[0] == classes
    inference = plan_reference_conversion(src, cfg.model, keep_aux_head=False)
    assert sorted(inference.dropped) == sorted(k for k in src if k.startswith(_AUX))


# ------------------------------------------------------------------------------------ the converted model


def test_converted_cityscapes_model_loads_strictly_and_runs(converted, city_weights):
    state = load_checkpoint(converted)
    cfg = checkpoint_config(state)
    assert cfg.model.num_queries == 256 and cfg.model.num_classes == 19 and list(cfg.model.input_size) == list(SIZE)
    cats = state["categories"]
    assert [c["id"] for c in cats] == [c.id for c in reference_categories("cityscapes")]
    assert cats[CAR]["name"] == "car" and cats[CAR]["id"] == CAR_ID and cats[0]["name"] == "road"
    weights = state["model"]
    # Sentinels: the reference's class-head row of train id 13 is our row 13 (car), in every predictor; the light
    # aux head's 19 rows are copied whole (no void row to drop).
    assert torch.equal(weights["transformer_decoder.predictor.class_head.weight"][CAR],
                       city_weights[_FINAL + "_transformer_class_head.conv.weight"][CAR])
    assert torch.equal(weights["transformer_decoder.layers.5.predictor.class_head.bias"],
                       city_weights["sem_seg_head.predictor._kmax_transformer_layers.5._predcitor."
                                    "_transformer_class_head.conv.bias"])
    assert torch.equal(weights["aux_semantic_head.classifier.weight"], city_weights[_AUX + "2.conv.weight"])
    assert torch.equal(weights["pixel_decoder.backbone_norms.3.weight"],  # the stem's LayerNorm (64)
                       city_weights["sem_seg_head.pixel_decoder._in_norms.3.weight"])

    model = KMaXDeepLab(dataclasses.replace(cfg.model, remask_stages=0), with_training_heads=True)
    model.load_state_dict(weights, strict=True)
    model.eval()
    image = torch.randint(0, 256, (1, 3, *SIZE), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    with torch.no_grad():
        x = normalize_image(image)
        out = model(x)
        aux = model.aux_semantic_head(model.backbone(x))
    assert out["pred_logits"].shape == (1, 256, 20)  # 19 classes + void
    assert out["pred_masks"].shape == (1, 256, 17, 33)  # stride 4 of 65 x 129
    assert aux.shape == (1, 19, 3, 5)  # stride 32
    for t in (out["pred_logits"], out["pred_masks"], aux):
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------- evaluation on a fabricated data set


def _fabricate_cityscapes(src: Path) -> None:
    """Two 64 x 128 val images laid out like the Cityscapes release: 16-bit ``*_gtFine_instanceIds.png``
    (label id, or label id * 1000 + instance for instances) and RGB ``*_leftImg8bit.png``. In each, one car
    instance covers 75 % of the image."""
    h, w = 64, 128
    a = np.full((h, w), 23, np.int64)  # sky (label id 23, train id 10)
    a[8:56] = 26001  # car instance 1
    a[56:] = 7  # road (label id 7, train id 0)
    a[0:8, 0:8] = 24000  # a person instance
    b = np.full((h, w), 26001, np.int64)
    b[48:, :64] = 26002  # a second car, too small to be matched
    b[48:, 64:] = 7
    rng = np.random.default_rng(0)
    for name, ids in (("frankfurt_000000_000294", a), ("frankfurt_000000_000576", b)):
        gt = src / "gtFine" / "val" / "frankfurt"
        img = src / "leftImg8bit" / "val" / "frankfurt"
        gt.mkdir(parents=True, exist_ok=True)
        img.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids.astype(np.uint16)).save(gt / f"{name}_gtFine_instanceIds.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img / f"{name}_leftImg8bit.png")


def _plant_car_everywhere(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference weights whose final prediction is one query, classified as train id 13 (car), on every pixel.

    The final class head predicts only its bias (weight 0): car 20 against void's built-in 7.09. The pixel head's
    last BatchNorm (weight 0) makes every pixel's feature the same vector, so each query's mask logit is constant
    over the image and a single query wins everywhere; the mask BatchNorm's gain of 1000 makes that win certain.
    """
    w = dict(weights)
    head = _FINAL + "_transformer_class_head.conv."
    w[head + "weight"] = torch.zeros_like(w[head + "weight"])
    w[head + "bias"] = torch.zeros_like(w[head + "bias"])
    w[head + "bias"][CAR] = 20.0
    last = _FINAL + "_pixel_space_head_last_convbn.norm."
    w[last + "weight"] = torch.zeros_like(w[last + "weight"])
    w[last + "bias"] = torch.linspace(-1.0, 1.0, w[last + "bias"].numel())
    bn = _FINAL + "_pixel_space_mask_batch_norm."
    w[bn + "weight"], w[bn + "bias"] = torch.tensor([1000.0]), torch.tensor([0.0])
    w[bn + "running_mean"], w[bn + "running_var"] = torch.tensor([0.0]), torch.tensor([1.0])
    return w


def test_converted_cityscapes_checkpoint_evaluates_with_the_right_class_mapping(city_weights, tmp_path, capsys):
    _fabricate_cityscapes(tmp_path / "raw")
    convert_cityscapes(tmp_path / "raw", tmp_path / "cs", splits=["val"], images="copy")
    listed = json.loads((tmp_path / "cs" / "annotations" / "panoptic_val.json").read_text())["categories"]
    assert [c["id"] for c in listed][:3] == [7, 8, 11]  # label-id order in the file; the loader goes things-first

    src = tmp_path / "planted.pth"
    torch.save(_plant_car_everywhere(city_weights), src)
    ckpt = tmp_path / "planted.pt"
    assert main(["convert-checkpoint", str(src), str(ckpt), "--preset", "kmax_cityscapes_r50", "--dataset",
                 "cityscapes", "--set", SMALL, "--drop-training-heads"]) == 0
    src.unlink()
    capsys.readouterr()

    results = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "cs"), "--no-progress",
                 "--json", str(results), "--set", "data.num_workers=0"]) == 0
    scores = json.loads(results.read_text())
    per_class = scores["per_class"]
    assert scores["num_images"] == 2
    # One "car" segment per image, matched to the car instance covering 75 % of it (IoU 0.75): 2 TP, and the
    # small second car unmatched (1 FN): SQ 0.75, RQ 2 / 2.5, PQ 0.6. PQ matches segments by category id, so this
    # guards the checkpoint's side: had its categories been stored things-first, row 13 would be "pole" (17).
    car = per_class[str(CAR_ID)]
    assert car["sq"] == pytest.approx(0.75) and car["rq"] == pytest.approx(0.8) and car["pq"] == pytest.approx(0.6)
    assert (car["tp"], car["fp"], car["fn"]) == (2, 0, 1)
    assert all(v["fp"] == 0 and v["tp"] == 0 for cid, v in per_class.items() if cid != str(CAR_ID))
    for cid in ("7", "23", "24"):  # road, sky, person: present, never predicted
        assert per_class[cid]["fn"] > 0 and per_class[cid]["pq"] == 0.0
    assert set(map(int, per_class)) <= {c["id"] for c in listed}
    assert scores["Things"]["pq"] > 0 and scores["Stuff"]["pq"] == 0.0
    # Semantic IoU compares contiguous ids, so this guards the data set's side: its classes must be indexed in the
    # checkpoint's (train-id) order, not the loader's default things-first one (then car's row would hold no
    # ground truth). Car covers 13312 of the 16384 pixels it claims; road (0), sky (10) and person (11) are
    # present but never predicted; the other 15 are absent.
    iou = scores["semantic"]["per_class_iou"]
    assert iou[CAR] == pytest.approx(13312 / 16384)
    assert [i for i, v in enumerate(iou) if v == 0.0] == [0, 10, 11]
    assert sum(v is None for v in iou) == 15


def test_a_checkpoint_of_another_data_set_is_refused_in_one_line(tmp_path, capsys):
    """An ADE20K checkpoint evaluated on a Cityscapes set: the category sets differ, one line, exit status 2."""
    _fabricate_cityscapes(tmp_path / "raw")
    convert_cityscapes(tmp_path / "raw", tmp_path / "cs", splits=["val"], images="copy")
    src = tmp_path / "ade.pth"
    torch.save(_zeros(ade20k_r50_reference_keys()), src)
    ckpt = tmp_path / "ade.pt"
    assert main(["convert-checkpoint", str(src), str(ckpt), "--preset", "kmax_ade20k_r50", "--dataset", "ade20k",
                 "--set", SMALL, "--drop-training-heads"]) == 0
    src.unlink()
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "cs"), "--split", "val",
                 "--no-progress", "--set", "data.num_workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "differ" in err and "(150)" in err and "(19)" in err, err
