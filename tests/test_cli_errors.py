"""One error policy for every command: an expected failure prints one ``remax: error:`` line and exits 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "inference"))
from inference_helpers import write_checkpoint, write_gt_root  # noqa: E402

from remax.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from remax.cli import main  # noqa: E402
from remax.config import get_config  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("remax: error:"), err
    return err[0]


@pytest.mark.parametrize("args, expected", [
    (["config", "show", "nanoo"], "nanoo"),
    (["config", "show", "nano", "--set", "train.lrr=1"], "lrr"),
])
def test_config_show_mistakes(args, expected, capsys) -> None:
    assert main(args) == 2
    assert expected in _one_error(capsys)


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_cuda_without_a_gpu(command, checkpoint, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_gt_root(tmp_path / "data")
    if command == "predict":
        args = ["predict", str(tmp_path / "data" / "val"), "--checkpoint", str(checkpoint), "--out",
                str(tmp_path / "out"), "--device", "cuda", "--no-progress"]
    else:
        args = ["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "val",
                "--device", "cuda", "--no-progress"]
    assert main(args) == 2
    assert "no CUDA device" in _one_error(capsys)


@pytest.mark.parametrize("fault", ["missing_png", "truncated_image"])
def test_eval_on_a_broken_data_set_names_the_file(fault, checkpoint, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    write_gt_root(data)
    if fault == "missing_png":
        victim = sorted((data / "annotations" / "panoptic_val").glob("*.png"))[0]
        victim.unlink()
    else:
        victim = sorted((data / "val").glob("*.png"))[0]
        victim.write_bytes(victim.read_bytes()[:80])
    for workers in ("0", "1"):  # an error inside a DataLoader worker is reduced to its own line too
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val",
                     "--no-progress", "--set", f"data.num_workers={workers}"]) == 2
        assert victim.name in _one_error(capsys)


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"placeholder")
    (run / "config.yaml").write_text(get_config("nano").to_yaml())
    return run


@pytest.mark.parametrize("extra, expected", [
    (["--set", "model.num_queries=64"], "model.num_queries"),
    (["--preset", "remax_t"], "--preset remax_t"),
])
def test_resume_cannot_change_the_model(extra, expected, tmp_path, capsys) -> None:
    run = _run_folder(tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--no-progress", *extra]) == 2
    assert expected in _one_error(capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "-5"], "--max-steps"),
    (["--set", "train.keep_checkpoints=-1"], "keep_checkpoints"),
    (["--set", "train.lr=-1"], "train.lr must be positive, got -1"),
])
def test_meaningless_training_settings_are_refused(extra, expected, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(out), "--no-progress", *extra]) == 2
    assert expected in _one_error(capsys)
    assert not out.exists()


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_refused_checkpoint_never_suggests_weights_only_false(tmp_path, capsys) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert "weights_only" not in message and "system" in message and "\n" not in message
    (tmp_path / "i.png").write_bytes(b"")
    assert main(["predict", str(tmp_path / "i.png"), "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    line = _one_error(capsys)
    assert "weights_only" not in line and str(bad) in line
