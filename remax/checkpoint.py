"""Checkpoint files: written atomically, read without executing code.

A checkpoint is a plain dict of tensors and Python primitives (see docs/design.md). Reading always uses
``torch.load(weights_only=True)``, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from remax.config import Config
from remax.structures import CategoryInfo

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a remax checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a remax checkpoint (no 'model' entry)")
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The :class:`Config` stored in a checkpoint (defaults if it has none)."""
    raw = state.get("config")
    return Config.from_dict(raw) if raw else Config()


def checkpoint_categories(state: dict[str, Any]) -> list[CategoryInfo]:
    """The categories stored in a checkpoint, by contiguous training id."""
    cats = []
    for c in state.get("categories") or []:
        cats.append(CategoryInfo(id=int(c["id"]), name=str(c["name"]), isthing=bool(c["isthing"]),
                                 color=tuple(int(v) for v in c.get("color", (0, 0, 0)))))
    return cats


def categories_to_state(categories: list[CategoryInfo]) -> list[dict[str, Any]]:
    return [dict(dataclasses.asdict(c), color=list(c.color)) for c in categories]
