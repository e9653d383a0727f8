"""Checkpoint files: written atomically, read without executing code.

A checkpoint is a plain dict of tensors and Python primitives (see docs/design.md). Reading always uses
``torch.load(weights_only=True)``, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import torch

from remax.config import Config
from remax.structures import CategoryInfo

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a remax checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, permissions); the message names the file."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (torch's unpickling errors span many lines; the first one names the
    file and the cause), or its type name when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (``mkstemp`` always uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_reason(exc: BaseException) -> str:
    """Why a write failed, in words: torch reports a full disk as ``[enforce fail ...] unexpected pos``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file too large (file-size limit)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = first_line(exc)
    if "unexpected pos" in text or "PytorchStreamWriter" in text or "file write failed" in text:
        return "the write failed (disk full, quota or file-size limit)"
    return text


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename (:func:`write_atomically`)."""
    return write_atomically(path, lambda f: torch.save(state, f), "checkpoint")


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "file") -> Path:
    """Run ``write`` on a temporary file beside ``path``, then rename it onto ``path``.

    A failed or interrupted write (full disk, quota, permissions, Ctrl-C) removes the temporary file and leaves
    any previous ``path`` untouched; disk and permission failures raise :class:`CheckpointWriteError` naming
    ``path`` (``what`` says what it is). The file gets the mode the umask gives.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)  # reopened by name: writers such as onnx.save_model read the file object's name
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write {what} {path}: {_write_reason(exc)}") from exc
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            kept = f"; the previous {what} there is kept" if path.exists() else ""
            raise CheckpointWriteError(f"cannot write {what} {path}: {_write_reason(exc)}{kept}") from exc
        raise
    return path


def _read_reason(exc: BaseException) -> str:
    """torch's reason for refusing a file, without its advice to load with ``weights_only=False`` (which would
    let the file run code): only what was refused."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if match:
        refused = match.group(1).strip().split(" was not an allowed global")[0].rstrip(".")
        return (f"refused to load Python objects ({refused}); a remax checkpoint holds only tensors and plain "
                f"values, and loading never executes code from the file")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and "weights_only" not in ln]
    return f"{type(exc).__name__}: {lines[0] if lines else 'unreadable file'}"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, or a model folder (safetensors + JSON, see
    :mod:`remax.hub`) into the same dict; raise :class:`CheckpointError` with the reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        from remax.hub import load_model_folder  # lazy: remax.hub imports this module

        return load_model_folder(path, map_location=map_location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {_read_reason(exc)}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a remax checkpoint (no 'model' entry)")
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The :class:`Config` stored in a checkpoint (defaults if it has none)."""
    raw = state.get("config")
    return Config.from_dict(raw) if raw else Config()


def load_with_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Config]:
    """A checkpoint (on the CPU) and its config with ``overrides`` applied; a bad stored config is the file's
    one-line :class:`CheckpointError`, a bad override the caller's ``ValueError``."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = checkpoint_config(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad config in checkpoint ({first_line(exc)})") from exc
    return state, cfg.override(list(overrides))


def checkpoint_categories(state: dict[str, Any]) -> list[CategoryInfo]:
    """The categories stored in a checkpoint, by contiguous training id."""
    cats = []
    for c in state.get("categories") or []:
        cats.append(CategoryInfo(id=int(c["id"]), name=str(c["name"]), isthing=bool(c["isthing"]),
                                 color=tuple(int(v) for v in c.get("color", (0, 0, 0)))))
    return cats


def model_categories(state: dict[str, Any], num_classes: int, where: str | os.PathLike) -> list[CategoryInfo]:
    """The categories a checkpoint stores, or generic names with every class a thing (and a warning) when it stores
    none; a one-line :class:`CheckpointError` when their number is not the model's class count."""
    categories = checkpoint_categories(state)
    if not categories:
        log.warning("%s holds no categories; using generic names with every class a thing", where)
        categories = [CategoryInfo(id=i + 1, name=f"class_{i}", isthing=True) for i in range(num_classes)]
    if len(categories) != num_classes:
        raise CheckpointError(f"{where}: {len(categories)} categories but the model has {num_classes} classes")
    return categories


def categories_to_state(categories: list[CategoryInfo]) -> list[dict[str, Any]]:
    return [dict(dataclasses.asdict(c), color=list(c.color)) for c in categories]
