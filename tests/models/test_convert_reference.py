"""Reference (bytedance/kmax-deeplab) weights -> KMaXDeepLab: numerical parity stage by stage on the fixture, and
one-line refusals of state_dicts that do not fit.

The parity tests rebuild the reference's R50 and ConvNeXt-T weights from the fixture's weight rule, convert them
by name, and compare every stage with the reference's stored outputs at 129x129, so a failure says where the two
models diverge (backbone, pixel decoder, a k-means layer, the final head, the auxiliary semantic head).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from reference_parity import PRESETS, reference_outputs, reference_state_dict

from remax.config import model_config
from remax.models import KMaXDeepLab, normalize_image
from remax.models.convert_reference import (ReferenceConversionError, convert_reference_state_dict,
                                            plan_reference_conversion, reference_backbone, reference_num_classes)

K = 133
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(preset: str, **overrides):
    return model_config(preset, input_size=(129, 129), remask_stages=0, **overrides)


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, torch.Tensor]]:
    return {name: reference_state_dict(name) for name in PRESETS}


@pytest.fixture(scope="module", params=list(PRESETS))
def run(request, sources, one_thread):
    """Convert one fixture, load it strictly, run every stage once (eval, fp32) and keep outputs + references."""
    name = request.param
    model = KMaXDeepLab(_cfg(PRESETS[name]), with_training_heads=True).eval()
    plan = plan_reference_conversion(sources[name], model)
    model.load_state_dict(plan.state_dict, strict=True)
    ref = reference_outputs(name)
    with torch.no_grad():
        features = model.backbone(normalize_image(ref["image_uint8"]))
        multi_scale, pixel = model.pixel_decoder(features)
        final, aux, _ = model.transformer_decoder(multi_scale, pixel)
        semantic = model.aux_semantic_head(features)
        model_out = model(normalize_image(ref["image_uint8"]))
    decoder = dict(zip(("os32", "os16", "os8", "os4"), [*multi_scale, pixel]))
    return dict(name=name, plan=plan, ref=ref, features=features, decoder=decoder, final=final, aux=aux,
                semantic=semantic, model_out=model_out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _assert_fp16_close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Against a float16 copy: half an fp16 ulp plus fp32 noise."""
    expected = expected.float()
    assert actual.shape == expected.shape, where
    excess = (actual - expected).abs() - (2e-5 + 2 ** -11 * expected.abs())
    assert excess.max().item() <= 0, f"{where}: max |diff| {_max_diff(actual, expected):.3g} beyond fp16 rounding"


# ---------------------------------------------------------------------------------------------------- parity


def test_weight_rule_matches_the_readme_spot_checks(sources):
    r50 = sources["r50"]["backbone.stem.conv1.weight"]
    assert zlib.crc32(b"backbone.stem.conv1.weight") == 1166582298
    assert r50.flatten()[:3].tolist() == pytest.approx([0.042954, 0.076533, -0.071276], abs=1e-6)
    assert r50.sum().item() == pytest.approx(-13.888393, abs=1e-4)
    cnx = sources["convnext_t"]["backbone.downsample_layers.0.0.weight"]
    assert zlib.crc32(b"backbone.downsample_layers.0.0.weight") == 3786527156
    assert cnx.flatten()[:3].tolist() == pytest.approx([0.030083, -0.150503, -0.051014], abs=1e-6)
    assert cnx.sum().item() == pytest.approx(-9.456573, abs=1e-4)
    assert len(sources["r50"]) == 1417 and len(sources["convnext_t"]) == 1283


def test_every_source_tensor_is_used_and_only_the_aux_void_row_changes(run, sources):
    plan = run["plan"]
    assert plan.dropped == {}
    assert plan.adjusted == {"aux_semantic_head.classifier.weight": "void row dropped",
                             "aux_semantic_head.classifier.bias": "void row dropped"}
    assert len(plan.state_dict) == len(sources[run["name"]])
    src = sources[run["name"]]["sem_seg_head.predictor._auxiliary_semantic_predictor.final_conv.conv.weight"]
    assert torch.equal(plan.state_dict["aux_semantic_head.classifier.weight"], src[:K])


@pytest.mark.parametrize("stage", ["res2", "res3", "res4", "res5"])
def test_backbone_features_match(run, stage):
    _assert_fp16_close(run["features"][stage], run["ref"][f"backbone.{stage}"], f"{run['name']} backbone {stage}")


@pytest.mark.parametrize("stage", ["os32", "os16", "os8", "os4"])
def test_pixel_decoder_outputs_match(run, stage):
    _assert_fp16_close(run["decoder"][stage], run["ref"][f"pixel_decoder.{stage}"],
                       f"{run['name']} pixel decoder {stage}")


def test_every_kmeans_layer_matches(run):
    assert len(run["aux"]) == 6
    for i, pred in enumerate(run["aux"]):
        logits, masks = run["ref"][f"aux.{i}.pred_logits"], run["ref"][f"aux.{i}.pred_masks"]
        assert _max_diff(pred["pred_logits"], logits) < 2e-4, f"{run['name']} k-means layer {i} class logits"
        assert pred["pred_masks"].shape == masks.shape
        assert _max_diff(pred["pred_masks"], masks) < 5e-4, f"{run['name']} k-means layer {i} mask logits"
        same = (pred["pred_masks"].argmax(1) == masks.argmax(1)).float().mean().item()
        assert same >= 0.999, f"{run['name']} k-means layer {i}: same assignment on {same:.2%} of pixels"


