"""The data set checker: every problem type reported with its file; `remax data check` exit codes and --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import write_dataset
from PIL import Image

from remax.cli import main
from remax.config import DataConfig
from remax.data.coco_panoptic import DatasetError
from remax.data.validate import Problem, check_dataset, check_root, find_splits, validate_config_data


def _broken(root: Path) -> dict:
    """A train split with one problem (or a group of JSON problems) per image, plus an empty and a junk split."""
    data = write_dataset(root, "train", n=10)
    img, png = root / "train", root / "annotations" / "panoptic_train"
    (img / "sub" / "photo_1.png").unlink()  # 1: missing image (the helper puts it in a sub-folder)
    (img / "photo_2.png").write_bytes(b"junk")  # 2: unreadable image
    full = (img / "photo_3.png").read_bytes()
    (img / "photo_3.png").write_bytes(full[: len(full) // 2])  # 3: truncated image
    (png / "pan_4.png").unlink()  # 4: missing PNG
    (png / "pan_5.png").write_bytes(b"junk")  # 5: unreadable PNG
    segs = data["annotations"][6]["segments_info"]  # 6: JSON / PNG disagreements
    segs[:] = [s for s in segs if s["id"] != 1000]  # PNG id 1000 not in segments_info
    segs.append({"id": 4242, "category_id": 5, "area": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0})  # not in the PNG
    segs.append(dict(segs[1]))  # duplicate segment id 300
    next(s for s in segs if s["id"] == 12)["category_id"] = 99  # unknown category
    next(s for s in segs if s["id"] == 70001)["area"] += 5  # stale area
    Image.new("RGB", (10, 10)).save(img / "photo_7.png")  # 7: image size differs from the PNG
    data["images"][8]["height"] = 99  # 8: PNG size differs from the JSON
    data["images"].append({"id": 100, "file_name": "again.png", "height": 24, "width": 32})  # duplicate image id
    data["images"].append({"id": 555, "file_name": "orphan.png", "height": 24, "width": 32})  # no annotation
    data["annotations"][9]["image_id"] = 777  # annotation of an unknown image (and image 109 loses its annotation)
    (root / "annotations" / "panoptic_train.json").write_text(json.dumps(data))
    (root / "annotations" / "panoptic_val.json").write_text(json.dumps({"images": [], "annotations": [],
                                                                        "categories": data["categories"]}))
    (root / "annotations" / "panoptic_junk.json").write_text("{not json")
    return data


EXPECTED = [  # (file suffix, message fragment)
    ("photo_2.png", "unreadable or truncated image"),
    ("photo_3.png", "unreadable or truncated image"),
    ("pan_4.png", "panoptic PNG is missing"),
    ("pan_5.png", "unreadable panoptic PNG"),
    ("pan_6.png", "PNG id(s) not in segments_info: 1000"),
    ("pan_6.png", "segment(s) of segments_info not in the PNG: 4242"),
    ("pan_6.png", "duplicate segment id(s) in segments_info: 300"),
    ("pan_6.png", "segment 12 has unknown category_id 99"),
    ("pan_6.png", "differs from the PNG pixel count"),
    ("photo_7.png", "image is 10×10 but its panoptic PNG is 32×24"),
    ("pan_8.png", "PNG is 32×24 but the JSON says 32×99"),
    ("pan_9.png", "image_id 777 is not in 'images'"),
    ("panoptic_train.json", "duplicate image id(s): 100"),
    ("panoptic_train.json", "image(s) without annotation"),
    ("panoptic_val.json", "the split is empty"),
    ("panoptic_junk.json", "unreadable annotation file"),
]


def _report(problems: list[Problem], suffix: str, fragment: str) -> bool:
    return any(p.file.endswith(suffix) and fragment in p.message for p in problems)


def test_every_problem_is_reported_with_its_file(tmp_path):
    _broken(tmp_path)
    assert find_splits(tmp_path) == ["junk", "train", "val"]
    problems = check_root(tmp_path)
    for suffix, fragment in EXPECTED:
        assert _report(problems, suffix, fragment), (suffix, fragment, [str(p) for p in problems])
    missing = [p for p in problems if p.message == "image is missing"]
    assert [Path(p.file).name for p in missing] == ["photo_1.png"]
    orphan = next(p for p in problems if "without annotation" in p.message)
    assert "orphan.png" in orphan.message and "sub/photo_1.png" not in orphan.message
    assert "photo_9.png" in orphan.message  # its annotation now points at image 777
    # Nothing is reported for the clean image 0.
    assert not any("photo_0" in p.file or "pan_0" in p.file for p in problems)
    assert str(problems[0]) == f"{problems[0].file}: {problems[0].message}"
    assert problems[0].to_dict() == {"file": problems[0].file, "message": problems[0].message}


def test_headers_only_misses_truncated_data_only(tmp_path):
    _broken(tmp_path)
    full = check_dataset(tmp_path / "annotations" / "panoptic_train.json", tmp_path / "annotations" / "panoptic_train",
                         tmp_path / "train")
    fast = check_dataset(tmp_path / "annotations" / "panoptic_train.json", tmp_path / "annotations" / "panoptic_train",
                         tmp_path / "train", check_images=False)
    assert {str(p) for p in full} - {str(p) for p in fast} == {
        next(str(p) for p in full if p.file.endswith("photo_3.png"))}
    assert _report(fast, "photo_2.png", "unreadable")


def test_clean_data_set_reports_nothing(tmp_path):
    write_dataset(tmp_path, "train", n=3, string_ids=True, ext="jpg")
    write_dataset(tmp_path, "val", n=1)
    calls = []
    assert check_root(tmp_path, progress=calls.append) == []
    assert len(calls) == 4
    validate_config_data(DataConfig(root=str(tmp_path)), ["train", "val"])


def test_validate_config_data_lists_every_problem(tmp_path):
    _broken(tmp_path)
    with pytest.raises(DatasetError) as err:
        validate_config_data(DataConfig(root=str(tmp_path)), ["train", "val", "test"])
    text = str(err.value)
    for name in ("photo_1.png", "photo_2.png", "pan_4.png", "panoptic_val.json", "panoptic_test.json"):
        assert name in text
    assert len(text.splitlines()) >= len(EXPECTED)


def test_cli_check_exit_codes_and_json(tmp_path, capsys):
    clean = tmp_path / "clean"
    write_dataset(clean, "train", n=2)
    assert main(["data", "check", str(clean)]) == 0
    assert "no problems found" in capsys.readouterr().out

    broken = tmp_path / "broken"
    _broken(broken)
    report = tmp_path / "problems.json"
    assert main(["data", "check", str(broken), "--split", "train", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "pan_4.png: panoptic PNG is missing" in out
    items = json.loads(report.read_text())
    assert all(set(i) == {"file", "message"} for i in items)
    assert any(i["file"].endswith("photo_7.png") for i in items)
    assert not any(i["file"].endswith("panoptic_val.json") for i in items)  # only the split asked for
    # Explicit paths (another layout).
    assert main(["data", "check", "--json-file", str(clean / "annotations" / "panoptic_train.json"),
                 "--image-dir", str(clean / "train")]) == 0
    assert main(["data", "check", str(broken), "--headers-only"]) == 1


def test_cli_synth_then_check(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "32",
                 "--format", "png"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert (out / "train" / "000001.png").is_file()
    assert main(["data", "check", str(out)]) == 0
