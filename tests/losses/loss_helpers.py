"""Shared test fixtures for the loss tests: small hand-made panoptic targets and float64 numpy oracles.

The oracles rebuild everything from the raw id map with explicit loops, independently of remax.losses.targets.
"""

from __future__ import annotations

import numpy as np
import torch

from remax.structures import PanopticTarget

K = 3  # classes 0, 1 are things, 2 is stuff
STRIDE = 4

# 4x4 layout at the mask resolution; the full 13x13 id map places it at the stride-4 grid and fills every other
# pixel with segment 5, which therefore vanishes at the mask resolution.
SMALL_A = np.array([[1, 1, 2, 0],
                    [1, 1, 2, 3],
                    [4, 4, 6, 6],
                    [4, 6, 6, 7]])
# segment i+1: (class, is_thing, is_crowd)
SEGMENTS_A = [(0, True, False), (1, True, False), (0, True, True), (2, False, False), (1, True, False),
              (2, False, False), (1, True, False)]
SMALL_B = np.array([[1, 1, 1, 1],
                    [1, 2, 2, 1],
                    [1, 2, 2, 0],
                    [1, 1, 0, 0]])
SEGMENTS_B = [(2, False, False), (0, True, False)]


def make_target(small: np.ndarray, segments: list[tuple[int, bool, bool]], filler: int | None = None,
                stride: int = STRIDE) -> PanopticTarget:
    """A PanopticTarget whose id map, strided by ``stride``, equals ``small``."""
    h, w = small.shape
    H, W = (h - 1) * stride + 1, (w - 1) * stride + 1
    full = np.full((H, W), filler if filler is not None else 0, dtype=np.int64)
    full[::stride, ::stride] = small
    return PanopticTarget(
        id_map=torch.from_numpy(full),
        classes=torch.tensor([s[0] for s in segments], dtype=torch.long),
        is_thing=torch.tensor([s[1] for s in segments], dtype=torch.bool),
        is_crowd=torch.tensor([s[2] for s in segments], dtype=torch.bool),
    )


def target_a() -> PanopticTarget:
    return make_target(SMALL_A, SEGMENTS_A, filler=5)


def target_b() -> PanopticTarget:
    return make_target(SMALL_B, SEGMENTS_B)


def oracle_masks(small: np.ndarray, segments: list[tuple[int, bool, bool]]) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) per GT mask: things alone, stuff merged per class, crowd and empty masks dropped."""
    out: list[tuple[int, np.ndarray]] = []
    stuff: dict[int, np.ndarray] = {}
    for i, (cls, thing, crowd) in enumerate(segments):
        m = small == i + 1
        if crowd or not m.any():
            continue
        if thing:
            out.append((cls, m))
        else:
            stuff[cls] = stuff.get(cls, np.zeros_like(m)) | m
    out += [(c, m) for c, m in stuff.items()]
    return out


def dense_index_of(dense, b: int, small: np.ndarray, seg_id: int) -> int:
    """The dense GT-mask index holding segment ``seg_id`` of image ``b`` (found through one of its pixels)."""
    r, c = np.argwhere(small == seg_id)[0]
    return int(dense.pixel_segment[b, r * small.shape[1] + c])


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