def test_final_outputs_match(run):
    ref = run["ref"]
    for out in (run["final"], run["model_out"]):  # the stage-by-stage run and the model's own forward
        assert _max_diff(out["pred_logits"], ref["pred_logits"]) < 2e-4
        assert _max_diff(out["pred_masks"], ref["pred_masks"]) < 1e-3
        winners = (out["pred_masks"].argmax(1) == ref["pred_masks"].argmax(1)).float().mean().item()
        assert winners >= 0.999
        assert torch.equal(out["pred_logits"].argmax(-1), ref["pred_logits"].argmax(-1))
    # Random weights still pick many queries per pixel, so the check is not vacuous.
    assert ref["pred_masks"].argmax(1).unique().numel() >= 10


def test_aux_semantic_head_matches_without_its_void_row(run):
    assert run["semantic"].shape[1] == K
    assert _max_diff(run["semantic"], run["ref"]["aux_semantic_pred"][:, :K]) < 1e-3


# ------------------------------------------------------------------------------------------------ refusals


def _one_line_error(src, cfg, *needles: str, keep_aux_head: bool = True) -> str:
    with pytest.raises(ReferenceConversionError) as info:
        convert_reference_state_dict(src, cfg, keep_aux_head=keep_aux_head)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_convnext_file_is_refused_by_a_resnet_preset(sources):
    message = _one_line_error(sources["convnext_t"], _cfg("kmax_r50"), "backbone mismatch", "ConvNeXt-T",
                              "resnet50")
    assert "kmax_convnext_t" in message


def test_a_convnext_t_file_is_refused_by_the_convnext_s_preset(sources):
    _one_line_error(sources["convnext_t"], _cfg("kmax_convnext_s"), "depth mismatch", "ConvNeXt-T",
                    "convnext_small", "[3, 3, 27, 3]")


def test_a_resnet_file_is_refused_by_a_convnext_preset(sources):
    _one_line_error(sources["r50"], _cfg("kmax_convnext_b"), "backbone mismatch", "ResNet-50", "convnext_base")


def test_missing_extra_and_misshapen_keys_are_named(sources):
    cfg = _cfg("kmax_r50")
    src = dict(sources["r50"])
    del src["sem_seg_head.pixel_decoder._stages.1._blocks.3._conv3_bn.norm.running_var"]
    _one_line_error(src, cfg, "1 missing", "pixel_decoder.stages.1.3.conv3.norm.running_var")

    src = dict(sources["r50"], **{"sem_seg_head.predictor._kmax_transformer_layers.6._pixel_v_conv_bn.conv.weight":
                                  torch.zeros(256, 256, 1, 1)})
    _one_line_error(src, cfg, "1 unexpected", "_kmax_transformer_layers.6._pixel_v_conv_bn.conv.weight")

    src = dict(sources["r50"], **{"sem_seg_head.predictor._cluster_centers.weight": torch.zeros(256, 100)})
    _one_line_error(src, cfg, "1 wrong shape", "_cluster_centers.weight (256, 100) -> "
                    "transformer_decoder.cluster_centers (256, 128)")


def test_long_key_lists_are_truncated_with_a_count(sources):
    src = {k: v for k, v in sources["r50"].items() if not k.startswith("sem_seg_head.pixel_decoder.")}
    message = _one_line_error(src, _cfg("kmax_r50"), "missing", "more)")
    assert len(message) < 1000


def test_class_count_and_foreign_files_are_refused(sources):
    _one_line_error(sources["r50"], _cfg("kmax_r50", num_classes=19), "class count mismatch", "133")
    with pytest.raises(ReferenceConversionError, match="not a kMaX-DeepLab reference"):
        reference_backbone({"backbone.body.conv1.weight": torch.zeros(1)})
    assert reference_backbone(sources["convnext_t"]) == "convnext"
    assert reference_num_classes(sources["r50"]) == K


def test_the_aux_head_can_be_dropped_for_inference(sources):
    plan = plan_reference_conversion(sources["convnext_t"], _cfg("kmax_convnext_t"), keep_aux_head=False)
    aux = [k for k in sources["convnext_t"] if "_auxiliary_semantic_predictor." in k]
    assert len(aux) == 86  # 14 conv+BN units (6 tensors each) and the 134-row classifier (2)
    assert set(plan.dropped) == set(aux)
    assert not any(k.startswith("aux_semantic_head.") for k in plan.state_dict)
    with torch.device("meta"):  # only the key set matters
        inference = KMaXDeepLab(_cfg("kmax_convnext_t"))
    assert set(plan.state_dict) == set(inference.state_dict())


def test_reference_batchnorm_settings_reach_every_backbone_batchnorm():
    with torch.device("meta"):
        r50 = KMaXDeepLab(_cfg("kmax_r50"))
        timm_default = KMaXDeepLab(_cfg("kmax_r50", backbone_bn_eps=None, backbone_bn_momentum=None))
    norms = [m for m in r50.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 53
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}
    assert {(m.eps, m.momentum) for m in timm_default.backbone.modules()
            if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-5, 0.1)}
    assert model_config("remax_b").backbone_bn_eps == 1e-3
    assert model_config("kmax_convnext_t").backbone_bn_eps is None  # LayerNorm only
