"""Real COCO layouts: the vendored two-photo COCO sample (detectron2's layout) and the official-zip layout work with
`data check`, `eval --gt` and `predict` without path flags; a missing split lists the splits that exist."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from inference_helpers import write_checkpoint  # noqa: E402
from reference_parity import COCO_SAMPLE  # noqa: E402

from remax.cli import main  # noqa: E402
from remax.data.coco_panoptic import dataset_paths  # noqa: E402


@pytest.fixture(scope="module")
def sample() -> Path:
    if not (COCO_SAMPLE / "annotations" / "panoptic_val2017.json").is_file():
        pytest.skip(f"COCO panoptic sample not found at {COCO_SAMPLE}")
    return COCO_SAMPLE


@pytest.fixture(scope="module")
def official_layout(sample: Path, tmp_path_factory) -> Path:
    """The sample as the official zips unpack: PNGs under annotations/panoptic_val2017/."""
    root = tmp_path_factory.mktemp("official")
    shutil.copytree(sample / "annotations", root / "annotations")
    shutil.copytree(sample / "panoptic_val2017", root / "annotations" / "panoptic_val2017")
    shutil.copytree(sample / "val2017", root / "val2017")
    return root


def test_both_layouts_are_found_under_generic_and_coco_split_names(sample: Path, official_layout: Path) -> None:
    for root, png_dir in ((sample, sample / "panoptic_val2017"),
                          (official_layout, official_layout / "annotations" / "panoptic_val2017")):
        for split in ("val", "val2017"):
            paths = dataset_paths(root, split)
            assert paths.json_file == root / "annotations" / "panoptic_val2017.json"
            assert paths.png_dir == png_dir and paths.image_dir == root / "val2017"


@pytest.mark.parametrize("layout", ["detectron2", "official"])
def test_data_check_passes_without_path_flags(layout: str, sample: Path, official_layout: Path, capsys) -> None:
    root = sample if layout == "detectron2" else official_layout
    assert main(["data", "check", str(root)]) == 0
    assert main(["data", "check", str(root), "--split", "val"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_missing_split_lists_the_splits_that_exist(sample: Path, capsys) -> None:
    assert main(["data", "check", str(sample), "--split", "training"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'training' not found" in err[0] and "splits found: val2017" in err[0]
    assert main(["eval", "--gt", str(sample), "--split", "test2017", "--pred-json",
                 str(sample / "annotations" / "panoptic_val2017.json"), "--no-progress"]) == 2
    assert "splits found: val2017" in capsys.readouterr().err


def test_eval_gt_on_the_sample_and_the_png_folder_option(sample: Path, tmp_path: Path, capsys) -> None:
    gt_json = sample / "annotations" / "panoptic_val2017.json"
    pngs = sample / "panoptic_val2017"
    for gt_args in (["--gt", str(sample)], ["--gt-json", str(gt_json), "--gt-png-dir", str(pngs)]):
        out = tmp_path / "pq.json"
        assert main(["eval", *gt_args, "--pred-json", str(gt_json), "--pred-dir", str(pngs), "--json", str(out),
                     "--no-progress", "--no-per-class"]) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        assert result["All"]["pq"] == pytest.approx(1.0) and result["num_images"] == 2
    capsys.readouterr()


def test_predict_on_the_sample_photos(sample: Path, tmp_path: Path, capsys) -> None:
    ckpt = write_checkpoint(tmp_path / "model.pt")
    assert main(["predict", str(sample / "val2017"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                 "--no-progress", "--no-overlay"]) == 0
    assert "2 image(s) predicted, 0 skipped" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "predictions").glob("*.png"))) == 2
