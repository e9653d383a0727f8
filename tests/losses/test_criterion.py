"""SetCriterion: composition, ReMaX switches, gradient isolation of the semantic heads, and edge cases."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from loss_helpers import K, make_target, target_a, target_b
import numpy as np
from remax.config import LossConfig, RemaxConfig
from remax.losses import (
    SetCriterion,
    build_dense_targets,
    hungarian_match,
    instance_discrimination_loss,
    mask_id_loss,
    pq_style_loss,
    remask,
    semantic_loss,
)
from remax.losses.pq_style import pq_loss_weights
from remax.structures import PanopticTarget

N, D, H4 = 5, 6, 4
# Deterministic sampling: more samples than pixels takes every labeled pixel.
LCFG = LossConfig(instance_discrimination_sample_k=64, semantic_sample_k=64)
# The loss-only reading of ReMask: these synthetic outputs come from no model, so the criterion relaxes them.
LOSS_ONLY = RemaxConfig(remask_in_decoder=False)


def crit(cfg, loss_cfg=LCFG, num_classes=K):
    """A criterion with its own seeded sampler, so that two criteria draw the very same pixels."""
    return SetCriterion(loss_cfg, cfg, num_classes, generator=torch.Generator().manual_seed(0))


def make_outputs(B=2, n_aux=3, h=H4, w=H4, seed=0, dtype=None, stages=3, semantic=True):
    """Random model outputs; returns (outputs, leaves). ``dtype`` casts every tensor (e.g. bf16 under autocast)."""
    g = torch.Generator().manual_seed(seed)
    leaves = []

    def leaf(*shape, scale=2.0, normalize=False):
        t = (torch.randn(*shape, generator=g) * scale)
        if normalize:
            t = nn.functional.normalize(t, dim=1)
        t.requires_grad_(True)
        leaves.append(t)
        return t.to(dtype) if dtype is not None else t

    def head():
        return dict(pred_logits=leaf(B, N, K + 1), pred_masks=leaf(B, N, h, w),
                    pixel_embeddings=leaf(B, D, h, w, scale=1.0, normalize=True))

    out = head()
    out["aux_outputs"] = [head() for _ in range(n_aux)]
    if semantic:
        out["semantic_logits"] = leaf(B, K, h, w)
    out["remask_semantic_logits"] = [leaf(B, K, h, w) for _ in range(stages)]
    return out, leaves


def without_remask_heads(outputs):
    return {k: v for k, v in outputs.items() if k != "remask_semantic_logits"}


def test_breakdown_sums_to_total_and_names_every_term():
    outputs, _ = make_outputs()
    total, bd = crit(LOSS_ONLY)(outputs, [target_a(), target_b()])
    names = ["final", "aux0", "aux1", "aux2"]
    for term in ("loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_instance_discrimination"):
        for name in names:
            assert f"{term}/{name}" in bd
    assert {"loss_semantic", "loss_remask_semantic/0", "loss_remask_semantic/1", "loss_remask_semantic/2"} <= set(bd)
    assert math.isclose(sum(v for k, v in bd.items() if k != "loss_total"), total.item(), rel_tol=1e-5)
    assert bd["loss_total"] == pytest.approx(total.item())


def _baseline_by_hand(outputs, targets):
    """The kMaX-DeepLab objective composed from the public loss functions (no ReMaX)."""
    dense = build_dense_targets(targets, (H4, H4), K)
    final_probs = outputs["pred_masks"].flatten(2).softmax(1)
    matching = hungarian_match(outputs["pred_logits"], final_probs, dense)
    weights = pq_loss_weights(outputs["pred_logits"], final_probs, dense, matching, 0.75)
    terms = []
    for out in [outputs] + outputs["aux_outputs"]:
        masks = out["pred_masks"].flatten(2)
        cls, dice = pq_style_loss(out["pred_logits"], masks.softmax(1), dense, matching, 0.75, weights=weights)
        terms += [3.0 * cls, 3.0 * dice, 0.3 * mask_id_loss(masks, dense, matching, "softmax"),
                  1.0 * instance_discrimination_loss(out["pixel_embeddings"].flatten(2), dense, 64, 1.5, 0.3)]
    terms.append(1.0 * semantic_loss(outputs["semantic_logits"], dense, 64, 2.0))
    return torch.stack(terms).sum()


def test_remax_off_equals_kmax_baseline_exactly():
    outputs, _ = make_outputs()
    targets = [target_a(), target_b()]
    off, bd_off = crit(RemaxConfig(enabled=False))(outputs, targets)
    assert not any(k.startswith("loss_remask") for k in bd_off)
    # The same numbers when the model has no ReMask heads at all...
    plain, bd_plain = crit(RemaxConfig(enabled=False))(without_remask_heads(outputs), targets)
    assert torch.equal(off, plain) and bd_off == bd_plain
    # ...and when ReMaX is "on" with every relaxation switched off and the softmax mask-ID loss.
    neutral = RemaxConfig(remask=False, reclass=False, mask_id_activation="softmax")
    same, bd_same = crit(neutral)(outputs, targets)
    assert torch.equal(off, same) and bd_off == bd_same
    # And equal to the objective composed by hand from the loss functions.
    assert off.item() == pytest.approx(_baseline_by_hand(outputs, targets).item(), rel=1e-6)
    # ReMaX on changes it.
    on, _ = crit(LOSS_ONLY)(outputs, targets)
    assert not torch.isclose(on, off)


def test_mask_id_activation_follows_remax_switch():
    outputs, _ = make_outputs()
    targets = [target_a()]
    outputs, _ = make_outputs(B=1)
    dense = build_dense_targets(targets, (H4, H4), K)
    masks = outputs["pred_masks"].flatten(2)
    matching = hungarian_match(outputs["pred_logits"], masks.softmax(1), dense)
    _, bd = crit(RemaxConfig(remask=False, reclass=False, mask_id_activation="sigmoid"))(outputs, targets)
    exp = 0.3 * mask_id_loss(masks, dense, matching, "sigmoid", "mean")  # the default normalisation
    assert bd["loss_mask_id/final"] == pytest.approx(exp.item(), rel=1e-6)
    _, bd = SetCriterion(dataclasses.replace(LCFG, mask_id_activation="sigmoid"), RemaxConfig(enabled=False), K)(
        outputs, targets)
    assert bd["loss_mask_id/final"] == pytest.approx(exp.item(), rel=1e-6)
    _, bd = crit(RemaxConfig(enabled=False))(outputs, targets)
    assert bd["loss_mask_id/final"] == pytest.approx(0.3 * mask_id_loss(masks, dense, matching).item(), rel=1e-6)


@pytest.mark.parametrize("use_gt", [False, True])
def test_remask_relaxes_only_the_first_stages_with_shared_matching(use_gt):
    outputs, _ = make_outputs()
    targets = [target_a(), target_b()]
    cfg = dataclasses.replace(LOSS_ONLY, remask_stages=2, reclass=False, remask_use_gt=use_gt)
    _, bd = crit(cfg)(outputs, targets)
    _, bd_off = crit(dataclasses.replace(cfg, remask=False))(outputs, targets)
    for name in ("final", "aux2"):  # not relaxed: identical
        for term in ("loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_instance_discrimination"):
            assert bd[f"{term}/{name}"] == bd_off[f"{term}/{name}"]
    # Relaxed stages, recomputed by hand with the final output's matching.
    dense = build_dense_targets(targets, (H4, H4), K)
    final_probs = outputs["pred_masks"].flatten(2).softmax(1)
    matching = hungarian_match(outputs["pred_logits"], final_probs, dense)
    weights = pq_loss_weights(outputs["pred_logits"], final_probs, dense, matching)
    for i in range(2):
        aux = outputs["aux_outputs"][i]
        sem = None if use_gt else outputs["remask_semantic_logits"][i].flatten(2)
        relaxed = remask(aux["pred_masks"].flatten(2), aux["pred_logits"], sem, activation=cfg.remask_activation,
                         gt_semantic=dense.semantic() if use_gt else None)
        cls, dice = pq_style_loss(aux["pred_logits"], relaxed.softmax(1), dense, matching, weights=weights)
        assert bd[f"loss_pq_class/aux{i}"] == pytest.approx(3.0 * cls.item(), rel=1e-5)
        assert bd[f"loss_pq_dice/aux{i}"] == pytest.approx(3.0 * dice.item(), rel=1e-5)
        exp_id = 0.3 * mask_id_loss(relaxed, dense, matching, cfg.mask_id_activation)
        assert bd[f"loss_mask_id/aux{i}"] == pytest.approx(exp_id.item(), rel=1e-5)
        assert bd[f"loss_mask_id/aux{i}"] != bd_off[f"loss_mask_id/aux{i}"]
        if use_gt:  # the ground-truth control has no per-stage semantic loss
            assert f"loss_remask_semantic/{i}" not in bd
        else:
            exp_sem = 0.5 * semantic_loss(outputs["remask_semantic_logits"][i], dense, 64, 2.0)
            assert bd[f"loss_remask_semantic/{i}"] == pytest.approx(exp_sem.item(), rel=1e-6)
    assert "loss_remask_semantic/2" not in bd


def test_reclass_eta_zero_equals_one_hot_targets_exactly():
    outputs, _ = make_outputs()
    targets = [target_a(), target_b()]
    for unmatched in (False, True):
        eta0, bd0 = crit(RemaxConfig(reclass_eta=0.0, reclass_unmatched=unmatched))(outputs, targets)
        hot, bd_hot = crit(RemaxConfig(reclass=False))(outputs, targets)
        assert torch.equal(eta0, hot) and bd0 == bd_hot
    soft, bd_soft = crit(RemaxConfig(reclass_eta=0.1))(outputs, targets)
    assert bd_soft["loss_pq_class/final"] != bd_hot["loss_pq_class/final"]
    assert bd_soft["loss_pq_dice/final"] == bd_hot["loss_pq_dice/final"]  # ReClass touches only the class term


class TinyModel(nn.Module):
    """A stand-in mask transformer with one semantic head per stage on the stage's pixel features."""

    def __init__(self, stages=3):
        super().__init__()
        self.pixel = nn.Conv2d(3, D, 1)
        self.stage_pixel = nn.ModuleList(nn.Conv2d(D, D, 1) for _ in range(stages))
        self.queries = nn.Parameter(torch.randn(stages + 1, N, D))
        self.cls = nn.Linear(D, K + 1)
        self.sem_heads = nn.ModuleList(nn.Sequential(nn.Conv2d(D, 8, 1), nn.GELU(), nn.Conv2d(8, K, 1))
                                       for _ in range(stages))
        self.aux_semantic = nn.Conv2d(3, K, 1)

    def forward(self, x):
        feat = self.pixel(x)

        def head(f, q):
            emb = nn.functional.normalize(f, dim=1)
            return dict(pred_logits=self.cls(q).expand(x.shape[0], -1, -1),
                        pred_masks=torch.einsum("nd,bdhw->bnhw", q, f), pixel_embeddings=emb)

        aux, sems = [], []
        for i, (sp, sh) in enumerate(zip(self.stage_pixel, self.sem_heads)):
            f = sp(feat)
            aux.append(head(f, self.queries[i]))
            sems.append(sh(f))
        out = head(feat, self.queries[-1])
        out.update(aux_outputs=aux, remask_semantic_logits=sems, semantic_logits=self.aux_semantic(x))
        return out


