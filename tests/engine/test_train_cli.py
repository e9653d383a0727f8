"""`remax train` end to end on the real stack: exact resume after SIGKILL, SIGTERM, custom data, fine-tuning."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import TINY, env, make_synthetic, remax_cmd, run_remax
from remax.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--no-progress", *TINY, *extra]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_is_bitwise_exact(synth: Path, tmp_path: Path) -> None:
    steps = ["--max-steps", "8", "--set", "train.checkpoint_every=2"]
    straight = run_remax(*_args(synth, tmp_path / "straight", *steps), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Same run, killed without warning once a periodic checkpoint exists, then resumed.
    out = tmp_path / "killed"
    proc = subprocess.Popen(remax_cmd(*_args(synth, out, *steps)), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_000002.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert 2 <= killed_at < 8
    resumed = run_remax("train", "--resume", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'last.pt'} at step {killed_at}" in resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    _assert_same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_state(sa, sb)
    # metrics.jsonl holds each step once, with identical losses.
    ra = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    la = [(r["step"], r["loss"]) for r in ra if r["kind"] == "train"]
    lb = [(r["step"], r["loss"]) for r in rb if r["kind"] == "train"]
    assert la == lb and [s for s, _ in la] == list(range(1, 9))


def test_sigterm_writes_checkpoint_and_exits_zero(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(remax_cmd(*_args(synth, out, "--max-steps", "100000",
                                             "--set", "train.checkpoint_every=0")),
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] >= 2
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged[-1] == state["step"]


def _write_coco_fixture(root: Path) -> None:
    """Three classes of our own (one thing, two stuff), string image ids, PNG images: 3 train, 1 val."""
    import numpy as np
    from PIL import Image

    from remax.data.io import write_panoptic_png

    cats = [{"id": 11, "name": "blob", "isthing": 1, "color": [200, 30, 30]},
            {"id": 20, "name": "floor", "isthing": 0, "color": [30, 200, 30]},
            {"id": 21, "name": "wall", "isthing": 0, "color": [30, 30, 200]}]
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        (root / split).mkdir(parents=True)
        (root / "annotations" / f"panoptic_{split}").mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            h, w = 48, 64
            ids = np.zeros((h, w), np.int64)
            ids[: h // 2] = 1  # wall
            ids[h // 2:] = 2  # floor
            y, x = rng.integers(4, h - 16), rng.integers(4, w - 16)
            ids[y:y + 12, x:x + 12] = 3  # blob
            ids[0, 0] = 0  # a void pixel
            colours = {0: (0, 0, 0), 1: (40, 40, 160), 2: (40, 160, 40), 3: (220, 60, 60)}
            img = np.zeros((h, w, 3), np.uint8)
            for k, c in colours.items():
                img[ids == k] = c
            name = f"img_{split}_{i}"
            Image.fromarray(img).save(root / split / f"{name}.png")
            write_panoptic_png(root / "annotations" / f"panoptic_{split}" / f"{name}.png", ids)
            segs = [{"id": k, "category_id": c, "iscrowd": 0, "area": int((ids == k).sum()),
                     "bbox": [0, 0, 1, 1]} for k, c in ((1, 21), (2, 20), (3, 11))]
            images.append({"id": name, "file_name": f"{name}.png", "height": h, "width": w})
            anns.append({"image_id": name, "file_name": f"{name}.png", "segments_info": segs})
        (root / "annotations" / f"panoptic_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_train_on_custom_coco_folder_and_finetune(tmp_path: Path) -> None:
    data = tmp_path / "custom"
    _write_coco_fixture(data)
    out = tmp_path / "run"
    res = run_remax(*_args(data, out, "--max-steps", "2", "--per-class"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["config"]["model"]["num_classes"] == 3 and state["config"]["data"]["name"] == "custom"
    assert [c["name"] for c in state["categories"]] == ["blob", "floor", "wall"]
    assert "validation panoptic quality" in res.stdout and "blob" in res.stdout
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "pq.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "val_overlays").glob("*.png"))) == 1

    # Fine-tune the 3-class model on the 9-class synthetic data: class heads are skipped, the rest is loaded.
    synth = make_synthetic(tmp_path / "synthetic")
    ft = run_remax(*_args(synth, tmp_path / "ft", "--max-steps", "1", "--init-from",
                          str(out / "checkpoints" / "last.pt")), cwd=tmp_path)
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "skipped (shape): " in ft.stderr and "class_head" in ft.stderr
    assert load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["config"]["model"]["num_classes"] == 9


def test_invalid_data_is_refused_before_training(tmp_path: Path) -> None:
    data = tmp_path / "custom"
    _write_coco_fixture(data)
    (data / "annotations" / "panoptic_train" / "img_train_1.png").unlink()
    (data / "train" / "img_train_2.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    res = run_remax(*_args(data, out, "--max-steps", "2"), cwd=tmp_path)
    assert res.returncode == 2
    assert "img_train_1.png" in res.stderr and "img_train_2.png" in res.stderr
    assert not (out / "checkpoints").exists()


def test_run_folder_refuses_to_overwrite(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(__file__, out / "checkpoints" / "last.pt")
    res = run_remax(*_args(synth, out, "--max-steps", "1"), cwd=tmp_path)
    assert res.returncode == 2 and "--resume" in res.stderr
