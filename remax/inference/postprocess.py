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
from remax.structures import PanopticPrediction

PROTOCOLS = ("remax", "reference")


def check_protocol(protocol: str) -> str:
    """The evaluation protocol name, refused early (a typo would otherwise silently select the default)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return protocol


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


def panoptic_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                         cfg: EvalConfig | None = None) -> PanopticPrediction:
    """The mask-wise merge (kmax-reference §4): rank queries, paste masks onto free pixels, merge stuff by class.

    Returns a :class:`PanopticPrediction` whose ``id_map`` numbers the kept segments ``1..S`` in paste order
    (``0`` = void) and whose ``segments_info`` holds contiguous ``category_id``s, ``isthing``, ``score`` (class
    confidence of the segment's best query) and ``area`` (pixels in ``id_map``).
    """
    cfg = cfg or EvalConfig()
    p_cls, p_mask = class_and_mask_probabilities(class_logits, mask_logits)
    num_queries, height, width = p_mask.shape
    is_thing = torch.as_tensor(is_thing, dtype=torch.bool, device=p_cls.device)
    if is_thing.numel() != p_cls.shape[1]:
        raise ValueError(f"is_thing has {is_thing.numel()} entries but the model predicts {p_cls.shape[1]} classes")

    score_cls, labels = p_cls.max(dim=1)
    binary = (p_mask > cfg.pixel_confidence_threshold).flatten(1)  # N×HW
    own_pixels = binary.sum(dim=1)
    mask_score = (p_mask.flatten(1) * binary).sum(dim=1) / own_pixels.clamp(min=1)
    ranking = score_cls.pow(cfg.reorder_class_weight) * mask_score.pow(cfg.reorder_mask_weight)
    order = torch.argsort(ranking, descending=True, stable=True)

    query_is_thing = is_thing[labels]
    threshold = torch.where(query_is_thing, torch.full_like(score_cls, cfg.thing_threshold),
                            torch.full_like(score_cls, cfg.stuff_threshold))
    # TF deeplab2 keeps a score equal to the threshold; the PyTorch reference needs it strictly above.
    if check_protocol(cfg.protocol) == "reference":
        passes = score_cls > threshold
    else:
        passes = score_cls >= threshold
    confident = passes & (own_pixels > 0)
    # Only confident queries can be kept, and the overlap test of a query depends only on the queries pasted
    # before it, so the paste loop visits the confident ones only (usually a handful), each over its own pixels.
    candidates = order[confident[order]].tolist()

    canvas = torch.zeros(height * width, dtype=torch.int64, device=p_mask.device)
    segments: list[dict] = []
    stuff_segment: dict[int, int] = {}  # contiguous stuff class -> its segment id
    for q in candidates:
        pixels = binary[q].nonzero().squeeze(1)
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
    n, h, w = p_mask.shape
    flat = p_mask.reshape(n, h * w)
    out = torch.empty(h * w, dtype=torch.int64, device=p_mask.device)
    p_cls_t = p_cls.t()  # K×N
    for start in range(0, h * w, chunk_pixels):
        out[start:start + chunk_pixels] = (p_cls_t @ flat[:, start:start + chunk_pixels]).argmax(dim=0)
    return out.view(h, w)


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
    num_classes = p_cls.shape[1]
    thing_mask = torch.as_tensor(is_thing, dtype=torch.bool).to(p_cls.device)
    thing_ids = thing_mask.nonzero().squeeze(1)
    h, w = p_mask.shape[1:]
    if thing_ids.numel() == 0 or topk <= 0:
        return InstancePrediction(masks=torch.zeros(0, h, w, dtype=torch.bool, device=p_mask.device),
                                  scores=torch.zeros(0, device=p_mask.device),
                                  labels=torch.zeros(0, dtype=torch.int64, device=p_mask.device))
    if reference:
        top_probs, flat_index = p_cls.flatten().topk(min(topk, p_cls.numel()))
        queries = flat_index // num_classes
        labels = flat_index % num_classes
        keep = thing_mask[labels]
        top_probs, queries, labels = top_probs[keep], queries[keep], labels[keep]
    else:
        thing_probs = p_cls[:, thing_ids]  # N×T
        top_probs, flat_index = thing_probs.flatten().topk(min(topk, thing_probs.numel()))
        queries = flat_index // thing_ids.numel()
        labels = thing_ids[flat_index % thing_ids.numel()]
    binary = p_mask > cfg.pixel_confidence_threshold
    own = binary.flatten(1).sum(1)
    inside = (p_mask.flatten(1) * binary.flatten(1)).sum(1)
    mask_score = inside / (own + 1e-6) if reference else inside / own.clamp(min=1)
    return InstancePrediction(masks=binary[queries], scores=top_probs * mask_score[queries], labels=labels)
