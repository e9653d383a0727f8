"""The kMaX reference's Cityscapes and ADE20K configurations (bytedance/kmax-deeplab configs/{cityscapes,ade20k}):
exact parameter counts per component (derived from the reference's config and code in docs/models.md), the fifth
pixel-decoder stage and the "stem" feature it reads, the light res5 semantic head, real CPU forward/backward at a
small non-square size, and the data preset each defaults to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from remax.config import MODEL_PRESETS, PRESET_DATA, get_config, model_config
from remax.losses import SetCriterion
from remax.models import build_model
from remax.models.summary import count_parameters
from remax.models.backbones import TimmBackbone
from remax.models.heads import AuxSemanticDecoder, Res5SemanticHead
from remax.models.remask import ReMaskOptions
from remax.structures import PanopticTarget

REFERENCE_PRESETS = ["kmax_cityscapes_r50", "kmax_cityscapes_convnext_l", "kmax_ade20k_r50",
                     "kmax_ade20k_convnext_l"]

# (backbone, pixel decoder, transformer decoder + heads, auxiliary semantic head). The reference counts are the
# same except the ADE20K auxiliary decoder, whose classifier has a void row more there (+257): see docs/models.md.
COUNTS = {
    "kmax_cityscapes_r50": (23_508_032, 21_170_240, 11_712_506, 584_979),
    "kmax_cityscapes_convnext_l": (196_227_264, 23_722_560, 11_712_506, 440_083),
    "kmax_ade20k_r50": (23_508_032, 21_151_040, 11_951_631, 15_860_854),
    "kmax_ade20k_convnext_l": (196_227_264, 23_688_640, 11_951_631, 12_049_526),
}
INFERENCE_PARAMS = {"kmax_cityscapes_r50": 56_390_778, "kmax_cityscapes_convnext_l": 231_662_330,
                    "kmax_ade20k_r50": 56_610_703, "kmax_ade20k_convnext_l": 231_867_535}


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_model(preset: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(preset, **kwargs)


@pytest.mark.parametrize("preset", REFERENCE_PRESETS)
def test_parameter_counts_are_exact(preset: str) -> None:
    model = _meta_model(preset, with_training_heads=True)
    parts = (model.backbone, model.pixel_decoder, model.transformer_decoder, model.aux_semantic_head)
    assert tuple(count_parameters(p) for p in parts) == COUNTS[preset]
    assert count_parameters(model.drop_training_heads()) == INFERENCE_PARAMS[preset] == sum(COUNTS[preset][:3])


def test_cityscapes_delta_against_coco_is_the_fifth_stage_and_the_wider_query_set() -> None:
    """Against kmax_r50 (COCO, checked against the reference): +19,200 in the pixel decoder (a 32-wide bottleneck
    stage, its fuse, one LayerNorm more, and no projection of the 64-channel stem into the 64-wide fourth stage)
    and −208,542 in the transformer decoder (256 centres, 20-way class heads, a 128-channel final pixel head)."""
    coco, city = _meta_model("kmax_r50"), _meta_model("kmax_cityscapes_r50")
    assert count_parameters(city.pixel_decoder) - count_parameters(coco.pixel_decoder) == 128 - 16_512 + 19_072 + 16_512
    assert (count_parameters(city.transformer_decoder) - count_parameters(coco.transformer_decoder)
            == 256 * 128 - 7 * 257 * (134 - 20) - 27 * 128 - 128 * 256)
    fuses = city.pixel_decoder.fuses
    assert fuses[2].high_proj is None  # stem (64 ch) into the 64-wide fourth stage, as in the reference
    assert tuple(fuses[3].high_proj.conv.weight.shape) == (32, 256, 1, 1)  # res2 into the fifth stage


def test_reference_configuration_fields() -> None:
    city = model_config("kmax_cityscapes_r50")
    assert (city.num_classes, city.num_queries, tuple(city.input_size)) == (19, 256, (1025, 2049))
    assert tuple(city.pixel_decoder_layers) == (1, 5, 1, 1, 1)
    assert tuple(city.pixel_decoder_channels) == (512, 256, 128, 64, 32)
    assert tuple(city.pixel_decoder_block_types) == ("axial", "axial", "bottleneck", "bottleneck", "bottleneck")
    assert (city.pixel_decoder_stem_feature, city.aux_semantic_decoder, city.drop_path) == ("reference", False, 0.2)
    assert (city.backbone_bn_eps, city.backbone_bn_momentum) == (1e-3, 0.01)
    large = model_config("kmax_cityscapes_convnext_l")
    assert large.backbone_drop_path == 0.6 and large.backbone_bn_eps is None
    ade = model_config("kmax_ade20k_r50")
    assert (ade.num_classes, ade.num_queries, tuple(ade.input_size), ade.drop_path) == (150, 128, (1281, 1281), 0.0)
    assert ade.aux_semantic_decoder and ade.pixel_decoder_stem_feature == ""
    assert model_config("kmax_ade20k_convnext_l").backbone_drop_path == 0.7
    # Same architecture as the COCO preset apart from the class count and the drop path.
    assert model_config("kmax_ade20k_r50") == model_config("kmax_r50", num_classes=150, drop_path=0.0)


def test_reference_stem_feature_of_resnet_is_the_max_pooled_stem() -> None:
    """detectron2's ResNet "stem" ends with the 3×3/2 max-pool: stride 4, 64 channels, and it precedes res2."""
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet50", stem_feature="reference").eval()
    assert backbone.feature_order == ("res5", "res4", "res3", "stem", "res2")
    assert backbone.channels["stem"] == 64 and backbone.strides["stem"] == 4
    x = torch.randn(1, 3, 65, 129)
    with torch.no_grad():
        feats = backbone(x)
        body = backbone.body
        expected = F.max_pool2d(body.act1(body.bn1(body.conv1(x))), 3, 2, 1)
    assert feats["stem"].shape == (1, 64, 17, 33) == expected.shape
    torch.testing.assert_close(feats["stem"], expected, rtol=0, atol=0)
    assert feats["res2"].shape == (1, 256, 17, 33)
    assert backbone._captured == []  # no activation is kept after the call


