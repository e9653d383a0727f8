"""Mask-wise merge, semantic and instance post-processing on hand-built logits with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from remax.config import EvalConfig
from remax.inference.postprocess import (
    class_and_mask_probabilities,
    instance_postprocess,
    panoptic_postprocess,
    semantic_postprocess,
)

H, W = 6, 10
# Classes: 0, 1 things; 2, 3 stuff; void is 4.
IS_THING = torch.tensor([True, True, False, False])


def class_logits(rows: list[tuple[int, float]], num_classes: int = 4) -> torch.Tensor:
    """One row per query: (class, probability); the rest of the mass is split evenly over the other classes+void."""
    out = []
    for label, prob in rows:
        p = np.full(num_classes + 1, (1.0 - prob) / num_classes)
        p[label] = prob
        out.append(np.log(p))
    return torch.tensor(np.array(out), dtype=torch.float32)


def mask_logits(regions: list[np.ndarray], strength: float = 30.0) -> torch.Tensor:
    """Logit ``strength`` inside each query's region, 0 elsewhere: P_mask ~1 on pixels one query owns, ~0.5 where
    two overlap, 1/N on pixels nobody covers (below 0.4 for N >= 3)."""
    return torch.tensor(np.stack([r.astype(np.float32) * strength for r in regions]))


def region(rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[rows, cols] = True
    return m


def cfg(**kw) -> EvalConfig:
    base = dict(pixel_confidence_threshold=0.4, thing_threshold=0.7, stuff_threshold=0.5, overlap_threshold=0.8,
                reorder_class_weight=1.0, reorder_mask_weight=1.0)
    base.update(kw)
    return EvalConfig(**base)


def test_disjoint_segments_void_for_unclaimed_pixels():
    regions = [region(slice(0, 3), slice(0, 4)), region(slice(3, 6), slice(0, 10)), np.zeros((H, W), bool)]
    out = panoptic_postprocess(class_logits([(0, 0.9), (2, 0.8), (1, 0.95)]), mask_logits(regions), IS_THING, cfg())
    expected = np.zeros((H, W), np.int64)
    expected[0:3, 0:4] = 1  # query 0 ranks first (0.9 * 1.0 > 0.8 * 1.0); query 2 has no pixels
    expected[3:6, :] = 2
    np.testing.assert_array_equal(out.id_map.numpy(), expected)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in out.segments_info] == [
        (1, 0, True, 12), (2, 2, False, 30)]
    assert out.segments_info[0]["score"] == pytest.approx(0.9, abs=1e-6)
    # The 18 pixels right of the thing and above the stuff belong to no query: void.
    assert int((out.id_map == 0).sum()) == 18


def test_overlap_rule_drops_or_keeps_and_claims_only_free_pixels():
    # Query 0 (thing, score 0.95) owns columns 0..4 of rows 0..1 (10 px). Query 1 (thing, 0.9) owns 10 px in
    # row 2 plus `k` px of query 0's region; its own mask therefore has 10 + k pixels, of which 10 are free.
    def run(k: int):
        a = region(slice(0, 2), slice(0, 5))
        b = region(slice(2, 3), slice(0, 10))
        b[0, :k] = True
        return panoptic_postprocess(class_logits([(0, 0.95), (1, 0.9), (3, 0.01)]), mask_logits([a, b,
                                    np.zeros((H, W), bool)]), IS_THING, cfg(reorder_mask_weight=0.0))

    # k = 2: free 10 > 0.8 * 12 = 9.6 -> kept, claims the 10 free pixels only.
    out = run(2)
    assert [(s["category_id"], s["area"]) for s in out.segments_info] == [(0, 10), (1, 10)]
    assert (out.id_map[0, :2] == 1).all() and (out.id_map[2] == 2).all()
    # k = 3: free 10 > 0.8 * 13 = 10.4 fails -> dropped, its row becomes void.
    out = run(3)
    assert [(s["category_id"], s["area"]) for s in out.segments_info] == [(0, 10)]
    assert (out.id_map[2] == 0).all()


def test_overlap_rule_boundary_is_strict():
    # 8 free of 10 own pixels with threshold 0.8: 8 > 8 is false -> dropped; threshold 0.79 keeps it.
    a = region(slice(0, 1), slice(0, 10))
    b = region(slice(1, 2), slice(0, 8))
    b[0, :2] = True
    logits = class_logits([(0, 0.95), (1, 0.9), (3, 0.01)])
    masks = mask_logits([a, b, np.zeros((H, W), bool)])
    out = panoptic_postprocess(logits, masks, IS_THING, cfg(reorder_mask_weight=0.0))
    assert len(out.segments_info) == 1
    out = panoptic_postprocess(logits, masks, IS_THING, cfg(reorder_mask_weight=0.0, overlap_threshold=0.79))
    assert [s["area"] for s in out.segments_info] == [10, 8]


def test_class_thresholds_differ_for_things_and_stuff():
    regions = [region(slice(0, 2), slice(0, 10)), region(slice(2, 4), slice(0, 10)),
               region(slice(4, 6), slice(0, 5)), region(slice(4, 6), slice(5, 10))]
    # thing 0.65 (< 0.7: dropped), stuff 0.55 (>= 0.5: kept), thing 0.75 (kept), stuff 0.45 (dropped)
    logits = class_logits([(0, 0.65), (2, 0.55), (1, 0.75), (3, 0.45)])
    out = panoptic_postprocess(logits, mask_logits(regions), IS_THING, cfg())
    assert sorted((s["category_id"], s["area"]) for s in out.segments_info) == [(1, 10), (2, 20)]
    assert (out.id_map[0:2] == 0).all() and (out.id_map[4:6, 5:] == 0).all()
    # Lower thresholds keep everything.
    out = panoptic_postprocess(logits, mask_logits(regions), IS_THING, cfg(thing_threshold=0.6,
                                                                           stuff_threshold=0.4))
    assert sorted(s["category_id"] for s in out.segments_info) == [0, 1, 2, 3]
    assert int((out.id_map == 0).sum()) == 0


def test_stuff_of_one_class_merges_into_one_segment_but_things_do_not():
    regions = [region(slice(0, 3), slice(0, 5)), region(slice(3, 6), slice(5, 10)),  # stuff class 2, twice
               region(slice(0, 3), slice(5, 10)), region(slice(3, 6), slice(0, 5))]  # thing class 0, twice
    logits = class_logits([(2, 0.9), (2, 0.8), (0, 0.99), (0, 0.98)])
    out = panoptic_postprocess(logits, mask_logits(regions), IS_THING, cfg())
    info = {s["id"]: s for s in out.segments_info}
    assert sorted((s["category_id"], s["isthing"], s["area"]) for s in info.values()) == [
        (0, True, 15), (0, True, 15), (2, False, 30)]
    stuff_id = next(i for i, s in info.items() if not s["isthing"])
    assert (out.id_map[0:3, 0:5] == stuff_id).all() and (out.id_map[3:6, 5:10] == stuff_id).all()
    # The merged segment carries the score of its best query.
    assert info[stuff_id]["score"] == pytest.approx(0.9, abs=1e-6)
    assert len(set(out.id_map.unique().tolist())) == 3


def test_reordering_uses_mask_score():
    # Query 0 has the higher class score but a weak mask (P_mask 0.5 on half its pixels, shared with query 2);
    # query 1 wins the ranking only when the mask score counts.
    shared = region(slice(0, 2), slice(0, 10))
    a = shared.copy()
    a[2:4, :] = True
    b = region(slice(0, 4), slice(0, 10))
    c = shared.copy()
    logits = class_logits([(0, 0.95), (1, 0.9), (3, 0.01)])
    # Strengths: a and c tie on the shared rows (0.5 each) so a's mask score is 0.75; b is weaker there.
    masks = torch.stack([torch.tensor(a, dtype=torch.float32) * 30, torch.tensor(b, dtype=torch.float32) * 30,
                         torch.tensor(c, dtype=torch.float32) * 30])
    masks[1, 0:2] = 0.0  # b only owns rows 2..3 strongly -> its 0..1 rows fall below 0.4
    masks[1, 2:4] = 31.0  # b beats a on rows 2..3 (P ~0.73 > 0.4, a gets ~0.27 < 0.4)
    p_cls, p_mask = class_and_mask_probabilities(logits, masks)
    assert (p_mask[0, 2:4] < 0.4).all() and (p_mask[1, 2:4] > 0.4).all()
    # Now query 0 owns rows 0..1 at P=0.5 (mask score 0.5), query 1 rows 2..3 at ~0.73.
    out_cls = panoptic_postprocess(logits, masks, IS_THING, cfg(reorder_mask_weight=0.0, overlap_threshold=0.0))
    out_both = panoptic_postprocess(logits, masks, IS_THING, cfg(reorder_mask_weight=1.0, overlap_threshold=0.0))
    assert [s["category_id"] for s in out_cls.segments_info] == [0, 1]
    assert [s["category_id"] for s in out_both.segments_info] == [1, 0]


def test_area_limits_void_small_segments_and_renumber():
    regions = [region(slice(0, 1), slice(0, 3)), region(slice(1, 6), slice(0, 10)), region(slice(0, 1), slice(5, 7))]
    logits = class_logits([(0, 0.99), (2, 0.9), (3, 0.9)])
    out = panoptic_postprocess(logits, mask_logits(regions), IS_THING, cfg(thing_area_limit=4, stuff_area_limit=3))
    assert [(s["id"], s["category_id"], s["area"]) for s in out.segments_info] == [(1, 2, 50)]
    assert (out.id_map[1:] == 1).all() and (out.id_map[0] == 0).all()


def reference_merge(class_logits: torch.Tensor, mask_logits: torch.Tensor, is_thing: torch.Tensor,
                    c: EvalConfig) -> tuple[np.ndarray, list[tuple]]:
    """A direct transcription of kmax-reference §4 (full-canvas masks, every query visited) as an oracle."""
    p = torch.softmax(class_logits.double(), -1)[:, :-1].numpy()
    pm = torch.softmax(mask_logits.double(), 0).numpy()
    score, label = p.max(1), p.argmax(1)
    binary = pm > c.pixel_confidence_threshold
    mscore = np.array([pm[i][binary[i]].mean() if binary[i].any() else 0.0 for i in range(len(p))])
    rank = score ** c.reorder_class_weight * mscore ** c.reorder_mask_weight
    canvas = np.zeros(pm.shape[1:], np.int64)
    segs, stuff = [], {}
    for i in sorted(range(len(p)), key=lambda i: -rank[i]):  # Python's sort is stable
        thing = bool(is_thing[label[i]])
        if score[i] < (c.thing_threshold if thing else c.stuff_threshold):
            continue
        new = binary[i] & (canvas == 0)
        if not new.sum() > c.overlap_threshold * binary[i].sum():
            continue
        if not thing and label[i] in stuff:
            canvas[new] = stuff[label[i]]
            continue
        segs.append((len(segs) + 1, int(label[i]), thing))
        canvas[new] = len(segs)
        if not thing:
            stuff[label[i]] = len(segs)
    return canvas, segs


@pytest.mark.parametrize("seed", range(12))
def test_matches_direct_transcription_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 7, 5
    is_thing = torch.tensor([True, True, False, True, False])
    cl = torch.randn(n, k + 1, generator=g) * 3
    ml = torch.randn(n, 9, 11, generator=g) * 4
    c = cfg(thing_threshold=0.5, stuff_threshold=0.4, overlap_threshold=0.6)
    out = panoptic_postprocess(cl, ml, is_thing, c)
    canvas, segs = reference_merge(cl, ml, is_thing, c)
    np.testing.assert_array_equal(out.id_map.numpy(), canvas)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in out.segments_info] == segs
    assert [s["area"] for s in out.segments_info] == [int((canvas == s[0]).sum()) for s in segs]


def test_semantic_is_soft_marginalisation():
    g = torch.Generator().manual_seed(1)
    cl, ml = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 7, 9, generator=g) * 2
    p = torch.softmax(cl.double(), -1)[:, :-1].numpy()
    pm = torch.softmax(ml.double(), 0).numpy()
    expected = np.einsum("nc,nhw->chw", p, pm).argmax(0)
    np.testing.assert_array_equal(semantic_postprocess(cl, ml).numpy(), expected)
    # Chunking over pixels gives the same map.
    np.testing.assert_array_equal(semantic_postprocess(cl, ml, chunk_pixels=5).numpy(), expected)


def test_semantic_never_predicts_void():
    cl = torch.tensor([[0.0, 0.0, 10.0], [0.0, 1.0, 10.0]])  # void dominates both queries
    ml = torch.zeros(2, 3, 3)
    ml[1, :, :2] = 5.0
    sem = semantic_postprocess(cl, ml)
    assert sem.max() <= 1
    assert (sem[:, :2] == 1).all()


def test_instance_topk_thing_pairs_and_scores():
    is_thing = torch.tensor([True, False, True])
    cl = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.1, 0.6, 0.1], [0.05, 0.9, 0.04, 0.01]]))
    regions = [region(slice(0, 3), slice(0, 10)), region(slice(3, 6), slice(0, 10)), np.zeros((H, W), bool)]
    ml = mask_logits(regions)
    inst = instance_postprocess(cl, ml, is_thing, cfg(), topk=3)
    # (query, class) pairs over thing classes 0 and 2 by probability: (1,2)=0.6, (0,0)=0.5, (1,0)=0.2
    assert inst.labels.tolist() == [2, 0, 0]
    np.testing.assert_array_equal(inst.masks[0].numpy(), regions[1])
    np.testing.assert_array_equal(inst.masks[1].numpy(), regions[0])
    mscore = torch.softmax(ml, 0)[1][torch.tensor(regions[1])].mean().item()
    assert inst.scores[0].item() == pytest.approx(0.6 * mscore, rel=1e-5)
    assert inst.scores[2].item() == pytest.approx(0.2 * mscore, rel=1e-5)
    assert math.isclose(mscore, 1.0, abs_tol=1e-6)
    # No thing classes: empty output of the right shape.
    empty = instance_postprocess(cl, ml, torch.tensor([False, False, False]), cfg())
    assert len(empty) == 0 and empty.masks.shape == (0, H, W)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="masks"):
        panoptic_postprocess(torch.zeros(3, 5), torch.zeros(4, 2, 2), IS_THING)
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_postprocess(torch.zeros(3, 6), torch.zeros(3, 2, 2), IS_THING)
