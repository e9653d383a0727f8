"""Model folders (remax.hub): train checkpoint -> folder -> from_pretrained with identical outputs, eval-form
weights only, a converted reference checkpoint too, one-line errors for tampered or incomplete folders, and hub ids
resolved through huggingface_hub's real download code against a local cache, offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "inference"))
from inference_helpers import CATEGORIES, nano_config, write_checkpoint  # noqa: E402

import remax  # noqa: E402
from remax._extras import MissingExtraError  # noqa: E402
from remax.checkpoint import (CheckpointError, CheckpointWriteError, checkpoint_categories,  # noqa: E402
                              checkpoint_config, load_checkpoint)
from remax.cli import main  # noqa: E402
from remax.config import Config  # noqa: E402
from remax.demo import default_examples  # noqa: E402
from remax.hub import (CATEGORIES_NAME, CONFIG_NAME, FOLDER_FILES, README_NAME, WEIGHTS_NAME,  # noqa: E402
                       export_folder, load_model_folder, resolve_pretrained, save_model_folder)
from remax.inference import Predictor  # noqa: E402
from remax.inference.predictor import TRAINING_ONLY_PREFIXES  # noqa: E402

safetensors = pytest.importorskip("safetensors", reason="model folders need the hub extra (safetensors)")
from safetensors import safe_open  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

COCO_PHOTO = next(p for p in default_examples() if p.name.startswith("coco_"))
SYNTHETIC = next(p for p in default_examples() if p.name.startswith("synthetic_"))


@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory, one_thread) -> Path:
    """A training-style checkpoint: ReMaX and auxiliary semantic heads included, as the trainer writes it."""
    return write_checkpoint(tmp_path_factory.mktemp("train") / "last.pt")


@pytest.fixture(scope="module")
def folder(train_checkpoint, tmp_path_factory) -> Path:
    return export_folder(train_checkpoint, tmp_path_factory.mktemp("export") / "nano-folder")


def _one_line(exc: BaseException, where: Path | str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    assert str(where) in text, text
    return text


# ---------------------------------------------------------------------------------------------- layout, round trip


def test_folder_holds_eval_weights_config_and_categories(folder, train_checkpoint):
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    trained = load_checkpoint(train_checkpoint)["model"]
    assert any(k.startswith(TRAINING_ONLY_PREFIXES) for k in trained)  # so that dropping them is tested
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {k for k in trained if not k.startswith(TRAINING_ONLY_PREFIXES)}
    assert meta["remax_format_version"] == "1" and meta["remax_version"] == remax.__version__
    # config.json is the checkpoint's Config dict (what checkpoints store), minus backbone downloads.
    stored = Config.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    assert stored == nano_config()
    cats = checkpoint_categories({"categories": json.loads((folder / CATEGORIES_NAME).read_text())})
    assert cats == CATEGORIES
    card = (folder / README_NAME).read_text()
    assert "`nano`" in card and "last.pt" in card and "class0" in card and "129×129" in card


def test_round_trip_gives_identical_outputs(folder, train_checkpoint):
    reference = Predictor.from_checkpoint(train_checkpoint)
    loaded = [Predictor.from_checkpoint(folder), Predictor.from_pretrained(str(folder))]
    bare = remax.from_pretrained(folder)
    batch = torch.randn(2, 3, 129, 129)
    with torch.inference_mode():
        want = reference.model(batch)
        for model in [p.model for p in loaded] + [bare]:
            got = model(batch)
            assert torch.equal(got["pred_logits"], want["pred_logits"])
            assert torch.equal(got["pred_masks"], want["pred_masks"])
    for image in (COCO_PHOTO, SYNTHETIC):
        expected = reference.predict(image)
        assert expected.segments_info, "the fixture model should find segments"
        for predictor in loaded:
            result = predictor.predict(image)
            assert torch.equal(result.id_map, expected.id_map)
            assert result.segments_info == expected.segments_info
            assert torch.equal(result.semantic, expected.semantic)


def test_every_checkpoint_option_takes_a_folder(folder, tmp_path, capsys):
    state = load_checkpoint(folder)
    assert set(state) >= {"model", "config", "categories"}
    assert checkpoint_config(state) == nano_config()
    assert checkpoint_categories(state) == CATEGORIES
    code = main(["predict", str(SYNTHETIC), "--checkpoint", str(folder), "--out", str(tmp_path / "out"),
                 "--no-progress", "--no-overlay"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["annotations"]


def test_export_into_an_existing_folder_replaces_its_files_and_keeps_others(folder, tmp_path):
    again = shutil.copytree(folder, tmp_path / "again")
    (again / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    export_folder(folder, again, overrides=["eval.thing_threshold=0.25"])  # a folder is a checkpoint too
    assert (again / ".gitattributes").is_file()
    assert json.loads((again / CONFIG_NAME).read_text())["eval"]["thing_threshold"] == 0.25
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failed_write_leaves_no_half_folder(train_checkpoint, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    state = load_checkpoint(train_checkpoint)
    out = tmp_path / "model"
    with pytest.raises(CheckpointWriteError) as info:
        save_model_folder(state["model"], nano_config(), CATEGORIES, out, source="test")
    assert "no space left" in _one_line(info.value, out)
    assert list(tmp_path.iterdir()) == []


def test_a_converted_reference_checkpoint_becomes_a_folder(tmp_path):
    """`remax convert-checkpoint` output (R50 on COCO, 133 classes, aux head kept) -> folder: the same tensors
    minus the training-only head, the baseline config and the COCO categories."""
    from reference_parity import reference_state_dict

    src = tmp_path / "kmax_r50.pth"
    torch.save({"model": reference_state_dict("r50"), "iteration": 5}, src)
    converted = tmp_path / "kmax_r50_coco.pt"
    assert main(["convert-checkpoint", str(src), str(converted), "--preset", "kmax_r50",
                 "--set", "model.input_size=[129,129]"]) == 0
    src.unlink()
    out = export_folder(converted, tmp_path / "kmax_r50_coco")
    state = load_checkpoint(converted)
    folder_state = load_model_folder(out)
    expected = {k: v for k, v in state["model"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    assert len(expected) < len(state["model"])  # the auxiliary semantic head was there and is dropped
    assert sorted(folder_state["model"]) == sorted(expected)
    assert all(torch.equal(folder_state["model"][k], v) for k, v in expected.items())
    assert checkpoint_config(folder_state) == checkpoint_config(state)
    assert checkpoint_categories(folder_state) == checkpoint_categories(state)
    assert len(checkpoint_categories(folder_state)) == 133
    assert "converted from the kmax-deeplab" in (out / README_NAME).read_text()


# ---------------------------------------------------------------------------------------------- tampered folders


def _edit_json(name, edit):
    def apply(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    return apply


def _truncate(folder: Path) -> None:
    path = folder / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_header(folder: Path) -> None:
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    path.write_bytes(bytes(data))


def _drop_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / WEIGHTS_NAME))
    weights.pop(sorted(weights)[-1])
    save_file(weights, str(folder / WEIGHTS_NAME))


TAMPERED = {
    "no weights": (lambda f: (f / WEIGHTS_NAME).unlink(), "missing model.safetensors"),
    "no config": (lambda f: (f / CONFIG_NAME).unlink(), "missing config.json"),
    "no categories": (lambda f: (f / CATEGORIES_NAME).unlink(), "missing categories.json"),
    "nothing": (lambda f: [p.unlink() for p in f.iterdir()], "not a remax model folder"),
    "truncated weights": (_truncate, "cannot read model.safetensors"),
    "corrupt safetensors header": (_corrupt_header, "cannot read model.safetensors"),
    "corrupt config JSON": (lambda f: (f / CONFIG_NAME).write_text('{"model": {"num_classes": 9,'),
                            "config.json is not valid JSON"),
    "config of an unknown field": (_edit_json(CONFIG_NAME, lambda d: d["model"].update(heads=3)),
                                   "config.json is not a remax config"),
    "wrong num_classes": (_edit_json(CONFIG_NAME, lambda d: d["model"].update(num_classes=12)),
                          "9 categories but config.json says the model has 12 classes"),
    "categories without names": (_edit_json(CATEGORIES_NAME, lambda d: [c.pop("name") for c in d]),
                                 "categories.json is not a list of categories"),
    "weights of another width": (_edit_json(CONFIG_NAME, lambda d: d["model"].update(hidden_dim=96)),
                                 "weights do not fit the model of its config"),
    "a missing tensor": (_drop_tensor, "1 missing"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_or_incomplete_folders_give_one_line_errors(case, folder, tmp_path):
    tamper, expected = TAMPERED[case]
    broken = shutil.copytree(folder, tmp_path / "broken")
    tamper(broken)
    with pytest.raises(CheckpointError) as info:
        Predictor.from_pretrained(broken)
    assert expected in _one_line(info.value, broken)


def test_the_cli_reports_a_tampered_folder_in_one_line(folder, tmp_path, capsys):
    broken = shutil.copytree(folder, tmp_path / "broken")
    _truncate(broken)
    assert main(["predict", str(SYNTHETIC), "--checkpoint", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("remax: error:") and str(broken) in err[0], err


# ---------------------------------------------------------------------------------------------- hub ids, offline


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """The layout huggingface_hub's snapshot_download writes: blobs by hash, a snapshot of symlinks, refs/main."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in folder.iterdir():
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, repo / "blobs" / digest)
        os.symlink(os.path.relpath(repo / "blobs" / digest, snapshot), snapshot / p.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline_hub(monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="hub ids need the hub extra (huggingface_hub)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    return hub


def test_hub_ids_resolve_from_the_local_cache_offline(offline_hub, folder, train_checkpoint, tmp_path):
    cache = tmp_path / "hf-cache"
    commit = _fake_hub_cache(cache, "remax-org/nano-synthetic", folder)
    snapshot = cache / "models--remax-org--nano-synthetic" / "snapshots" / commit
    assert resolve_pretrained("remax-org/nano-synthetic", cache_dir=cache) == snapshot
    assert resolve_pretrained("remax-org/nano-synthetic", revision=commit, cache_dir=cache) == snapshot
    predictor = Predictor.from_pretrained("remax-org/nano-synthetic", cache_dir=cache)
    expected = Predictor.from_checkpoint(train_checkpoint).predict(SYNTHETIC)
    assert torch.equal(predictor.predict(SYNTHETIC).id_map, expected.id_map)
    model = remax.from_pretrained("remax-org/nano-synthetic", cache_dir=cache)
    assert isinstance(model, torch.nn.Module) and not model.training


def test_unknown_hub_ids_and_paths_give_one_line_errors(offline_hub, tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with pytest.raises(CheckpointError) as info:
        resolve_pretrained("remax-org/no-such-model", cache_dir=cache)
    assert "Hugging Face Hub" in _one_line(info.value, "remax-org/no-such-model")
    with pytest.raises(CheckpointError) as info:
        resolve_pretrained(tmp_path / "no" / "such" / "folder")
    assert "model not found" in _one_line(info.value, tmp_path / "no" / "such" / "folder")


def test_a_hub_id_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError) as info:
        resolve_pretrained("remax-org/nano-synthetic")
    assert "pip install 'remax[hub]'" in str(info.value) and "\n" not in str(info.value)


def test_a_folder_without_safetensors_installed_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert "pip install 'remax[hub]'" in _one_line(info.value, folder)


def test_local_paths_resolve_to_themselves(folder, train_checkpoint):
    assert resolve_pretrained(folder) == folder
    assert resolve_pretrained(str(train_checkpoint)) == train_checkpoint
    assert np.array_equal(sorted(load_checkpoint(folder)["model"]), sorted(load_model_folder(folder)["model"]))
