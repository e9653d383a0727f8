"""Semantic cross-entropy for the auxiliary semantic head and the ReMaX per-stage heads (kmax-reference §2.6).

``sample_k > 0``: cross-entropy on ``sample_k`` pixels per image drawn by the Gumbel-top-k inverse-area sampler
(temperature 2.0 by default, as [BD]); ``sample_k = 0``: plain cross-entropy over every labeled pixel. Void is
ignored. As in the reference, each image's loss is averaged over its pixels with a non-zero loss, then the batch
mean is taken, so an image with few labelled pixels weighs as much as one with many.
"""

from __future__ import annotations

import torch
from torch import Tensor

from remax.losses.instance_discrimination import gumbel_topk_pixels
from remax.losses.reduction import nonzero_mean
from remax.losses.targets import DenseTargets


def semantic_loss(
    logits: Tensor,
    targets: DenseTargets,
    sample_k: int = 4096,
    sample_temperature: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Cross-entropy of B×K×h×w (or B×K×P) semantic logits against ``targets`` at the same resolution."""
    B, K = logits.shape[:2]
    if K != targets.num_classes:
        raise ValueError(f"semantic logits have {K} channels but the data set has {targets.num_classes} classes")
    flat = logits.float().reshape(B, K, -1)
    if flat.shape[-1] != targets.height * targets.width:
        raise ValueError(
            f"semantic logits of spatial size {tuple(logits.shape[2:])} do not match the targets' "
            f"{targets.height}x{targets.width}"
        )
    labels = targets.semantic()  # B×P, K on void
    valid = targets.valid
    if sample_k > 0:
        idx, valid = gumbel_topk_pixels(targets, sample_k, sample_temperature, generator)
        flat = flat.gather(2, idx.unsqueeze(1).expand(-1, K, -1))
        labels = labels.gather(1, idx)
    log_p = torch.log_softmax(flat, dim=1)
    nll = -log_p.gather(1, labels.clamp(max=K - 1).unsqueeze(1)).squeeze(1)
    nll = torch.where(valid, nll, torch.zeros((), device=nll.device))
    return nonzero_mean(nll).mean()
