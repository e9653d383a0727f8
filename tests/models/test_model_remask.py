"""ReMask inside the decoder: what the relaxation changes in the forward pass, and what it must leave alone."""

from __future__ import annotations

import pytest
import torch

import remax.models.kmax_decoder as kmax_decoder
from remax.config import RemaxConfig
from remax.models import ReMaskOptions, build_model, remask
from remax.models.remask import prior_bias, stride_labels

SIZE = (65, 65)


def nano(options: ReMaskOptions | None = None, heads: bool = True, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("nano", with_training_heads=heads, input_size=SIZE, remask=options, **overrides)
    # Spread the class probabilities over the queries, so that Eq. 1 scales the queries differently, and open the
    # k-means update (its BN scale starts at 0, so at initialisation the assignment cannot reach the centres).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.transformer_decoder.layers:
            w = layer.predictor.class_head.weight
            w.copy_(torch.randn(w.shape, generator=g))
            layer.kmeans_conv3.norm.weight.fill_(1.0)
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(2)) * 0.5


def run_recording(model: torch.nn.Module, x: torch.Tensor, monkeypatch, **kwargs):
    """Forward pass that also returns every layer's k-means assignment (argmax over queries)."""
    seen = []
    original = kmax_decoder.kmeans_assignment

    def recording(mask_logits):
        out = original(mask_logits)
        seen.append(out.argmax(1))
        return out

    monkeypatch.setattr(kmax_decoder, "kmeans_assignment", recording)
    torch.manual_seed(3)  # the heads' dropout draws the same masks in both runs
    out = model(x, **kwargs)
    monkeypatch.setattr(kmax_decoder, "kmeans_assignment", original)
    return out, seen


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_semantic_head_steers_the_kmeans_assignment_only_inside_the_decoder(activation, monkeypatch):
    x = images()
    for in_decoder in (True, False):
        options = ReMaskOptions.from_config(RemaxConfig(remask_activation=activation, remask_in_decoder=in_decoder))
        assert options.stages == (4 if in_decoder else 0)
        model = nano(options).train()
        before, assign_before = run_recording(model, x, monkeypatch)
        with torch.no_grad():  # a different semantic head for the first stage only
            head = model.remask_heads[0].classifier
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)) * 3)
        after, assign_after = run_recording(model, x, monkeypatch)
        assert len(assign_before) == model.num_decoder_layers == 3
        if in_decoder:
            assert not torch.equal(assign_before[0], assign_after[0]), "stage 0's assignment ignores its head"
            assert not torch.equal(before["pred_masks"], after["pred_masks"]), "final masks ignore the head"
            # The stage's prediction is m̃; the raw logits are kept for ReClass.
            aux = after["aux_outputs"][0]
            assert "pred_masks_raw" in aux and not torch.equal(aux["pred_masks"], aux["pred_masks_raw"])
        else:
            assert all(torch.equal(a, b) for a, b in zip(assign_before, assign_after))
            assert torch.equal(before["pred_masks"], after["pred_masks"])
            assert all("pred_masks_raw" not in aux for aux in after["aux_outputs"])
        # Either way the head's own output changed, and only stage 0's.
        assert not torch.equal(before["remask_semantic_logits"][0], after["remask_semantic_logits"][0])


def test_assignment_is_the_argmax_of_the_relaxed_masks(monkeypatch):
    """Stage 0's assignment equals argmax over queries of m + σ(m_sem)σ(p)ᵀ ⊙ m at the stage's resolution."""
    model = nano(ReMaskOptions(stages=1, activation="sigmoid")).train()
    captured = {}
    original = model._relax_stage

    def spy(index, store, gt, prediction, pixel):
        out = original(index, store, gt, prediction, pixel)
        captured.setdefault(index, (prediction, store[index], out))
        return out

    monkeypatch.setattr(model, "_relax_stage", spy)
    _, seen = run_recording(model, images(), monkeypatch)
    prediction, semantic, out = captured[0]
    m = prediction["pred_masks"].flatten(2)
    p = torch.sigmoid(prediction["pred_logits"][..., :-1])
    s = torch.sigmoid(semantic.flatten(2))
    expected = m + torch.bmm(p, s) * m
    torch.testing.assert_close(out["pred_masks"].flatten(2), expected)
    assert torch.equal(seen[0], expected.argmax(1))
    assert list(captured) == [0]  # one relaxed stage


def test_eval_without_heads_equals_a_model_that_never_had_them():
    options = ReMaskOptions(stages=3, activation="sigmoid")
    with_heads = nano(options)
    with_heads.train()(images())  # the heads exist and have been used in training mode (BN statistics moved)
    plain = nano(heads=False)
    state = {k: v for k, v in with_heads.state_dict().items() if not k.startswith(("remask_heads.", "aux_semantic"))}
    plain.load_state_dict(state, strict=True)
    with_heads.eval()
    plain.eval()
    x = images(1)
    reference = plain(x)
    for out in (with_heads(x), with_heads.drop_training_heads()(x)):
        assert set(out) == {"pred_logits", "pred_masks"}
        assert torch.equal(out["pred_masks"], reference["pred_masks"])
        assert torch.equal(out["pred_logits"], reference["pred_logits"])


