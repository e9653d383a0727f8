"""Data structures shared by data, losses, evaluation and inference.

They hold tensors and plain Python values only, so that losses and metrics never depend on how a data set is
stored on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class CategoryInfo:
    """One category of a data set, indexed by its contiguous training id (things first, then stuff)."""

    id: int  # the data set's own category id (e.g. COCO's 1..200)
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)


def _describe(cats: Sequence[CategoryInfo], limit: int = 8) -> str:
    items = [f"{c.id} ({c.name})" for c in cats[:limit]]
    if len(cats) > limit:
        items.append(f"… {len(cats) - limit} more")
    return ", ".join(items)


def category_mismatch(expected: Sequence[CategoryInfo], found: Sequence[CategoryInfo],
                      expected_name: str = "the checkpoint", found_name: str = "the data set") -> str | None:
    """One line naming what differs between two category sets (ids on one side only, thing/stuff kind), or
    ``None`` when they hold the same categories, in any order.

    Categories are matched by data-set id, never by position: the reference's Cityscapes and ADE20K orders are not
    things-first, so two lists of the same classes can legitimately be ordered differently.
    """
    exp = {c.id: c for c in expected}
    got = {c.id: c for c in found}
    only_exp = [c for c in expected if c.id not in got]
    only_got = [c for c in found if c.id not in exp]
    kind = [c for c in expected if c.id in got and bool(got[c.id].isthing) != bool(c.isthing)]
    parts = []
    if only_exp:
        parts.append(f"only in {expected_name}: {_describe(only_exp)}")
    if only_got:
        parts.append(f"only in {found_name}: {_describe(only_got)}")
    if kind:
        parts.append(f"thing/stuff differs for: {_describe(kind)}")
    if not parts:
        return None
    return f"the categories of {expected_name} ({len(exp)}) and {found_name} ({len(got)}) differ: " + "; ".join(parts)


def align_categories(categories: Sequence[CategoryInfo], order: Sequence[CategoryInfo],
                     order_name: str = "the checkpoint", own_name: str = "the data set") -> list[CategoryInfo]:
    """``categories`` rearranged into ``order`` (matched by id), keeping their own names and colours.

    Raises ``ValueError`` with :func:`category_mismatch`'s one line when the two sets differ.
    """
    problem = category_mismatch(order, categories, order_name, own_name)
    if problem:
        raise ValueError(problem)
    by_id = {c.id: c for c in categories}
    return [by_id[c.id] for c in order]


@dataclass
class PanopticTarget:
    """Compact panoptic ground truth of one image.

    ``id_map`` holds ``0`` for void (unlabeled or padding) and ``i + 1`` for the ``i``-th segment of the lists
    below. Crowd segments are kept (``is_crowd``): training treats them as void, evaluation as crowd regions.
    Dense per-segment masks are never stored; losses build them at the mask resolution.
    """

    id_map: torch.Tensor  # int64 [H, W]
    classes: torch.Tensor  # int64 [S], contiguous training ids
    is_thing: torch.Tensor  # bool [S]
    is_crowd: torch.Tensor  # bool [S]
    segment_ids: torch.Tensor | None = None  # int64 [S], the original (e.g. PNG) segment ids, if known
    areas: torch.Tensor | None = None  # int64 [S], ground-truth areas as given by the annotation file

    @property
    def num_segments(self) -> int:
        return int(self.classes.numel())

    def semantic_map(self, num_classes: int) -> torch.Tensor:
        """int64 ``H×W`` contiguous class per pixel; ``num_classes`` on void, padding and crowd (as in training)."""
        void = torch.full((1,), num_classes, dtype=torch.int64, device=self.id_map.device)
        classes = torch.where(self.is_crowd.bool(), void, self.classes.long())
        return torch.cat([void, classes])[self.id_map.long()]

    def to(self, device: torch.device | str) -> "PanopticTarget":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PanopticTarget(
            id_map=self.id_map.to(device),
            classes=self.classes.to(device),
            is_thing=self.is_thing.to(device),
            is_crowd=self.is_crowd.to(device),
            segment_ids=move(self.segment_ids),
            areas=move(self.areas),
        )


@dataclass
class PanopticPrediction:
    """Panoptic output of one image, in the same compact form as the ground truth.

    ``segments_info`` follows COCO-panoptic: dicts with ``id`` (the value in ``id_map``), ``category_id``
    (contiguous training id unless stated otherwise), ``isthing``, ``score`` and ``area``.
    """

    id_map: torch.Tensor  # int64 [H, W], 0 = void
    segments_info: list[dict] = field(default_factory=list)
    semantic: torch.Tensor | None = None  # int64 [H, W] contiguous class per pixel, or None
