"""Pixel-wise instance discrimination (CMT-DeepLab; kmax-reference §2.5) and the shared pixel sampler.

K pixels per image are drawn without replacement by Gumbel-top-k on ``T_s · log(inv_area)`` (void excluded), so
pixel x is drawn with probability ∝ ``area(x)^(−T_s)``. The sampled L2-normalised embeddings are compared by
``e_k·e_j / τ``; the soft target of row k is uniform over the samples in the same GT mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from remax.losses.reduction import nonzero_mean
from remax.losses.targets import DenseTargets

VOID_LOGIT = -99999.0
MASKED_SIMILARITY = -1e9


def gumbel_topk_pixels(
    targets: DenseTargets, k: int, temperature: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample ``min(k, P)`` pixels per image; return ``(indices B×k, sample_valid B×k)``.

    Sampled void pixels (only when an image has fewer than k labeled pixels) are flagged invalid.
    """
    inv_area = targets.inverse_area()
    valid = targets.valid
    logits = temperature * torch.log(inv_area.clamp(min=1.0))
    logits = torch.where(valid, logits, torch.full_like(logits, VOID_LOGIT))
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    k = min(k, logits.shape[1])
    idx = torch.topk(logits + gumbel, k, dim=1).indices
    return idx, valid.gather(1, idx)


def instance_discrimination_loss(
    embeddings: Tensor,
    targets: DenseTargets,
    sample_k: int = 4096,
    sample_temperature: float = 1.5,
    temperature: float = 0.3,
    generator: torch.Generator | None = None,
    samples: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Contrastive loss on B×D×P pixel embeddings: per-image mean over the valid samples with a non-zero loss,
    then batch mean.

    Invalid samples (void pixels drawn only when an image has fewer labelled pixels than ``sample_k``) are left
    out of every row's softmax as well; the reference keeps them there as columns, but never trains on such
    images (it re-samples images with at most 4096 labelled pixels).

    ``samples``: ``(indices, sample_valid)`` from :func:`gumbel_topk_pixels`, to share one draw between outputs.
    """
    emb = embeddings.float().flatten(2)
    if samples is None:
        samples = gumbel_topk_pixels(targets, sample_k, sample_temperature, generator)
    idx, sample_valid = samples
    B, D = emb.shape[:2]
    e = emb.gather(2, idx.unsqueeze(1).expand(-1, D, -1)).transpose(1, 2)  # B×k×D
    # Row k: −Σ_j Y_kj log softmax_j(l_kj) with Y uniform over the n_k samples of k's mask
    #      = logsumexp_j(l_kj) − (e_k · Σ_{j in mask(k)} e_j) / (τ · n_k).
    # Only the k×k logits are materialised (for the logsumexp); the target matrix never is.
    logits = torch.bmm(e / temperature, e.transpose(1, 2))  # B×k×k
    logits.masked_fill_(~sample_valid.unsqueeze(1), MASKED_SIMILARITY)
    lse = torch.logsumexp(logits, dim=-1)  # B×k
    M = targets.masks.shape[1]
    seg = targets.pixel_segment.gather(1, idx)
    seg = torch.where(sample_valid, seg, torch.full_like(seg, M))  # invalid samples pool in slot M
    seg_sum = e.new_zeros(B, M + 1, D).scatter_add_(1, seg.unsqueeze(-1).expand(-1, -1, D), e)
    seg_count = e.new_zeros(B, M + 1).scatter_add_(1, seg, torch.ones_like(e[..., 0]))
    pos = (e * seg_sum.gather(1, seg.unsqueeze(-1).expand(-1, -1, D))).sum(-1) / temperature
    per_sample = lse - pos / seg_count.gather(1, seg).clamp(min=1)
    per_sample = torch.where(sample_valid, per_sample, torch.zeros((), device=per_sample.device))
    return nonzero_mean(per_sample).mean()
