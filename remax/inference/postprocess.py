"""Post-processing of kMaX-DeepLab outputs: the mask-wise panoptic merge, semantic and instance outputs.

All functions take the outputs of ONE image: class logits ``N×(K+1)`` (void last) and mask logits ``N×H×W`` at
the resolution the output should have (the predictor resizes them to the original image first, as the PyTorch
reference does). They follow kmax-reference §4; where the two reference implementations differ we follow the
TF one for the class thresholds (``>=``) and offer its area limits (0 = off, the PyTorch behaviour).

``cfg.protocol == "reference"`` switches to the PyTorch reference's (bytedance/kmax-deeplab) choices, so that its
published numbers can be reproduced: strict ``>`` class thresholds, and instances taken as the top-k (query,
class) pairs over *all* classes before the stuff pairs are dropped (so fewer than k may remain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remax.config import EvalConfig
from remax.inference.mask_probabilities import QueryProbabilities, Upsample, query_probabilities
from remax.preprocessing import PROTOCOLS, check_protocol  # noqa: F401 (re-exported)
from remax.structures import PanopticPrediction



@dataclass
class InstancePrediction:
    """Instance masks of one image, best first.

    ``labels`` are contiguous class ids (thing classes only); ``masks`` are boolean ``k×H×W``.
    """

    masks: torch.Tensor  # bool [k, H, W]
    scores: torch.Tensor  # float [k]
    labels: torch.Tensor  # int64 [k]

    def __len__(self) -> int:
        return int(self.scores.numel())


def _check_inputs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.dim() != 2 or mask_logits.dim() != 3:
        raise ValueError(f"expected class logits N×(K+1) and mask logits N×H×W, got {tuple(class_logits.shape)} "
                         f"and {tuple(mask_logits.shape)}")
    if class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"{class_logits.shape[0]} class predictions but {mask_logits.shape[0]} masks")
    if class_logits.shape[1] < 2:
        raise ValueError("class logits need at least one class plus void")


def class_and_mask_probabilities(class_logits: torch.Tensor,
                                 mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_cls`` (``N×K``, softmax over K+1 with void dropped) and ``P_mask`` (``N×H×W``, softmax over queries).

    Computed in float32: under AMP the logits may arrive in half precision, where the softmax over N loses the
    small differences the 0.4 pixel threshold depends on.
    """
    _check_inputs(class_logits, mask_logits)
    p_cls = class_logits.float().softmax(dim=-1)[:, :-1]
    p_mask = mask_logits.float().softmax(dim=0)
    return p_cls, p_mask


