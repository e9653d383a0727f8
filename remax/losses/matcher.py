"""Hungarian matching with the PQ-style similarity (kmax-reference §2.2).

``S_ij = p_i(c_j) · Dice(m̂_i, g_j)``: class probability of GT j's class times the Dice of the query's
softmax mask (void pixels removed) with the GT mask. The assignment maximises the sum of ``S`` per image with
scipy on the CPU; it is computed once on the final output and shared by every auxiliary output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from remax.losses.targets import DenseTargets

DICE_EPS = 1e-5


@dataclass
class Matching:
    """A one-to-one assignment between queries and GT masks of each image."""

    query_of_segment: Tensor  # int64 B×M, matched query of each GT mask, -1 if unmatched or padding
    segment_of_query: Tensor  # int64 B×N, matched GT mask of each query, -1 if unmatched

    @property
    def segment_matched(self) -> Tensor:
        return self.query_of_segment >= 0

    @property
    def query_matched(self) -> Tensor:
        return self.segment_of_query >= 0


def class_probabilities(pred_logits: Tensor, classes: Tensor) -> Tensor:
    """``p_i(c_j)``: B×N×M probability (softmax over K+1, void column dropped) of each GT mask's class."""
    probs = pred_logits.float().softmax(-1)[..., :-1]  # B×N×K
    K = probs.shape[-1]
    idx = classes.clamp(max=K - 1).unsqueeze(1).expand(-1, probs.shape[1], -1)
    return probs.gather(2, idx)


def similarity(pred_logits: Tensor, mask_probs: Tensor, targets: DenseTargets) -> Tensor:
    """The matching similarity ``S`` (B×N×M), 0 in padding columns. ``mask_probs`` is the softmax over queries."""
    valid = targets.valid.to(mask_probs.dtype)
    masked = mask_probs * valid.unsqueeze(1)  # void pixels removed
    inter = torch.bmm(masked, targets.masks.transpose(1, 2))  # B×N×M
    denom = (masked.sum(-1).unsqueeze(2) + targets.areas.unsqueeze(1)) / 2 + DICE_EPS
    dice = inter / denom
    sim = class_probabilities(pred_logits, targets.classes) * dice
    return sim * targets.segment_valid.unsqueeze(1)


@torch.no_grad()
def hungarian_match(pred_logits: Tensor, mask_probs: Tensor, targets: DenseTargets) -> Matching:
    """Maximise the total similarity per image (``min(N, M_b)`` pairs)."""
    B, N = pred_logits.shape[:2]
    M = targets.classes.shape[1]
    sim = similarity(pred_logits.float(), mask_probs.float(), targets).cpu().numpy()
    counts = targets.segment_valid.sum(1).cpu().tolist()
    query_of_segment = np.full((B, M), -1, dtype=np.int64)
    segment_of_query = np.full((B, N), -1, dtype=np.int64)
    for b in range(B):
        m = int(counts[b])
        if m == 0:
            continue
        # Valid masks always fill the first m slots (see build_dense_targets).
        rows, cols = linear_sum_assignment(np.nan_to_num(sim[b, :, :m], nan=0.0), maximize=True)
        query_of_segment[b, cols] = rows
        segment_of_query[b, rows] = cols
    device = pred_logits.device
    return Matching(
        query_of_segment=torch.from_numpy(query_of_segment).to(device),
        segment_of_query=torch.from_numpy(segment_of_query).to(device),
    )
