"""Each loss term against an independent float64 oracle written with explicit loops (void and crowd included)."""

import dataclasses

import numpy as np
import pytest
import torch

from loss_helpers import K, SEGMENTS_A, SEGMENTS_B, SMALL_A, SMALL_B, dense_index_of, softmax, target_a, target_b
from remax.losses.instance_discrimination import gumbel_topk_pixels, instance_discrimination_loss
from remax.losses.mask_id import mask_id_loss
from remax.losses.matcher import Matching
from remax.losses.pq_style import pq_style_loss
from remax.losses.semantic import semantic_loss
from remax.losses.targets import build_dense_targets

P = 16


def _oracle_masks(small, segments):
    """Seg id -> (class, mask) with stuff merged: the mask of a stuff segment is its class's union."""
    out = {}
    for i, (c, thing, crowd) in enumerate(segments):
        if crowd:
            continue
        if thing:
            m = (small == i + 1).reshape(-1)
        else:
            m = np.isin(small, [j + 1 for j, s in enumerate(segments) if s[0] == c and not s[1]]).reshape(-1)
        if m.any():
            out[i + 1] = (c, m)
    return out


# Hand-chosen matchings: query -> segment id (image A has 4 GT masks, image B 2).
PAIRS_A = {0: 1, 2: 4, 3: 7, 4: 2}  # query 1 unmatched
PAIRS_B = {1: 1, 4: 2}
PAIRS_A_SHORT = {0: 1, 1: 6, 2: 2}  # N = 3 < M = 4: segment 7 stays unmatched (its pixel becomes void)


def _setup(pairs_per_image, N, seed=0):
    torch.manual_seed(seed)
    targets = [target_a(), target_b()][: len(pairs_per_image)]
    smalls = [(SMALL_A, SEGMENTS_A), (SMALL_B, SEGMENTS_B)][: len(pairs_per_image)]
    dense = build_dense_targets(targets, (4, 4), K)
    B, M = dense.classes.shape
    qos = torch.full((B, M), -1, dtype=torch.long)
    soq = torch.full((B, N), -1, dtype=torch.long)
    oracle_pairs = []
    for b, pairs in enumerate(pairs_per_image):
        small, segs = smalls[b]
        om = _oracle_masks(small, segs)
        oracle_pairs.append({q: om[s] for q, s in pairs.items()})
        for q, s in pairs.items():
            j = dense_index_of(dense, b, small, s)
            qos[b, j] = q
            soq[b, q] = j
    logits = torch.randn(B, N, K + 1) * 2
    mask_logits = torch.randn(B, N, P) * 2
    return dense, Matching(qos, soq), oracle_pairs, logits, mask_logits


def _oracle_pq(logits, mask_logits, pairs, alpha):
    N = logits.shape[0]
    logp = np.log(softmax(logits, -1))
    m = softmax(mask_logits, 0)
    lv = np.zeros(P, dtype=bool)
    for _, g in pairs.values():
        lv |= g
    cls_sum, dice_sum = 0.0, 0.0
    for n in range(N):
        if n in pairs:
            c, g = pairs[n]
            inter = sum(m[n, x] for x in range(P) if g[x] and lv[x])
            psum = sum(m[n, x] for x in range(P) if lv[x])
            area = g.sum()
            dice = inter / ((psum + area) / 2 + 1e-5)
            cls_sum += alpha * max(dice, 1e-5) * -logp[n, c]
            dice_sum += (1 - (2 * inter + 1) / (psum + area + 1)) * max(np.exp(logp[n, c]), 1e-5)
        else:
            r = sum(m[n, x] for x in range(P) if not lv[x]) / sum(m[n])
            cls_sum += (1 - alpha) * max(r, 1e-5) * -logp[n, K]
    return cls_sum / N, dice_sum * alpha / N


@pytest.mark.parametrize("pairs,N", [([PAIRS_A, PAIRS_B], 5), ([PAIRS_A_SHORT], 3)])
def test_pq_style_loss(pairs, N):
    dense, matching, opairs, logits, mask_logits = _setup(pairs, N)
    cls, dice = pq_style_loss(logits, mask_logits.softmax(1), dense, matching, alpha=0.75)
    exp = [_oracle_pq(logits[b].double().numpy(), mask_logits[b].double().numpy(), opairs[b], 0.75)
           for b in range(len(pairs))]
    assert cls.item() == pytest.approx(np.mean([e[0] for e in exp]), rel=1e-5)
    assert dice.item() == pytest.approx(np.mean([e[1] for e in exp]), rel=1e-5)


def test_pq_style_soft_class_targets():
    """A soft target enters the class term as −Σ ŷ log p, with the same per-query weights."""
    dense, matching, opairs, logits, mask_logits = _setup([PAIRS_A], 5)
    soft = torch.rand(1, 5, K + 1)
    cls, _ = pq_style_loss(logits, mask_logits.softmax(1), dense, matching, 0.75, class_targets=soft)
    lg, ml = logits[0].double().numpy(), mask_logits[0].double().numpy()
    logp = np.log(softmax(lg, -1))
    m = softmax(ml, 0)
    lv = np.zeros(P, dtype=bool)
    for _, g in opairs[0].values():
        lv |= g
    total = 0.0
    for n in range(5):
        if n in opairs[0]:
            _, g = opairs[0][n]
            inter, psum = (m[n] * g * lv).sum(), (m[n] * lv).sum()
            w = 0.75 * max(inter / ((psum + g.sum()) / 2 + 1e-5), 1e-5)
        else:
            w = 0.25 * max((m[n] * ~lv).sum() / m[n].sum(), 1e-5)
        total += w * -(soft[0, n].double().numpy() * logp[n]).sum()
    assert cls.item() == pytest.approx(total / 5, rel=1e-5)


