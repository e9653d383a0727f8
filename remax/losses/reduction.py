"""The per-image normalisation every kMaX-DeepLab pixel and query loss shares (kmax-reference §2.3-2.6).

The reference divides each image's summed loss by the number of entries whose loss is *not exactly zero*,
clamped to at least one, and then averages over the batch. Masked entries (void pixels, invalid samples) are
zero and therefore never counted; once easy entries saturate to an exact zero the loss becomes a mean over the
hard ones, which keeps their gradient from being diluted as training progresses.
"""

from __future__ import annotations

from torch import Tensor


def nonzero_mean(loss: Tensor) -> Tensor:
    """B×X per-entry losses (0 where masked) -> B per-image means over the non-zero entries."""
    flat = loss.flatten(1)
    count = (flat != 0).sum(1).clamp(min=1).to(flat.dtype)
    return flat.sum(1) / count
