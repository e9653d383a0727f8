"""Dense ground truth at the loss resolution, built from the compact :class:`PanopticTarget`.

kMaX-DeepLab takes the ground truth at the mask resolution by *strided sub-sampling* of the id map (``[::4, ::4]``
for a ``4k+1`` input), never by interpolation (kmax-reference §2.1). One mask per thing instance, one mask per
stuff class (all its segments merged); void is unlabeled + crowd + padding. Masks that vanish at the mask
resolution are dropped. The batch is padded to the largest number of masks so that every loss is one batched
tensor expression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from remax.models.layers import subsample_stride
from remax.structures import PanopticTarget


def supervision_size(input_size: tuple[int, int], mask_size: tuple[int, int],
                     loss_stride: int) -> tuple[tuple[int, int], bool]:
    """Size at which the mask terms are supervised, and the ``align_corners`` that upsamples the logits to it.

    ``loss_stride`` is in input pixels. It equals the logits' own stride for kMaX-DeepLab (the logits are used as
    they are) or divides it (the logits are upsampled bilinearly, the ground truth sub-sampled more finely). A
    ``k·s+1`` input keeps the corner-aligned geometry of the Predictor (grid point ``j`` on input pixel ``s·j``).
    """
    s = subsample_stride(input_size, mask_size)
    if loss_stride < 1 or s % loss_stride:
        raise ValueError(f"loss.mask_loss_stride={loss_stride} must divide the mask logits' stride {s} "
                         f"(input {input_size[0]}x{input_size[1]}, masks {mask_size[0]}x{mask_size[1]})")
    H, W = input_size
    align = (H - 1) % s == 0 and (W - 1) % s == 0
    if loss_stride == s:
        return tuple(mask_size), align
    return (math.ceil(H / loss_stride), math.ceil(W / loss_stride)), align


@dataclass
class DenseTargets:
    """Batch ground truth at one resolution ``h×w`` (``P = h·w`` flattened pixels), padded to ``M`` masks."""

    masks: Tensor  # float32 B×M×P, binary GT masks (all zero in padding slots)
    classes: Tensor  # int64 B×M, contiguous class id; num_classes (void) in padding slots
    segment_valid: Tensor  # bool B×M, True for real masks
    pixel_segment: Tensor  # int64 B×P, index of the GT mask holding each pixel, -1 for void
    areas: Tensor  # float32 B×M, pixel count of each mask at this resolution
    num_classes: int
    height: int
    width: int

    @property
    def valid(self) -> Tensor:
        """bool B×P: pixels that belong to a GT mask (not unlabeled, crowd or padding)."""
        return self.pixel_segment >= 0

    def semantic(self) -> Tensor:
        """int64 B×P semantic labels, ``num_classes`` on void pixels."""
        cls = self.classes.gather(1, self.pixel_segment.clamp(min=0))
        return torch.where(self.valid, cls, torch.full_like(cls, self.num_classes))

    def inverse_area(self) -> Tensor:
        """float B×P: ``P / area`` of the mask holding each pixel (kmax-reference §2.1), 0 on void."""
        area = self.areas.gather(1, self.pixel_segment.clamp(min=0)).clamp(min=1.0)
        inv = float(self.height * self.width) / area
        return torch.where(self.valid, inv, torch.zeros_like(inv))

    def class_areas(self) -> Tensor:
        """float B×K: ground-truth area of each class (the ``Σ_HW S`` of ReClass Eq. 3)."""
        B = self.classes.shape[0]
        out = self.areas.new_zeros(B, self.num_classes + 1)
        out.scatter_add_(1, self.classes, self.areas * self.segment_valid)
        return out[:, : self.num_classes]


def _mask_keys(target: PanopticTarget, num_classes: int, where: str) -> Tensor:
    """Per segment, the key of the GT mask it joins: its own index for things, ``S + class`` for stuff, -1 crowd."""
    S = target.num_segments
    classes = target.classes.long().reshape(-1)
    is_thing = target.is_thing.bool().reshape(-1)
    is_crowd = target.is_crowd.bool().reshape(-1)
    if is_thing.numel() != S or is_crowd.numel() != S:
        raise ValueError(
            f"{where}: classes / is_thing / is_crowd have different lengths ({S}, {is_thing.numel()}, "
            f"{is_crowd.numel()})"
        )
    if S and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        bad = classes[(classes < 0) | (classes >= num_classes)][0].item()
        raise ValueError(f"{where}: segment class {bad} is outside [0, {num_classes})")
    index = torch.arange(S, device=classes.device)
    keys = torch.where(is_thing, index, S + classes)
    return torch.where(is_crowd, torch.full_like(keys, -1), keys)


def build_dense_targets(
    targets: list[PanopticTarget],
    size: tuple[int, int],
    num_classes: int,
    device: torch.device | str | None = None,
) -> DenseTargets:
    """Sub-sample each target's id map onto ``size`` (h, w) and form the padded dense batch."""
    h, w = size
    P = h * w
    per_image = []
    for b, target in enumerate(targets):
        where = f"target {b}"
        id_map = target.id_map
        if id_map.dim() != 2:
            raise ValueError(f"{where}: id_map must be H×W, got shape {tuple(id_map.shape)}")
        s = subsample_stride(tuple(id_map.shape), (h, w))
        ids = id_map[::s, ::s].reshape(-1).long()
        S = target.num_segments
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > S):
            raise ValueError(f"{where}: id_map holds id {int(ids.max())} but the target has only {S} segments")
        keys = _mask_keys(target, num_classes, where)
        lut = torch.cat([keys.new_full((1,), -1), keys])
        pixel_key = lut[ids]  # P, -1 on void
        labeled = pixel_key >= 0
        present, inverse = torch.unique(pixel_key[labeled], return_inverse=True)
        pixel_segment = torch.full((P,), -1, dtype=torch.long, device=ids.device)
        pixel_segment[labeled] = inverse
        # Class of each present mask: stuff keys encode it, thing keys index the segment list.
        classes = target.classes.long().reshape(-1)
        mask_classes = torch.where(present >= S, present - S, classes[present.clamp(max=max(S - 1, 0))])
        per_image.append((pixel_segment, mask_classes))

    # At least one (padding) slot, so that gathers by mask index stay valid for images without any mask.
    M = max([len(c) for _, c in per_image] + [1])
    B = len(targets)
    if device is None:
        device = targets[0].id_map.device if B else torch.device("cpu")
    pixel_segment = torch.stack([p for p, _ in per_image]) if B else torch.empty(0, P, dtype=torch.long)
    pixel_segment = pixel_segment.to(device)
    classes = torch.full((B, M), num_classes, dtype=torch.long)
    segment_valid = torch.zeros(B, M, dtype=torch.bool)
    for b, (_, c) in enumerate(per_image):
        classes[b, : len(c)] = c.cpu()
        segment_valid[b, : len(c)] = True
    classes = classes.to(pixel_segment.device)
    segment_valid = segment_valid.to(pixel_segment.device)
    # One-hot masks from the pixel -> mask index map: column M collects void and is dropped.
    masks = torch.zeros(B, M + 1, P, device=pixel_segment.device)
    masks.scatter_(1, torch.where(pixel_segment >= 0, pixel_segment, M).unsqueeze(1), 1.0)
    masks = masks[:, :M]
    return DenseTargets(
        masks=masks,
        classes=classes,
        segment_valid=segment_valid,
        pixel_segment=pixel_segment,
        areas=masks.sum(-1),
        num_classes=num_classes,
        height=h,
        width=w,
    )
