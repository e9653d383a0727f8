"""The low-resolution merge (query pruning + upsampling of the kept queries) against the definition: every query
upsampled to the image size, then :func:`panoptic_postprocess` / semantic / instance post-processing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from remax.config import EvalConfig
from remax.inference.mask_probabilities import (PRUNE_MARGIN, BufferedUpsample, active_queries, lowres_support,
                                                max_logit_gap, query_probabilities)
from remax.inference.postprocess import (instance_postprocess, panoptic_postprocess, panoptic_postprocess_lowres,
                                         semantic_postprocess)
from remax.inference.predictor import Predictor, mask_logits_to_image, resize_alignment

from inference_helpers import CATEGORIES, INPUT, nano_config, nano_model

IS_THING = torch.tensor([c.isthing for c in CATEGORIES])


def _blobs(n: int, h: int, w: int, seed: int, scale: float = 12.0) -> torch.Tensor:
    """Low-res logits with spatial structure: each query a smooth bump somewhere, plus noise (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h).float()[:, None]
    xs = torch.arange(w).float()[None, :]
    cy = torch.rand(n, generator=g) * h
    cx = torch.rand(n, generator=g) * w
    r = 2 + torch.rand(n, generator=g) * h / 3
    d2 = (ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2
    return scale * (1 - d2 / r[:, None, None] ** 2) + torch.randn(n, h, w, generator=g)


def _class_logits(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(n, k + 1, generator=g) * 3


def _same(a, b) -> None:
    assert torch.equal(a.id_map, b.id_map)
    assert a.segments_info == b.segments_info


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("geometry", [((129, 129), (128, 128), (128, 128)),  # fits: padded by one pixel
                                      ((129, 129), (96, 128), (150, 200)),  # resized back up
                                      ((129, 129), (128, 72), (64, 36))])  # resized back down
def test_lowres_merge_equals_full_resolution_merge(seed, geometry):
    input_size, valid, original = geometry
    lowres = _blobs(24, 33, 33, seed)
    logits = _class_logits(24, len(CATEGORIES), seed)
    cfg = EvalConfig(thing_threshold=0.3, stuff_threshold=0.3)

    def up(x):
        return mask_logits_to_image(x, input_size, valid, original)

    full = panoptic_postprocess(logits, up(lowres), IS_THING, cfg)
    rows, cols = lowres_support(valid, input_size, (33, 33))
    fast = panoptic_postprocess_lowres(logits, lowres, up, original, IS_THING, cfg,
                                       active=active_queries(lowres, rows=rows, cols=cols))
    assert full.segments_info, "the case must keep segments to be a test"
    _same(full, fast)


def test_pruning_drops_far_queries_and_keeps_near_ones():
    lowres = torch.zeros(4, 8, 8)
    lowres[0] = 10.0  # the winner everywhere
    lowres[1] = 10.0 - PRUNE_MARGIN + 1  # within the margin: kept
    lowres[2] = 10.0 - PRUNE_MARGIN - 5  # far below everywhere: dropped
    lowres[3] = -100.0
    lowres[3, 7, 7] = 50.0  # wins one corner pixel only, which the crop below excludes
    assert active_queries(lowres).tolist() == [0, 1, 3]
    assert active_queries(lowres, rows=4, cols=4).tolist() == [0, 1]


def test_pruned_probabilities_match_softmax_over_all_queries():
    lowres = _blobs(32, 17, 17, seed=3, scale=40.0)
    lowres[20:] -= 100.0  # unused queries, far below the others everywhere (as in a trained model)
    active = active_queries(lowres)
    assert active.tolist() == list(range(20))

    def up(x):
        return mask_logits_to_image(x, (65, 65), (64, 64), (64, 64))

    wanted = active[:5]
    probs = query_probabilities(lowres, up, wanted, active=active, chunk=3)  # several chunks
    full = up(lowres)
    reference = full.softmax(dim=0)
    # Bilinear resizing of a few maps and of all 32 can round differently (one ulp of the logit, seen with one
    # thread on an Intel Xeon), and a softmax turns an input change d into a relative change of about
    # d * (1 + P) of P. Bound: two ulps of |l_i| and of the P-weighted |l_j|, plus a few roundings.
    eps = torch.finfo(torch.float32).eps
    spread = (reference * full.abs()).sum(dim=0)
    bound = reference[wanted] * (2 * eps * (full[wanted].abs() + spread) + 8 * eps) + 1e-7
    err = (probs.probs - reference[wanted]).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"
    pruned = sorted(set(range(32)) - set(active.tolist()))
    assert float(up(lowres).softmax(dim=0)[pruned].max()) < 1e-12


def test_no_candidate_skips_the_masks():
    lowres = _blobs(8, 9, 9, seed=0)
    logits = torch.zeros(8, len(CATEGORIES) + 1)
    logits[:, -1] = 20.0  # every query is void: nothing passes

    def up(x):
        raise AssertionError("no mask should be upsampled")

    out = panoptic_postprocess_lowres(logits, lowres, up, (40, 40), IS_THING, EvalConfig())
    assert out.segments_info == [] and out.id_map.shape == (40, 40) and int(out.id_map.abs().sum()) == 0


@pytest.mark.parametrize("protocol", ["remax", "reference"])
def test_predictor_equals_full_resolution_postprocessing(protocol, one_thread):
    """The Predictor (low-res path, all three outputs) against upsample-everything + the definitions."""
    cfg = nano_config()
    cfg.eval = dataclasses.replace(cfg.eval, protocol=protocol)
    model = nano_model(cfg)
    predictor = Predictor(model, cfg, CATEGORIES)
    g = torch.Generator().manual_seed(5)
    images = [torch.randint(0, 256, (3, 100, 129), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 200, 90), generator=g, dtype=torch.uint8)]
    results = predictor.predict_tensors(images)
    outputs, sizes = predictor.forward_batch(images)
    for i, img in enumerate(images):
        original = tuple(img.shape[1:])
        valid = sizes[i]
        if protocol == "reference":
            from remax.preprocessing import reference_crop

            valid = reference_crop(*original, predictor.input_size)
        masks = mask_logits_to_image(outputs["pred_masks"][i], INPUT, valid, original, protocol)
        logits = outputs["pred_logits"][i]
        pan = panoptic_postprocess(logits, masks, predictor.is_thing, cfg.eval)
        assert pan.segments_info, "the case must keep segments to be a test"
        assert torch.equal(results[i].id_map, pan.id_map)
        assert [s["id"] for s in results[i].segments_info] == [s["id"] for s in pan.segments_info]
        assert [s["area"] for s in results[i].segments_info] == [s["area"] for s in pan.segments_info]
        assert torch.equal(results[i].semantic, semantic_postprocess(logits, masks))
        inst = instance_postprocess(logits, masks, predictor.is_thing, cfg.eval)
        assert torch.equal(results[i].instances.masks, inst.masks)
        assert torch.equal(results[i].instances.labels, inst.labels)
        torch.testing.assert_close(results[i].instances.scores, inst.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("protocol", ["remax", "reference"])
@pytest.mark.parametrize("valid, original", [((128, 128), (128, 128)), ((96, 128), (150, 200)), ((128, 72), (64, 36))])
def test_buffered_upsample_is_bitwise_the_predictor_resize(protocol, valid, original):
    lowres = _blobs(10, 33, 33, seed=1)
    up = BufferedUpsample((129, 129), valid, original, *resize_alignment((129, 129), protocol), channels=4,
                          device=torch.device("cpu"))
    reference = mask_logits_to_image(lowres, (129, 129), valid, original, protocol)
    for start in (0, 4, 8):  # chunks of 4, 4 and 2 through the same buffers
        got = up(lowres[start:start + 4])
        if valid == original:  # one resize: the kernel treats channels alike, bitwise equal
            assert torch.equal(got, reference[start:start + 4])
        else:  # the second resize's kernel vectorises over channels: equal up to float32 rounding
            torch.testing.assert_close(got, reference[start:start + 4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gap", [None, 0.0, 1e9])  # two passes / one shifted pass / refused shift (two passes)
def test_one_pass_shifted_softmax_matches_softmax(gap):
    lowres = _blobs(32, 17, 17, seed=4, scale=20.0)

    def up(x):
        return mask_logits_to_image(x, (65, 65), (60, 64), (90, 96))

    shift_gap = None if gap is None else max(gap, max_logit_gap(lowres))
    assert max_logit_gap(lowres) >= 0
    wanted = torch.tensor([3, 7, 30])
    probs = query_probabilities(lowres, up, wanted, chunk=5, shift_gap=shift_gap)
    torch.testing.assert_close(probs.probs, up(lowres).softmax(dim=0)[wanted], rtol=1e-5, atol=1e-7)


def test_max_logit_gap_bounds_the_shift():
    lowres = _blobs(16, 17, 17, seed=2, scale=30.0)

    def up(x):
        return mask_logits_to_image(x, (65, 65), (64, 64), (100, 80))

    true_gap = float((up(lowres.amax(dim=0, keepdim=True))[0] - up(lowres).amax(dim=0)).max())
    assert 0 <= true_gap <= max_logit_gap(lowres) + 1e-4



def test_pruning_plan_agrees_with_the_bounds():
    from remax.inference.mask_probabilities import pruning_plan

    small = _blobs(12, 9, 9, seed=0, scale=3.0)  # range under the margin: everything kept, no 3×3 bounds
    keep, gap = pruning_plan(small[None])
    assert bool(keep.all()) and gap >= max_logit_gap(small) - 1e-6
    wide = _blobs(12, 9, 9, seed=0, scale=3.0)
    wide[6:] -= 200.0  # far below: pruned by the 3×3 bounds
    keep, gap = pruning_plan(wide[None])
    assert keep[0].nonzero().squeeze(1).tolist() == active_queries(wide).tolist() == list(range(6))
    assert gap == pytest.approx(max_logit_gap(wide))