def test_reference_stem_feature_of_convnext_is_the_normalised_patchify_stem() -> None:
    """The reference ConvNeXt returns its stem (padded 4×4/4 conv + LayerNorm) as "stem", declared stride 2 so it
    feeds the fifth stage, though it is at stride 4 (ConvNeXt-T here; the layout is the same for L)."""
    torch.manual_seed(0)
    backbone = TimmBackbone("convnext_tiny", stem_feature="reference").eval()
    assert backbone.feature_order == ("res5", "res4", "res3", "res2", "stem")
    assert backbone.channels["stem"] == backbone.channels["res2"] == 96
    x = torch.randn(1, 3, 65, 129)
    with torch.no_grad():
        feats = backbone(x)
        expected = backbone.body.stem_1(F.conv2d(F.pad(x, (1, 2, 1, 2)), backbone.body.stem_0.weight,
                                                 backbone.body.stem_0.bias, stride=4))
    assert feats["stem"].shape == (1, 96, 17, 33) == feats["res2"].shape
    torch.testing.assert_close(feats["stem"], expected)


def test_reference_stem_is_refused_for_other_backbones() -> None:
    with pytest.raises(ValueError, match="ResNet and ConvNeXt"):
        TimmBackbone("mobilenetv3_small_050", stem_feature="reference")
    with pytest.raises(ValueError, match="no stride-2 feature"):
        TimmBackbone("convnext_tiny", stem_feature="stride2")
    with pytest.raises(ValueError, match="5 stages|needs 5 stages"):
        build_model("kmax_cityscapes_r50", pixel_decoder_layers=(1, 5, 1, 1))


def _all_tensors(out: dict) -> list[torch.Tensor]:
    tensors = [out["pred_logits"], out["pred_masks"], out["pixel_embeddings"], out["semantic_logits"]]
    for aux in out["aux_outputs"]:
        tensors += [aux["pred_logits"], aux["pred_masks"], aux["pixel_embeddings"]]
    return tensors + list(out.get("remask_semantic_logits", []))


def test_cityscapes_r50_real_forward_backward_at_a_small_non_square_size() -> None:
    """65×129 (1025×2049 shrunk, nothing else changed): stride-4 masks from the 128-channel fifth stage, the res5
    semantic head upsampled to the mask size, and a gradient in every parameter; eval returns the two outputs."""
    torch.manual_seed(0)
    model = build_model("kmax_cityscapes_r50", with_training_heads=True, input_size=(65, 129)).train()
    assert isinstance(model.aux_semantic_head, Res5SemanticHead) and model.output_stride == 4
    x = torch.randn(2, 3, 65, 129)
    _, pixel = model.pixel_decoder(model.backbone(x))
    assert pixel.shape == (2, 128, 17, 33)
    out = model(x)
    assert out["pred_masks"].shape == (2, 256, 17, 33)
    assert out["pred_logits"].shape == (2, 256, 20)
    assert out["semantic_logits"].shape == (2, 19, 17, 33)
    assert model.aux_semantic_head(model.backbone(x)).shape == (2, 19, 3, 5)  # stride 32 before resizing
    tensors = _all_tensors(out)
    assert all(torch.isfinite(t).all() for t in tensors)
    sum(t.float().mean() for t in tensors).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    model.drop_training_heads().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 129))
    assert set(out) == {"pred_logits", "pred_masks"} and out["pred_masks"].shape == (1, 256, 17, 33)