def class_scores(class_logits: torch.Tensor, is_thing: torch.Tensor,
                  cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: best class probability, its label, whether it is a thing, and whether it passes its threshold."""
    p_cls = class_logits.float().softmax(dim=-1)[:, :-1]
    is_thing = torch.as_tensor(is_thing, dtype=torch.bool, device=p_cls.device)
    if is_thing.numel() != p_cls.shape[1]:
        raise ValueError(f"is_thing has {is_thing.numel()} entries but the model predicts {p_cls.shape[1]} classes")
    score_cls, labels = p_cls.max(dim=1)
    query_is_thing = is_thing[labels]
    threshold = torch.where(query_is_thing, torch.full_like(score_cls, cfg.thing_threshold),
                            torch.full_like(score_cls, cfg.stuff_threshold))
    # TF deeplab2 keeps a score equal to the threshold; the PyTorch reference needs it strictly above.
    if check_protocol(cfg.protocol) == "reference":
        passes = score_cls > threshold
    else:
        passes = score_cls >= threshold
    return score_cls, labels, query_is_thing, passes


def _binary_masks(probs: torch.Tensor, cfg: EvalConfig,
                  reference: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary masks ``probs > pixel threshold`` of ``M`` queries (``M×HW``), their pixel counts and the mean
    probability inside each (0 for an empty mask; divided by ``pixels + 1e-6`` as the reference's instance output
    does when ``reference``)."""
    binary = (probs > cfg.pixel_confidence_threshold).flatten(1)
    own = binary.sum(dim=1)
    inside = (probs.flatten(1) * binary).sum(dim=1)
    mask_score = inside / (own + 1e-6) if reference else inside / own.clamp(min=1)
    return binary, own, mask_score


def _mask_ranking(probs: torch.Tensor, score_cls: torch.Tensor,
                  cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary masks (``M×HW``), own pixel counts and the ranking ``score^a · mask_score^b`` of ``M`` queries."""
    binary, own_pixels, mask_score = _binary_masks(probs, cfg)
    ranking = score_cls.pow(cfg.reorder_class_weight) * mask_score.pow(cfg.reorder_mask_weight)
    return binary, own_pixels, ranking


def _paste(candidates: list[int], rows: list[int], binary: torch.Tensor, score_cls: torch.Tensor,
           labels: torch.Tensor, query_is_thing: torch.Tensor, size: tuple[int, int],
           cfg: EvalConfig) -> PanopticPrediction:
    """Paste the ranked confident queries (``candidates``, their rows of ``binary`` in ``rows``) onto free pixels."""
    height, width = size
    canvas = torch.zeros(height * width, dtype=torch.int64, device=binary.device)
    segments: list[dict] = []
    stuff_segment: dict[int, int] = {}  # contiguous stuff class -> its segment id
    for q, row in zip(candidates, rows):
        pixels = binary[row].nonzero().squeeze(1)
        free = pixels[canvas[pixels] == 0]
        if not free.numel() > cfg.overlap_threshold * pixels.numel():
            continue
        label = int(labels[q])
        thing = bool(query_is_thing[q])
        if not thing and label in stuff_segment:
            canvas[free] = stuff_segment[label]
            continue
        seg_id = len(segments) + 1
        canvas[free] = seg_id
        if not thing:
            stuff_segment[label] = seg_id
        segments.append({"id": seg_id, "category_id": label, "isthing": thing, "score": float(score_cls[q])})

    areas = torch.bincount(canvas, minlength=len(segments) + 1).tolist()
    for seg in segments:
        seg["area"] = int(areas[seg["id"]])
    id_map = canvas.view(height, width)
    if cfg.thing_area_limit > 0 or cfg.stuff_area_limit > 0:
        id_map, segments = _apply_area_limits(id_map, segments, cfg.thing_area_limit, cfg.stuff_area_limit)
    return PanopticPrediction(id_map=id_map, segments_info=segments)


def panoptic_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                         cfg: EvalConfig | None = None) -> PanopticPrediction:
    """The mask-wise merge (kmax-reference §4): rank queries, paste masks onto free pixels, merge stuff by class.

    Takes every query's mask logits at the output size: the definition, kept as the oracle of
    :func:`panoptic_postprocess_lowres` (which the Predictor uses and gives the same result without upsampling
    all queries). Returns a :class:`PanopticPrediction` whose ``id_map`` numbers the kept segments ``1..S`` in
    paste order (``0`` = void) and whose ``segments_info`` holds contiguous ``category_id``s, ``isthing``,
    ``score`` (class confidence of the segment's best query) and ``area`` (pixels in ``id_map``).
    """
    cfg = cfg or EvalConfig()
    _check_inputs(class_logits, mask_logits)
    score_cls, labels, query_is_thing, passes = class_scores(class_logits, is_thing, cfg)
    p_mask = mask_logits.float().softmax(dim=0)
    binary, own_pixels, ranking = _mask_ranking(p_mask, score_cls, cfg)
    order = torch.argsort(ranking, descending=True, stable=True)
    confident = passes & (own_pixels > 0)
    # Only confident queries can be kept, and the overlap test of a query depends only on the queries pasted
    # before it, so the paste loop visits the confident ones only (usually a handful), each over its own pixels.
    candidates = order[confident[order]].tolist()
    return _paste(candidates, candidates, binary, score_cls, labels, query_is_thing, tuple(p_mask.shape[1:]), cfg)


def panoptic_postprocess_lowres(class_logits: torch.Tensor, lowres_logits: torch.Tensor, upsample: Upsample,
                                size: tuple[int, int], is_thing: torch.Tensor, cfg: EvalConfig | None = None,
                                active: torch.Tensor | None = None, probs: QueryProbabilities | None = None,
                                shift_gap: float | None = None) -> PanopticPrediction:
    """The mask-wise merge of :func:`panoptic_postprocess` from the stride-4 logits.

    Only the queries whose class score passes its threshold are upsampled (``upsample`` maps ``q×h×w`` low-res
    logits to ``q×H×W`` at ``size``), with the softmax over the queries that can matter at each pixel
    (:mod:`remax.inference.mask_probabilities` explains why the result is the same). Their ranking keeps the
    order of the full merge (a stable sort of the same values over the candidates in query order). No candidate:
    an empty map without touching the masks. ``probs`` may carry probabilities already computed for a superset
    of the candidates (the Predictor shares them with the semantic and instance outputs); ``shift_gap`` allows
    the one-pass softmax of :func:`~remax.inference.mask_probabilities.query_probabilities`.
    """
    cfg = cfg or EvalConfig()
    score_cls, labels, query_is_thing, passes = class_scores(class_logits, is_thing, cfg)
    wanted = passes.nonzero().squeeze(1)
    device = lowres_logits.device
    if wanted.numel() == 0:
        return PanopticPrediction(id_map=torch.zeros(size, dtype=torch.int64, device=device), segments_info=[])
    if probs is None:
        probs = query_probabilities(lowres_logits, upsample, wanted, active=active, shift_gap=shift_gap)
    row_of = {q: i for i, q in enumerate(probs.queries.tolist())}
    rows = torch.tensor([row_of[q] for q in wanted.tolist()], dtype=torch.int64, device=probs.probs.device)
    binary, own_pixels, ranking = _mask_ranking(probs.probs[rows], score_cls[wanted], cfg)
    order = torch.argsort(ranking, descending=True, stable=True)  # over candidates in ascending query order
    order = order[(own_pixels > 0)[order]]
    candidates = wanted[order].tolist()
    return _paste(candidates, order.tolist(), binary, score_cls, labels, query_is_thing, tuple(size), cfg)


def _apply_area_limits(id_map: torch.Tensor, segments: list[dict], thing_limit: int,
                       stuff_limit: int) -> tuple[torch.Tensor, list[dict]]:
    """Void thing segments / stuff regions smaller than the limits, then renumber the survivors ``1..S``."""
    relabel = torch.zeros(len(segments) + 1, dtype=torch.int64, device=id_map.device)
    kept: list[dict] = []
    for seg in segments:
        limit = thing_limit if seg["isthing"] else stuff_limit
        if seg["area"] < limit:
            continue
        relabel[seg["id"]] = len(kept) + 1
        kept.append(dict(seg, id=len(kept) + 1))
    return relabel[id_map], kept


def semantic_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                         chunk_pixels: int = 1 << 18) -> torch.Tensor:
    """Soft marginalisation: class of pixel x = argmax_c Σ_i P_cls(i, c) · P_mask(i, x) (void excluded).

    Works on chunks of pixels so that the ``K×H×W`` score volume never exists at once for large images.
    """
    p_cls, p_mask = class_and_mask_probabilities(class_logits, mask_logits)
    return _semantic_argmax(p_cls, p_mask, chunk_pixels)


def _semantic_argmax(p_cls: torch.Tensor, probs: torch.Tensor, chunk_pixels: int) -> torch.Tensor:
    """argmax_c Σ_i p_cls(i, c) · probs(i, x) for ``M`` queries (``M×K`` and ``M×H×W``), by chunks of pixels."""
    m, h, w = probs.shape
    flat = probs.reshape(m, h * w)
    out = torch.empty(h * w, dtype=torch.int64, device=probs.device)
    p_cls_t = p_cls.t()  # K×M
    for start in range(0, h * w, chunk_pixels):
        out[start:start + chunk_pixels] = (p_cls_t @ flat[:, start:start + chunk_pixels]).argmax(dim=0)
    return out.view(h, w)


def semantic_from_probabilities(class_logits: torch.Tensor, probs: QueryProbabilities,
                                chunk_pixels: int = 1 << 18) -> torch.Tensor:
    """:func:`semantic_postprocess` over the queries of ``probs`` (which must hold every active query: the others
    weigh under ``exp(-margin)`` at every pixel)."""
    p_cls = class_logits.float().softmax(dim=-1)[:, :-1]
    return _semantic_argmax(p_cls[probs.queries], probs.probs, chunk_pixels)


def _instance_pairs(p_cls: torch.Tensor, thing_mask: torch.Tensor, topk: int,
                    reference: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k (query, thing class) pairs: class probabilities, query ids, labels (see instance_postprocess)."""
    num_classes = p_cls.shape[1]
    if reference:
        top_probs, flat_index = p_cls.flatten().topk(min(topk, p_cls.numel()))
        queries = flat_index // num_classes
        labels = flat_index % num_classes
        keep = thing_mask[labels]
        return top_probs[keep], queries[keep], labels[keep]
    thing_ids = thing_mask.nonzero().squeeze(1)
    thing_probs = p_cls[:, thing_ids]  # N×T
    top_probs, flat_index = thing_probs.flatten().topk(min(topk, thing_probs.numel()))
    return top_probs, flat_index // thing_ids.numel(), thing_ids[flat_index % thing_ids.numel()]


def _no_instances(h: int, w: int, device: torch.device) -> InstancePrediction:
    return InstancePrediction(masks=torch.zeros(0, h, w, dtype=torch.bool, device=device),
                              scores=torch.zeros(0, device=device),
                              labels=torch.zeros(0, dtype=torch.int64, device=device))


def instance_from_probabilities(class_logits: torch.Tensor, probs: QueryProbabilities, is_thing: torch.Tensor,
                                cfg: EvalConfig | None = None, topk: int = 100) -> InstancePrediction:
    """:func:`instance_postprocess` from the probabilities of the active queries: a query outside ``probs`` stays
    under the pixel threshold everywhere, so its mask is empty and its score 0, as in the full computation."""
    cfg = cfg or EvalConfig()
    reference = check_protocol(cfg.protocol) == "reference"
    p_cls = class_logits.float().softmax(dim=-1)[:, :-1]
    thing_mask = torch.as_tensor(is_thing, dtype=torch.bool).to(p_cls.device)
    h, w = probs.probs.shape[1:]
    device = probs.probs.device
    if not bool(thing_mask.any()) or topk <= 0:
        return _no_instances(h, w, device)
    top_probs, queries, labels = _instance_pairs(p_cls, thing_mask, topk, reference)
    row_of = torch.full((p_cls.shape[0],), -1, dtype=torch.int64, device=device)
    row_of[probs.queries] = torch.arange(probs.queries.numel(), device=device)
    rows = row_of[queries]
    present = rows >= 0
    binary, _, mask_score = _binary_masks(probs.probs, cfg, reference)
    masks = torch.zeros(queries.numel(), h, w, dtype=torch.bool, device=device)
    masks[present] = binary[rows[present]].view(-1, h, w)
    scores = torch.zeros_like(top_probs)
    scores[present] = top_probs[present] * mask_score[rows[present]]
    return InstancePrediction(masks=masks, scores=scores, labels=labels)


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                         cfg: EvalConfig | None = None, topk: int = 100) -> InstancePrediction:
    """Instance output: the top-k (query, thing class) pairs by class probability, best first.

    Mask = ``P_mask > pixel_confidence_threshold``; score = class probability × mean ``P_mask`` inside the mask
    (0 for an empty mask). Under ``cfg.protocol == "reference"`` the top-k is taken over all classes and the stuff
    pairs are dropped afterwards, as the PyTorch reference does (high-scoring stuff queries then use up places
    of the k), and the mean divides by ``pixels + 1e-6`` as there.
    """
    cfg = cfg or EvalConfig()
    reference = check_protocol(cfg.protocol) == "reference"
    p_cls, p_mask = class_and_mask_probabilities(class_logits, mask_logits)
    thing_mask = torch.as_tensor(is_thing, dtype=torch.bool).to(p_cls.device)
    h, w = p_mask.shape[1:]
    if not bool(thing_mask.any()) or topk <= 0:
        return _no_instances(h, w, p_mask.device)
    top_probs, queries, labels = _instance_pairs(p_cls, thing_mask, topk, reference)
    binary, _, mask_score = _binary_masks(p_mask, cfg, reference)
    return InstancePrediction(masks=binary[queries].view(-1, h, w), scores=top_probs * mask_score[queries],
                              labels=labels)
