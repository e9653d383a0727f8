"""`--init-from` with a checkpoint that fits only a small part of the model is refused unless asked for."""

from __future__ import annotations

import pytest
import torch

from remax.checkpoint import CheckpointError, save_checkpoint
from remax.config import get_config
from remax.engine.trainer import load_init_weights
from remax.models import build_model


def test_mostly_mismatched_checkpoint_needs_init_partial(tmp_path) -> None:
    cfg = get_config("nano")
    cfg.model.input_size = (65, 65)
    source = build_model(cfg.model, with_training_heads=True).state_dict()
    keys = sorted(source)
    # Four tensors in five of another shape: what a checkpoint of another architecture looks like.
    odd = {k: (torch.zeros(1, *v.shape) if i % 5 else v) for i, (k, v) in enumerate(sorted(source.items()))}
    path = save_checkpoint(tmp_path / "other.pt", {"model": odd})
    model = build_model(cfg.model, with_training_heads=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_init_weights(model, path)
    message = str(info.value)
    assert "--init-partial" in message and "backbone (" in message and "\n" not in message
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in keys)  # nothing loaded
    report = load_init_weights(model, path, allow_partial=True)
    assert len(report["mismatched"]) > 0.5 * len(keys) and report["loaded"]