def _split_grads(outputs, targets, cfg, params, num_classes=K):
    """Gradients of the panoptic part and of the semantic part of the objective w.r.t. ``params``."""
    terms = crit(cfg, num_classes=num_classes).loss_terms(outputs, targets)
    semantic_keys = ("loss_semantic", "loss_remask_semantic")
    panoptic = sum(v for k, v in terms.items() if not k.startswith(semantic_keys))
    semantic = sum(v for k, v in terms.items() if k.startswith(semantic_keys))
    pan = torch.autograd.grad(panoptic, params, allow_unused=True, retain_graph=True)
    sem = torch.autograd.grad(semantic, params, allow_unused=True)
    return terms, pan, sem


def test_semantic_heads_get_gradient_only_from_semantic_losses():
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(2, 3, H4, H4)
    targets = [target_a(), target_b()]
    params = [p for h in list(model.sem_heads) + [model.aux_semantic] for p in h.parameters()]
    _, pan, sem = _split_grads(model(x), targets, LOSS_ONLY, params)
    assert all(g is None or not g.any() for g in pan)
    assert all(g is not None and g.abs().sum() > 0 for g in sem)
    # The isolation is the stop-gradient's doing: without it the panoptic loss reaches the ReMask heads.
    params = [p for h in model.sem_heads for p in h.parameters()]
    _, pan, _ = _split_grads(model(x), targets, dataclasses.replace(LOSS_ONLY, remask_stop_gradient=False), params)
    assert all(g is not None and g.abs().sum() > 0 for g in pan)


