"""``P_mask`` at the output size for the queries that matter, without upsampling every query.

The merges need the softmax over all N queries at every output pixel, but only for a few queries (those whose
class score can pass the thresholds), and the softmax denominator is dominated by the queries near the per-pixel
maximum. Upsampling all N (128) stride-4 logits to the image size costs more than the network on the CPU and holds
N full-size float maps; this module works on the low-resolution logits first and upsamples what is needed.

Why it gives the same result: the output logits are bilinear resizes of the stride-4 logits (one resize, or two
chained ones back to the original size), so every output value is a convex combination of the low-resolution
samples in its 3×3 neighbourhood and lies between their minimum and maximum. A query whose 3×3 maximum is more
than ``margin`` below the largest 3×3 minimum of any query, at every low-resolution position, is below the
per-pixel maximum by more than ``margin`` everywhere: its softmax term is under ``exp(-margin)`` of the largest
term. With the default margin of 30 (``exp(-30) ≈ 1e-13``, times 128 queries still far below float32's 6e-8
half-ulp) dropping those terms changes the denominator only at float32 rounding level, and such a query's own
probability stays below the 0.4 pixel threshold, so it owns no pixel and contributes nothing to any mask score.
The upsampling of the kept queries is the same call on a subset of channels: the same logits as the full
upsampling up to float32 rounding (the bilinear kernel's last bit can depend on how many channels it resizes at
once: one ulp, seen with one thread on an Intel Xeon; usually bitwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# exp(-30) ≈ 9e-14: negligible against the float32 resolution of a softmax denominator (>= 1 term of size 1).
PRUNE_MARGIN = 30.0
# Full-size float maps held at once while reducing over the active queries (bounds the memory of the merge).
CHUNK_QUERIES = 8  # measured: 8 maps stay in cache between upsample, exp and sum (4-8 fastest, 16 +28 %)

Upsample = Callable[[torch.Tensor], torch.Tensor]  # q×h×w low-res logits -> q×H×W output logits (float32)


@dataclass
class QueryProbabilities:
    """Softmax-over-queries probabilities of ``queries`` (ascending ids) at the output size: ``probs[i]`` is
    ``P_mask(queries[i])``. ``active`` are the queries that entered the softmax denominator."""

    queries: torch.Tensor  # int64 [M]
    probs: torch.Tensor  # float32 [M, H, W]
    active: torch.Tensor  # int64 [A]


def _window3(x: torch.Tensor, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """3×3 (clipped at the borders) max or min of ``…×h×w`` by two separable passes of shifted views: an order of
    magnitude faster on the CPU than ``max_pool2d``, which also computes indices."""
    out = x.clone()
    out[..., 1:, :] = reduce(out[..., 1:, :], x[..., :-1, :])
    out[..., :-1, :] = reduce(out[..., :-1, :], x[..., 1:, :])
    rows = out.clone()
    out[..., :, 1:] = reduce(out[..., :, 1:], rows[..., :, :-1])
    out[..., :, :-1] = reduce(out[..., :, :-1], rows[..., :, 1:])
    return out


def logit_bounds(lowres: torch.Tensor, rows: int | None = None,
                 cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query and low-resolution position, the 3×3 maximum and minimum of the logits (``B×N×h×w`` each):
    bounds of every output logit whose bilinear support lies around that position."""
    x = lowres.float()[None] if lowres.dim() == 3 else lowres.float()
    if rows is not None or cols is not None:
        x = x[..., : rows or x.shape[-2], : cols or x.shape[-1]]
    return _window3(x, torch.maximum), _window3(x, torch.minimum)


