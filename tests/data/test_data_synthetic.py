"""The built-in synthetic data set: determinism, validity, PQ of GT against itself, content statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from remax.config import DataConfig
from remax.data.coco_panoptic import COCOPanopticDataset, DatasetError
from remax.data.synthetic import ensure_synthetic_dataset, render_scene, write_synthetic_dataset
from remax.data.validate import check_root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    calls = []
    write_synthetic_dataset(root, 4, 2, size=64, seed=7, progress=calls.append)
    assert calls == [1] * 6
    return root


def test_same_seed_gives_identical_bytes(small, tmp_path):
    write_synthetic_dataset(tmp_path / "b", 4, 2, size=64, seed=7)
    a, b = _files(small), _files(tmp_path / "b")
    assert len(a) == 2 + 6 + 6 and a == b
    write_synthetic_dataset(tmp_path / "c", 4, 2, size=64, seed=8)
    c = _files(tmp_path / "c")
    assert a.keys() == c.keys() and a["train/000000.jpg"] != c["train/000000.jpg"]


def test_layout_categories_and_checker(small):
    for split, n in (("train", 4), ("val", 2)):
        data = json.loads((small / "annotations" / f"panoptic_{split}.json").read_text())
        assert len(data["images"]) == n and len(data["annotations"]) == n
        assert all((small / split / im["file_name"]).is_file() for im in data["images"])
        assert [(c["name"], c["isthing"]) for c in data["categories"]] == [
            ("circle", 1), ("square", 1), ("triangle", 1), ("star", 1), ("ring", 1),
            ("sky", 0), ("grass", 0), ("water", 0), ("sand", 0)]
    assert check_root(small) == []
    ds = COCOPanopticDataset.from_root(small, "val")
    assert len(ds.categories) == 9 and [c.isthing for c in ds.categories] == [True] * 5 + [False] * 4
    assert tuple(ds[0]["image"].shape) == (3, 64, 64)


def test_ground_truth_scores_pq_100_with_hotcoco(small, tmp_path):
    hotcoco = pytest.importorskip("hotcoco.panoptic")
    gt = small / "annotations" / "panoptic_train.json"
    data = json.loads(gt.read_text())
    # Predictions = ground truth without crowd segments (left void), no areas.
    from remax.data.io import read_panoptic_png, write_panoptic_png

    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for ann in data["annotations"]:
        ids = read_panoptic_png(small / "annotations" / "panoptic_train" / ann["file_name"])
        for s in ann["segments_info"]:
            if s["iscrowd"]:
                ids[ids == s["id"]] = 0
        ann["segments_info"] = [{"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"]
                                if not s["iscrowd"]]
        write_panoptic_png(pred_dir / ann["file_name"], ids)
    (tmp_path / "pred.json").write_text(json.dumps(data))
    res = hotcoco.pq_compute(str(gt), str(tmp_path / "pred.json"), str(small / "annotations" / "panoptic_train"),
                             str(pred_dir))
    for split in ("All", "Things", "Stuff"):
        assert res[split]["pq"] == pytest.approx(1.0) and res[split]["n"] > 0


def test_scene_statistics_and_colour_does_not_tell_things_apart():
    """Shapes carry the class: per-class colour distributions of things overlap almost completely."""
    colours: dict[int, list[np.ndarray]] = {c: [] for c in range(1, 6)}
    void, crowd, counts, sizes = [], 0, [], []
    for i in range(24):
        image, ids, segments = render_scene(np.random.default_rng(1000 + i), 128)
        void.append(float((ids == 0).mean()))
        crowd += any(s["iscrowd"] for s in segments)
        things = [s for s in segments if s["category_id"] <= 5 and not s["iscrowd"]]
        counts.append(len(things))
        for s in segments:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
            if s in things:
                colours[s["category_id"]].append(image[ids == s["id"]].reshape(-1, 3).mean(0))
                sizes.append(max(s["bbox"][2:]))
    assert 0.005 < np.mean(void) < 0.05  # about 2 % void
    assert 0 < crowd < 24
    assert max(counts) <= 12 and np.mean(counts) > 2
    assert min(sizes) < 16 and max(sizes) > 30  # from about 10 px up to a third of the image
    means = np.array([np.mean(colours[c], 0) for c in range(1, 6)])
    spreads = np.array([np.std(colours[c], 0) for c in range(1, 6)])
    # Class means differ by far less than the colour spread inside any class.
    assert np.abs(means[:, None] - means[None]).max() < spreads.min()
    assert spreads.min() > 40


def test_ensure_synthetic_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(root="", synth_train=2, synth_val=1, synth_size=32, synth_seed=0)
    root = ensure_synthetic_dataset(cfg)
    assert cfg.root == "data/synthetic" and root == Path("data/synthetic")
    assert (root / "annotations" / "panoptic_val.json").is_file() and len(list((root / "train").iterdir())) == 2
    assert [p.name for p in Path("data").iterdir()] == ["synthetic"]  # no temporary folder left
    stamp = (root / "train" / "000000.jpg").stat().st_mtime_ns
    ensure_synthetic_dataset(cfg)  # present: not rewritten
    assert (root / "train" / "000000.jpg").stat().st_mtime_ns == stamp
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="busy"):
        ensure_synthetic_dataset(DataConfig(root=str(other), synth_train=1, synth_val=1, synth_size=32))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
