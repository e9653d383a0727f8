"""`remax predict` and `remax eval` end to end on tiny files the tests write."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from inference_helpers import CATEGORIES, gt_images, write_checkpoint, write_gt_root, write_panoptic_set
from PIL import Image

from remax.cli import main
from remax.evaluation import read_panoptic_png


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def test_predict_folder_skips_non_images_and_corrupt_files(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)).save(src / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (25, 20), dtype=np.uint8), mode="L").save(src / "b.png")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes((src / "b.png").read_bytes()[:60])  # a truncated PNG
    out = tmp_path / "out"
    code = main(["predict", str(src), "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0
    assert "2 image(s) predicted, 2 skipped" in captured.out
    assert "notes.txt" in captured.err and "broken.png" in captured.err
    data = json.loads((out / "predictions.json").read_text())
    assert [a["file_name"] for a in data["annotations"]] == ["a.png", "b.png"]
    assert [a["image_id"] for a in data["annotations"]] == ["a", "b"]
    assert [c["id"] for c in data["categories"]] == [c.id for c in CATEGORIES]
    for ann, size in zip(data["annotations"], [(30, 41), (25, 20)]):
        ids = read_panoptic_png(out / "predictions" / ann["file_name"])
        assert ids.shape == size
        # Every PNG id is in segments_info with its pixel count as area, and vice versa.
        assert sorted(s["id"] for s in ann["segments_info"]) == sorted(set(np.unique(ids).tolist()) - {0})
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())
            ys, xs = np.nonzero(ids == s["id"])
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["category_id"] in {c.id for c in CATEGORIES}
        assert Image.open(out / "overlays" / f"{ann['file_name'][:-4]}.jpg").size == (size[1], size[0])


def test_predict_single_unreadable_image_fails(checkpoint, tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    code = main(["predict", str(tmp_path / "x.jpg"), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "no image could be read" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_missing_and_corrupt_checkpoints_give_one_clear_line(command, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    for ckpt, message in ((tmp_path / "none.pt", "checkpoint not found"), (tmp_path / "bad.pt", "cannot read")):
        if command == "predict":
            args = ["predict", str(tmp_path / "i.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
        else:
            args = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path)]
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("remax: error:") and message in err[0]
        assert str(ckpt) in err[0]


def test_eval_predictions_on_disk(tmp_path, capsys):
    images = gt_images()
    write_gt_root(tmp_path / "gt")
    preds = copy.deepcopy(images)
    for im in preds:
        for s in im["segments"]:
            if s["iscrowd"]:
                im["ids"][im["ids"] == s["id"]] = 0
        im["segments"] = [{"id": s["id"], "category_id": s["category_id"]} for s in im["segments"]
                          if not s["iscrowd"]]
    write_panoptic_set(tmp_path / "p" / "predictions.json", tmp_path / "p" / "predictions", preds, with_area=False)
    out_json = tmp_path / "res" / "pq.json"
    code = main(["eval", "--gt", str(tmp_path / "gt"), "--split", "val", "--pred-json",
                 str(tmp_path / "p" / "predictions.json"), "--json", str(out_json), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "All" in printed and "Things" in printed and "Stuff" in printed and "mIoU" in printed
    res = json.loads(out_json.read_text())
    for split, n in (("All", 4), ("Things", 2), ("Stuff", 2)):
        assert res[split]["pq"] == 1.0 and res[split]["sq"] == 1.0 and res[split]["rq"] == 1.0
        assert res[split]["n"] == n
    assert res["per_class"]["10"]["tp"] == 3
    assert res["ap"] == pytest.approx(1.0)
    assert 0.9 < res["miou"] < 1.0  # the crowd pixels, void in the prediction, are misses


def test_eval_usage_errors(tmp_path, capsys):
    assert main(["eval", "--gt", str(tmp_path)]) == 2
    assert "either --checkpoint" in capsys.readouterr().err
    assert main(["eval", "--pred-json", str(tmp_path / "p.json"), "--gt", str(tmp_path), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_checkpoint_equals_predict_then_eval_files(checkpoint, tmp_path, capsys):
    """The in-memory evaluation of a checkpoint gives the same PQ as writing its predictions and scoring them."""
    write_gt_root(tmp_path / "data")
    res_mem = tmp_path / "mem.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "val",
                 "--json", str(res_mem), "--no-progress", "--batch-size", "1"]) == 0
    assert main(["predict", str(tmp_path / "data" / "val"), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "pred"), "--no-progress", "--no-overlay"]) == 0
    data = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert sorted(str(a["image_id"]) for a in data["annotations"]) == ["1", "street_a"]  # COCO id convention
    res_files = tmp_path / "files.json"
    assert main(["eval", "--gt", str(tmp_path / "data"), "--pred-json", str(tmp_path / "pred" / "predictions.json"),
                 "--json", str(res_files), "--no-progress"]) == 0
    capsys.readouterr()
    a, b = json.loads(res_mem.read_text()), json.loads(res_files.read_text())
    assert a["num_images"] == b["num_images"] == 2
    for split in ("All", "Things", "Stuff"):
        assert a[split] == b[split]
    assert a["per_class"] == b["per_class"]
    assert 0.0 <= a["miou"] <= 1.0
