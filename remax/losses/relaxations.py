"""The two ReMaX training-time relaxations (SPEC §4.1; ReMaX paper §3.1-3.2).

* ReMask (Eq. 1-2): ``m̂_sem = σ(m_sem)·σ(p)ᵀ``, ``m̃_pan = m_pan + m̂_sem ⊙ m_pan``. The identity term keeps the
  scale of ``m_pan`` so that the semantic branch can be dropped at test time; the semantic logits are detached so
  that the panoptic loss never trains the semantic head.
* ReClass (Eq. 3-4): ``y_m = σ(m_pan)ᵀS / Σ_HW S`` (detached), ``ŷ = η·y_m + (1 − η·y_m) ⊙ y``: the class
  target of a query is softened towards every class its mask overlaps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from remax.losses.matcher import Matching
from remax.losses.targets import DenseTargets

ACTIVATIONS = ("sigmoid", "softmax")


def _check(activation: str, what: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what} activation must be one of {ACTIVATIONS}, got {activation!r}")


def remask(
    mask_logits: Tensor,
    class_logits: Tensor,
    semantic_logits: Tensor | None = None,
    activation: str = "sigmoid",
    stop_gradient: bool = True,
    detach_class: bool = False,
    gt_semantic: Tensor | None = None,
) -> Tensor:
    """Relaxed mask logits ``m̃`` (B×N×P) of one decoder stage.

    ``mask_logits`` B×N×P; ``class_logits`` B×N×(K+1) (the void column is excluded from ``p``);
    ``semantic_logits`` B×K×P of the stage's semantic head. ``activation``: ``sigmoid`` (the paper) or
    ``softmax`` (over the K classes, for both ``m_sem`` and ``p``). ``gt_semantic`` (int64 B×P, K on void) replaces
    ``σ(m_sem)`` by the one-hot ground-truth semantic mask (paper Table 7 control; void pixels are all zero).
    """
    _check(activation, "ReMask")
    p = class_logits.float()[..., :-1]
    if detach_class:
        p = p.detach()
    p = torch.sigmoid(p) if activation == "sigmoid" else torch.softmax(p, dim=-1)  # B×N×K
    m = mask_logits.float()
    if gt_semantic is not None:
        K = p.shape[-1]
        valid = (gt_semantic < K).unsqueeze(1)
        idx = gt_semantic.clamp(max=K - 1).unsqueeze(1).expand(-1, p.shape[1], -1)
        m_hat = torch.where(valid, p.gather(2, idx), torch.zeros((), device=p.device))
    else:
        if semantic_logits is None:
            raise ValueError("ReMask needs the stage's semantic logits (or gt_semantic)")
        s = semantic_logits.float()
        if stop_gradient:
            s = s.detach()
        s = torch.sigmoid(s) if activation == "sigmoid" else torch.softmax(s, dim=1)  # B×K×P
        m_hat = torch.bmm(p, s)  # B×N×P
    return m + m_hat * m


@torch.no_grad()
def reclass_targets(
    class_targets: Tensor,
    mask_logits: Tensor,
    targets: DenseTargets,
    matching: Matching,
    eta: float = 0.1,
    activation: str = "sigmoid",
    soften_unmatched: bool = False,
    normalize: bool = False,
) -> Tensor:
    """Softened class targets ``ŷ`` (B×N×(K+1)) from one-hot ``class_targets`` ``y`` (void last).

    ``y_m[q, c]`` is the share of class c's GT area covered by query q's mask, the mask taken as ``sigmoid`` of
    the logits (the paper's σ) or the ``softmax`` over queries (kMaX's mask probability, where the shares of a
    class sum to 1 over the queries). Only matched queries are softened unless ``soften_unmatched``;
    ``normalize`` rescales ``ŷ`` to sum 1 (Eq. 4 as printed does not).
    """
    _check(activation, "ReClass")
    B, N, C = class_targets.shape
    m = mask_logits.float()
    probs = torch.sigmoid(m) if activation == "sigmoid" else torch.softmax(m, dim=1)
    inter = torch.bmm(probs, targets.masks.transpose(1, 2))  # B×N×M
    per_class = inter.new_zeros(B, N, C)
    per_class.scatter_add_(2, targets.classes.unsqueeze(1).expand(-1, N, -1), inter)
    class_area = targets.class_areas()  # B×K
    y_m = per_class[..., : C - 1] / class_area.clamp(min=1).unsqueeze(1)
    y_m = torch.cat([y_m, y_m.new_zeros(B, N, 1)], dim=-1)  # no softening towards void
    y = class_targets.float()
    soft = eta * y_m + (1 - eta * y_m) * y
    if normalize:
        soft = soft / soft.sum(-1, keepdim=True).clamp(min=1e-12)
    if not soften_unmatched:
        soft = torch.where(matching.query_matched.unsqueeze(-1), soft, y)
    return soft
