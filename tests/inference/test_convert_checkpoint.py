"""`remax convert-checkpoint` end to end: reading reference files safely, writing a remax checkpoint that the
predictor, `remax predict`, `remax eval` and fine-tuning accept, and the real COCO sample on a 133-class model."""

from __future__ import annotations

import json

import pytest
import torch
from reference_parity import COCO_SAMPLE, reference_outputs, reference_state_dict

from remax.checkpoint import CheckpointError, checkpoint_config, load_checkpoint
from remax.cli import main
from remax.convert import read_reference_checkpoint, reference_categories
from remax.models import normalize_image
from remax.models.convert_reference import convert_reference_state_dict

SMALL = "model.input_size=[129,129]"
pytestmark = pytest.mark.usefixtures("one_thread")


class Trainer:
    """Stands in for an arbitrary Python object pickled into a detectron2 checkpoint."""


@pytest.fixture(scope="module")
def r50_source(tmp_path_factory, one_thread):
    """A detectron2-style reference checkpoint of the fixture's R50 weights, plus the weights themselves."""
    weights = reference_state_dict("r50")
    path = tmp_path_factory.mktemp("reference") / "kmax_r50.pth"
    torch.save({"model": weights, "iteration": 5}, path)
    return path, weights


@pytest.fixture(scope="module")
def converted(r50_source, tmp_path_factory):
    """`remax convert-checkpoint` of the R50 file at 129x129, keeping the auxiliary head (fine-tuning form)."""
    src, _ = r50_source
    dst = tmp_path_factory.mktemp("converted") / "kmax_r50_coco.pt"
    code = main(["convert-checkpoint", str(src), str(dst), "--preset", "kmax_r50", "--set", SMALL])
    assert code == 0
    return dst


# --------------------------------------------------------------------------------------------------- reading


def test_bare_state_dicts_and_detectron2_dicts_are_read(tmp_path):
    sd = {"backbone.stem.conv1.weight": torch.ones(2, 3)}
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": sd, "iteration": 7, "optimizer": {"lr": 0.1}}, tmp_path / "d2.pth")
    weights, extra = read_reference_checkpoint(tmp_path / "bare.pth")
    assert list(weights) == list(sd) and extra == {}
    weights, extra = read_reference_checkpoint(tmp_path / "d2.pth")
    assert torch.equal(weights["backbone.stem.conv1.weight"], sd["backbone.stem.conv1.weight"])
    assert extra == {"iteration": 7, "optimizer": {"lr": 0.1}}


def _read_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_reference_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unreadable_files_give_one_line_errors(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in _read_error(tmp_path / "cut.pth")
    assert "not found" in _read_error(tmp_path / "absent.pth")
    torch.save({"model": {"w": torch.ones(1), "step": 3}}, tmp_path / "mixed.pth")
    assert "not tensors (e.g. step)" in _read_error(tmp_path / "mixed.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    assert "holds a list" in _read_error(tmp_path / "list.pth")


def test_pickled_objects_are_refused_not_executed(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "trainer": Trainer()}, tmp_path / "objects.pth")
    message = _read_error(tmp_path / "objects.pth")
    assert "Python objects other than tensors" in message and "Trainer" in message


def test_reference_category_orders():
    coco = reference_categories("coco")
    assert len(coco) == 133 and all(c.isthing for c in coco[:80]) and not any(c.isthing for c in coco[80:])
    assert (coco[0].id, coco[0].name, coco[79].name, coco[80].name, coco[-1].id) == (1, "person", "toothbrush",
                                                                                      "banner", 200)
    cityscapes = reference_categories("cityscapes")  # train-id order, Cityscapes label ids
    assert [c.id for c in cityscapes] == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert [c.name for c in cityscapes if c.isthing] == ["person", "rider", "car", "truck", "bus", "train",
                                                         "motorcycle", "bicycle"]
    ade = reference_categories("ade20k")  # id order, things and stuff interleaved
    assert [c.id for c in ade] == list(range(150)) and sum(c.isthing for c in ade) == 100
    assert [(c.name, c.isthing) for c in ade[6:9]] == [("road", False), ("bed", True), ("window", True)]
    with pytest.raises(ValueError, match="unknown reference data set"):
        reference_categories("voc")


# ------------------------------------------------------------------------------------------- the command


def test_converted_checkpoint_is_a_remax_checkpoint(converted, r50_source, capsys):
    _, weights = r50_source
    state = load_checkpoint(converted)
    assert state["config"]["model"]["num_classes"] == 133
    assert state["config"]["model"]["input_size"] == [129, 129]
    assert state["config"]["model"]["backbone_bn_eps"] == 1e-3
    assert state["config"]["remax"]["enabled"] is False  # kMaX weights: the baseline recipe
    assert [c["id"] for c in state["categories"]] == [c.id for c in reference_categories("coco")]
    assert state["source"]["iteration"] == 5
    expected = convert_reference_state_dict(weights, checkpoint_config(state).model)
    assert set(state["model"]) == set(expected)
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())
    assert state["model"]["aux_semantic_head.classifier.weight"].shape[0] == 133


