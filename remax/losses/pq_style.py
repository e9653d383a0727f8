"""PQ-style loss of MaX-DeepLab / kMaX-DeepLab (kmax-reference §2.3): a class term and a Dice term.

* Class term: soft-target cross-entropy per query, weighted by the (detached) Dice of the matched pair for
  matched queries (×α) and by the share of the query's mask mass lying on void for unmatched ones (×(1−α),
  target void); each image's sum over queries is divided by the number of non-zero terms (N in practice), then
  averaged over the batch.
* Dice term: ``(1 − Dice_smooth) · p(c)`` (class probability detached) over matched pairs, × α/N, batch mean.

The weights (matched Dice, void overlap, matched class probability) are :class:`PQWeights`. Under deep
supervision the reference computes them once, from the final output, and reuses them for every auxiliary output:
an early stage's class term is then weighted by how good the *final* mask is, not by how poor its own still is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from remax.losses.matcher import DICE_EPS, Matching
from remax.losses.reduction import nonzero_mean
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


@dataclass
class PQWeights:
    """The detached weights of the PQ-style loss, computed from one output (the final one under deep
    supervision) and applicable to any output that shares its matching."""

    class_weight: Tensor  # B×N: α·max(Dice, 1e-5) for matched queries, (1−α)·max(void ratio, 1e-5) otherwise
    dice_weight: Tensor  # B×M: max(p(c), 1e-5) of the matched query for matched GT masks, 0 otherwise


@torch.no_grad()
def pq_loss_weights(
    pred_logits: Tensor,
    mask_probs: Tensor,
    targets: DenseTargets,
    matching: Matching,
    alpha: float = 0.75,
) -> PQWeights:
    """The PQ-style weights of one output: ``pred_logits`` B×N×(K+1), ``mask_probs`` B×N×P (softmax over
    queries)."""
    C = pred_logits.shape[-1]
    mask_probs = mask_probs.float()
    P = mask_probs.shape[-1]
    lv = loss_valid_pixels(targets, matching).to(mask_probs.dtype)
    masked = mask_probs * lv.unsqueeze(1)  # void (and unmatched GT) pixels removed
    qos = matching.query_of_segment
    seg_ok = qos >= 0
    q_idx = qos.clamp(min=0)
    # Matched Dice, GT-mask major (the matcher's similarity without the class factor).
    pred_seg = masked.gather(1, q_idx.unsqueeze(-1).expand(-1, -1, P))  # B×M×P
    inter = (pred_seg * targets.masks).sum(-1)
    dice = inter / ((pred_seg.sum(-1) + targets.areas) / 2 + DICE_EPS)
    # Matched class probability of the GT class.
    probs = torch.softmax(pred_logits.float(), dim=-1)
    p_match = probs.gather(1, q_idx.unsqueeze(-1).expand(-1, -1, C))  # B×M×C
    p_match = p_match.gather(2, targets.classes.clamp(max=C - 2).unsqueeze(-1)).squeeze(-1)
    dice_weight = torch.where(seg_ok, p_match.clamp(min=WEIGHT_FLOOR), torch.zeros_like(p_match))
    # Class weights, query major; unmatched queries: the share of their mask mass on void (IoP with void).
    soi = matching.segment_of_query
    matched = soi >= 0
    dice_q = dice.gather(1, soi.clamp(min=0))
    void_ratio = (mask_probs.sum(-1) - masked.sum(-1)).clamp(min=0) / (mask_probs.sum(-1) + DICE_EPS)
    class_weight = torch.where(matched, alpha * dice_q.clamp(min=WEIGHT_FLOOR),
                               (1 - alpha) * void_ratio.clamp(min=WEIGHT_FLOOR))
    return PQWeights(class_weight=class_weight, dice_weight=dice_weight)


def pq_style_loss(
    pred_logits: Tensor,
    mask_probs: Tensor,
    targets: DenseTargets,
    matching: Matching,
    alpha: float = 0.75,
    class_targets: Tensor | None = None,
    weights: PQWeights | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(class_loss, dice_loss)``, unweighted.

    ``pred_logits`` B×N×(K+1) (void last); ``mask_probs`` B×N×P the softmax over queries of the mask logits;
    ``class_targets`` B×N×(K+1) soft targets (ReClass), one-hot from the matching when ``None``; ``weights``
    from :func:`pq_loss_weights` of another output (the final one), computed from this output when ``None``.
    """
    B, N, C = pred_logits.shape
    if weights is None:
        weights = pq_loss_weights(pred_logits, mask_probs, targets, matching, alpha)
    log_p = torch.log_softmax(pred_logits.float(), dim=-1)
    mask_probs = mask_probs.float()
    P = mask_probs.shape[-1]
    lv = loss_valid_pixels(targets, matching).to(mask_probs.dtype)
    masked = mask_probs * lv.unsqueeze(1)

    # Dice term over matched pairs, GT-mask major.
    q_idx = matching.query_of_segment.clamp(min=0)
    pred_seg = masked.gather(1, q_idx.unsqueeze(-1).expand(-1, -1, P))  # B×M×P
    inter = (pred_seg * targets.masks).sum(-1)
    dice_smooth = (2 * inter + 1) / (pred_seg.sum(-1) + targets.areas + 1)
    dice_loss = ((1 - dice_smooth) * weights.dice_weight).sum(1) * (alpha / N)

    # Class term, query major.
    if class_targets is None:
        class_targets = one_hot_class_targets(matching, targets, C)
    ce = -(class_targets.to(log_p.dtype) * log_p).sum(-1)  # B×N
    class_loss = nonzero_mean(weights.class_weight * ce)
    return class_loss.mean(), dice_loss.mean()
