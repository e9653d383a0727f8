"""Every preset builds; measured parameters and MACs land in the ranges SPEC §3 and kmax-reference §1.8 give;
train-mode forward and backward reach every parameter. Big presets run on the meta device (shapes only, no
memory), one real CPU pass per preset is marked slow."""

from __future__ import annotations

import pytest
import torch

from remax.config import list_presets, model_config
from remax.models import build_model
from remax.models.summary import measure_macs

PRESETS = list_presets()
PAPER = [p for p in PRESETS if p != "nano"]

# Inference parameters (no training-only heads) from SPEC §3; ConvNeXt-B is the reference unit test number.
SPEC_PARAMS = {
    "remax_t": 18.6e6, "remax_s": 22.0e6, "remax_m": 50.8e6, "remax_b": 56.6e6, "kmax_r50": 56.6e6,
    "kmax_convnext_t": 60.9e6, "kmax_convnext_s": 82.6e6, "kmax_convnext_l": 231.8e6,
}
# MACs at the preset input size (SPEC §3; kmax_r50 from the fvcore count in kmax-reference §1.8).
SPEC_MACS = {"remax_t": 18.8e9, "remax_s": 20.9e9, "remax_m": 67.8e9, "remax_b": 294.7e9, "kmax_r50": 294e9,
             "kmax_convnext_t": 304e9, "kmax_convnext_l": 1311e9}


def _meta_model(preset: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(preset, **kwargs)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_all_presets_listed() -> None:
    assert set(PRESETS) == {"remax_t", "remax_s", "remax_m", "remax_b", "kmax_r50", "kmax_convnext_t",
                            "kmax_convnext_s", "kmax_convnext_b", "kmax_convnext_l", "kmax_cityscapes_r50",
                            "kmax_cityscapes_convnext_l", "kmax_ade20k_r50", "kmax_ade20k_convnext_l",
                            "remax_cityscapes_mnv3s", "remax_cityscapes_mnv3l", "remax_cityscapes_r50",
                            "remax_cityscapes_maxs", "remax_ade20k_r50_641", "remax_ade20k_r50_1281", "nano"}


@pytest.mark.parametrize("preset", sorted(SPEC_PARAMS))
def test_paper_preset_params_within_3_percent(preset: str) -> None:
    params = _params(_meta_model(preset))
    assert abs(params / SPEC_PARAMS[preset] - 1) < 0.03, params


def test_kmax_convnext_b_params_match_the_reference_unit_test() -> None:
    params = _params(_meta_model("kmax_convnext_b"))
    assert abs(params - 121_513_304) <= 0.002 * 121_513_304, params


def test_r50_parameter_split_and_aux_semantic_head_match_the_reference() -> None:
    """kmax-reference §1.8: backbone 23.51 M, pixel decoder 21.15 M, transformer decoder + heads 11.92 M,
    auxiliary semantic head 15.86 M (R50) / 8.23 M (ConvNeXt-B)."""
    model = _meta_model("kmax_r50", with_training_heads=True)
    for part, want in [(model.backbone, 23.51e6), (model.pixel_decoder, 21.15e6),
                       (model.transformer_decoder, 11.92e6), (model.aux_semantic_head, 15.86e6)]:
        assert abs(_params(part) / want - 1) < 0.005, (type(part).__name__, _params(part))
    head = _meta_model("kmax_convnext_b", with_training_heads=True).aux_semantic_head
    assert abs(_params(head) / 8.23e6 - 1) < 0.005


@pytest.mark.parametrize("preset", sorted(SPEC_MACS))
def test_macs_within_10_percent(preset: str) -> None:
    macs = measure_macs(_meta_model(preset), device="meta")
    assert abs(macs / SPEC_MACS[preset] - 1) < 0.10, macs / 1e9


def _all_outputs(out: dict) -> list[torch.Tensor]:
    tensors = [out["pred_logits"], out["pred_masks"], out["pixel_embeddings"]]
    for aux in out["aux_outputs"]:
        tensors += [aux["pred_logits"], aux["pred_masks"], aux["pixel_embeddings"]]
    tensors += [out["semantic_logits"], *out["remask_semantic_logits"]]
    return tensors


def _distinct_presets() -> list[str]:
    """Presets with distinct architectures (remax_b and kmax_r50 differ only in their training recipe)."""
    seen, names = set(), []
    for name in PRESETS:
        key = repr(model_config(name))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def test_only_recipe_twins_share_an_architecture() -> None:
    assert set(PRESETS) - set(_distinct_presets()) == {"kmax_r50", "remax_ade20k_r50_1281"}
    assert model_config("kmax_r50") == model_config("remax_b")
    assert model_config("remax_ade20k_r50_1281") == model_config("kmax_ade20k_r50")


@pytest.mark.parametrize("preset", _distinct_presets())
def test_forward_backward_reaches_every_parameter_on_meta(preset: str) -> None:
    """Non-square 97×161 input, training heads on: every output has the size of the model's output stride (4, or
    2 with a stride-2 pixel-decoder stage) and every parameter (backbone, pixel decoder, all decoder layers and
    their auxiliary heads, semantic heads) gets a gradient; then the eval form at 129×129 returns only what
    post-processing needs."""
    model = _meta_model(preset, with_training_heads=True).train()
    cfg = model.cfg
    s = model.output_stride
    size = (-(-97 // s), -(-161 // s))  # ceil: (25, 41) at stride 4
    with torch.device("meta"):
        out = model(torch.zeros(2, 3, 97, 161))
    layers = sum(cfg.transformer_decoder_layers)
    assert len(out["aux_outputs"]) == layers
    assert len(out["remask_semantic_logits"]) == min(cfg.remask_stages, layers)
    assert out["pred_masks"].shape == (2, cfg.num_queries, *size)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["semantic_logits"].shape == (2, cfg.num_classes, *size)
    tensors = _all_outputs(out)
    assert all(t.shape[-2:] == size for t in tensors if t.dim() == 4)
    sum(t.sum() for t in tensors).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing

    model.drop_training_heads().eval()
    with torch.device("meta"), torch.no_grad():
        out = model(torch.zeros(1, 3, 129, 129))
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_masks"].shape == (1, cfg.num_queries, -(-129 // s), -(-129 // s))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER)
def test_paper_preset_real_cpu_forward_backward(preset: str) -> None:
    """Real numbers on the CPU at a small square and a non-square size (≈5 s per preset on one core)."""
    torch.manual_seed(0)
    model = build_model(preset, with_training_heads=True).train()
    for size in [(65, 65), (33, 97)]:
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(2, 3, *size))
        tensors = _all_outputs(out)
        assert all(torch.isfinite(t).all() for t in tensors)
        sum(t.float().mean() for t in tensors).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        s = model.output_stride
        assert model(torch.randn(1, 3, 33, 97))["pred_masks"].shape == (1, model.cfg.num_queries, -(-33 // s),
                                                                         -(-97 // s))
