"""Backbones: res2..res5 at strides 4/8/16/32 with the expected channels, the ConvNeXt reference padding, and
loading pretrained weights from a local file (no download)."""

from __future__ import annotations

import pytest
import timm
import torch

from remax.models.backbones import TimmBackbone

CHANNELS = {
    "mobilenetv3_small_100": (16, 24, 48, 576),
    "mobilenetv3_large_100": (24, 40, 112, 960),
    "resnet50": (256, 512, 1024, 2048),
    "convnext_tiny": (96, 192, 384, 768),
    "convnext_small": (96, 192, 384, 768),
    "convnext_base": (128, 256, 512, 1024),
    "convnext_large": (192, 384, 768, 1536),
}
NAMES = ("res2", "res3", "res4", "res5")


def _check(backbone: TimmBackbone, x: torch.Tensor, name: str, sizes: list[tuple[int, int]]) -> None:
    assert tuple(backbone.channels[n] for n in NAMES) == CHANNELS[name]
    assert tuple(backbone.strides[n] for n in NAMES) == (4, 8, 16, 32)
    feats = backbone(x)
    assert list(feats) == list(NAMES)
    for n, c, size in zip(NAMES, CHANNELS[name], sizes):
        assert tuple(feats[n].shape) == (x.shape[0], c, *size), n


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "mobilenetv3_large_100"])
def test_mobilenet_features_real(name: str) -> None:
    backbone = TimmBackbone(name).eval()
    with torch.no_grad():
        # ceil(n / stride) for odd inputs: 33 -> 9/5/3/2, 65 -> 17/9/5/3.
        _check(backbone, torch.randn(1, 3, 33, 65), name, [(9, 17), (5, 9), (3, 5), (2, 3)])


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large"])
def test_large_backbone_features_on_meta(name: str) -> None:
    with torch.device("meta"):
        backbone = TimmBackbone(name).eval()
        _check(backbone, torch.zeros(2, 3, 65, 97), name, [(17, 25), (9, 13), (5, 7), (3, 4)])


def test_convnext_gets_the_reference_zero_padding() -> None:
    """Top/left 1 and bottom/right 2 zeros before the 4×4 stem, bottom/right 1 before each 2×2 down-sampling:
    a 33×33 input gives 9/5/3/2 (timm alone would give 8/4/2/1)."""
    torch.manual_seed(0)
    backbone = TimmBackbone("convnext_tiny").eval()
    seen = {}
    stem = backbone.body.stem_0
    handle = stem.register_forward_pre_hook(lambda m, args: seen.setdefault("stem", args[0].clone()))
    down = backbone.body.stages_1.downsample
    handle2 = down.register_forward_pre_hook(lambda m, args: seen.setdefault("down", args[0].clone()))
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        _check(backbone, x, "convnext_tiny", [(9, 9), (5, 5), (3, 3), (2, 2)])
    handle.remove()
    handle2.remove()
    padded = seen["stem"]
    assert padded.shape == (1, 3, 36, 36)
    assert torch.equal(padded[:, :, 1:34, 1:34], x)
    assert padded[:, :, :1].abs().sum() == 0 and padded[:, :, 34:].abs().sum() == 0
    assert padded[:, :, :, :1].abs().sum() == 0 and padded[:, :, :, 34:].abs().sum() == 0
    down_in = seen["down"]
    assert down_in.shape[-2:] == (10, 10)
    assert down_in[..., 9, :].abs().sum() == 0 and down_in[..., :, 9].abs().sum() == 0


def test_pretrained_weights_load_from_a_local_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    source = timm.create_model("mobilenetv3_small_050", pretrained=False)
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = TimmBackbone("mobilenetv3_small_050", pretrained_file=str(path))
    fresh = TimmBackbone("mobilenetv3_small_050")
    reference = source.state_dict()
    state = loaded.body.state_dict()
    weights = [k for k in state if k.endswith("weight")]
    assert len(weights) > 20
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key
    assert any(not torch.equal(fresh.body.state_dict()[k], reference[k]) for k in weights)


def test_backbone_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmBackbone("mobilenetv3_small_050", pretrained_file=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="cannot build backbone 'no_such_net'"):
        TimmBackbone("no_such_net")
