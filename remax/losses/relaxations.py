"""The two ReMaX training-time relaxations (SPEC §4.1; ReMaX paper §3.1-3.2).

* ReMask (Eq. 1-2): ``m̂_sem = σ(m_sem)·σ(p)ᵀ``, ``m̃_pan = m_pan + m̂_sem ⊙ m_pan``. The operation lives with
  the model (:mod:`remax.models.remask`), which applies it inside the decoder; it is re-exported here for the
  loss-only reading (``remax.remask_in_decoder=false``).
* ReClass (Eq. 3-4): ``y_m = σ(m_pan)ᵀS / Σ_HW S`` (detached), ``ŷ = η·y_m + (1 − η·y_m) ⊙ y``: the class
  target of a query is softened towards every class its mask overlaps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from remax.losses.matcher import Matching
from remax.losses.targets import DenseTargets
from remax.models.remask import ACTIVATIONS, remask

__all__ = ["ACTIVATIONS", "reclass_targets", "remask"]


def _check(activation: str, what: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what} activation must be one of {ACTIVATIONS}, got {activation!r}")


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
