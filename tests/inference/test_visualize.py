"""Overlay pictures: exact blend of category colours, void untouched, instances told apart, boundaries drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remax.inference.visualize import boundaries, category_color, colorize, overlay_panoptic
from remax.structures import CategoryInfo

CATS = [CategoryInfo(1, "person", True, (200, 20, 60)), CategoryInfo(7, "sky", False, (70, 130, 180)),
        CategoryInfo(8, "road", False, (0, 0, 0))]


def scene():
    ids = np.zeros((40, 50), np.int64)
    ids[:15] = 5  # sky
    ids[25:] = 6  # road (category without a colour)
    ids[10:30, 5:20] = 11  # two people touching
    ids[10:30, 20:35] = 12
    segs = [{"id": 5, "category_id": 7, "isthing": False}, {"id": 6, "category_id": 8, "isthing": False},
            {"id": 11, "category_id": 1, "isthing": True}, {"id": 12, "category_id": 1, "isthing": True}]
    return ids, segs


def test_colorize_uses_category_colours_and_jitters_instances():
    ids, segs = scene()
    col = colorize(ids, segs, CATS)
    assert (col[0, 0] == (70, 130, 180)).all()  # stuff: the category colour itself
    assert (col[39, 0] == category_color(8)).all() and any(category_color(8))  # generated colour when none
    assert (col[ids == 0] == 0).all()
    a, b = col[12, 10], col[12, 25]
    assert not (a == b).all()  # touching instances of one class differ
    assert np.abs(a.astype(int) - np.array([200, 20, 60])).max() <= 40  # ... but stay near the class colour
    # Deterministic: the same segment id always gets the same colour.
    np.testing.assert_array_equal(colorize(ids, segs, CATS), col)


def test_overlay_blends_keeps_void_and_draws_boundaries():
    ids, segs = scene()
    image = np.full((40, 50, 3), 100, np.uint8)
    out = np.asarray(overlay_panoptic(image, ids, segs, CATS, alpha=0.5, draw_labels=False))
    assert out.shape == (40, 50, 3)
    np.testing.assert_array_equal(out[17, 40], [100, 100, 100])  # void pixel far from any boundary
    np.testing.assert_array_equal(out[2, 45], np.round(0.5 * 100 + 0.5 * np.array([70, 130, 180])))
    edge = boundaries(ids)
    assert (out[edge] == 255).all()
    assert edge[14, 45] and edge[15, 45] and not edge[13, 45]
    # Tensor image input gives the same picture; a size mismatch is a clear error.
    same = overlay_panoptic(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(ids), segs, CATS,
                            alpha=0.5, draw_labels=False)
    np.testing.assert_array_equal(np.asarray(same), out)
    with pytest.raises(ValueError, match="differs"):
        overlay_panoptic(image[:10], ids, segs, CATS)


def test_labels_are_drawn_on_large_pictures_only():
    ids, segs = scene()
    big = np.kron(ids, np.ones((4, 4), np.int64))
    image = np.full(big.shape + (3,), 100, np.uint8)
    plain = np.asarray(overlay_panoptic(image, big, segs, CATS, draw_labels=False))
    labelled = np.asarray(overlay_panoptic(image, big, segs, CATS, draw_labels=True))
    assert (plain != labelled).any()
    small = np.full((40, 50, 3), 100, np.uint8)
    np.testing.assert_array_equal(np.asarray(overlay_panoptic(small, ids, segs, CATS, draw_labels=True)),
                                  np.asarray(overlay_panoptic(small, ids, segs, CATS, draw_labels=False)))


def test_overlay_without_segments_says_so():
    image = np.full((120, 160, 3), 128, np.uint8)
    ids = np.zeros((120, 160), np.int64)
    assert np.array_equal(np.asarray(overlay_panoptic(image, ids, [], CATS, draw_labels=False)), image)
    noted = np.asarray(overlay_panoptic(image, ids, [], CATS))
    corner = noted[:20, :80]
    assert (corner == 0).any() and (corner > 200).any()  # "0 segments", white on black
    assert np.array_equal(noted[40:], image[40:])


def _overlay_in_one_piece(image: np.ndarray, ids: np.ndarray, segs: list, alpha: float = 0.55) -> np.ndarray:
    """The blend written over the whole picture at once (the formula the banded overlay must reproduce)."""
    base = image.astype(np.float32)
    color = colorize(ids, segs, CATS).astype(np.float32)
    out = np.where((ids != 0)[..., None], (1 - alpha) * base + alpha * color, base)
    out[boundaries(ids)] = 255.0
    return np.clip(out, 0, 255).round().astype(np.uint8)


def test_banded_overlay_equals_the_whole_picture_blend(monkeypatch):
    import remax.inference.visualize as vis

    ids, segs = scene()
    image = np.random.default_rng(0).integers(0, 256, (*ids.shape, 3), dtype=np.uint8)
    monkeypatch.setattr(vis, "_BAND_PIXELS", 7 * ids.shape[1])  # 7-row bands cut through segments and boundaries
    got = np.asarray(overlay_panoptic(image, ids, segs, CATS, draw_labels=False))
    assert np.array_equal(got, _overlay_in_one_piece(image, ids, segs))


def test_large_overlay_allocates_a_few_bytes_per_pixel():
    """A big photo's overlay must not hold full-size float pictures (4 bytes × 3 channels each) or full-size
    int64 index arrays (it peaked at about 60 bytes per pixel). What may be full size: the uint8 picture (3 bytes
    per pixel), the boundary map and its two shifted comparisons (3); the float work is bounded by the band."""
    import tracemalloc

    import remax.inference.visualize as vis

    h, w = 1200, 1600
    ids = np.zeros((h, w), np.int64)
    ids[: h // 2] = 5
    ids[h // 2:] = 6
    ids[300:900, 200:700] = 11
    ids[300:900, 700:1200] = 12
    _, segs = scene()
    image = np.full((h, w, 3), 90, np.uint8)
    tracemalloc.start()
    try:
        overlay_panoptic(image, ids, segs, CATS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    band_budget = 3 * 4 * 3 * vis._BAND_PIXELS + 8 * 2 * vis._BAND_PIXELS  # 3 float pictures + 2 index arrays
    assert peak < 8 * h * w + band_budget, f"peak {peak / (h * w):.1f} bytes per pixel"