def _oracle_mask_id(mask_logits, pairs, activation, reduction):
    N = mask_logits.shape[0]
    owner = {}
    for q, (_, g) in pairs.items():
        for x in np.flatnonzero(g):
            owner[x] = q
    losses = []
    for x, t in owner.items():
        if activation == "softmax":
            losses.append(-np.log(softmax(mask_logits[:, x], 0)[t]))
        else:
            s = 1 / (1 + np.exp(-mask_logits[:, x]))
            bce = [-(np.log(s[n]) if n == t else np.log(1 - s[n])) for n in range(N)]
            losses.append(sum(bce) if reduction == "sum" else sum(bce) / N)
    if activation == "sigmoid" and reduction == "matched":  # per matched query: mean BCE over labelled pixels
        per_query = []
        for q, (_, g) in pairs.items():
            s = 1 / (1 + np.exp(-mask_logits[q]))
            per_query.append(np.mean([-np.log(s[x]) if g[x] else -np.log(1 - s[x]) for x in owner]))
        return np.mean(per_query)
    return np.mean(losses)


@pytest.mark.parametrize("activation,reduction", [("softmax", "sum"), ("sigmoid", "sum"), ("sigmoid", "mean"),
                                                  ("sigmoid", "matched")])
@pytest.mark.parametrize("pairs,N", [([PAIRS_A, PAIRS_B], 5), ([PAIRS_A_SHORT], 3)])
def test_mask_id_loss(activation, reduction, pairs, N):
    dense, matching, opairs, _, mask_logits = _setup(pairs, N)
    got = mask_id_loss(mask_logits, dense, matching, activation, reduction)
    exp = np.mean([_oracle_mask_id(mask_logits[b].double().numpy(), opairs[b], activation, reduction)
                   for b in range(len(pairs))])
    assert got.item() == pytest.approx(exp, rel=1e-5)


def test_instance_discrimination_loss():
    """With K >= P every labeled pixel is sampled, so the loss is deterministic."""
    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    emb = torch.nn.functional.normalize(torch.randn(2, 6, 4, 4), dim=1)
    got = instance_discrimination_loss(emb, dense, sample_k=64, sample_temperature=1.5, temperature=0.3)
    per_image = []
    for b, (small, segs) in enumerate([(SMALL_A, SEGMENTS_A), (SMALL_B, SEGMENTS_B)]):
        masks = list(_oracle_masks(small, segs).values())
        label = np.full(P, -1)
        for i, (_, g) in enumerate({g.tobytes(): (c, g) for c, g in masks}.values()):  # stuff deduplicated
            label[g] = i
        e = emb[b].reshape(6, P).double().numpy()
        valid = np.flatnonzero(label >= 0)
        losses = []
        for k in valid:
            logits = np.array([e[:, k] @ e[:, j] / 0.3 for j in valid])
            logp = np.log(softmax(logits, 0))
            same = np.array([label[j] == label[k] for j in valid], dtype=float)
            losses.append(-(same / same.sum() * logp).sum())
        per_image.append(np.mean(losses))
    assert got.item() == pytest.approx(np.mean(per_image), rel=1e-5)


def test_gumbel_sampler_follows_inverse_area():
    """With k = 1, pixel x is drawn with probability ∝ inv_area(x)^T (void never)."""
    dense = build_dense_targets([target_a()], (4, 4), K)
    R = 20000
    big = dataclasses.replace(dense, **{f: getattr(dense, f).expand(R, *getattr(dense, f).shape[1:])
                                        for f in ("masks", "classes", "segment_valid", "pixel_segment", "areas")})
    g = torch.Generator().manual_seed(0)
    idx, valid = gumbel_topk_pixels(big, 1, 1.5, g)
    assert valid.all()
    freq = torch.bincount(idx[:, 0], minlength=P).double() / R
    w = dense.inverse_area()[0].double() ** 1.5 * dense.valid[0]
    np.testing.assert_allclose(freq.numpy(), (w / w.sum()).numpy(), atol=0.015)
    # More samples than labeled pixels: every labeled pixel appears once, void samples are flagged.
    idx, valid = gumbel_topk_pixels(dense, 16, 1.5, g)
    assert sorted(idx[0][valid[0]].tolist()) == torch.nonzero(dense.valid[0]).flatten().tolist()


def test_semantic_loss():
    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    logits = torch.randn(2, K, 4, 4)
    full = semantic_loss(logits, dense, sample_k=0)
    per_image = []  # the reference's rule: a mean per image (A has 13 labelled pixels, B 13), then over images
    for b, (small, segs) in enumerate([(SMALL_A, SEGMENTS_A), (SMALL_B, SEGMENTS_B)]):
        lp = np.log(softmax(logits[b].reshape(K, P).double().numpy(), 0))
        nll = [-lp[segs[seg_id - 1][0], x] for x, seg_id in enumerate(small.reshape(-1).tolist())
               if seg_id != 0 and not segs[seg_id - 1][2]]
        per_image.append(np.mean(nll))
    assert full.item() == pytest.approx(np.mean(per_image), rel=1e-5)
    # Sampling at least P pixels per image takes every labeled pixel once: the same value.
    sampled = semantic_loss(logits, dense, sample_k=64, sample_temperature=2.0)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        semantic_loss(torch.randn(2, K + 1, 4, 4), dense)
