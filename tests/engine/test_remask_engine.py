"""The engine wires ReMask into the model as the run's config says (in the decoder, ground-truth control)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine_helpers import TINY, make_synthetic
from remax.config import get_config
from remax.engine import build_parts
from remax.engine.trainer import unpack_batch


def _parts(tmp_path: Path, *overrides: str):
    root = make_synthetic(tmp_path / "synthetic")
    cfg = get_config("nano").override([a for a in TINY if a != "--set"] + [f"data.root={root}", *overrides])
    return cfg, build_parts(cfg, progress=False)


def test_default_run_relaxes_inside_the_decoder(tmp_path: Path) -> None:
    cfg, parts = _parts(tmp_path)
    assert parts.model.remask.stages == cfg.remax.remask_stages and not parts.model.remask.use_gt
    assert parts.forward_kwargs is None
    images, targets = unpack_batch(parts.collate_fn([parts.train_dataset[i] for i in range(2)]))
    out = parts.model.train()(images)
    assert ["pred_masks_raw" in a for a in out["aux_outputs"]] == [True, True, True]
    loss, bd = parts.criterion(out, targets)
    assert torch.isfinite(loss) and "loss_remask_semantic/2" in bd


def test_baseline_and_loss_only_runs_leave_the_decoder_alone(tmp_path: Path) -> None:
    for overrides in (["remax.enabled=false"], ["remax.remask_in_decoder=false"]):
        _, parts = _parts(tmp_path, *overrides)
        assert parts.model.remask.stages == 0
        images, _ = unpack_batch(parts.collate_fn([parts.train_dataset[i] for i in range(2)]))
        assert all("pred_masks_raw" not in a for a in parts.model.train()(images)["aux_outputs"])


def test_ground_truth_control_hands_the_labels_to_the_decoder(tmp_path: Path) -> None:
    cfg, parts = _parts(tmp_path, "remax.remask_use_gt=true")
    assert parts.model.remask.use_gt and parts.forward_kwargs is not None
    images, targets = unpack_batch(parts.collate_fn([parts.train_dataset[i] for i in range(2)]))
    labels = parts.forward_kwargs(targets)["remask_gt_semantic"]
    K = cfg.model.num_classes
    assert labels.shape == (2, *cfg.model.input_size)
    for b, t in enumerate(targets):  # every pixel: its segment's class; void, padding and crowd: K
        for seg in range(t.num_segments):
            pix = labels[b][t.id_map == seg + 1]
            want = K if bool(t.is_crowd[seg]) else int(t.classes[seg])
            assert pix.numel() == 0 or bool((pix == want).all())
        assert bool((labels[b][t.id_map == 0] == K).all())
    out = parts.model.train()(images, **parts.forward_kwargs(targets))
    loss, bd = parts.criterion(out, targets)
    assert torch.isfinite(loss)
    assert not any(k.startswith("loss_remask_semantic") for k in bd)  # the control has no semantic loss
