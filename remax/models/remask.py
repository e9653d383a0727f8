"""ReMask (ReMaX paper §3.1, Eq. 1-2; SPEC §4.1): a stage's panoptic masks relaxed by a semantic prediction.

``m̂_sem = σ(m_sem)·σ(p)ᵀ`` maps the stage's semantic logits into the query space through the class
probabilities of each query, and ``m̃ = m + m̂_sem ⊙ m`` relaxes the mask logits: a query's logits are amplified
where the semantic head sees its class and left as they are elsewhere. The identity term keeps the scale of ``m``
so the semantic heads can be dropped at test time.

During training ``m̃`` is the stage's mask prediction *inside the decoder*: the stage's k-means assignment
(argmax over queries), and so every later stage and the final output, see it. That is the reading under which the
paper's Table 5 (ReMask kept or removed at test time) is meaningful. The operation lives here, with the model;
the loss-only reading in :mod:`remax.losses.criterion` imports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from remax.config import RemaxConfig
from remax.models.layers import subsample_stride

ACTIVATIONS = ("sigmoid", "softmax")


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
    ``softmax`` (over the K classes, for both ``m_sem`` and ``p``). ``stop_gradient`` detaches ``m_sem`` (no
    gradient from the panoptic loss into the semantic head); ``detach_class`` detaches ``p`` too.
    ``gt_semantic`` (int64 B×P, K on void) replaces ``σ(m_sem)`` by the one-hot ground-truth semantic mask (paper
    Table 7 control; void pixels are all zero).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"ReMask activation must be one of {ACTIVATIONS}, got {activation!r}")
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


def prior_bias(num_classes: int, init_multiplier: float, class_probability: float = 0.5) -> float:
    """Semantic-head class bias that makes ``1 + Σ_c σ(m_sem)σ(p)`` start at ``init_multiplier`` (sigmoid).

    At initialisation the class logits are close to 0, so ``σ(p) ≈ 0.5``; a bias ``b`` on every semantic logit
    gives ``1 + K·σ(b)·0.5``. With a zero bias that is ``1 + K/4`` (34 on COCO): the relaxed logits of the first
    steps are tens of times the raw ones.
    """
    share = (init_multiplier - 1.0) / (num_classes * class_probability)
    if not 0.0 < share < 1.0:
        raise ValueError(f"remax.remask_init_multiplier={init_multiplier} must lie in (1, "
                         f"{1 + num_classes * class_probability:g}) for {num_classes} classes")
    return math.log(share / (1.0 - share))


@dataclass(frozen=True)
class ReMaskOptions:
    """How the model applies ReMask in its forward pass (built from ``Config.remax`` by the engine).

    ``stages`` relaxed decoder stages counted from the first (0 = off: the heads, if built, only feed the loss);
    ``at_test`` keeps the relaxation in ``eval()`` mode (paper Table 5, heads kept); otherwise ``eval()`` never
    touches the heads, so its outputs equal those of a model built without them. ``init_multiplier`` (sigmoid
    only, 0 = off) sets the heads' class bias by :func:`prior_bias` when they are built.
    """

    stages: int = 0
    activation: str = "softmax"
    stop_gradient: bool = True
    detach_class: bool = False
    use_gt: bool = False
    at_test: bool = False
    init_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ReMask activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.stages < 0:
            raise ValueError(f"ReMask stages must be >= 0, got {self.stages}")
        if self.init_multiplier and self.activation != "sigmoid":
            raise ValueError("remax.remask_init_multiplier only applies with remax.remask_activation=sigmoid "
                             "(with the softmax the multiplier starts at 1 + 1/K already)")

    def replace(self, **changes: object) -> "ReMaskOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, remax_cfg: RemaxConfig, at_test: bool = False) -> "ReMaskOptions":
        """The options a run's ``remax`` section asks for; ``at_test`` is ``eval.keep_remask``.

        ReMask runs in the decoder only with ReMaX on, ReMask on and ``remask_in_decoder``; the heads' prior bias
        applies to either reading.
        """
        on = remax_cfg.enabled and remax_cfg.remask and remax_cfg.remask_stages > 0
        in_decoder = on and remax_cfg.remask_in_decoder
        return cls(stages=remax_cfg.remask_stages if in_decoder else 0,
                   activation=remax_cfg.remask_activation, stop_gradient=remax_cfg.remask_stop_gradient,
                   detach_class=remax_cfg.remask_detach_class, use_gt=remax_cfg.remask_use_gt,
                   at_test=at_test and in_decoder,
                   init_multiplier=remax_cfg.remask_init_multiplier if on else 0.0)


def stride_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Sub-sample a B×H×W label map onto ``size`` by striding, as the losses take their ground truth (never by
    interpolation), so the ground-truth control of ReMask sees the labels the losses see."""
    s = subsample_stride(tuple(labels.shape[-2:]), tuple(size))
    return labels[..., ::s, ::s]
