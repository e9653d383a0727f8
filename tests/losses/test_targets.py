"""Dense targets: strided sub-sampling, thing / stuff / crowd / void handling, padding and stride checks."""

import numpy as np
import pytest
import torch

from loss_helpers import K, SEGMENTS_A, SEGMENTS_B, SMALL_A, SMALL_B, oracle_masks, target_a, target_b
from remax.losses.targets import build_dense_targets, subsample_stride


def test_subsample_stride():
    assert subsample_stride((641, 641), (161, 161)) == 4
    assert subsample_stride((1025, 2049), (257, 513)) == 4
    assert subsample_stride((1025, 2049), (33, 65)) == 32
    assert subsample_stride((64, 64), (16, 16)) == 4  # multiple-of-stride inputs work too
    assert subsample_stride((13, 13), (13, 13)) == 1
    with pytest.raises(ValueError, match="cannot be strided"):
        subsample_stride((641, 641), (100, 100))
    with pytest.raises(ValueError, match="cannot be strided"):
        subsample_stride((641, 641), (161, 81))


def test_dense_masks_match_oracle():
    dense = build_dense_targets([target_a(), target_b()], (4, 4), K)
    assert dense.masks.shape == (2, 4, 16)
    for b, (small, segs) in enumerate([(SMALL_A, SEGMENTS_A), (SMALL_B, SEGMENTS_B)]):
        expected = oracle_masks(small, segs)
        n = int(dense.segment_valid[b].sum())
        assert n == len(expected)
        got = {(int(dense.classes[b, j]), tuple(dense.masks[b, j].bool().tolist())) for j in range(n)}
        want = {(c, tuple(m.reshape(-1).tolist())) for c, m in expected}
        assert got == want
        # Padding slots: no pixels, void class.
        assert dense.masks[b, n:].sum() == 0
        assert (dense.classes[b, n:] == K).all()
        void = np.ones(16, dtype=bool)
        for _, m in expected:
            void &= ~m.reshape(-1)
        assert torch.equal(~dense.valid[b], torch.from_numpy(void))
    # Image A: the vanishing segment 5 is absent, the crowd pixel (1, 3) and the unlabeled (0, 3) are void.
    assert not dense.valid[0, 3] and not dense.valid[0, 7]
    # Stuff segments 4 and 6 (class 2) are one mask of area 7.
    sem = dense.semantic()[0].reshape(4, 4)
    assert int((sem == 2).sum()) == 7 and int((sem == K).sum()) == 2
    assert dense.areas[0].sum() == 14
    assert torch.equal(dense.class_areas()[0], torch.tensor([4.0, 3.0, 7.0]))
    inv = dense.inverse_area()[0]
    assert inv[0] == pytest.approx(16 / 4) and inv[3] == 0


def test_bad_inputs_raise_clear_errors():
    t = target_a()
    t.id_map[0, 0] = 99
    with pytest.raises(ValueError, match="id 99"):
        build_dense_targets([t], (4, 4), K)
    t = target_a()
    t.classes[0] = 7
    with pytest.raises(ValueError, match="class 7"):
        build_dense_targets([t], (4, 4), K)


def test_empty_image():
    t = target_b()
    t.id_map.zero_()
    dense = build_dense_targets([t], (4, 4), K)
    assert dense.masks.shape == (1, 1, 16) and not dense.valid.any()  # one padding slot
    assert not dense.segment_valid.any() and dense.masks.sum() == 0 and dense.classes[0, 0] == K
