"""File helpers of the data package: JSON, panoptic PNGs and photos, with errors that name the file.

A panoptic PNG stores segment id ``R + 256·G + 256²·B`` per pixel (``0`` = void). The colour <-> id codec and the
PNG decoder are shared with :mod:`remax.evaluation.io`, so training and evaluation can never read a PNG differently.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from remax.evaluation.io import id2rgb, rgb2id
from remax.evaluation.io import read_panoptic_png as _read_png_uint32

__all__ = ["load_json", "write_json", "rgb2id", "id2rgb", "read_panoptic_png", "write_panoptic_png", "read_image",
           "image_size", "label_stats", "segment_stats", "place_images"]

# zlib level of the panoptic PNGs we write: label maps compress well even at level 1, and level 1 keeps the
# synthetic generator and the converters fast. The bytes are a pure function of the ids (no timestamps).
_PNG_COMPRESS_LEVEL = 1


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object; a missing file raises ``FileNotFoundError``, bad JSON ``ValueError``, both naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write compact JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"), ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Segment ids of a COCO-panoptic PNG as an ``H×W`` int64 array (``0`` = void)."""
    return _read_png_uint32(path).astype(np.int64)


def write_panoptic_png(path: str | os.PathLike[str], ids: np.ndarray) -> None:
    """Write ``H×W`` segment ids as an RGB PNG; equal ids give byte-identical files."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{path}: segment ids must be an H×W array, got shape {ids.shape}")
    Image.fromarray(id2rgb(ids), mode="RGB").save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image as ``H×W×3`` uint8: alpha over black; 16-bit / 32-bit / float scaled to 0..255."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Same rule as remax.inference.predictor: values above 255 are scaled so the peak maps to 255.
        arr = np.asarray(im).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if peak > 255:
            arr = arr * (255.0 / peak)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode a photo into a ``3×H×W`` uint8 tensor (EXIF orientation applied, any mode converted to RGB).

    Missing, unreadable or truncated files raise ``OSError`` whose message starts with the path.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated data fails here and not later in a worker
            im = ImageOps.exif_transpose(im)
            arr = _to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for corrupt files
        raise OSError(f"{path}: cannot read image ({exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


_EXIF_ORIENTATION = 0x0112


def _orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PIL's PNG ``getexif`` would read the whole file)."""
    try:
        if im.format == "PNG":
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        return int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: read_image would ignore it as well
        return 1


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` from the header only, after the EXIF rotation :func:`read_image` applies."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = _orientation(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"{path}: cannot read image ({exc})") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def label_stats(label: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count ``(n,)`` and COCO bbox ``(n, 4)`` of every label ``0..n-1`` of an ``H×W`` label map.

    Absent labels have count 0 and bbox ``[0, 0, 0, 0]``. Rows / columns holding a label come from one
    ``bincount`` over (row, label) and (column, label) pairs, so the cost does not grow with ``n``.
    """
    label = np.asarray(label)
    h, w = label.shape
    lab = label.astype(np.int64, copy=False)
    counts = np.bincount(lab.reshape(-1), minlength=n)[:n]
    rows = np.bincount((np.arange(h)[:, None] * n + lab).reshape(-1), minlength=h * n).reshape(h, n) > 0
    cols = np.bincount((np.arange(w)[None, :] * n + lab).reshape(-1), minlength=w * n).reshape(w, n) > 0
    boxes = np.zeros((n, 4), np.int64)
    for k in np.flatnonzero(counts):
        ry = np.flatnonzero(rows[:, k])
        cx = np.flatnonzero(cols[:, k])
        boxes[k] = (cx[0], ry[0], cx[-1] - cx[0] + 1, ry[-1] - ry[0] + 1)
    return counts, boxes


def segment_stats(ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """``{id: (area, [x, y, width, height])}`` of every non-zero id of an ``H×W`` id map (COCO bbox)."""
    ids = np.asarray(ids)
    uniq = np.unique(ids)
    if uniq.size == 0:
        return {}
    counts, boxes = label_stats(np.searchsorted(uniq, ids), uniq.size)
    return {int(v): (int(counts[k]), [int(b) for b in boxes[k]]) for k, v in enumerate(uniq.tolist()) if v != 0}


def place_images(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: str,
                 dry_run: bool = False) -> Path | None:
    """Make ``dst`` hold the images of ``src``: ``"link"`` (a symlink), ``"copy"`` (a copy) or ``"none"``.

    An existing ``dst`` is left alone if it already is a link to ``src``; anything else there raises
    ``FileExistsError``, so a conversion never overwrites the user's files. ``dry_run`` only checks (converters
    call it before writing anything).
    """
    if mode not in ("link", "copy", "none"):
        raise ValueError(f"images must be 'link', 'copy' or 'none', got {mode!r}")
    if mode == "none":
        return None
    src, dst = Path(src).resolve(), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: image folder not found")
    if dst.is_symlink() and dst.resolve() == src:
        return dst
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} already exists; remove it or use --images none")
    if dry_run:
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        dst.symlink_to(src, target_is_directory=True)
    else:
        import shutil

        shutil.copytree(src, dst)
    return dst