def test_remask_kept_at_test_time_changes_eval_outputs_and_needs_the_heads():
    options = ReMaskOptions(stages=3, activation="sigmoid")
    model = nano(options).eval()
    x = images(1)
    removed = model(x)
    kept = model.set_remask(options.replace(at_test=True))(x)
    assert set(kept) == {"pred_logits", "pred_masks"}
    assert not torch.equal(kept["pred_masks"], removed["pred_masks"])
    model.drop_training_heads()
    with pytest.raises(ValueError, match="semantic heads"):
        model(x)


def _stage0_multiplier(model: torch.nn.Module, activation: str) -> float:
    out = model.train()(images())
    ones = torch.ones(out["aux_outputs"][0]["pred_masks"].flatten(2).shape)
    factor = remask(ones, out["aux_outputs"][0]["pred_logits"], out["remask_semantic_logits"][0].flatten(2),
                    activation)
    return float(factor.detach().mean())


@pytest.mark.parametrize("num_classes", [9, 133])
def test_multiplier_at_initialisation(num_classes):
    """1 + Σ_c σ(m_sem)σ(p) starts at 1 + K/4 with a zero head bias (34.25 for COCO's 133 classes), near
    1 + 1/K with the softmax, and at the requested value with the prior bias."""
    K = num_classes
    kw = dict(num_classes=K)
    plain = build_model("nano", with_training_heads=True, input_size=SIZE,
                        remask=ReMaskOptions(stages=1, activation="sigmoid"), **kw)
    assert _stage0_multiplier(plain, "sigmoid") == pytest.approx(1 + K / 4, rel=0.02)
    soft = build_model("nano", with_training_heads=True, input_size=SIZE, remask=ReMaskOptions(stages=1), **kw)
    assert _stage0_multiplier(soft, "softmax") == pytest.approx(1 + 1 / K, rel=0.01)
    primed = build_model("nano", with_training_heads=True, input_size=SIZE,
                         remask=ReMaskOptions(stages=1, activation="sigmoid", init_multiplier=1.1), **kw)
    bias = primed.remask_heads[0].classifier.bias
    assert torch.allclose(bias, torch.full_like(bias, prior_bias(K, 1.1)))
    assert _stage0_multiplier(primed, "sigmoid") == pytest.approx(1.1, abs=0.01)


def test_prior_bias_values_and_errors():
    # σ(b) = (m − 1) / (K · 0.5): K = 9, m = 1.1 -> 1/45.
    assert torch.sigmoid(torch.tensor(prior_bias(9, 1.1))).item() == pytest.approx(1 / 45, rel=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        prior_bias(9, 0.9)
    with pytest.raises(ValueError, match="sigmoid"):
        ReMaskOptions(stages=1, activation="softmax", init_multiplier=1.1)


def test_ground_truth_control_relaxes_with_the_labels(monkeypatch):
    """With ReMask's ground-truth control the stage sees one-hot labels: all-void labels leave the masks as they
    are (Eq. 2 with m̂ = 0), real labels change the assignment; the labels are required."""
    options = ReMaskOptions(stages=3, use_gt=True)
    model = nano(options).train()
    plain = nano(ReMaskOptions()).train()
    x = images()
    K = model.cfg.num_classes
    with pytest.raises(ValueError, match="ground-truth semantic map"):
        model(x)
    void = torch.full((2, *SIZE), K, dtype=torch.long)
    out_void, assign_void = run_recording(model, x, monkeypatch, remask_gt_semantic=void)
    out_plain, assign_plain = run_recording(plain, x, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(assign_void, assign_plain))
    torch.testing.assert_close(out_void["pred_masks"], out_plain["pred_masks"])
    labels = torch.zeros(2, *SIZE, dtype=torch.long)
    labels[:, :, 32:] = 3
    _, assign_gt = run_recording(model, x, monkeypatch, remask_gt_semantic=labels)
    assert not torch.equal(assign_gt[0], assign_plain[0])


def test_stride_labels_takes_every_stride_th_pixel():
    labels = torch.arange(65 * 65).view(1, 65, 65)
    out = stride_labels(labels, (3, 3))  # stride 32
    assert out.tolist() == [[[0, 32, 64], [32 * 65, 32 * 65 + 32, 32 * 65 + 64],
                             [64 * 65, 64 * 65 + 32, 64 * 65 + 64]]]
    with pytest.raises(ValueError, match="cannot be strided"):
        stride_labels(labels, (4, 7))
