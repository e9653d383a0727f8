"""PQ-style loss of MaX-DeepLab / kMaX-DeepLab (kmax-reference §2.3): a class term and a Dice term.

* Class term: soft-target cross-entropy per query, weighted by the (detached) Dice of the matched pair for
  matched queries (×α) and by the share of the query's mask mass lying on void for unmatched ones (×(1−α),
  target void); the sum over queries is divided by N, then averaged over the batch.
* Dice term: ``(1 − Dice_smooth) · p(c)`` (class probability detached) over matched pairs, × α/N, batch mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from remax.losses.matcher import DICE_EPS, Matching
from remax.losses.targets import DenseTargets

WEIGHT_FLOOR = 1e-5


def loss_valid_pixels(targets: DenseTargets, matching: Matching) -> Tensor:
    """bool B×P: pixels of *matched* GT masks; all other pixels count as void for the mask losses.

    With ``N >= M`` (always in practice) this is every labeled pixel.
    """
    matched = matching.query_of_segment >= 0
    return targets.valid & matched.gather(1, targets.pixel_segment.clamp(min=0))


def one_hot_class_targets(matching: Matching, targets: DenseTargets, num_logits: int) -> Tensor:
    """float B×N×(K+1): the GT class for matched queries, void (last column) for unmatched ones."""
    soi = matching.segment_of_query
    cls = targets.classes.gather(1, soi.clamp(min=0))
    cls = torch.where(soi >= 0, cls, torch.full_like(cls, num_logits - 1))
    return torch.nn.functional.one_hot(cls, num_logits).float()


def pq_style_loss(
    pred_logits: Tensor,
    mask_probs: Tensor,
    targets: DenseTargets,
    matching: Matching,
    alpha: float = 0.75,
    class_targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(class_loss, dice_loss)``, unweighted.

    ``pred_logits`` B×N×(K+1) (void last); ``mask_probs`` B×N×P the softmax over queries of the mask logits;
    ``class_targets`` B×N×(K+1) soft targets (ReClass), one-hot from the matching when ``None``.
    """
    B, N, C = pred_logits.shape
    log_p = torch.log_softmax(pred_logits.float(), dim=-1)
    mask_probs = mask_probs.float()
    P = mask_probs.shape[-1]
    lv = loss_valid_pixels(targets, matching).to(mask_probs.dtype)
    masked = mask_probs * lv.unsqueeze(1)  # void (and unmatched GT) pixels removed

    # Matched pairs, GT-mask major: gather the matched query's mask for every GT mask.
    qos = matching.query_of_segment
    seg_ok = (qos >= 0).to(mask_probs.dtype)
    q_idx = qos.clamp(min=0)
    pred_seg = masked.gather(1, q_idx.unsqueeze(-1).expand(-1, -1, P))  # B×M×P
    inter = (pred_seg * targets.masks).sum(-1)
    pred_sum = pred_seg.sum(-1)
    area = targets.areas
    dice_weight = (inter / ((pred_sum + area) / 2 + DICE_EPS)).detach()
    dice_smooth = (2 * inter + 1) / (pred_sum + area + 1)
    probs = log_p.detach().exp()
    p_match = probs.gather(1, q_idx.unsqueeze(-1).expand(-1, -1, C))  # B×M×C
    p_match = p_match.gather(2, targets.classes.clamp(max=C - 2).unsqueeze(-1)).squeeze(-1)
    dice_loss = ((1 - dice_smooth) * p_match.clamp(min=WEIGHT_FLOOR) * seg_ok).sum(1) * (alpha / N)

    # Class term, query major.
    soi = matching.segment_of_query
    matched = soi >= 0
    dice_q = dice_weight.gather(1, soi.clamp(min=0))
    with torch.no_grad():
        total = mask_probs.sum(-1)
        void_mass = (total - masked.sum(-1)).clamp(min=0)
        void_ratio = void_mass / total.clamp(min=DICE_EPS)
    weight = torch.where(
        matched, alpha * dice_q.clamp(min=WEIGHT_FLOOR), (1 - alpha) * void_ratio.clamp(min=WEIGHT_FLOOR)
    )
    if class_targets is None:
        class_targets = one_hot_class_targets(matching, targets, C)
    ce = -(class_targets.to(log_p.dtype) * log_p).sum(-1)  # B×N
    class_loss = (weight * ce).sum(1) / N
    return class_loss.mean(), dice_loss.mean()
