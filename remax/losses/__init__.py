"""remax.losses: Hungarian matching, the kMaX-DeepLab losses and the ReMaX relaxations (SPEC §4)."""

from remax.losses.criterion import SetCriterion
from remax.losses.instance_discrimination import gumbel_topk_pixels, instance_discrimination_loss
from remax.losses.mask_id import mask_id_loss
from remax.losses.matcher import Matching, hungarian_match, similarity
from remax.losses.pq_style import loss_valid_pixels, one_hot_class_targets, pq_style_loss
from remax.losses.relaxations import reclass_targets, remask
from remax.losses.semantic import semantic_loss
from remax.losses.targets import DenseTargets, build_dense_targets, subsample_stride

__all__ = [
    "SetCriterion",
    "DenseTargets",
    "Matching",
    "build_dense_targets",
    "gumbel_topk_pixels",
    "hungarian_match",
    "instance_discrimination_loss",
    "loss_valid_pixels",
    "mask_id_loss",
    "one_hot_class_targets",
    "pq_style_loss",
    "reclass_targets",
    "remask",
    "semantic_loss",
    "similarity",
    "subsample_stride",
]
