"""Hungarian matcher against brute force over all assignments, with an independent numpy similarity."""

import itertools

import numpy as np
import torch

from loss_helpers import make_target, oracle_masks, softmax
from remax.losses.matcher import hungarian_match, similarity
from remax.losses.targets import build_dense_targets


def _oracle_similarity(logits, mask_logits, masks):
    """S[n, j] = p_n(c_j) * Dice(softmax mask with void removed, g_j), by loops in float64."""
    probs = softmax(logits, -1)
    mprob = softmax(mask_logits, 0)  # N×P over queries
    valid = np.zeros(mprob.shape[1], dtype=bool)
    for _, m in masks:
        valid |= m
    N = len(logits)
    S = np.zeros((N, len(masks)))
    for n in range(N):
        pm = mprob[n] * valid
        for j, (c, g) in enumerate(masks):
            inter = sum(pm[x] for x in range(len(g)) if g[x])
            S[n, j] = probs[n, c] * inter / ((pm.sum() + g.sum()) / 2 + 1e-5)
    return S


def test_matcher_equals_brute_force():
    rng = np.random.default_rng(0)
    K, h, w = 3, 3, 4
    cases = 0
    for trial in range(120):
        N = int(rng.integers(1, 5))
        n_seg = int(rng.integers(1, 6))
        segments = [(int(rng.integers(0, K)), bool(rng.random() < 0.6), bool(rng.random() < 0.15))
                    for _ in range(n_seg)]
        small = rng.integers(0, n_seg + 1, size=(h, w))
        target = make_target(small, segments)
        masks = [(c, m.reshape(-1)) for c, m in oracle_masks(small, segments)]
        dense = build_dense_targets([target], (h, w), K)
        M = len(masks)
        assert int(dense.segment_valid.sum()) == M
        logits = rng.normal(size=(N, K + 1)) * 2
        mask_logits = rng.normal(size=(N, h * w)) * 2
        lt = torch.tensor(logits, dtype=torch.float32)[None]
        mt = torch.tensor(mask_logits, dtype=torch.float32)[None].softmax(1)
        match = hungarian_match(lt, mt, dense)
        if M == 0:
            assert (match.segment_of_query == -1).all()
            continue
        # Oracle similarity in the oracle's mask order; map dense indices to it through the mask contents.
        S = _oracle_similarity(logits, mask_logits, masks)
        order = []
        for j in range(M):
            m = dense.masks[0, j].bool().numpy()
            order.append(next(i for i, (c, g) in enumerate(masks) if np.array_equal(g, m)))
        np.testing.assert_allclose(similarity(lt, mt, dense)[0, :, :M].numpy(), S[:, order], rtol=1e-4, atol=1e-6)
        got = sum(S[int(match.query_of_segment[0, j]), order[j]] for j in range(M) if match.query_of_segment[0, j] >= 0)
        assert int((match.query_of_segment[0] >= 0).sum()) == min(N, M)
        if N >= M:
            best = max(sum(S[q, j] for j, q in enumerate(p)) for p in itertools.permutations(range(N), M))
        else:
            best = max(sum(S[n, j] for n, j in enumerate(p)) for p in itertools.permutations(range(M), N))
        assert abs(got - best) < 1e-5 * max(1.0, best)
        # Consistency of both directions of the assignment.
        for n in range(N):
            j = int(match.segment_of_query[0, n])
            if j >= 0:
                assert int(match.query_of_segment[0, j]) == n
        cases += 1
    assert cases >= 100


def test_matcher_batch_with_padding():
    rng = np.random.default_rng(1)
    from loss_helpers import K, target_a, target_b

    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    logits = torch.randn(2, 5, K + 1)
    masks = torch.randn(2, 5, 16).softmax(1)
    match = hungarian_match(logits, masks, dense)
    assert (match.query_of_segment[0] >= 0).sum() == 4
    assert (match.query_of_segment[1] >= 0).sum() == 2
    assert (match.query_of_segment[1, 2:] == -1).all()  # padding slots never matched
    del rng