def test_convnext_cityscapes_layout_runs_for_real_with_a_small_backbone() -> None:
    """The ConvNeXt-L Cityscapes preset with only the backbone swapped for ConvNeXt-T: real numbers end to end."""
    torch.manual_seed(0)
    model = build_model("kmax_cityscapes_convnext_l", with_training_heads=True, backbone="convnext_tiny",
                        backbone_drop_path=0.0, input_size=(65, 129)).train()
    out = model(torch.randn(2, 3, 65, 129))
    assert out["pred_masks"].shape == (2, 256, 17, 33)
    sum(t.float().mean() for t in _all_tensors(out)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_ade20k_r50_real_forward_backward() -> None:
    torch.manual_seed(0)
    model = build_model("kmax_ade20k_r50", with_training_heads=True, input_size=(65, 97)).train()
    assert isinstance(model.aux_semantic_head, AuxSemanticDecoder)
    out = model(torch.randn(2, 3, 65, 97))
    assert out["pred_masks"].shape == (2, 128, 17, 25) and out["pred_logits"].shape == (2, 128, 151)
    assert out["semantic_logits"].shape == (2, 150, 17, 25)
    sum(t.float().mean() for t in _all_tensors(out)).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_stride2_stage_predicts_at_stride_2_and_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pixel_decoder_stem_feature="stride2"`` (the deeplab2 / ReMaX-paper layout, for the ReMaX Cityscapes
    presets): nano with a fifth stage on MobileNetV3's stride-2 feature gives 2× finer masks; get_config moves the
    mask losses to that grid, and the full objective back-propagates into every parameter."""
    five = dict(pixel_decoder_layers=(1, 1, 1, 1, 1), pixel_decoder_channels=(64, 32, 32, 16, 8),
                pixel_decoder_block_types=("axial", "axial", "bottleneck", "bottleneck", "bottleneck"),
                pixel_decoder_stem_feature="stride2")
    monkeypatch.setitem(MODEL_PRESETS, "nano_stride2", {**MODEL_PRESETS["nano"], **five, "input_size": (65, 97)})
    cfg = get_config("nano_stride2", data="synthetic")
    assert cfg.loss.mask_loss_stride == 2 and get_config("nano").loss.mask_loss_stride == 4
    torch.manual_seed(0)
    model = build_model(cfg.model, with_training_heads=True, remask=ReMaskOptions.from_config(cfg.remax)).train()
    assert model.backbone.feature_order[-1] == "stem" and model.output_stride == 2
    x = torch.randn(2, 3, 65, 97)
    _, pixel = model.pixel_decoder(model.backbone(x))
    assert pixel.shape == (2, 32, 33, 49)  # 4 × 8 channels at stride 2
    out = model(x)
    assert out["pred_masks"].shape == (2, 32, 33, 49)
    assert all(a["pred_masks"].shape[-2:] == (33, 49) for a in out["aux_outputs"])
    id_map = torch.zeros(65, 97, dtype=torch.long)
    id_map[5:40, 10:60], id_map[40:, :] = 1, 2
    target = PanopticTarget(id_map=id_map, classes=torch.tensor([0, 5]), is_thing=torch.tensor([True, False]),
                            is_crowd=torch.tensor([False, False]))
    total, breakdown = SetCriterion(cfg.loss, cfg.remax, cfg.model.num_classes)(out, [target, target])
    assert torch.isfinite(total) and breakdown["loss_pq_dice/final"] > 0
    total.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_get_config_defaults_to_each_presets_data_set() -> None:
    assert {p: PRESET_DATA[p] for p in REFERENCE_PRESETS} == {
        "kmax_cityscapes_r50": "cityscapes", "kmax_cityscapes_convnext_l": "cityscapes",
        "kmax_ade20k_r50": "ade20k", "kmax_ade20k_convnext_l": "ade20k"}
    for preset in REFERENCE_PRESETS:
        cfg = get_config(preset)
        assert cfg.data.name == PRESET_DATA[preset]
        assert cfg.model == model_config(preset)  # the data preset agrees with the architecture
        assert tuple(cfg.data.crop_size) == tuple(cfg.model.input_size)
    city = get_config("kmax_cityscapes_r50")
    assert city.data.resize_longer_side == 2048
    assert (city.eval.thing_threshold, city.eval.stuff_threshold, city.eval.overlap_threshold,
            city.eval.reorder_mask_weight) == (0.5, 0.3, 0.9, 0.0)
    ade = get_config("kmax_ade20k_convnext_l")
    assert (ade.eval.thing_threshold, ade.eval.stuff_threshold) == (0.4, 0.4)
    assert get_config("kmax_r50").data.name == "coco" and get_config("nano").data.name == "synthetic"
    # An explicit data preset still wins.
    assert get_config("kmax_cityscapes_r50", data="coco").model.num_classes == 133
