"""The kMaX-DeepLab objective against the reference's rules, written out by hand.

Each rule of the authors' criterion gets its own hand-computed case: the PQ-style weights of every auxiliary output
come from the *final* output; per-image sums are divided by the number of entries whose loss is not exactly zero;
the semantic loss is a mean per image, then over images; the sigmoid mask-ID loss at initialisation for each
normalisation. Then the whole ReMaX-off objective (final + 6 auxiliary outputs) is compared with a float64 numpy
oracle that follows those rules with explicit loops and shares no code with ``remax.losses``.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from loss_helpers import make_target, softmax
from remax.config import LossConfig, RemaxConfig
from remax.losses import SetCriterion, build_dense_targets, mask_id_loss, semantic_loss
from remax.losses.matcher import Matching

ALPHA = 0.75


# --------------------------------------------------------------------------------------------------------------
# Deep supervision: the PQ-style weights of an auxiliary output are the final output's.
# --------------------------------------------------------------------------------------------------------------

def test_aux_pq_weights_come_from_the_final_output():
    """One thing (class 0) on pixels 0-1 of a 2×2 grid, void on pixels 2-3; two queries, K = 1 (+ void).

    Final output: query 0 owns pixels 0-1 with probability 0.8 and pixels 2-3 with 0.5 (mask logits ln 4 / 0);
    query 1 is unmatched. Query 0's class probability is 0.6, computed from logits (ln 0.6, ln 0.4).
      matched Dice  d = Σ m̂g / ((Σ m̂ + Σ g)/2 + 1e-5) on non-void pixels = 1.6 / ((1.6 + 2)/2 + 1e-5)
      void overlap  r = Σ_void m̂_1 / Σ m̂_1 = (0.5 + 0.5) / (0.2 + 0.2 + 0.5 + 0.5)   (for query 1)
      p_final(c)    = 0.6
    The auxiliary output is different (uniform masks, other class logits); its class and Dice terms must use d, r
    and 0.6, not its own values.
    """
    ids = np.array([[1, 1], [0, 0]])
    target = make_target(ids, [(0, True, False)])
    K, N = 1, 2
    ln4 = math.log(4.0)
    final_masks = torch.tensor([[ln4, ln4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(1, N, 2, 2)
    final_logits = torch.tensor([[[math.log(0.6), math.log(0.4)], [0.0, 5.0]]])
    aux_masks = torch.zeros(1, N, 2, 2)
    aux_logits = torch.tensor([[[0.3, -0.2], [1.0, 0.5]]])
    emb = torch.nn.functional.normalize(torch.ones(1, 2, 2, 2), dim=1)
    outputs = {"pred_logits": final_logits, "pred_masks": final_masks, "pixel_embeddings": emb,
               "aux_outputs": [{"pred_logits": aux_logits, "pred_masks": aux_masks, "pixel_embeddings": emb}]}
    loss_cfg = LossConfig(mask_id_weight=0, instance_discrimination_weight=0, semantic_weight=0)
    _, bd = SetCriterion(loss_cfg, RemaxConfig(enabled=False), K)(outputs, [target])

    d = 1.6 / ((1.6 + 2.0) / 2 + 1e-5)
    r = 1.0 / (1.4 + 1e-5)
    ce_aux = [-math.log(softmax(np.array([0.3, -0.2]), 0)[0]), -math.log(softmax(np.array([1.0, 0.5]), 0)[1])]
    exp_cls = (ALPHA * d * ce_aux[0] + (1 - ALPHA) * r * ce_aux[1]) / N
    dice_aux = (2 * 1.0 + 1) / (1.0 + 2.0 + 1)  # uniform aux masks: m̂ = 0.5 on both non-void pixels
    exp_dice = (1 - dice_aux) * 0.6 * ALPHA / N
    assert bd["loss_pq_class/aux0"] == pytest.approx(3.0 * exp_cls, rel=1e-5)
    assert bd["loss_pq_dice/aux0"] == pytest.approx(3.0 * exp_dice, rel=1e-5)

    # The aux output's own weights would give other numbers (what the code did before: Dice 1/1.5, r 1/2, p 0.62).
    own_d, own_r = 1.0 / ((1.0 + 2.0) / 2 + 1e-5), 1.0 / (2.0 + 1e-5)
    own_cls = (ALPHA * own_d * ce_aux[0] + (1 - ALPHA) * own_r * ce_aux[1]) / N
    assert abs(bd["loss_pq_class/aux0"] - 3.0 * own_cls) > 0.05
    # The final output itself uses its own weights.
    ce_final = [-math.log(0.6), -math.log(softmax(np.array([0.0, 5.0]), 0)[1])]
    dice_final = (2 * 1.6 + 1) / (1.6 + 2 + 1)
    assert bd["loss_pq_class/final"] == pytest.approx(
        3.0 * (ALPHA * d * ce_final[0] + (1 - ALPHA) * r * ce_final[1]) / N, rel=1e-5)
    assert bd["loss_pq_dice/final"] == pytest.approx(3.0 * (1 - dice_final) * 0.6 * ALPHA / N, rel=1e-5)

    # Without shared matching the reference recomputes everything per output, weights included.
    _, bd_own = SetCriterion(LossConfig(mask_id_weight=0, instance_discrimination_weight=0, semantic_weight=0,
                                        share_final_matching=False), RemaxConfig(enabled=False), K)(outputs, [target])
    assert bd_own["loss_pq_class/aux0"] == pytest.approx(3.0 * own_cls, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Normalisation: per image, over the entries whose loss is not exactly zero.
# --------------------------------------------------------------------------------------------------------------

def _two_stuff_target():
    """Stuff class 1 on the top row, stuff class 0 on the bottom row of a 2×2 grid."""
    return make_target(np.array([[1, 1], [2, 2]]), [(1, False, False), (0, False, False)])


def test_mask_id_averages_over_pixels_with_nonzero_loss():
    """Half the labelled pixels saturated: their cross-entropy is exactly 0 in fp32 and they leave the mean.

    Query 0 matches the top-row mask, query 1 the bottom one, N = 4. On the top row query 0's logit is 200 (loss
    exactly 0.0); on the bottom row all logits are 0 (loss ln 4). The reference gives ln 4, a mean over all
    labelled pixels would give ln 4 / 2.
    """
    dense = build_dense_targets([_two_stuff_target()], (2, 2), 2)
    top, bottom = int(dense.pixel_segment[0, 0]), int(dense.pixel_segment[0, 2])
    qos = torch.full((1, 2), -1, dtype=torch.long)
    qos[0, top], qos[0, bottom] = 0, 1
    soq = torch.tensor([[top, bottom, -1, -1]])
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, :2] = 200.0
    loss = mask_id_loss(logits, dense, Matching(qos, soq), "softmax")
    assert float(-torch.log_softmax(logits, 1)[0, 0, 0]) == 0.0
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-6)


def test_semantic_loss_is_a_mean_per_image_then_over_images():
    """Image A: 4 labelled pixels, all logits 0 (loss ln 3 each). Image B: one labelled pixel (the rest void) whose
    right class leads by 2 (loss ln(1 + 2e⁻²)). Reference: (ln 3 + ln(1 + 2e⁻²)) / 2; a mean over the batch's
    pixels would give (4 ln 3 + ln(1 + 2e⁻²)) / 5."""
    a = make_target(np.array([[1, 1], [2, 2]]), [(1, False, False), (0, True, False)])
    b = make_target(np.array([[1, 0], [0, 0]]), [(2, False, False)])
    dense = build_dense_targets([a, b], (2, 2), 3)
    logits = torch.zeros(2, 3, 2, 2)
    logits[1, 2, 0, 0] = 2.0
    got = semantic_loss(logits, dense, sample_k=0)
    lb = math.log(1 + 2 * math.exp(-2.0))
    assert got.item() == pytest.approx((math.log(3) + lb) / 2, rel=1e-6)
    # The sampled variant follows the same rule (4 samples per image take every labelled pixel of both).
    assert semantic_loss(logits, dense, sample_k=4).item() == pytest.approx(got.item(), rel=1e-6)


def test_instance_discrimination_drops_invalid_samples_from_the_mean():
    """Image B has one labelled pixel; with 4 samples per image the other three are void and do not count.
    A sample alone in its mask has loss −log softmax(self) = log 1 = 0 when it is the only valid column."""
    from remax.losses import instance_discrimination_loss

    a = make_target(np.array([[1, 1], [2, 2]]), [(1, False, False), (0, True, False)])
    b = make_target(np.array([[1, 0], [0, 0]]), [(2, False, False)])
    dense = build_dense_targets([a, b], (2, 2), 3)
    emb = torch.nn.functional.normalize(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(2, 2, 2, 2), dim=1)
    got = instance_discrimination_loss(emb, dense, sample_k=4, temperature=0.3)
    # Image A: identical embeddings, 2 + 2 samples in two masks: each row −Σ_j∈mask (1/2) log(1/4) = ln 4.
    # Image B: a mean over no non-zero entry is 0. Batch mean: ln 4 / 2.
    assert got.item() == pytest.approx(math.log(4.0) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The sigmoid mask-ID loss at initialisation (all mask logits 0), for each normalisation.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction,expected", [("sum", lambda n: n * math.log(2)),
                                                ("mean", lambda n: math.log(2)),
                                                ("matched", lambda n: math.log(2))])
@pytest.mark.parametrize("N", [4, 32, 128])
def test_sigmoid_mask_id_value_at_init(reduction, expected, N):
    dense = build_dense_targets([_two_stuff_target()], (2, 2), 2)
    top, bottom = int(dense.pixel_segment[0, 0]), int(dense.pixel_segment[0, 2])
    qos = torch.full((1, 2), -1, dtype=torch.long)
    qos[0, top], qos[0, bottom] = 0, 1
    soq = torch.full((1, N), -1, dtype=torch.long)
    soq[0, 0], soq[0, 1] = top, bottom
    got = mask_id_loss(torch.zeros(1, N, 4), dense, Matching(qos, soq), "sigmoid", reduction)
    assert got.item() == pytest.approx(expected(N), rel=1e-6)
    # Through the objective: 0.3 × that per output (the sum over COCO's 128 queries is 26.6 per output).
    outputs = {"pred_logits": torch.zeros(1, N, 3), "pred_masks": torch.zeros(1, N, 2, 2)}
    cfg = LossConfig(instance_discrimination_weight=0, semantic_weight=0, mask_id_sigmoid_reduction=reduction)
    _, bd = SetCriterion(cfg, RemaxConfig(remask=False, reclass=False, mask_id_activation="sigmoid"), 2)(
        outputs, [_two_stuff_target()])
    assert bd["loss_mask_id/final"] == pytest.approx(0.3 * expected(N), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The whole ReMaX-off objective against a float64 oracle of the reference rules (final + 6 auxiliary outputs).
# --------------------------------------------------------------------------------------------------------------

K_REF, N_REF, D_REF, AUX = 4, 6, 5, 6
# Two 4×4 images with the same number (13) of labelled pixels, so that drawing 13 samples per image takes every
# labelled pixel and no void one: the sampling is then deterministic and the same as the reference's.
IMG_A = (np.array([[1, 1, 2, 0],
                   [1, 1, 2, 3],
                   [4, 4, 5, 5],
                   [4, 0, 6, 6]]),
         [(0, True, False), (1, True, False), (0, True, True), (3, False, False), (2, True, False),
          (3, False, False)])
IMG_B = (np.array([[1, 1, 1, 1],
                   [1, 2, 2, 1],
                   [1, 2, 2, 0],
                   [3, 3, 0, 0]]),
         [(2, False, False), (0, True, False), (1, True, False)])
SAMPLES = 13


def _gt_masks(small, segments):
    """[(class, bool mask over 16 pixels)]: things alone, stuff merged per class, crowd and void dropped."""
    flat = small.reshape(-1)
    out, stuff = [], {}
    for i, (c, thing, crowd) in enumerate(segments):
        m = flat == i + 1
        if crowd or not m.any():
            continue
        if thing:
            out.append((c, m))
        else:
            stuff[c] = stuff.get(c, np.zeros_like(m)) | m
    return out + sorted(stuff.items())


def _reference_objective(outputs, images):
    """The kMaX-DeepLab criterion's rules in float64 with explicit loops."""
    final = outputs
    heads = [final] + final["aux_outputs"]
    per_head = {name: [] for name in ("cls", "dice", "mask", "insdis")}
    sem = []
    for b, (small, segments) in enumerate(images):
        gts = _gt_masks(small, segments)
        M = len(gts)
        nonvoid = np.zeros(16, dtype=bool)
        for _, g in gts:
            nonvoid |= g

        def probs_of(head):
            return softmax(head["pred_masks"][b].detach().double().numpy().reshape(N_REF, 16), 0)

        # Matching on the final output: S_ij = p_i(c_j) · Dice(m̂_i masked to non-void, g_j).
        pf = probs_of(final)
        cls_p = softmax(final["pred_logits"][b].detach().double().numpy(), -1)
        S = np.zeros((N_REF, M))
        dice = np.zeros((N_REF, M))
        for i in range(N_REF):
            for j, (c, g) in enumerate(gts):
                inter = sum(pf[i, x] for x in range(16) if nonvoid[x] and g[x])
                psum = sum(pf[i, x] for x in range(16) if nonvoid[x])
                dice[i, j] = inter / ((psum + g.sum()) / 2 + 1e-5)
                S[i, j] = cls_p[i, c] * dice[i, j]
        rows, cols = linear_sum_assignment(-S)
        match = dict(zip(rows.tolist(), cols.tolist()))
        # Weights, once, from the final output.
        w_cls = np.zeros(N_REF)
        for i in range(N_REF):
            if i in match:
                w_cls[i] = ALPHA * max(dice[i, match[i]], 1e-5)
            else:
                void_iop = sum(pf[i, x] for x in range(16) if not nonvoid[x]) / (pf[i].sum() + 1e-5)
                w_cls[i] = (1 - ALPHA) * max(void_iop, 1e-5)
        w_dice = {i: max(cls_p[i, gts[j][0]], 1e-5) for i, j in match.items()}
        owner = {x: i for i, j in match.items() for x in np.flatnonzero(gts[j][1])}

        for head in heads:
            p = probs_of(head)
            logp_cls = np.log(softmax(head["pred_logits"][b].detach().double().numpy(), -1))
            ce = [w_cls[i] * -logp_cls[i, gts[match[i]][0] if i in match else K_REF] for i in range(N_REF)]
            per_head["cls"].append(sum(ce) / max(sum(1 for v in ce if v != 0), 1))
            dl = 0.0
            for i, j in match.items():
                g = gts[j][1]
                inter = sum(p[i, x] for x in range(16) if nonvoid[x] and g[x])
                psum = sum(p[i, x] for x in range(16) if nonvoid[x])
                dl += (1 - (2 * inter + 1) / (psum + g.sum() + 1)) * w_dice[i]
            per_head["dice"].append(dl * ALPHA / N_REF)
            mce = [-np.log(p[owner[x], x]) for x in range(16) if x in owner]
            per_head["mask"].append(sum(mce) / max(sum(1 for v in mce if v != 0), 1))
            e = head["pixel_embeddings"][b].detach().double().numpy().reshape(D_REF, 16)
            label = {x: j for j, (_, g) in enumerate(gts) for x in np.flatnonzero(g)}
            rows_loss = []
            for k in label:
                logits = np.array([e[:, k] @ e[:, j] / 0.3 for j in label])
                logp = np.log(softmax(logits, 0))
                same = np.array([label[j] == label[k] for j in label], dtype=float)
                rows_loss.append(-(same / same.sum() * logp).sum())
            per_head["insdis"].append(sum(rows_loss) / max(sum(1 for v in rows_loss if v != 0), 1))
        sem_logp = np.log(softmax(final["semantic_logits"][b].detach().double().numpy().reshape(K_REF, 16), 0))
        labels = {x: c for c, g in gts for x in np.flatnonzero(g)}
        s = [-sem_logp[c, x] for x, c in labels.items()]
        sem.append(sum(s) / max(sum(1 for v in s if v != 0), 1))

    B = len(images)
    total = 0.0
    for h in range(len(heads)):
        for name, weight in (("cls", 3.0), ("dice", 3.0), ("mask", 0.3), ("insdis", 1.0)):
            # per_head lists are image-major: image b, head h at index b * len(heads) + h.
            total += weight * np.mean([per_head[name][b * len(heads) + h] for b in range(B)])
    return total + 1.0 * np.mean(sem)


def test_remax_off_objective_equals_the_reference_rules():
    g = torch.Generator().manual_seed(3)
    B, h = 2, 4

    def head():
        return {"pred_logits": torch.randn(B, N_REF, K_REF + 1, generator=g) * 2,
                "pred_masks": torch.randn(B, N_REF, h, h, generator=g) * 3,
                "pixel_embeddings": torch.nn.functional.normalize(torch.randn(B, D_REF, h, h, generator=g), dim=1)}

    outputs = head()
    outputs["aux_outputs"] = [head() for _ in range(AUX)]
    outputs["semantic_logits"] = torch.randn(B, K_REF, h, h, generator=g)
    targets = [make_target(*IMG_A), make_target(*IMG_B)]
    dense = build_dense_targets(targets, (h, h), K_REF)
    assert dense.valid.sum(1).tolist() == [SAMPLES, SAMPLES]

    cfg = LossConfig(instance_discrimination_sample_k=SAMPLES, semantic_sample_k=SAMPLES)
    total, bd = SetCriterion(cfg, RemaxConfig(enabled=False), K_REF)(outputs, targets)
    expected = _reference_objective(outputs, [IMG_A, IMG_B])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(sum(v for k, v in bd.items() if k != "loss_total"), rel=1e-6)
