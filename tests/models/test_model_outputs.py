"""The output contract of KMaXDeepLab (docs/design.md) on the real nano model: train vs eval form, training-only
heads, build_model overrides and errors, input size limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import remax
from remax.config import model_config
from remax.models import build_model, normalize_image

SIZE = (65, 65)


def _nano(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("nano", input_size=SIZE, **overrides)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_train_outputs_with_training_heads() -> None:
    model = _nano(with_training_heads=True).train()
    cfg = model.cfg
    out = model(torch.randn(2, 3, *SIZE))
    assert set(out) == {"pred_logits", "pred_masks", "pixel_embeddings", "aux_outputs", "semantic_logits",
                        "remask_semantic_logits"}
    n, k = cfg.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (2, n, k + 1)
    assert out["pred_masks"].shape == (2, n, 17, 17)  # stride 4: ceil(65 / 4)
    assert out["pixel_embeddings"].shape == (2, cfg.pixel_embedding_dim, 17, 17)
    torch.testing.assert_close(out["pixel_embeddings"].norm(dim=1), torch.ones(2, 17, 17))
    assert len(out["aux_outputs"]) == sum(cfg.transformer_decoder_layers) == 3
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "pixel_embeddings"}
        assert aux["pred_logits"].shape == (2, n, k + 1)
        assert aux["pred_masks"].shape == (2, n, 17, 17)  # upsampled from strides 32/16/8
        assert aux["pixel_embeddings"].shape == (2, cfg.pixel_embedding_dim, 17, 17)
    assert out["semantic_logits"].shape == (2, k, 17, 17)
    assert len(out["remask_semantic_logits"]) == min(cfg.remask_stages, 3)
    assert all(t.shape == (2, k, 17, 17) for t in out["remask_semantic_logits"])


@pytest.mark.parametrize("stages, expected", [(0, 0), (2, 2), (10, 3)])
def test_remask_head_count_is_min_of_stages_and_layers(stages: int, expected: int) -> None:
    model = _nano(with_training_heads=True, remask_stages=stages).train()
    out = model(torch.randn(2, 3, *SIZE))
    if expected == 0:
        assert model.remask_heads is None and "remask_semantic_logits" not in out
    else:
        assert len(model.remask_heads) == expected == len(out["remask_semantic_logits"])


def test_aux_semantic_head_can_be_switched_off() -> None:
    model = _nano(with_training_heads=True, aux_semantic_head=False).train()
    assert model.aux_semantic_head is None
    assert "semantic_logits" not in model(torch.randn(2, 3, *SIZE))


def test_eval_form_has_no_training_heads_in_parameters_or_outputs() -> None:
    full = _nano(with_training_heads=True)
    inference = _nano()
    names = [n for n, _ in inference.named_parameters()]
    assert not any(n.startswith(("aux_semantic_head", "remask_heads")) for n in names)
    assert any(n.startswith(("aux_semantic_head", "remask_heads")) for n, _ in full.named_parameters())
    assert _params(full) > _params(inference)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        before = full.eval()(x)
    assert set(before) == {"pred_logits", "pred_masks"}
    full.drop_training_heads()
    assert not full.has_training_heads
    assert _params(full) == _params(inference)
    assert [n for n, _ in full.named_parameters()] == names
    with torch.no_grad():
        after = full(x)
    # Same weights (same seed): the heads never influence the inference outputs.
    torch.testing.assert_close(after["pred_masks"], before["pred_masks"])
    torch.testing.assert_close(after["pred_logits"], inference.eval()(x)["pred_logits"])
    assert set(full.train()(x)) == {"pred_logits", "pred_masks", "pixel_embeddings", "aux_outputs"}
    full.build_training_heads()
    assert _params(full) == _params(_nano(with_training_heads=True))


def test_backward_on_real_nano_reaches_every_parameter_and_the_centres() -> None:
    model = _nano(with_training_heads=True).train()
    out = model(torch.randn(2, 3, 97, 161))  # non-square
    assert out["pred_masks"].shape[-2:] == (25, 41)
    tensors = [out["pred_logits"], out["pred_masks"], out["pixel_embeddings"], out["semantic_logits"],
               *out["remask_semantic_logits"]]
    for aux in out["aux_outputs"]:
        tensors += list(aux.values())
    gen = torch.Generator().manual_seed(0)
    sum((t * torch.randn(t.shape, generator=gen)).sum() for t in tensors).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The centres learn through the value path (k-means update) and the self-attention, not the argmax.
    assert model.transformer_decoder.cluster_centers.grad.abs().sum() > 0


def test_nano_at_641_forward_backward() -> None:
    model = _nano(with_training_heads=True).train()
    out = model(torch.randn(2, 3, 641, 641))
    assert out["pred_masks"].shape == (2, model.cfg.num_queries, 161, 161)
    (out["pred_masks"].mean() + out["pred_logits"].mean() + out["semantic_logits"].mean()).backward()
    assert torch.isfinite(model.transformer_decoder.cluster_centers.grad).all()


def test_input_longer_than_the_axial_table_is_rejected() -> None:
    model = _nano(axial_max_length=2).eval()
    with pytest.raises(ValueError, match="exceeds the relative-position table limit 2"):
        model(torch.randn(1, 3, *SIZE))  # 65 -> 3 at stride 32


def test_build_model_overrides_and_errors() -> None:
    model = _nano(num_queries=7, num_classes=5)
    assert model.transformer_decoder.cluster_centers.shape == (model.cfg.hidden_dim, 7)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 33, 33))
    assert out["pred_logits"].shape == (1, 7, 6)
    assert out["pred_masks"].shape == (1, 7, 9, 9)
    cfg = dataclasses.replace(model_config("nano"), num_queries=3)
    assert build_model(cfg, num_classes=2).cfg.num_queries == 3
    with pytest.raises(ValueError, match="unknown model option.*not_a_field"):
        build_model("nano", not_a_field=1)
    with pytest.raises(ValueError, match="unknown model option.*not_a_field"):
        build_model(cfg, not_a_field=1)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("no_such_preset")
    with pytest.raises(TypeError):
        build_model(3)


def test_top_level_api() -> None:
    assert "nano" in remax.list_presets() and "kmax_convnext_l" in remax.list_presets()
    model = remax.build_model("nano", input_size=SIZE)
    assert not model.has_training_heads
    assert _params(model) == _params(_nano())


def test_normalize_image_maps_0_255_to_minus_1_1() -> None:
    x = torch.tensor([0, 127.5, 255], dtype=torch.float32).reshape(1, 3, 1, 1)
    assert torch.equal(normalize_image(x).flatten(), torch.tensor([-1.0, 0.0, 1.0]))
    assert normalize_image(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).dtype == torch.float32