def test_predictor_from_converted_checkpoint_reproduces_the_reference(converted):
    from remax.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(converted)
    ref = reference_outputs("r50")
    with torch.no_grad():
        out = predictor.model(normalize_image(ref["image_uint8"]))
    assert (out["pred_logits"] - ref["pred_logits"]).abs().max().item() < 2e-4
    assert (out["pred_masks"] - ref["pred_masks"]).abs().max().item() < 1e-3
    assert (out["pred_masks"].argmax(1) == ref["pred_masks"].argmax(1)).float().mean().item() >= 0.999
    assert [c.name for c in predictor.categories[:2]] == ["person", "bicycle"]


def test_fine_tuning_starts_from_every_converted_tensor(converted):
    from remax.engine.trainer import load_init_weights
    from remax.models import build_model

    model = build_model("kmax_r50", with_training_heads=True, input_size=(129, 129))  # with ReMaX heads
    report = load_init_weights(model, converted)
    assert report["mismatched"] == [] and report["unexpected"] == []
    assert report["missing"] and all(k.startswith("remask_heads.") for k in report["missing"])
    assert len(report["loaded"]) == 1417


def test_a_checkpoint_of_another_data_set_is_refused(r50_source, tmp_path, capsys):
    src, _ = r50_source
    code = main(["convert-checkpoint", str(src), str(tmp_path / "x.pt"), "--preset", "kmax_r50",
                 "--dataset", "cityscapes"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "predicts 133 classes" in err and "--dataset coco" in err
    code = main(["convert-checkpoint", str(src), str(tmp_path / "x.pt"), "--preset", "kmax_convnext_t"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "backbone mismatch" in err and "ResNet-50" in err
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------------------- real COCO sample


def test_real_coco_sample_runs_through_predict_and_eval(r50_source, tmp_path, capsys):
    if not (COCO_SAMPLE / "annotations" / "panoptic_val2017.json").is_file():
        pytest.skip(f"COCO panoptic sample not found at {COCO_SAMPLE}")
    src, _ = r50_source
    ckpt = tmp_path / "kmax_r50_infer.pt"
    assert main(["convert-checkpoint", str(src), str(ckpt), "--preset", "kmax_r50", "--set", SMALL,
                 "--drop-training-heads"]) == 0
    assert "auxiliary semantic head dropped" in capsys.readouterr().out
    assert not any(k.startswith("aux_semantic_head.") for k in load_checkpoint(ckpt)["model"])

    out = tmp_path / "pred"
    assert main(["predict", str(COCO_SAMPLE / "val2017"), "--checkpoint", str(ckpt), "--out", str(out),
                 "--no-progress", "--no-overlay"]) == 0
    data = json.loads((out / "predictions.json").read_text())
    assert sorted(a["file_name"] for a in data["annotations"]) == ["000000142238.png", "000000439180.png"]
    assert len(data["categories"]) == 133
    for ann in data["annotations"]:
        assert (out / "predictions" / ann["file_name"]).is_file()
        assert {s["category_id"] for s in ann["segments_info"]} <= {c["id"] for c in data["categories"]}

    results = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(COCO_SAMPLE), "--no-progress",
                 "--json", str(results), "--set", "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "PQ" in printed and "Things" in printed
    scores = json.loads(results.read_text())
    assert scores["num_images"] == 2
    gt = json.loads((COCO_SAMPLE / "annotations" / "panoptic_val2017.json").read_text())
    present = {s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s.get("iscrowd")}
    assert set(map(int, scores["per_class"])) <= {c["id"] for c in gt["categories"]}
    assert present <= set(map(int, scores["per_class"]))
    assert 0.0 <= scores["All"]["pq"] <= 1.0
