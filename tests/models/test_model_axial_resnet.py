"""Axial-ResNet-50 (MaX-S, remax/models/axial_resnet.py): the deeplab2 design block by block, exact parameter
counts per component, feature shapes and channels per stride, the strided axial attention, drop-path schedule,
weights loading, and the ReMaX Cityscapes model built on it (74 M parameters in the ReMaX paper, Table 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remax.config import model_config
from remax.models import build_model
from remax.models.summary import count_parameters
from remax.models.axial import AxialAttention2D
from remax.models.axial_resnet import AxialResNet
from remax.models.backbones import build_backbone

# Component counts derived by hand in docs/models.md ("Axial-ResNet-50 (MaX-S)").
STEM = 112_832
STAGES = (236_288, 1_219_584, 12_706_528, 27_068_192)
BACKBONE = 41_343_424
CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048, "stem": 128}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "stem": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_backbone(**kwargs) -> AxialResNet:
    with torch.device("meta"):
        return AxialResNet(**kwargs)


def _tiny(**kwargs) -> AxialResNet:
    """MaX-S's layout at 1/8 of its widths and fewer blocks: the same code paths, real numbers in milliseconds."""
    torch.manual_seed(0)
    return AxialResNet(widths=(8, 16, 16, 32), layers=(1, 1, 2, 2), num_heads=2, **kwargs)


def test_parameter_counts_per_component_are_exact() -> None:
    backbone = _meta_backbone(stem_feature="stride2")
    assert count_parameters(backbone.stem) == STEM
    assert tuple(count_parameters(s) for s in backbone.stages) == STAGES
    assert count_parameters(backbone) == BACKBONE == STEM + sum(STAGES)


