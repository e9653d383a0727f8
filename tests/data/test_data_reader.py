"""COCOPanopticDataset: categories, records, targets, paths, errors, pickling and DataLoader workers."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import image_for, scene, write_dataset

from remax.config import DataConfig
from remax.data.coco_panoptic import COCOPanopticDataset, DatasetError, dataset_paths, paths_from_config


def _oracle_target(ids: np.ndarray, segments: list[dict], cat_order: list[int]):
    """id_map / classes computed naively: pixel of segment k -> k + 1."""
    id_map = np.zeros(ids.shape, np.int64)
    for k, s in enumerate(segments):
        id_map[ids == s["id"]] = k + 1
    classes = [cat_order.index(s["category_id"]) for s in segments]
    return id_map, classes


@pytest.mark.parametrize("string_ids,ext", [(False, "png"), (True, "jpg")])
def test_reader_matches_the_files(tmp_path, string_ids, ext):
    data = write_dataset(tmp_path, "train", n=3, string_ids=string_ids, ext=ext)
    ds = COCOPanopticDataset.from_root(tmp_path, "train")
    assert len(ds) == 3
    # Things first (JSON order: cat, dog), then stuff (floor, wall); ids kept.
    assert [(c.id, c.name, c.isthing) for c in ds.categories] == [(7, "cat", True), (3, "dog", True),
                                                                  (20, "floor", False), (5, "wall", False)]
    assert ds.category_map == {7: 0, 3: 1, 20: 2, 5: 3}
    assert ds.categories[0].color == (200, 10, 10)
    order = [7, 3, 20, 5]
    for i in range(3):
        rec = ds.records[i]
        assert rec["image_id"] == data["images"][i]["id"]
        assert rec["file_name"] == data["images"][i]["file_name"] and rec["png_name"] == f"pan_{i}.png"
        assert (rec["height"], rec["width"]) == (24, 32)
        ids, segments = scene(24, 32, seed=i)
        np.testing.assert_array_equal(ds.load_png_ids(i), ids)
        assert ds.segments_info(i) == segments
        item = ds[i]
        assert item["image_id"] == data["images"][i]["id"]
        img = item["image"]
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 24, 32)
        if ext == "png":
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), image_for(ids))
        else:  # lossy, but close
            assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - image_for(ids)).mean() < 4
        t = item["target"]
        id_map, classes = _oracle_target(ids, segments, order)
        np.testing.assert_array_equal(t.id_map.numpy(), id_map)
        assert t.id_map.dtype == torch.int64 and int(t.id_map[0, 0]) == 0  # void
        assert t.classes.tolist() == classes
        assert t.is_thing.tolist() == [False, False, True, True, True, True]
        assert t.is_crowd.tolist() == [False, False, False, False, False, True]
        assert t.segment_ids.tolist() == [s["id"] for s in segments]
        assert t.areas.tolist() == [s["area"] for s in segments]


def test_png_ids_missing_from_segments_info_become_void(tmp_path):
    data = write_dataset(tmp_path, "train", n=1)
    seg = data["annotations"][0]["segments_info"]
    dropped = seg.pop(2)  # cat 1 stays in the PNG but not in the JSON
    (tmp_path / "annotations" / "panoptic_train.json").write_text(json.dumps(data))
    ds = COCOPanopticDataset.from_root(tmp_path, "train")
    ids = ds.load_png_ids(0)
    t = ds.target(0)
    assert (t.id_map[torch.from_numpy(ids == dropped["id"])] == 0).all()
    assert t.num_segments == 5


def test_dataloader_workers_yield_the_same_items(tmp_path):
    write_dataset(tmp_path, "train", n=4, string_ids=True)
    ds = COCOPanopticDataset.from_root(tmp_path, "train")
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # records travel as one buffer
    direct = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, shuffle=False)
    got = list(loader)
    assert len(got) == 4
    for a, b in zip(direct, got):
        assert a["image_id"] == b["image_id"]
        assert torch.equal(a["image"], b["image"])
        for f in ("id_map", "classes", "is_thing", "is_crowd", "segment_ids", "areas"):
            assert torch.equal(getattr(a["target"], f), getattr(b["target"], f))


def test_transform_is_applied(tmp_path):
    write_dataset(tmp_path, "train", n=2)
    calls = []

    def flip(image, target, index):
        calls.append(index)
        target.id_map = target.id_map.flip(-1)
        return image.flip(-1), target

    ds = COCOPanopticDataset.from_root(tmp_path, "train", transform=flip)
    plain = COCOPanopticDataset.from_root(tmp_path, "train")
    item = ds[1]
    assert calls == [1]
    assert torch.equal(item["image"], plain[1]["image"].flip(-1))
    assert torch.equal(item["target"].id_map, plain.target(1).id_map.flip(-1))


def test_dataset_paths_and_config(tmp_path):
    p = dataset_paths(tmp_path, "val")
    assert p.json_file == tmp_path / "annotations" / "panoptic_val.json"
    assert p.png_dir == tmp_path / "annotations" / "panoptic_val"
    assert p.image_dir == tmp_path / "val"
    q = dataset_paths(None, "", json_file=tmp_path / "x" / "gt.json", image_dir=tmp_path / "imgs")
    assert q.png_dir == tmp_path / "x" / "gt" and q.image_dir == tmp_path / "imgs"
    with pytest.raises(DatasetError, match="image folder"):
        dataset_paths(None, "", json_file=tmp_path / "gt.json")
    with pytest.raises(DatasetError, match="annotation file"):
        dataset_paths(None, "train")

    cfg = DataConfig(root=str(tmp_path), train_split="training", val_split="validation",
                     val_json=str(tmp_path / "v.json"), val_image_dir=str(tmp_path / "vi"))
    tr = paths_from_config(cfg, "training")
    assert tr.json_file == tmp_path / "annotations" / "panoptic_training.json" and tr.image_dir == tmp_path / "training"
    va = paths_from_config(cfg, "validation")
    assert (va.json_file, va.png_dir, va.image_dir) == (tmp_path / "v.json", tmp_path / "v", tmp_path / "vi")
    with pytest.raises(DatasetError, match="data.root"):
        paths_from_config(SimpleNamespace(root="", train_split="train", val_split="val", train_json="",
                                          train_png_dir="", train_image_dir="", val_json="", val_png_dir="",
                                          val_image_dir=""), "train")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="panoptic_train.json"):
        COCOPanopticDataset.from_root(tmp_path, "train")
    data = write_dataset(tmp_path, "train", n=2)
    # An image whose size differs from its PNG is refused when it is read.
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "train" / "photo_0.png")
    ds = COCOPanopticDataset.from_root(tmp_path, "train")
    with pytest.raises(DatasetError, match="photo_0.png"):
        ds[0]
    # Unknown categories are refused with the PNG's name.
    data["annotations"][1]["segments_info"][0]["category_id"] = 99
    (tmp_path / "annotations" / "panoptic_train.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="pan_1.png.*99"):
        COCOPanopticDataset.from_root(tmp_path, "train").target(1)
    data["annotations"][1]["image_id"] = 555
    (tmp_path / "annotations" / "panoptic_train.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="555"):
        COCOPanopticDataset.from_root(tmp_path, "train")

