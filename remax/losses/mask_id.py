"""Mask-ID cross-entropy (kmax-reference §2.4) and ReMaX's sigmoid variant (SPEC §4.1, paper Table 2).

At every pixel of a matched GT mask the target is the query matched to that mask; unmatched queries appear
only as competitors (softmax) or negatives (sigmoid). Per-image mean over those pixels, then batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from remax.losses.matcher import Matching
from remax.losses.targets import DenseTargets

ACTIVATIONS = ("softmax", "sigmoid")
SIGMOID_REDUCTIONS = ("sum", "mean")


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

    ``softmax``: ``−log softmax_N(m)[t(x)]`` per pixel. ``sigmoid``: per-query binary cross-entropy
    ``Σ_n BCE(m_n(x), [n = t(x)])``, summed over the N queries (``sigmoid_reduction="sum"``, every query is a
    binary problem, so false positives weigh N−1 times as many terms as the false negative, as in the paper's
    Fig. 1) or averaged over them (``"mean"``). ``log_probs``: an already computed ``log_softmax`` over queries.
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
        # Σ_n BCE(m_n, y_n) = Σ_n softplus(m_n) − m_t : no one-hot tensor needed.
        per_pixel = F.softplus(logits).sum(1) - logits.gather(1, idx).squeeze(1)
        if sigmoid_reduction == "mean":
            per_pixel = per_pixel / logits.shape[1]
    vf = valid.to(per_pixel.dtype)
    per_image = (per_pixel * vf).sum(1) / vf.sum(1).clamp(min=1)
    return per_image.mean()
