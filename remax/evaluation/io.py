"""COCO-panoptic file helpers: segment ids <-> PNG colours, reading and writing the JSON + PNG pairs.

The id of a pixel is ``R + 256·G + 256²·B`` (the code of panopticapi's ``rgb2id``; the docstring of its
``IdGenerator`` writes the formula wrongly). ``0`` is void.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# PIL modes whose conversion to RGB keeps the colours a COCO-panoptic PNG stores.
_COLOUR_MODES = ("RGB", "RGBA", "P")
MAX_PNG_ID = 256**3 - 1


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``H×W×3`` (or ``×4``, alpha ignored) colours to ``H×W`` uint32 segment ids."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb2id expects an H×W×3 array, got shape {tuple(rgb.shape)}")
    rgb = rgb.astype(np.uint32, copy=False)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """``H×W`` segment ids (0 … 256³−1) to ``H×W×3`` uint8 colours."""
    id_map = np.asarray(id_map)
    if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_PNG_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_PNG_ID}] to fit an RGB PNG, got "
                         f"[{id_map.min()}, {id_map.max()}]")
    # The low three bytes of a little-endian uint32 are R, G, B: one uint32 copy and one uint8 copy, instead of a
    # uint32 array per channel (a 12000×8000 photo's id map would need 1.5 GB for those).
    ids = id_map.astype("<u4")
    return np.ascontiguousarray(ids.view(np.uint8).reshape(*ids.shape, 4)[..., :3])


try:  # OpenCV decodes PNGs about 2-3× faster than Pillow; it is optional.
    import cv2 as _cv2
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None


def _read_png_cv2(path: str | os.PathLike[str]) -> np.ndarray | None:
    """Ids through OpenCV, or ``None`` (then Pillow decides) for anything but an 8-bit 3/4-channel image."""
    if _cv2 is None:
        return None
    bgr = _cv2.imread(os.fspath(path), _cv2.IMREAD_UNCHANGED)
    if bgr is None or bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] not in (3, 4):
        return None
    code = _cv2.COLOR_BGR2RGBA if bgr.shape[2] == 3 else _cv2.COLOR_BGRA2RGBA
    rgba = np.ascontiguousarray(_cv2.cvtColor(bgr, code))
    return rgba.view("<u4")[..., 0] & np.uint32(0xFFFFFF)


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a COCO-panoptic PNG as an ``H×W`` uint32 id map."""
    ids = _read_png_cv2(path)
    if ids is not None:
        return ids
    try:
        with Image.open(path) as img:
            if img.mode not in _COLOUR_MODES:
                raise ValueError(f"{path}: a COCO-panoptic PNG must be RGB (ids = R + 256·G + 256²·B), "
                                 f"got PIL mode {img.mode!r}")
            # RGBX packs a pixel into 4 bytes, so the id is one little-endian uint32 view with the pad byte masked.
            rgbx = np.asarray(img.convert("RGBX"))
    except FileNotFoundError:
        raise FileNotFoundError(f"panoptic PNG not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read panoptic PNG {path}: {exc}") from exc
    return np.ascontiguousarray(rgbx).view("<u4")[..., 0] & np.uint32(0xFFFFFF)


def write_panoptic_png(path: str | os.PathLike[str], id_map: np.ndarray) -> None:
    """Write an ``H×W`` id map as a COCO-panoptic RGB PNG."""
    Image.fromarray(id2rgb(np.asarray(id_map))).save(path)


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a COCO-panoptic JSON, with an error that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"panoptic JSON not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: a COCO-panoptic JSON needs an 'annotations' list")
    return data


def default_png_folder(json_path: str | os.PathLike[str]) -> Path:
    """panopticapi's default: the PNG folder is the JSON path without ``.json``."""
    p = Path(json_path)
    return p.with_suffix("") if p.suffix == ".json" else p