def active_queries(lowres: torch.Tensor, margin: float = PRUNE_MARGIN,
                   rows: int | None = None, cols: int | None = None,
                   bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Queries that can come within ``margin`` of the per-pixel maximum logit somewhere in the output.

    ``lowres`` is ``N×h×w`` (one image) or ``B×N×h×w`` (a batch: one answer per image, as a boolean ``B×N``
    mask); ``rows``/``cols`` limit the test to the top-left low-resolution region the output is cropped from;
    ``bounds``: :func:`logit_bounds` when already computed.
    """
    upper, lower = bounds if bounds is not None else logit_bounds(lowres, rows, cols)
    floor = lower.amax(dim=1, keepdim=True) - margin  # B×1×h×w: the per-position maximum is at least this
    keep = (upper >= floor).flatten(2).any(dim=2)  # B×N
    if lowres.dim() == 3:
        return keep[0].nonzero().squeeze(1)
    return keep


def lowres_support(valid: tuple[int, int], input_size: tuple[int, int],
                   lowres_size: tuple[int, int]) -> tuple[int, int]:
    """Low-resolution rows/cols (from the top-left) that the crop ``valid`` of the padded input depends on,
    with one sample of slack on each side for the bilinear taps."""
    rows = min(lowres_size[0], -(-valid[0] * lowres_size[0] // input_size[0]) + 2)
    cols = min(lowres_size[1], -(-valid[1] * lowres_size[1] // input_size[1]) + 2)
    return rows, cols


def pruning_plan(lowres: torch.Tensor, rows: int | None = None, cols: int | None = None,
                 margin: float = PRUNE_MARGIN) -> tuple[torch.Tensor, float]:
    """:func:`active_queries` (``B×N`` boolean) and a bound of :func:`max_logit_gap` for a batch, skipping the
    3×3 bounds when the global range decides: logits spanning less than ``margin`` keep every query, and no gap
    exceeds the range (an upsampled value lies between the smallest and largest low-resolution logit)."""
    x = lowres.float()
    x = x[..., : rows or x.shape[-2], : cols or x.shape[-1]]
    spread = float(x.max() - x.min())
    if spread < margin:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), spread
    bounds = logit_bounds(x)
    return active_queries(x, margin, bounds=bounds), max_logit_gap(x, bounds=bounds)


def max_logit_gap(lowres: torch.Tensor, rows: int | None = None, cols: int | None = None,
                  bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """An upper bound, over the output pixels, of ``upsample(max_q l_q) - max_q upsample(l_q)``.

    :func:`query_probabilities` shifts the softmax by the upsampled low-resolution maximum (one map) instead of the
    per-pixel maximum over the upsampled queries (a pass over all of them); the shift is safe while this gap stays
    far from float32's ``exp`` underflow (~87).
    """
    upper, lower = bounds if bounds is not None else logit_bounds(lowres, rows, cols)
    # The 3×3 max of the per-position max over queries is the max over queries of the 3×3 maxima.
    return float((upper.amax(dim=1) - lower.amax(dim=1)).max())


# Above this bound on the shift gap, query_probabilities takes the two-pass (exact maximum) route.
MAX_SAFE_GAP = 60.0


class BufferedUpsample:
    """``upsample`` for chunks of queries into reused buffers: the same bilinear kernels as
    :func:`remax.inference.predictor.mask_logits_to_image`, without allocating and faulting in fresh full-size
    maps for every chunk. The returned tensor is overwritten by the next call."""

    def __init__(self, input_size: tuple[int, int], valid: tuple[int, int], out_size: tuple[int, int],
                 first_align: bool, second_align: bool, channels: int, device: torch.device) -> None:
        self.input_size, self.valid, self.out_size = tuple(input_size), tuple(valid), tuple(out_size)
        self.first_align, self.second_align = first_align, second_align
        self.first = torch.empty(1, channels, *self.input_size, device=device)
        self.second = None
        if self.valid != self.out_size:
            self.second = torch.empty(1, channels, *self.out_size, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0]
        if c > self.first.shape[1]:
            raise ValueError(f"chunk of {c} queries for a buffer of {self.first.shape[1]}")
        first = self.first[:, :c]
        torch._C._nn.upsample_bilinear2d(x[None].float(), self.input_size, self.first_align, None, None, out=first)
        crop = first[:, :, : self.valid[0], : self.valid[1]]
        if self.second is None:
            return crop[0]
        second = self.second[:, :c]
        torch._C._nn.upsample_bilinear2d(crop, self.out_size, self.second_align, None, None, out=second)
        return second[0]


def query_probabilities(lowres: torch.Tensor, upsample: Upsample, wanted: torch.Tensor,
                        active: torch.Tensor | None = None, margin: float = PRUNE_MARGIN,
                        chunk: int = CHUNK_QUERIES, shift_gap: float | None = None) -> QueryProbabilities:
    """``P_mask`` of the ``wanted`` queries at the output size, the softmax taken over the active queries.

    ``lowres``: ``N×h×w`` logits of one image; ``upsample`` maps a subset of them to the output size (it may
    reuse its output buffer between calls); ``active``: precomputed :func:`active_queries` (computed here when
    omitted). The maps are reduced in chunks of ``chunk`` queries, so at most ``chunk + len(wanted) + 3``
    full-size maps exist at once.

    With ``shift_gap`` (:func:`max_logit_gap`) below :data:`MAX_SAFE_GAP` one pass suffices: the softmax is
    shifted by the upsampled low-resolution maximum over the queries, an upper bound of every upsampled logit
    (bilinear weights are convex), instead of the exact per-pixel maximum; mathematically the same softmax, equal
    to ``softmax(dim=0)`` up to float32 rounding. Otherwise two passes: the exact maximum, then the sum.
    """
    if active is None:
        active = active_queries(lowres, margin)
    wanted = torch.unique(wanted.to(lowres.device))  # sorted ascending
    active = torch.unique(torch.cat([active.to(lowres.device), wanted]))
    ids = active.tolist()
    want = set(wanted.tolist())
    if not ids:  # no query at all (N == 0)
        out = upsample(lowres[:0])
        return QueryProbabilities(queries=wanted, probs=out.clone(), active=active)

    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    everything = len(ids) == lowres.shape[0]  # active == all queries: slices (views) instead of gathers

    def rows(part: list[int]) -> torch.Tensor:
        return lowres[part[0]:part[-1] + 1] if everything else lowres[part]

    kept: dict[int, torch.Tensor] = {}
    if shift_gap is not None and shift_gap < MAX_SAFE_GAP:
        shift = upsample((lowres if everything else lowres[active]).amax(dim=0, keepdim=True))[0].clone()
        total = None
        for part in chunks:
            terms = upsample(rows(part)).sub_(shift).exp_()  # upsample's buffer, rewritten in place
            for j, q in enumerate(part):
                if q in want:
                    kept[q] = terms[j].clone()
            part_sum = terms.sum(dim=0)
            total = part_sum if total is None else total.add_(part_sum)
    else:
        shift = None
        for part in chunks:
            logits = upsample(rows(part))
            part_max = logits.amax(dim=0)
            shift = part_max if shift is None else torch.maximum(shift, part_max)
            for j, q in enumerate(part):
                if q in want:
                    kept[q] = logits[j].clone()
        total = None
        for part in chunks:
            part_sum = upsample(rows(part)).sub_(shift).exp_().sum(dim=0)
            total = part_sum if total is None else total.add_(part_sum)
        for q in kept:
            kept[q].sub_(shift).exp_()
    order = wanted.tolist()
    if order:
        probs = torch.stack([kept[q] for q in order]).div_(total)
    else:
        probs = total.new_zeros((0, *total.shape))
    return QueryProbabilities(queries=wanted, probs=probs, active=active)
