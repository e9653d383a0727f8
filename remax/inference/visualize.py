"""Coloured overlays of panoptic id maps, for ``remax predict`` and the trainer's validation pictures."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from remax.structures import CategoryInfo


def category_color(category_id: int, base: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The category's own colour, or a fixed, well-spread hue when it has none (all zeros)."""
    if base is not None and any(int(v) for v in base):
        return (int(base[0]), int(base[1]), int(base[2]))
    hue = (category_id * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring ids apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return (int(r * 255), int(g * 255), int(b * 255))


def _jitter(color: tuple[int, int, int], segment_id: int, amount: int = 40) -> tuple[int, int, int]:
    """Deterministic per-instance shift so that touching things of one class stay distinguishable."""
    rng = np.random.default_rng(segment_id)
    delta = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(color) + delta, 0, 255))


def boundaries(id_map: np.ndarray) -> np.ndarray:
    """Boolean map of pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(id_map.shape, dtype=bool)
    diff_x = id_map[:, 1:] != id_map[:, :-1]
    diff_y = id_map[1:, :] != id_map[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    return edge


def colorize(id_map: np.ndarray, segments_info: Sequence[Mapping],
             categories: Sequence[CategoryInfo] | None = None) -> np.ndarray:
    """``H×W×3`` uint8 colour picture of an id map (void black); things jittered per instance."""
    colors = {c.id: c.color for c in categories or []}
    lut_ids = [0] + [int(s["id"]) for s in segments_info]
    lut = np.zeros((len(lut_ids), 3), dtype=np.uint8)
    for i, s in enumerate(segments_info, start=1):
        color = category_color(int(s["category_id"]), colors.get(int(s["category_id"])))
        if s.get("isthing", False):
            color = _jitter(color, int(s["id"]))
        lut[i] = color
    order = np.argsort(lut_ids)
    sorted_ids = np.asarray(lut_ids)[order]
    pos = np.clip(np.searchsorted(sorted_ids, id_map), 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == id_map
    out = lut[order[pos]]
    out[~found] = 0
    return out


_BAND_PIXELS = 1 << 18  # pixels blended (or counted) at once: about 12 MB of float temporaries per band


def _band_rows(width: int) -> int:
    return max(1, _BAND_PIXELS // max(1, width))


def overlay_panoptic(image: Image.Image | np.ndarray | torch.Tensor, id_map: np.ndarray | torch.Tensor,
                     segments_info: Sequence[Mapping], categories: Sequence[CategoryInfo] | None = None,
                     alpha: float = 0.55, draw_boundaries: bool = True, draw_labels: bool = True) -> Image.Image:
    """Blend the colourised id map over the image; void pixels keep the image. Returns an RGB PIL image.

    ``image`` is a PIL image, ``H×W×3`` uint8 array or ``3×H×W`` uint8 tensor of the id map's size.
    """
    ids = id_map.cpu().numpy() if isinstance(id_map, torch.Tensor) else np.asarray(id_map)
    if isinstance(image, torch.Tensor):
        base = image.detach().cpu().permute(1, 2, 0).numpy()
    elif isinstance(image, Image.Image):
        base = np.asarray(image.convert("RGB"))
    else:
        base = np.asarray(image)
    if base.shape[:2] != ids.shape:
        raise ValueError(f"image size {base.shape[:2]} differs from the id map size {ids.shape}")
    edges = boundaries(ids) if draw_boundaries else None
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    # Blend a band of rows at a time: the float temporaries stay the size of a band, not of the photo (a
    # 12000×8000 photo needs over 1 GB per full-size float picture).
    step = _band_rows(ids.shape[1])
    for top in range(0, ids.shape[0], step):
        rows = slice(top, top + step)
        band = base[rows, :, :3].astype(np.float32)
        color = colorize(ids[rows], segments_info, categories).astype(np.float32)
        labelled = (ids[rows] != 0)[..., None]
        blended = np.where(labelled, (1 - alpha) * band + alpha * color, band)
        if edges is not None:
            blended[edges[rows]] = 255.0
        out[rows] = np.clip(blended, 0, 255).round().astype(np.uint8)
    picture = Image.fromarray(out, mode="RGB")
    if draw_labels and segments_info:
        _draw_labels(picture, ids, segments_info, categories)
    elif draw_labels:
        _draw_empty_note(picture)
    return picture


def _draw_empty_note(picture: Image.Image) -> None:
    """Say "0 segments" in the corner: an overlay without segments otherwise looks like an untouched photo."""
    draw = ImageDraw.Draw(picture)
    text = "0 segments"
    left, top, right, bottom = draw.textbbox((3, 2), text)
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))


def _draw_labels(picture: Image.Image, ids: np.ndarray, segments_info: Sequence[Mapping],
                 categories: Sequence[CategoryInfo] | None) -> None:
    """Category names at each large segment's centroid (pixel mean of its mask)."""
    names = {c.id: c.name for c in categories or []}
    h, w = ids.shape
    if min(h, w) < 96:  # the default font would cover a tiny picture
        return
    min_area = max(64, (h * w) // 400)
    draw = ImageDraw.Draw(picture)
    # Pixel count and coordinate sums per id, a band of rows at a time (full-size index arrays would be 8 bytes
    # per pixel each).
    sums: dict[int, np.ndarray] = {}
    cols = np.arange(w, dtype=np.float64)
    step = _band_rows(w)
    for top in range(0, h, step):
        band = ids[top:top + step]
        uniq, inverse, counts = np.unique(band.ravel(), return_inverse=True, return_counts=True)
        ys = np.bincount(inverse, weights=np.repeat(np.arange(top, top + band.shape[0], dtype=np.float64), w),
                         minlength=uniq.size)
        xs = np.bincount(inverse, weights=np.tile(cols, band.shape[0]), minlength=uniq.size)
        for v, n, y, x in zip(uniq.tolist(), counts.tolist(), ys.tolist(), xs.tolist()):
            acc = sums.setdefault(int(v), np.zeros(3))
            acc += (n, y, x)
    for s in segments_info:
        acc = sums.get(int(s["id"]))
        if acc is None or int(s["id"]) == 0 or acc[0] < min_area:
            continue
        text = names.get(int(s["category_id"]), str(s["category_id"]))
        cx, cy = acc[2] / acc[0], acc[1] / acc[0]
        draw.text((cx, cy), text, fill=(255, 255, 255), anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