def _synthetic_targets(size, n):
    out = []
    for i in range(n):
        ids = np.zeros(size, dtype=np.int64)
        ids[: size[0] // 2] = 1
        ids[size[0] // 2:] = 2
        ids[5:30, 10 + i:40] = 3
        ids[40:55, 50:60] = 4
        ids[:4, :] = 0
        out.append(PanopticTarget(id_map=torch.from_numpy(ids), classes=torch.tensor([7, 8, 0, 3]),
                                  is_thing=torch.tensor([False, False, True, True]),
                                  is_crowd=torch.tensor([False, False, False, True])))
    return out


@pytest.mark.parametrize("in_decoder", [True, False])
def test_real_model_semantic_heads_gradient_isolation(in_decoder):
    models = pytest.importorskip("remax.models")
    torch.manual_seed(0)
    cfg = RemaxConfig(remask_in_decoder=in_decoder)
    model = models.build_model("nano", with_training_heads=True, input_size=(65, 65),
                               remask=models.ReMaskOptions.from_config(cfg)).train()
    heads = list(model.remask_heads or []) + ([model.aux_semantic_head] if model.aux_semantic_head else [])
    assert model.remask_heads is not None and heads
    params = [p for h in heads for p in h.parameters() if p.requires_grad]
    decoder = [p for p in model.transformer_decoder.parameters() if p.requires_grad]
    outputs = model(torch.randn(2, 3, 65, 65) * 0.5)
    assert all(("pred_masks_raw" in aux) == in_decoder for aux in outputs["aux_outputs"])
    terms, pan, sem = _split_grads(outputs, _synthetic_targets((65, 65), 2), cfg, params + decoder,
                                   num_classes=model.cfg.num_classes)
    assert len([k for k in terms if k.startswith("loss_remask_semantic")]) == len(model.remask_heads)
    assert all(g is None or not g.any() for g in pan[: len(params)])
    assert any(g is not None and g.any() for g in pan[len(params):])  # the panoptic loss does train the decoder
    assert all(g is not None for g in sem[: len(params)])
    for h in heads:  # every head is reached by its semantic loss
        assert sum(float(g.abs().sum()) for g, p in zip(sem, params) if any(p is q for q in h.parameters())) > 0


# --------------------------------------------------------------------------------------------------------------
# Edge cases: finite losses and finite gradients, fp32 and bf16 autocast.
# --------------------------------------------------------------------------------------------------------------

def _stuff_only():
    return make_target(np.array([[1, 1, 2, 2]] * 4), [(2, False, False), (1, False, False)])


def _only_void():
    return make_target(np.zeros((4, 4), dtype=np.int64), [(0, True, False)])  # its segment has no pixel


def _one_segment():
    return make_target(np.ones((4, 4), dtype=np.int64), [(0, True, False)])


def _vanishing():
    # Segment 1 lives only off the stride-4 grid; segment 2 covers the sampled pixels.
    return make_target(np.full((4, 4), 2), [(0, True, False), (2, False, False)], filler=1)


def _nothing():
    return PanopticTarget(id_map=torch.zeros(13, 13, dtype=torch.long), classes=torch.zeros(0, dtype=torch.long),
                          is_thing=torch.zeros(0, dtype=torch.bool), is_crowd=torch.zeros(0, dtype=torch.bool))


def _only_crowd():
    return make_target(np.ones((4, 4), dtype=np.int64), [(1, True, True)])


EDGE_CASES = {
    "no_things": [_stuff_only(), _stuff_only()],
    "only_void": [_only_void(), _only_void()],
    "one_segment": [_one_segment(), _one_segment()],
    "vanishing_segment": [_vanishing(), _vanishing()],
    "no_segments": [_nothing(), _nothing()],
    "only_crowd": [_only_crowd(), _nothing()],
    "mixed": [_nothing(), target_a()],
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("remax_on", [True, False])
def test_edge_cases_are_finite(case, precision, remax_on):
    targets = EDGE_CASES[case]
    cfg = RemaxConfig(enabled=remax_on, reclass_unmatched=True)
    crit = SetCriterion(LCFG, cfg, K)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs, leaves = make_outputs(dtype=torch.bfloat16)
            total, bd = crit(outputs, targets)
    else:
        outputs, leaves = make_outputs()
        total, bd = crit(outputs, targets)
    assert total.dtype == torch.float32
    assert torch.isfinite(total), bd
    assert all(math.isfinite(v) for v in bd.values()), bd
    total.backward()
    for t in leaves:
        assert t.grad is None or torch.isfinite(t.grad).all()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_edge_case_values():
    """No segments: every query is unmatched with void ratio 1, so only the void class term remains."""
    outputs, _ = make_outputs(n_aux=0, semantic=False)
    _, bd = crit(RemaxConfig(enabled=False))(outputs, EDGE_CASES["no_segments"])
    logp_void = torch.log_softmax(outputs["pred_logits"].float(), -1)[..., K]
    assert bd["loss_pq_class/final"] == pytest.approx(3.0 * 0.25 * float(-logp_void.detach().mean()), rel=1e-5)
    assert bd["loss_pq_dice/final"] == 0 and bd["loss_mask_id/final"] == 0
    assert bd["loss_instance_discrimination/final"] == 0


def test_errors():
    outputs, _ = make_outputs()
    bad = make_target(np.ones((4, 7), dtype=np.int64), [(0, True, False)])  # 13x25 cannot become 4x4
    with pytest.raises(ValueError, match="cannot be strided"):
        crit(RemaxConfig())(outputs, [bad, bad])
    with pytest.raises(ValueError, match="targets"):
        crit(RemaxConfig())(outputs, [target_a()])
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(LCFG, RemaxConfig(), K + 2)(outputs, [target_a(), target_b()])
    with pytest.raises(ValueError, match="pixel_embeddings"):
        o = dict(outputs)
        o["pixel_embeddings"] = None
        crit(RemaxConfig())(o, [target_a(), target_b()])
    with pytest.raises(ValueError, match="mask_id_activation"):
        SetCriterion(LCFG, RemaxConfig(mask_id_activation="relu"), K)


# --------------------------------------------------------------------------------------------------------------
# ReMask inside the decoder: the criterion takes the model's relaxed masks as they are.
# --------------------------------------------------------------------------------------------------------------

def test_in_decoder_stages_use_the_models_relaxed_masks_and_raw_masks_for_reclass():
    models = pytest.importorskip("remax.models")
    from remax.losses import reclass_targets
    from remax.losses.pq_style import one_hot_class_targets

    cfg = RemaxConfig(remask_stages=2)
    torch.manual_seed(0)
    model = models.build_model("nano", with_training_heads=True, input_size=(65, 65),
                               remask=models.ReMaskOptions.from_config(cfg)).train()
    outputs = model(torch.randn(2, 3, 65, 65) * 0.5)
    K9 = model.cfg.num_classes
    targets = _synthetic_targets((65, 65), 2)
    assert ["pred_masks_raw" in aux for aux in outputs["aux_outputs"]] == [True, True, False]
    _, bd = crit(cfg, num_classes=K9)(outputs, targets)

    h, w = outputs["pred_masks"].shape[-2:]
    dense = build_dense_targets(targets, (h, w), K9)
    final_probs = outputs["pred_masks"].flatten(2).softmax(1)
    matching = hungarian_match(outputs["pred_logits"], final_probs, dense)
    weights = pq_loss_weights(outputs["pred_logits"], final_probs, dense, matching)
    for i in range(2):
        aux = outputs["aux_outputs"][i]
        relaxed, raw = aux["pred_masks"].flatten(2), aux["pred_masks_raw"].flatten(2)
        soft = reclass_targets(one_hot_class_targets(matching, dense, K9 + 1), raw, dense, matching)
        cls, dice = pq_style_loss(aux["pred_logits"], relaxed.softmax(1), dense, matching, 0.75, soft, weights)
        assert bd[f"loss_pq_class/aux{i}"] == pytest.approx(3.0 * cls.item(), rel=1e-5)
        assert bd[f"loss_pq_dice/aux{i}"] == pytest.approx(3.0 * dice.item(), rel=1e-5)
        exp_id = 0.3 * mask_id_loss(relaxed, dense, matching, cfg.mask_id_activation)
        assert bd[f"loss_mask_id/aux{i}"] == pytest.approx(exp_id.item(), rel=1e-5)
        assert f"loss_remask_semantic/{i}" in bd
    assert "loss_remask_semantic/2" not in bd

    # A model that relaxed its stages under an objective that does not ask for it is a configuration error.
    for other in (dataclasses.replace(cfg, remask_in_decoder=False), RemaxConfig(enabled=False)):
        with pytest.raises(ValueError, match="applied ReMask in its decoder"):
            crit(other, num_classes=K9)(outputs, targets)


def test_in_decoder_objective_warns_when_the_model_relaxes_fewer_stages(caplog):
    outputs, _ = make_outputs()
    with caplog.at_level("WARNING"):
        _, bd = crit(RemaxConfig())(outputs, [target_a(), target_b()])
    assert "model relaxed 0" in caplog.text
    assert not any(k.startswith("loss_remask_semantic") for k in bd)