def test_block_layout_follows_deeplab2() -> None:
    """3/4/6/3 blocks; axial attention where a block's input is at stride >= 16 (blocks 2-6 of the stride-16
    stage, all of the last stage); the first block of each stage strides; drop path 0.75·rate at stride 16 and
    the full rate at stride 32, none before."""
    backbone = _meta_backbone(drop_path=0.2)
    assert [len(s) for s in backbone.stages] == [3, 4, 6, 3]
    axial = [[b.axial for b in s] for s in backbone.stages]
    assert axial == [[False] * 3, [False] * 4, [False] + [True] * 5, [True] * 3]
    assert [[b.stride for b in s] for s in backbone.stages] == [[2, 1, 1], [2, 1, 1, 1], [2] + [1] * 5, [2, 1, 1]]
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s] for s in backbone.stages]
    assert rates[0] == [0.0] * 3 and rates[1] == [0.0] * 4
    assert rates[2] == [0.0] + [pytest.approx(0.15)] * 5
    assert rates[3] == [pytest.approx(0.15), pytest.approx(0.2), pytest.approx(0.2)]
    first_axial = backbone.stages[2][1]
    assert tuple(first_axial.conv1.conv.weight.shape) == (512, 1024, 1, 1)  # 2w for the attention's input
    assert first_axial.attention.value_depth == 512 and first_axial.attention.height_axis.num_heads == 8
    assert backbone.stages[3][0].attention.stride == 2
    stem = backbone.stem
    assert [tuple(c.conv.weight.shape) for c in (stem.conv1, stem.conv2, stem.conv3)] == [
        (64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert stem.conv1.conv.stride == (2, 2) and isinstance(stem.conv3.act, torch.nn.Identity)


def test_feature_shapes_and_channels_per_stride() -> None:
    """Full widths on the meta device at a non-square k·32+1 input: ceil(n / stride) at every stride."""
    backbone = _meta_backbone(stem_feature="stride2")
    assert backbone.channels == CHANNELS and backbone.strides == STRIDES
    assert backbone.feature_order == ("res5", "res4", "res3", "res2", "stem")
    assert backbone.feature_channels == [256, 512, 1024, 2048, 128]
    with torch.device("meta"):
        feats = backbone(torch.zeros(2, 3, 65, 129))
    assert list(feats) == ["res2", "res3", "res4", "res5", "stem"]
    sizes = {"stem": (33, 65), "res2": (17, 33), "res3": (9, 17), "res4": (5, 9), "res5": (3, 5)}
    for name, size in sizes.items():
        assert tuple(feats[name].shape) == (2, CHANNELS[name], *size), name
    plain = _meta_backbone()
    assert "stem" not in plain.channels and plain.feature_order == ("res5", "res4", "res3", "res2")


def test_real_forward_backward_reaches_every_parameter() -> None:
    backbone = _tiny(stem_feature="stride2").train()
    feats = backbone(torch.randn(2, 3, 33, 65))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (32, 9, 17), "res3": (64, 5, 9), "res4": (64, 3, 5), "res5": (128, 2, 3), "stem": (128, 17, 33)}
    sum(f.square().mean() for f in feats.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_strided_axial_attention_is_the_unstrided_output_subsampled() -> None:
    """Height axis, keep every 2nd row, width axis, keep every 2nd column: with fixed BN statistics that is exactly
    the stride-1 layer's output at the even positions (each row's width attention is independent of the others)."""
    torch.manual_seed(0)
    full = AxialAttention2D(8, key_depth=8, value_depth=16, num_heads=2).eval()
    strided = AxialAttention2D(8, key_depth=8, value_depth=16, num_heads=2, stride=2).eval()
    strided.load_state_dict(full.state_dict())
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        want = full(x)[..., ::2, ::2]
        got = strided(x)
    assert got.shape == (2, 16, 5, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stride"):
        AxialAttention2D(8, key_depth=8, value_depth=16, num_heads=2, stride=0)


def test_build_backbone_dispatch_and_refusals(tmp_path: Path) -> None:
    with torch.device("meta"):
        assert isinstance(build_backbone("max_s"), AxialResNet)
        assert isinstance(build_backbone("axial_resnet50"), AxialResNet)
    with pytest.raises(ValueError, match="stride 2"):
        AxialResNet(stem_feature="reference")
    with pytest.raises(ValueError, match="no hub weights"):
        AxialResNet(pretrained=True)
    with pytest.raises(FileNotFoundError):
        _tiny(pretrained_file=str(tmp_path / "missing.pt"))


def test_weights_load_from_a_state_dict_or_a_model_checkpoint(tmp_path: Path) -> None:
    source = _tiny()
    plain, wrapped = tmp_path / "backbone.pt", tmp_path / "model.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": {f"backbone.{k}": v for k, v in source.state_dict().items()} | {"head.w": torch.ones(1)}},
               wrapped)
    for path in (plain, wrapped):
        torch.manual_seed(1)
        loaded = AxialResNet(widths=(8, 16, 16, 32), layers=(1, 1, 2, 2), num_heads=2, pretrained_file=str(path))
        for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_remax_cityscapes_maxs_is_74m_parameters() -> None:
    """ReMaX paper Table 9: 74 M. Backbone 41,343,424 + pixel decoder 21,182,784 (the COCO R50 decoder + a fifth
    stage on the 128-channel stride-2 stem) + transformer decoder and heads 11,712,506 = 74,238,714."""
    cfg = model_config("remax_cityscapes_maxs")
    assert cfg.backbone == "max_s" and cfg.backbone_drop_path == 0.2
    with torch.device("meta"):
        model = build_model("remax_cityscapes_maxs", with_training_heads=True)
    parts = (model.backbone, model.pixel_decoder, model.transformer_decoder)
    assert tuple(count_parameters(p) for p in parts) == (BACKBONE, 21_182_784, 11_712_506)
    assert count_parameters(model.aux_semantic_head) == 584_979  # the res5 head, training only
    total = count_parameters(model.drop_training_heads())
    assert total == 74_238_714 and abs(total / 74e6 - 1) < 0.03
    assert model.output_stride == 2
