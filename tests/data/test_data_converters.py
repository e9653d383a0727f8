"""Cityscapes and ADE20K converters on tiny inputs laid out exactly like the original releases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from remax.cli import main
from remax.data.ade20k import convert_ade20k
from remax.data.cityscapes import cityscapes_categories, convert_cityscapes
from remax.data.coco_panoptic import COCOPanopticDataset, DatasetError
from remax.data.io import read_panoptic_png
from remax.data.validate import check_root

# --------------------------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------------------------


def _cityscapes_raw(src: Path) -> np.ndarray:
    """gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png (16-bit) + its leftImg8bit image."""
    h, w = 10, 16
    v = np.full((h, w), 7, np.int64)  # road (stuff)
    v[:3] = 23  # sky (stuff)
    v[3:6, 0:4] = 26001  # car instance 1
    v[3:6, 4:8] = 26002  # car instance 2
    v[3:6, 8:10] = 26  # car region without instances -> crowd
    v[6:9, 10:12] = 24000  # person instance 0 (>= 1000, so an instance)
    v[0, :2] = 0  # unlabeled -> void
    v[9, :3] = 4  # static -> void
    v[9, 3:5] = 29001  # caravan instance: ignoreInEval -> void
    v[9, 5:7] = 9  # parking: ignoreInEval -> void
    gt = src / "gtFine" / "train" / "aachen"
    gt.mkdir(parents=True)
    Image.fromarray(v.astype(np.uint16)).save(gt / "aachen_000000_000019_gtFine_instanceIds.png")
    img = src / "leftImg8bit" / "train" / "aachen"
    img.mkdir(parents=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(img / "aachen_000000_000019_leftImg8bit.png")
    return v


def test_cityscapes_conversion(tmp_path):
    v = _cityscapes_raw(tmp_path / "raw")
    written = convert_cityscapes(tmp_path / "raw", tmp_path / "cs", splits=["train"])
    assert written == [tmp_path / "cs" / "annotations" / "panoptic_train.json", tmp_path / "cs" / "train"]
    assert (tmp_path / "cs" / "train").is_symlink()
    data = json.loads(written[0].read_text())
    assert data["images"] == [{"id": "aachen_000000_000019", "file_name": "aachen/aachen_000000_000019_leftImg8bit.png",
                               "height": 10, "width": 16}]
    ann = data["annotations"][0]
    assert ann["image_id"] == "aachen_000000_000019" and ann["file_name"] == "aachen_000000_000019_gtFine_panoptic.png"

    def seg(sid, cat, crowd):
        ys, xs = np.nonzero(v == sid)
        return {"id": sid, "category_id": cat, "area": int(len(ys)), "iscrowd": crowd,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]}

    expected = [seg(7, 7, 0), seg(23, 23, 0), seg(26, 26, 1), seg(24000, 24, 0), seg(26001, 26, 0),
                seg(26002, 26, 0)]
    assert ann["segments_info"] == expected
    ids = read_panoptic_png(tmp_path / "cs" / "annotations" / "panoptic_train" / ann["file_name"])
    void = np.isin(v, [0, 4, 29001, 9])
    np.testing.assert_array_equal(ids, np.where(void, 0, v))
    cats = data["categories"]
    assert len(cats) == 19 and sum(c["isthing"] for c in cats) == 8
    assert [c["id"] for c in cats][:3] == [7, 8, 11]
    assert check_root(tmp_path / "cs") == []
    ds = COCOPanopticDataset.from_root(tmp_path / "cs", "train")
    assert [c.name for c in ds.categories][:8] == ["person", "rider", "car", "truck", "bus", "train", "motorcycle",
                                                   "bicycle"]
    assert tuple(ds[0]["image"].shape) == (3, 10, 16)
    # Converting again refuses to overwrite.
    with pytest.raises(FileExistsError):
        convert_cityscapes(tmp_path / "raw", tmp_path / "cs", splits=["train"])


def test_cityscapes_train_ids_and_missing_input(tmp_path):
    _cityscapes_raw(tmp_path / "raw")
    written = convert_cityscapes(tmp_path / "raw", tmp_path / "cs", splits=["train"], use_train_id=True,
                                 images="none")
    assert written == [tmp_path / "cs" / "annotations" / "panoptic_train.json"]
    data = json.loads(written[0].read_text())
    assert [(s["id"], s["category_id"]) for s in data["annotations"][0]["segments_info"]] == [
        (7, 0), (23, 10), (26, 13), (24000, 11), (26001, 13), (26002, 13)]
    assert [c["id"] for c in cityscapes_categories(True)] == list(range(19))
    with pytest.raises(DatasetError, match="gtFine.val"):
        convert_cityscapes(tmp_path / "raw", tmp_path / "cs2", splits=["val"])
    # The CLI turns the error into exit status 2 with the message.
    assert main(["data", "convert", "cityscapes", str(tmp_path / "raw"), "--out", str(tmp_path / "cs3"),
                 "--splits", "val"]) == 2


# --------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------


def _ade_raw(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """ADEChallengeData2016 with one training image, its semantic map and its instance map."""
    h, w = 8, 12
    sem = np.full((h, w), 1, np.uint8)  # wall (class 0, stuff)
    sem[5:] = 4  # floor (class 3, stuff)
    sem[2:5, 1:4] = 13  # person (class 12, thing)
    sem[2:5, 6:10] = 21  # car (class 20, thing)
    sem[0, 0] = 0  # unlabelled
    ins = np.zeros((h, w, 3), np.uint8)
    ins[2:5, 1:3, 0], ins[2:5, 1:3, 1] = 9, 1  # person instance (instance class 9 -> semantic 13 = class 12)
    ins[2:5, 6:8, 0], ins[2:5, 6:8, 1] = 8, 2  # car (8 -> semantic 21 = class 20), part of it
    ins[5:7, 9:11, 0], ins[5:7, 9:11, 1] = 8, 3  # a car the semantic map calls floor: things win
    for folder in ("images/training", "annotations/training", "annotations_instance/training"):
        (src / folder).mkdir(parents=True)
    Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(src / "images" / "training" / "ADE_train_00000001.jpg")
    Image.fromarray(sem, mode="L").save(src / "annotations" / "training" / "ADE_train_00000001.png")
    Image.fromarray(ins, mode="RGB").save(src / "annotations_instance" / "training" / "ADE_train_00000001.png")
    # The mapping file of the release: header, then instance class, semantic class (1-based), full ADE20K id.
    (src / "mapping.txt").write_text("Instacne100\tSceneParse150\tFullADE20K\n8\t\t21\t\t471\n9\t\t13\t\t2978\n"
                                     "9\t\t13\t\t2979\n")
    return sem, ins


def test_ade20k_conversion(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    _ade_raw(src)
    written = convert_ade20k(src, tmp_path / "ade", src / "mapping.txt", splits=["training"])
    assert written == [tmp_path / "ade" / "annotations" / "panoptic_training.json", tmp_path / "ade" / "training"]
    data = json.loads(written[0].read_text())
    cats = data["categories"]
    assert [c["id"] for c in cats] == list(range(150))
    assert [c["id"] for c in cats if c["isthing"]] == [12, 20]  # only the classes named in the mapping
    assert cats[12]["name"] == "person" and cats[20]["name"] == "car"
    assert data["images"] == [{"id": "ADE_train_00000001", "file_name": "ADE_train_00000001.jpg", "height": 8,
                               "width": 12}]
    ann = data["annotations"][0]
    ids = read_panoptic_png(tmp_path / "ade" / "annotations" / "panoptic_training" / ann["file_name"])
    # Hand-computed expectation.
    expected = np.full((8, 12), 1000)  # wall: (0 + 1) * 1000
    expected[5:] = 4000  # floor: (3 + 1) * 1000
    expected[2:5, 1:4] = 0  # person pixels without an instance are void ...
    expected[2:5, 1:3] = 13001  # ... except the instance
    expected[2:5, 6:10] = 0
    expected[2:5, 6:8] = 21001  # first car
    expected[5:7, 9:11] = 21002  # second car over the floor
    expected[0, 0] = 0
    np.testing.assert_array_equal(ids, expected)
    segs = {s["id"]: s for s in ann["segments_info"]}
    assert sorted(segs) == [1000, 4000, 13001, 21001, 21002]
    assert segs[4000]["area"] == 3 * 12 - 4 and segs[1000]["area"] == 5 * 12 - 1 - 9 - 12
    assert segs[21002] == {"id": 21002, "category_id": 20, "area": 4, "bbox": [9, 5, 2, 2], "iscrowd": 0}
    assert segs[13001]["category_id"] == 12 and not any(s["iscrowd"] for s in segs.values())
    assert check_root(tmp_path / "ade") == []

    # The reference script's stale stuff areas: counted before things are pasted, so the checker flags them.
    stale = convert_ade20k(src, tmp_path / "ade_stale", src / "mapping.txt", splits=["training"], images="none",
                           stale_stuff_areas=True)
    sseg = {s["id"]: s for s in json.loads(stale[0].read_text())["annotations"][0]["segments_info"]}
    assert sseg[4000]["area"] == 3 * 12 and sseg[4000]["bbox"] == [0, 5, 12, 3]
    assert sseg[1000]["area"] == segs[1000]["area"]  # untouched by things
    problems = check_root(tmp_path / "ade_stale", check_images=False)
    msgs = [p.message for p in problems if "ADE_train_00000001.png" in p.file]
    assert any("segment 4000: JSON area 36 differs from the PNG pixel count 32" in m for m in msgs)


def test_ade20k_bad_inputs(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    _ade_raw(src)
    (src / "bad.txt").write_text("header\n8 x 1\n")
    with pytest.raises(DatasetError, match="bad.txt:2"):
        convert_ade20k(src, tmp_path / "o1", src / "bad.txt", splits=["training"])
    (src / "short.txt").write_text("header\n9 13 1\n")  # instance class 8 is unknown
    with pytest.raises(DatasetError, match="instance class 8"):
        convert_ade20k(src, tmp_path / "o2", src / "short.txt", splits=["training"], images="none")
    with pytest.raises(DatasetError, match="validation"):
        convert_ade20k(src, tmp_path / "o3", src / "mapping.txt", splits=["validation"])
