"""ReMask (Eq. 1-2) and ReClass (Eq. 3-4) against float64 loop oracles, their options and their gradients."""

import numpy as np
import pytest
import torch

from loss_helpers import K, target_a, target_b
from remax.losses.matcher import hungarian_match
from remax.losses.pq_style import one_hot_class_targets
from remax.losses.relaxations import reclass_targets, remask
from remax.losses.targets import build_dense_targets

N, P = 4, 16


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _inputs(requires_grad=False):
    m = torch.randn(2, N, P, requires_grad=requires_grad)
    z = torch.randn(2, N, K + 1, requires_grad=requires_grad)
    s = torch.randn(2, K, P, requires_grad=requires_grad)
    return m, z, s


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_remask_matches_oracle(activation):
    m, z, s = _inputs()
    got = remask(m, z, s, activation=activation)
    md, zd, sd = m.double().numpy(), z.double().numpy(), s.double().numpy()
    exp = np.zeros_like(md)
    for b in range(2):
        for n in range(N):
            pn = _sig(zd[b, n, :K]) if activation == "sigmoid" else _softmax(zd[b, n, :K])  # void excluded
            for x in range(P):
                sx = _sig(sd[b, :, x]) if activation == "sigmoid" else _softmax(sd[b, :, x])
                exp[b, n, x] = md[b, n, x] + sum(sx[k] * pn[k] for k in range(K)) * md[b, n, x]
    np.testing.assert_allclose(got.numpy(), exp, rtol=1e-5, atol=1e-6)


def test_remask_with_ground_truth_semantic_mask():
    m, z, _ = _inputs()
    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    labels = dense.semantic()
    got = remask(m, z, None, gt_semantic=labels)
    exp = m.double().numpy().copy()
    for b in range(2):
        for n in range(N):
            for x in range(P):
                c = int(labels[b, x])
                if c < K:  # one-hot S: only the pixel's class; void rows are all zero
                    exp[b, n, x] += _sig(float(z[b, n, c])) * float(m[b, n, x])
    np.testing.assert_allclose(got.numpy(), exp, rtol=1e-5, atol=1e-6)


def test_remask_gradients():
    m, z, s = _inputs(requires_grad=True)
    remask(m, z, s).sum().backward()
    assert s.grad is None, "stop-gradient: the panoptic side must not reach the semantic logits"
    assert z.grad is not None and z.grad[..., :K].abs().sum() > 0 and z.grad[..., K].abs().sum() == 0
    m, z, s = _inputs(requires_grad=True)
    remask(m, z, s, stop_gradient=False).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    m, z, s = _inputs(requires_grad=True)
    remask(m, z, s, detach_class=True).sum().backward()
    assert z.grad is None and s.grad is None and m.grad.abs().sum() > 0


def _reclass_setup():
    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    m = torch.randn(2, N, P) * 2
    z = torch.randn(2, N, K + 1)
    matching = hungarian_match(z, m.softmax(1), dense)
    y = one_hot_class_targets(matching, dense, K + 1)
    return dense, m, matching, y


def _oracle_y_m(m, labels, activation):
    """y_m[n, c] = Σ_x σ(m[n, x]) S[x, c] / Σ_x S[x, c], by loops."""
    probs = _sig(m) if activation == "sigmoid" else np.exp(m) / np.exp(m).sum(0, keepdims=True)
    y_m = np.zeros((N, K + 1))
    for c in range(K):
        area = sum(1 for x in range(P) if labels[x] == c)
        for n in range(N):
            if area:
                y_m[n, c] = sum(probs[n, x] for x in range(P) if labels[x] == c) / area
    return y_m


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("soften_unmatched", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_reclass_matches_oracle(activation, soften_unmatched, normalize):
    dense, m, matching, y = _reclass_setup()
    eta = 0.3
    got = reclass_targets(y, m, dense, matching, eta, activation, soften_unmatched, normalize)
    labels = dense.semantic()
    for b in range(2):
        y_m = _oracle_y_m(m[b].double().numpy(), labels[b].tolist(), activation)
        for n in range(N):
            yn = y[b, n].double().numpy()
            exp = eta * y_m[n] + (1 - eta * y_m[n]) * yn
            if normalize:
                exp = exp / exp.sum()
            if not soften_unmatched and matching.segment_of_query[b, n] < 0:
                exp = yn
            np.testing.assert_allclose(got[b, n].numpy(), exp, rtol=1e-5, atol=1e-7)
            if matching.segment_of_query[b, n] >= 0 and not normalize:
                assert got[b, n, int(yn.argmax())] == pytest.approx(1.0)  # the true class keeps weight 1


def test_reclass_eta_zero_is_exactly_one_hot():
    dense, m, matching, y = _reclass_setup()
    for unmatched in (False, True):
        for normalize in (False, True):
            assert torch.equal(reclass_targets(y, m, dense, matching, 0.0, "sigmoid", unmatched, normalize), y)


def test_reclass_is_detached():
    dense, m, matching, y = _reclass_setup()
    m.requires_grad_(True)
    assert not reclass_targets(y, m, dense, matching, 0.1).requires_grad
