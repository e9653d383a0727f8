"""Mask-ID cross-entropy (kmax-reference §2.4) and ReMaX's sigmoid variant (SPEC §4.1, paper Table 2).

At every pixel of a matched GT mask the target is the query matched to that mask; unmatched queries appear
only as competitors (softmax) or negatives (sigmoid). Each image's loss is its sum divided by the number of
pixels whose loss is non-zero (the reference's rule, :func:`~remax.losses.reduction.nonzero_mean`), then the
batch mean is taken.

The paper does not say how its per-query binary cross-entropy is normalised; ``sigmoid_reduction`` offers the
readings (values at initialisation, all mask logits 0, for N queries):

* ``sum``: ``Σ_n BCE`` over the N queries per pixel (N·ln 2). Every query is its own binary problem, so a false
  positive weighs N−1 times as many terms as the false negative (the paper's Fig. 1); 0.3·N·ln 2 swamps the
  objective (26.6 per output for COCO's 128 queries).
* ``mean``: ``(1/N) Σ_n BCE`` per pixel (ln 2), i.e. the mean over every (pixel, query) pair.
* ``matched``: Mask2Former's sigmoid mask loss: BCE of each *matched* query's mask against its GT mask, averaged
  over the labelled pixels, then over the matched masks of the image (ln 2). Unmatched queries get no mask term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from remax.losses.matcher import Matching
from remax.losses.reduction import nonzero_mean
from remax.losses.targets import DenseTargets

ACTIVATIONS = ("softmax", "sigmoid")
SIGMOID_REDUCTIONS = ("sum", "mean", "matched")


def pixel_query_targets(targets: DenseTargets, matching: Matching) -> Tensor:
    """int64 B×P: the query each pixel should belong to; -1 on void and on unmatched GT masks."""
    tq = matching.query_of_segment.gather(1, targets.pixel_segment.clamp(min=0))
    return torch.where(targets.valid, tq, torch.full_like(tq, -1))


def mask_id_loss(
    mask_logits: Tensor,
    targets: DenseTargets,
    matching: Matching,
    activation: str = "softmax",
    sigmoid_reduction: str = "sum",
    log_probs: Tensor | None = None,
) -> Tensor:
    """Mask-ID loss on B×N×P mask logits.

    ``softmax``: ``−log softmax_N(m)[t(x)]`` per pixel. ``sigmoid``: per-query binary cross-entropy, reduced as
    ``sigmoid_reduction`` says (module docstring). ``log_probs``: an already computed ``log_softmax`` over queries.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"mask-ID activation must be one of {ACTIVATIONS}, got {activation!r}")
    tq = pixel_query_targets(targets, matching)
    valid = tq >= 0
    idx = tq.clamp(min=0).unsqueeze(1)  # B×1×P
    if activation == "softmax":
        if log_probs is None:
            log_probs = torch.log_softmax(mask_logits.float(), dim=1)
        per_pixel = -log_probs.gather(1, idx).squeeze(1)
    else:
        if sigmoid_reduction not in SIGMOID_REDUCTIONS:
            raise ValueError(f"sigmoid reduction must be one of {SIGMOID_REDUCTIONS}, got {sigmoid_reduction!r}")
        logits = mask_logits.float()
        if sigmoid_reduction == "matched":
            return _matched_sigmoid_loss(logits, targets, matching, valid)
        # Σ_n BCE(m_n, y_n) = Σ_n softplus(m_n) − m_t : no one-hot tensor needed.
        per_pixel = F.softplus(logits).sum(1) - logits.gather(1, idx).squeeze(1)
        if sigmoid_reduction == "mean":
            per_pixel = per_pixel / logits.shape[1]
    per_pixel = torch.where(valid, per_pixel, torch.zeros((), device=per_pixel.device))
    return nonzero_mean(per_pixel).mean()


def _matched_sigmoid_loss(logits: Tensor, targets: DenseTargets, matching: Matching, valid: Tensor) -> Tensor:
    """Mask2Former-style: per matched pair, mean BCE over the labelled pixels; mean over the image's pairs."""
    qos = matching.query_of_segment  # B×M
    paired = qos >= 0
    pred = logits.gather(1, qos.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # B×M×P
    bce = F.binary_cross_entropy_with_logits(pred, targets.masks, reduction="none")
    vf = valid.to(bce.dtype).unsqueeze(1)
    per_pair = (bce * vf).sum(-1) / vf.sum(-1).clamp(min=1)  # B×M
    pf = paired.to(bce.dtype)
    return ((per_pair * pf).sum(1) / pf.sum(1).clamp(min=1)).mean()
