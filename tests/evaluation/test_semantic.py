"""mIoU / pixel accuracy against an independent per-class numpy computation and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remax.evaluation import ConfusionMatrix, SemanticMetrics


def reference_miou(gts, preds, num_classes, ignore):
    """Independent: per class, count intersection and union with boolean masks over all images."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = total = 0
    for g, p in zip(gts, preds):
        valid = g != ignore
        for c in range(num_classes):
            inter[c] += np.sum((g == c) & (p == c) & valid)
            union[c] += np.sum(((g == c) | (p == c)) & valid)
        correct += np.sum((g == p) & valid)
        total += valid.sum()
    ious = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    return np.mean([v for v in ious if v is not None]), ious, correct / total


def test_miou_equals_independent_numpy():
    rng = np.random.default_rng(0)
    k = 6
    gts, preds = [], []
    metric = ConfusionMatrix(k, ignore_index=255)
    for i in range(5):
        g = rng.integers(0, k - 1, size=(17, 23))  # class k-1 never in GT
        g[rng.random(g.shape) < 0.1] = 255
        p = np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, k, size=g.shape))
        p[rng.random(g.shape) < 0.05] = 255  # unclaimed (void) predictions: a miss for the GT class
        p[p == 255] = np.where(g[p == 255] == 255, 0, 255)
        gts.append(g)
        preds.append(p)
        metric.update(torch.from_numpy(g) if i % 2 else g, torch.from_numpy(p) if i % 2 else p)
    miou, ious, acc = reference_miou(gts, preds, k, 255)
    out = metric.compute()
    assert out["miou"] == pytest.approx(miou, abs=1e-12)
    assert out["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    for a, b in zip(out["per_class_iou"], ious):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12)


def test_hand_computed_case_and_absent_class():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 255, 0, 3]])
    m = SemanticMetrics(4, ignore_index=255, class_names=["a", "b", "c", "d"])
    m.update(gt, pred)
    out = m.compute()
    # class 0: inter 1, union 2; class 1: inter 2, union 3; class 2: inter 1, union 2 (void pred is a miss);
    # class 3: absent from GT and (on valid pixels) prediction -> None, excluded from the mean.
    assert out["per_class_iou"] == [0.5, 2 / 3, 0.5, None]
    assert out["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 6)
    assert out["class_names"] == ["a", "b", "c", "d"]


def test_errors_merge_and_state():
    m = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"labels \[7\] are outside"):
        m.update(np.array([[7]]), np.array([[0]]))
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    assert m.compute() == {"miou": 0.0, "per_class_iou": [None, None, None], "pixel_accuracy": 0.0}
    m.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    other = ConfusionMatrix(3)
    other.load_state_dict(m.state_dict())
    other.merge(m)
    assert other.matrix.sum() == 6 and other.compute() == m.compute()
