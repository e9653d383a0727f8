"""``loss.mask_loss_stride``: supervising the mask terms on upsampled logits, between the stride-4 grid points."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from loss_helpers import K, target_a, target_b
from remax.config import LossConfig, RemaxConfig
from remax.losses import SetCriterion, build_dense_targets
from remax.losses.targets import supervision_size
from remax.structures import PanopticTarget
from test_criterion import make_outputs

# Only the mask terms: instance discrimination and the semantic heads keep their own resolution.
MASK_TERMS = LossConfig(instance_discrimination_weight=0.0, semantic_weight=0.0)
MASK_PREFIXES = ("loss_pq_class/", "loss_pq_dice/", "loss_mask_id/")


@pytest.mark.parametrize("input_size, mask_size, stride, expected", [
    ((129, 129), (33, 33), 4, ((33, 33), True)),
    ((129, 129), (33, 33), 2, ((65, 65), True)),
    ((129, 129), (33, 33), 1, ((129, 129), True)),
    ((641, 481), (161, 121), 1, ((641, 481), True)),
    ((128, 64), (32, 16), 2, ((64, 32), False)),  # an even input keeps the half-pixel geometry
])
def test_supervision_size(input_size, mask_size, stride, expected):
    assert supervision_size(input_size, mask_size, stride) == expected


@pytest.mark.parametrize("stride", [3, 8, 0])
def test_supervision_size_rejects_strides_that_do_not_divide(stride):
    with pytest.raises(ValueError, match="mask_loss_stride"):
        supervision_size((129, 129), (33, 33), stride)


def _upsampled(outputs, size):
    """The same outputs with every mask and per-stage semantic map upsampled (differentiably) to ``size``."""
    up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    heads = [outputs] + outputs["aux_outputs"]
    new = [dict(h, pred_masks=up(h["pred_masks"]), pixel_embeddings=None) for h in heads]
    out = new[0]
    out["aux_outputs"] = new[1:]
    out["remask_semantic_logits"] = [up(s) for s in outputs["remask_semantic_logits"]]
    return out


@pytest.mark.parametrize("remax_on", [True, False])
def test_finer_stride_equals_the_loss_on_logits_upsampled_by_hand(remax_on):
    """Stride 1 on 4×4 logits of a 13×13 input = the stride-native loss on the logits upsampled to 13×13, with the
    ground truth taken at every input pixel (segment 5 of target A lives only between grid points)."""
    cfg = RemaxConfig(enabled=remax_on, remask_semantic_weight=0.0)
    outputs, leaves = make_outputs(semantic=False)
    targets = [target_a(), target_b()]
    fine = dataclasses.replace(MASK_TERMS, mask_loss_stride=1)

    total, bd = SetCriterion(fine, cfg, K)(outputs, targets)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    ref_total, ref_bd = SetCriterion(fine, cfg, K)(_upsampled(outputs, (13, 13)), targets)
    ref_grads = torch.autograd.grad(ref_total, leaves, allow_unused=True)

    terms = [k for k in bd if k.startswith(MASK_PREFIXES)]
    assert len(terms) == 12 and set(terms) == {k for k in ref_bd if k.startswith(MASK_PREFIXES)}
    for k in terms:
        assert bd[k] == pytest.approx(ref_bd[k], rel=1e-6, abs=1e-7), k
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # And it is a different objective from the stride-4 one: the between-grid pixels count.
    coarse_total, _ = SetCriterion(MASK_TERMS, cfg, K)(outputs, targets)
    assert abs(coarse_total.item() - total.item()) > 1e-3


def test_sub_grid_boundary_is_supervised_only_at_a_finer_stride():
    """The stride-4 loss prefers the prediction that is most confident on the grid points; the stride-1 loss
    prefers the one whose interpolated boundary falls between the right input pixels."""
    # 1×13 strip (1×4 grid): segment 1 on input columns 0..6, segment 2 on 7..12; grid points at 0, 4, 8, 12.
    target = PanopticTarget(id_map=torch.tensor([[1] * 7 + [2] * 6]), classes=torch.tensor([0, 2]),
                            is_thing=torch.tensor([True, False]), is_crowd=torch.tensor([False, False]))
    assert build_dense_targets([target], (1, 4), K).pixel_segment.tolist() == [[0, 0, 1, 1]]

    def outputs(at_grid_2: float):
        # Query 0 holds segment 1, query 1 segment 2. Their logit difference is 16 on grid point 1 (input 4) and
        # 2·at_grid_2 on grid point 2 (input 8), so the interpolated boundary sits at input 4 + 4·16/(16 - 2·g):
        # at 6.0 for g = -8 (pixel 6 is a tie), at 6.67 for g = -4 (every pixel on its side).
        q0 = torch.tensor([[8.0, 8.0, at_grid_2, -8.0]])
        masks = torch.stack([q0, -q0]).unsqueeze(0)  # 1×2×1×4
        logits = torch.full((1, 2, K + 1), -5.0)
        logits[0, 0, 0] = logits[0, 1, 2] = 5.0
        return {"pred_logits": logits, "pred_masks": masks}

    loss_cfg = dataclasses.replace(MASK_TERMS, deep_supervision=False)
    coarse = SetCriterion(loss_cfg, RemaxConfig(enabled=False), K)
    fine = SetCriterion(dataclasses.replace(loss_cfg, mask_loss_stride=1), RemaxConfig(enabled=False), K)
    confident, placed = outputs(-8.0), outputs(-4.0)
    mask_id = lambda crit, out: crit(out, [target])[1]["loss_mask_id/final"]  # noqa: E731
    assert mask_id(coarse, confident) < mask_id(coarse, placed)
    assert mask_id(fine, placed) < mask_id(fine, confident)
    # By hand: the stride-1 mask-ID loss of "confident" is dominated by the tie at pixel 6 (log 2 over 13 pixels).
    assert mask_id(fine, confident) == pytest.approx(0.3 * (0.6931 + 2 * 3.35e-4) / 13, rel=2e-3)
