"""Model folders: the form in which remax weights travel, loadable by a local path or a Hugging Face Hub id.

A training checkpoint mixes optimizer state, training-only heads and pickled containers with the weights. A model
folder holds only what inference needs, in the formats the ecosystem shares (as timm and transformers publish):

```
model.safetensors   eval-form weights (no training-only heads), format and remax version in the metadata
config.json         the full Config (Config.to_dict(), the same dict a checkpoint stores under "config")
categories.json     the categories in contiguous training order: id, name, isthing, color
README.md           a short model card: source, preset, classes, input size
```

Reading one never executes code: safetensors and JSON only. :func:`remax.checkpoint.load_checkpoint` accepts a
folder and returns the same checkpoint-like dict as for a ``.pt`` file, so every ``--checkpoint`` option, the
:class:`~remax.inference.Predictor` and ``remax train --init-from`` take folders unchanged.

>>> import remax
>>> model = remax.from_pretrained("path/to/folder")          # or "org/name" on the Hugging Face Hub
>>> from remax.inference import Predictor
>>> predictor = Predictor.from_checkpoint("path/to/folder")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from remax.checkpoint import (CheckpointError, CheckpointWriteError, _file_mode, _write_reason,
                              categories_to_state, checkpoint_categories, first_line, load_with_config,
                              model_categories)
from remax.config import Config
from remax.structures import CategoryInfo

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "CATEGORIES_NAME", "README_NAME", "FOLDER_FILES", "FORMAT_VERSION",
           "is_model_folder", "save_model_folder", "export_folder", "read_folder_config", "load_model_folder",
           "resolve_pretrained", "from_pretrained"]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CATEGORIES_NAME = "categories.json"
README_NAME = "README.md"
REQUIRED_FILES = (WEIGHTS_NAME, CONFIG_NAME, CATEGORIES_NAME)
FOLDER_FILES = (*REQUIRED_FILES, README_NAME)  # also what a hub download fetches, nothing else
# Version of the folder layout, in the safetensors metadata; bumped when a reader of the old one would misread it.
FORMAT_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _safetensors(folder: Path, error: type[CheckpointError] = CheckpointError):
    """``safetensors.torch``, or a one-line :class:`CheckpointError` naming the folder and the extra to install."""
    from remax._extras import MissingExtraError, require

    try:
        return require("safetensors.torch", "hub", "a model folder (model.safetensors)")
    except MissingExtraError as exc:
        raise error(f"{folder}: {exc}") from None


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that looks like a model folder (has a config.json or model.safetensors)."""
    p = Path(path)
    return p.is_dir() and ((p / CONFIG_NAME).is_file() or (p / WEIGHTS_NAME).is_file())


def eval_state_dict(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inference part of a state dict: no ``module.`` prefix (DDP), no training-only heads, contiguous CPU
    tensors that share no storage (safetensors refuses aliased tensors)."""
    from remax.inference.predictor import TRAINING_ONLY_PREFIXES

    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in model_state.items():
        key = key.removeprefix("module.")
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()  # tied weights or views of one buffer: each tensor gets its own storage
            storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def eval_config(cfg: Config) -> Config:
    """The config a model folder stores: the run's config with what would make loading do more than read the
    folder switched off (downloading backbone weights that the folder already holds; ``eval.keep_remask``, whose
    training-only heads a folder does not hold)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone_pretrained = False
    cfg.model.backbone_pretrained_file = ""
    if cfg.eval.keep_remask:
        log.warning("eval.keep_remask is switched off in the model folder: it holds no training-only heads")
        cfg.eval.keep_remask = False
    return cfg


# ------------------------------------------------------------------------------------------------------- writing


def _model_card(cfg: Config, categories: Sequence[CategoryInfo], source: str) -> str:
    from remax import __version__

    things = [c.name for c in categories if c.isthing]
    stuff = [c.name for c in categories if not c.isthing]
    h, w = cfg.model.input_size
    objective = "ReMaX (ReMask + ReClass)" if cfg.remax.enabled else "kMaX-DeepLab baseline"
    lines = [
        "---",
        "library_name: remax",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- panoptic-segmentation",
        "- kmax-deeplab",
        "- remax",
        "---",
        "",
        f"# remax `{cfg.preset}`: panoptic segmentation",
        "",
        f"A kMaX-DeepLab mask transformer (preset `{cfg.preset}`, backbone `{cfg.model.backbone}`, "
        f"{cfg.model.num_queries} queries) for panoptic segmentation of {len(categories)} classes "
        f"({len(things)} things, {len(stuff)} stuff) at a {h}×{w} input; training objective: {objective}.",
        "",
        f"- source: {source}",
        f"- written by remax {__version__} (model folder format {FORMAT_VERSION}): `{WEIGHTS_NAME}` holds the "
        f"inference weights only, `{CONFIG_NAME}` the full config, `{CATEGORIES_NAME}` the classes",
        "",
        "## Use",
        "",
        "```python",
        "from remax.inference import Predictor",
        "",
        'predictor = Predictor.from_checkpoint("PATH/TO/THIS/FOLDER")',
        'result = predictor.predict("photo.jpg")  # id_map, segments_info, semantic, instances',
        "```",
        "",
        "or on the command line: `remax predict --checkpoint FOLDER photo.jpg --out out/`, "
        "`remax demo --checkpoint FOLDER`.",
        "",
        "## Classes",
        "",
        f"things: {', '.join(things) or '(none)'}",
        "",
        f"stuff: {', '.join(stuff) or '(none)'}",
        "",
    ]
    return "\n".join(lines)


def _dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_model_folder(model_state: dict[str, Tensor], cfg: Config, categories: Sequence[CategoryInfo],
                      out: str | os.PathLike, source: str = "", readme: bool = True) -> Path:
    """Write a model folder from a state dict (training or eval form), its config and categories; returns ``out``.

    The files are written into a temporary sibling folder first, so a failed write (full disk, permissions) leaves
    no half folder: a new ``out`` appears whole, and the files of an existing ``out`` are replaced one by one by
    renames only after all of them were written (other files in it, such as a ``.git`` folder, are kept).
    Raises :class:`~remax.checkpoint.CheckpointWriteError` naming ``out``.
    """
    from remax import __version__

    out = Path(out)
    cfg = eval_config(cfg)
    categories = list(categories)
    if len(categories) != cfg.model.num_classes:
        raise ValueError(f"{len(categories)} categories given for a model with {cfg.model.num_classes} classes")
    weights = eval_state_dict(model_state)
    metadata = {"format": "pt", "remax_format_version": str(FORMAT_VERSION), "remax_version": __version__,
                "remax_preset": cfg.preset}
    st = _safetensors(out, CheckpointWriteError)
    if out.exists() and not out.is_dir():
        raise CheckpointWriteError(f"cannot write model folder {out}: a file of that name is in the way")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write model folder {out}: {_write_reason(exc)}") from exc
    try:
        st.save_file(weights, str(tmp / WEIGHTS_NAME), metadata=metadata)
        with open(tmp / WEIGHTS_NAME, "rb+") as f:
            os.fsync(f.fileno())
        _write_text(tmp / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
        _write_text(tmp / CATEGORIES_NAME, json.dumps(categories_to_state(categories), indent=2) + "\n")
        names = list(REQUIRED_FILES)
        if readme:
            _write_text(tmp / README_NAME, _model_card(cfg, categories, source or "unknown"))
            names.append(README_NAME)
        mode = _file_mode()
        for name in names:
            os.chmod(tmp / name, mode)
        if out.is_dir() and any(out.iterdir()):
            for name in names:  # renames within one file system: nothing left to fail for lack of space
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.chmod(tmp, _dir_mode())  # mkdtemp makes it 0700
            os.replace(tmp, out)  # a new folder appears whole (an empty one is replaced)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, ValueError)) or type(exc).__name__ == "SafetensorError":
            raise CheckpointWriteError(f"cannot write model folder {out}: {_write_reason(exc)}") from exc
        raise
    log.info("wrote model folder %s: %s, %d tensors, %d classes", out, cfg.preset, len(weights), len(categories))
    return out


def _describe_source(path: Path, state: dict[str, Any]) -> str:
    """Where the weights come from, for the model card: the file's name (not the local path) and, for a converted
    reference checkpoint, what it was converted from."""
    text = path.name
    src = state.get("source")
    if isinstance(src, dict) and src.get("format"):
        text += f" (converted from the {src['format']} checkpoint {src.get('file', '?')})"
    elif isinstance(state.get("step"), int):
        text += f" (remax train checkpoint, step {state['step']})"
    return text


def export_folder(checkpoint: str | os.PathLike, out: str | os.PathLike, overrides: Sequence[str] = ()) -> Path:
    """Turn any checkpoint :func:`~remax.checkpoint.load_checkpoint` reads (``remax train``,
    ``remax convert-checkpoint``, another model folder) into a model folder at ``out``.

    The eval model of the checkpoint's config (after ``section.field=value`` ``overrides``) is built and its
    weights loaded strictly first, so a folder is only written when it will load. Raises
    :class:`~remax.checkpoint.CheckpointError` (unreadable or mismatching checkpoint, failed write) in one line.
    """
    from remax.inference.predictor import load_model_from_state

    path = Path(checkpoint)
    state, cfg = load_with_config(path, overrides)
    cfg = eval_config(cfg)
    categories = model_categories(state, cfg.model.num_classes, path)
    model = load_model_from_state(state, cfg, where=str(path))
    return save_model_folder(model.state_dict(), cfg, categories, out, source=_describe_source(path, state))


# ------------------------------------------------------------------------------------------------------- reading


def _read_json(folder: Path, name: str) -> Any:
    try:
        with open(folder / name, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder}: {name} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                              f"{exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: cannot read {name} ({first_line(exc)})") from None


def read_folder_config(path: str | os.PathLike) -> tuple[dict[str, Any], Config]:
    """A model folder's ``config.json``, as stored and as a :class:`Config` (one-line errors), without its weights."""
    folder = Path(path)
    raw_cfg = _read_json(folder, CONFIG_NAME)
    if not isinstance(raw_cfg, dict):
        raise CheckpointError(f"{folder}: {CONFIG_NAME} holds a {type(raw_cfg).__name__}, not a config mapping")
    try:
        return raw_cfg, Config.from_dict(raw_cfg)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: {CONFIG_NAME} is not a remax config ({first_line(exc)})") from None


def load_model_folder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a model folder into the dict :func:`~remax.checkpoint.load_checkpoint` returns for a checkpoint file:
    ``{"model": weights, "config": dict, "categories": list, "source": {...}}``.

    Checks what the folder alone can tell (all files present, valid JSON, a valid config, as many categories as
    the config has classes, a readable safetensors file of a known format version); whether the tensors fit the
    config's model is checked where the model is built (:func:`remax.inference.predictor.load_model_from_state`),
    with an error naming the folder too. Raises :class:`~remax.checkpoint.CheckpointError` with one line.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        raise CheckpointError(f"{folder} is a folder but not a remax model folder (no {', '.join(REQUIRED_FILES)}); "
                              f"pass a checkpoint file or a folder written by remax export --format folder")
    if missing:
        raise CheckpointError(f"{folder}: incomplete model folder, missing {', '.join(missing)}")
    raw_cfg, cfg = read_folder_config(folder)
    raw_cats = _read_json(folder, CATEGORIES_NAME)
    try:
        if not isinstance(raw_cats, list):
            raise TypeError(f"a {type(raw_cats).__name__}, not a list")
        categories = checkpoint_categories({"categories": raw_cats})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise CheckpointError(f"{folder}: {CATEGORIES_NAME} is not a list of categories with id, name and isthing "
                              f"({reason})") from None
    if len(categories) != cfg.model.num_classes:
        raise CheckpointError(f"{folder}: {CATEGORIES_NAME} has {len(categories)} categories but {CONFIG_NAME} "
                              f"says the model has {cfg.model.num_classes} classes")
    _safetensors(folder)
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
        raise CheckpointError(f"{folder}: cannot read {WEIGHTS_NAME} ({first_line(exc)})") from None
    version = metadata.get("remax_format_version")
    if version is not None and (not version.isdigit() or int(version) > FORMAT_VERSION):
        raise CheckpointError(f"{folder}: model folder format {version!r} is newer than this remax reads "
                              f"({FORMAT_VERSION}); upgrade remax")
    if not weights:
        raise CheckpointError(f"{folder}: {WEIGHTS_NAME} holds no tensors")
    if str(map_location) != "cpu":
        weights = {k: v.to(map_location) for k, v in weights.items()}
    return {"model": weights, "config": raw_cfg, "categories": categories_to_state(categories),
            "source": {"format": "remax model folder", "folder": str(folder), "format_version": version,
                       "remax_version": metadata.get("remax_version")}}


# ------------------------------------------------------------------------------------------ resolving and loading


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path (model folder or checkpoint file) as it is; a Hugging Face Hub id (``org/name``) downloaded
    with ``huggingface_hub.snapshot_download`` (only the model folder's files, into the usual HF cache or
    ``cache_dir``) and its local snapshot folder returned. ``HF_HUB_OFFLINE=1`` resolves from the cache alone.

    Raises :class:`~remax.checkpoint.CheckpointError` (nothing found) or
    :class:`~remax._extras.MissingExtraError` (a hub id without ``huggingface_hub`` installed), one line each.
    """
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if not _HUB_ID.match(text) or text.endswith((".pt", ".pth", ".safetensors", ".json")):
        raise CheckpointError(f"model not found: {text} is no local file or folder (a Hugging Face Hub id has the "
                              f"form org/name)")
    from remax._extras import require

    require("huggingface_hub", "hub", f"loading {text!r} from the Hugging Face Hub")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=text, revision=revision,
                                   cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
                                   allow_patterns=list(FOLDER_FILES))
    except Exception as exc:  # offline misses, unknown repos, network and auth errors: each their own class
        where = f"{text}@{revision}" if revision else text
        raise CheckpointError(f"cannot get model {where} from the Hugging Face Hub "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    return Path(folder)


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] = ()) -> torch.nn.Module:
    """The bare inference model (``eval()`` mode, on ``device``) of a model folder, hub id or checkpoint file.

    It maps padded, normalised images to ``pred_logits`` / ``pred_masks``; for images in and panoptic results out
    use :class:`remax.inference.Predictor` (``Predictor.from_checkpoint`` takes the same paths).
    """
    from remax.inference.predictor import load_model_from_state, resolve_device

    path = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
    state, cfg = load_with_config(path, overrides)
    model = load_model_from_state(state, cfg, where=str(path))
    return model.to(resolve_device(device)).eval()
