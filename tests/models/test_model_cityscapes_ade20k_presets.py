"""The ReMaX Cityscapes and ADE20K presets (ReMaX paper Tables 8-10): their architecture (shared with the kMaX
reference dicts, the fifth pixel-decoder stage on a true stride-2 feature for Cityscapes), exact parameter counts,
the data presets and recipes get_config gives them, real CPU forward/backward at small inputs, and a short
synthetic training run through the engine's Trainer proving the stride-2 path trains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from remax.config import PRESET_DATA, get_config, model_config
from remax.data.synthetic import write_synthetic_dataset
from remax.models import build_model
from remax.models.summary import count_parameters
from remax.models.heads import AuxSemanticDecoder, Res5SemanticHead

CITYSCAPES = ["remax_cityscapes_mnv3s", "remax_cityscapes_mnv3l", "remax_cityscapes_r50", "remax_cityscapes_maxs"]
ADE20K = ["remax_ade20k_r50_641", "remax_ade20k_r50_1281"]

# (backbone, pixel decoder, transformer decoder + heads, inference total, with training heads), measured and
# explained in docs/models.md. The R50 and MaX-S pixel decoders are the COCO R50 one (21,151,040) plus the fifth
# stage: a 32-wide bottleneck (19,072), its fuse (256 -> 32: 8,256; stem -> 32) and the stem's LayerNorm.
COUNTS = {
    "remax_cityscapes_mnv3s": (927_008, 11_566_096, 6_009_096, 18_502_200, 25_379_140),
    "remax_cityscapes_mnv3l": (2_971_952, 12_765_632, 6_009_096, 21_746_680, 28_732_292),
    "remax_cityscapes_r50": (23_508_032, 21_151_040 + 19_072 + 8_256 + 2_112 + 128, 11_712_506, 56_401_146,
                             65_930_841),
    "remax_cityscapes_maxs": (41_343_424, 21_151_040 + 19_072 + 8_256 + 4_160 + 256, 11_712_506, 74_238_714,
                              83_768_409),
    "remax_ade20k_r50_641": (23_508_032, 21_151_040, 11_951_631, 56_610_703, 81_550_941),
    "remax_ade20k_r50_1281": (23_508_032, 21_151_040, 11_951_631, 56_610_703, 81_550_941),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _all_tensors(out: dict) -> list[torch.Tensor]:
    tensors = [out["pred_logits"], out["pred_masks"], out["pixel_embeddings"], out["semantic_logits"]]
    for aux in out["aux_outputs"]:
        tensors += [aux["pred_logits"], aux["pred_masks"], aux["pixel_embeddings"]]
    return tensors + list(out.get("remask_semantic_logits", []))


def test_presets_share_the_reference_dicts() -> None:
    """Cityscapes: the kMaX Cityscapes architecture with the fifth stage on the stride-2 feature (deeplab2's
    layout); the efficient backbones take ReMaX-T/S's one block / one layer per stride (paper Table 12). ADE20K:
    the kMaX ADE20K R50 model, at 641 or 1281."""
    r50 = model_config("remax_cityscapes_r50")
    assert r50 == model_config("kmax_cityscapes_r50", pixel_decoder_stem_feature="stride2")
    assert model_config("remax_cityscapes_maxs") == model_config(
        "kmax_cityscapes_r50", backbone="max_s", backbone_drop_path=0.2, pixel_decoder_stem_feature="stride2",
        backbone_bn_eps=None, backbone_bn_momentum=None)
    for preset, backbone in [("remax_cityscapes_mnv3s", "mobilenetv3_small_100"),
                             ("remax_cityscapes_mnv3l", "mobilenetv3_large_100")]:
        cfg = model_config(preset)
        assert cfg.backbone == backbone and cfg.backbone_bn_eps is None
        assert tuple(cfg.pixel_decoder_layers) == (1, 1, 1, 1, 1)
        assert tuple(cfg.transformer_decoder_layers) == (1, 1, 1)
        assert cfg == model_config("remax_cityscapes_r50", backbone=backbone, pixel_decoder_layers=(1, 1, 1, 1, 1),
                                   transformer_decoder_layers=(1, 1, 1), backbone_bn_eps=None,
                                   backbone_bn_momentum=None)
    for preset in CITYSCAPES:
        cfg = model_config(preset)
        assert (cfg.num_classes, cfg.num_queries, tuple(cfg.input_size)) == (19, 256, (1025, 2049))
        assert cfg.pixel_decoder_stem_feature == "stride2" and not cfg.aux_semantic_decoder
        assert tuple(cfg.pixel_decoder_channels) == (512, 256, 128, 64, 32)
    assert model_config("remax_ade20k_r50_1281") == model_config("kmax_ade20k_r50")
    assert model_config("remax_ade20k_r50_641") == model_config("kmax_ade20k_r50", input_size=(641, 641))


@pytest.mark.parametrize("preset", CITYSCAPES + ADE20K)
def test_parameter_counts_are_exact(preset: str) -> None:
    with torch.device("meta"):
        model = build_model(preset, with_training_heads=True)
    backbone, pixel, decoder, total, train = COUNTS[preset]
    assert count_parameters(model) == train
    assert (count_parameters(model.backbone), count_parameters(model.pixel_decoder), count_parameters(model.transformer_decoder)) == (
        backbone, pixel, decoder)
    assert count_parameters(model.drop_training_heads()) == total == backbone + pixel + decoder


def test_get_config_gives_the_paper_recipes() -> None:
    """Cityscapes (§4.3): 60K iterations, batch 32, 5K warm-up to 3e-3, loss weights PQ-style 3.0 / semantic 1.0
    / mask-ID 0.3 / instance discrimination 1.0, mask terms on the stride-2 grid. ADE20K (§4.4): the COCO ReMaX
    settings for 100K iterations, at the preset's resolution."""
    assert {p: PRESET_DATA[p] for p in CITYSCAPES + ADE20K} == {
        **{p: "cityscapes" for p in CITYSCAPES}, **{p: "ade20k" for p in ADE20K}}
    for preset in CITYSCAPES:
        cfg = get_config(preset)
        assert cfg.model == model_config(preset) and cfg.data.name == "cityscapes"
        t, loss = cfg.train, cfg.loss
        assert (t.max_steps, t.base_batch_size, t.warmup_steps, t.lr) == (60000, 32, 5000, 3e-3)
        assert (loss.pq_class_weight, loss.pq_dice_weight, loss.semantic_weight, loss.mask_id_weight,
                loss.instance_discrimination_weight) == (3.0, 3.0, 1.0, 0.3, 1.0)
        assert loss.mask_loss_stride == 2
        assert tuple(cfg.data.crop_size) == (1025, 2049) and cfg.data.resize_longer_side == 2048
        assert cfg.remax.enabled and cfg.remax.remask_stages == 4 and cfg.remax.reclass_eta == 0.1
    coco = get_config("remax_b")
    for preset, side in zip(ADE20K, (641, 1281)):
        cfg = get_config(preset)
        assert cfg.data.name == "ade20k" and cfg.model.num_classes == 150 and cfg.model.drop_path == 0.0
        assert tuple(cfg.data.crop_size) == (side, side) and cfg.data.resize_longer_side == side - 1
        assert cfg.train.max_steps == 100000 and cfg.loss.mask_loss_stride == 4
        assert _equal_except(cfg.train, coco.train, "max_steps")
        assert cfg.remax == coco.remax and cfg.loss == coco.loss


def _equal_except(a, b, *names: str) -> bool:
    """Dataclass equality ignoring the named fields (the recipe fields a data preset is meant to change)."""
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    for name in names:
        setattr(a, name, getattr(b, name))
    return a == b


@pytest.mark.parametrize("preset", ["remax_cityscapes_mnv3s", "remax_cityscapes_mnv3l", "remax_cityscapes_r50",
                                    "remax_cityscapes_maxs"])
def test_cityscapes_real_forward_backward_at_65x129(preset: str) -> None:
    """1025×2049 shrunk to 65×129, nothing else changed: the fifth stage outputs 128 channels at stride 2
    (33×65), every output is on that grid, every parameter gets a gradient, eval returns the two outputs."""
    torch.manual_seed(0)
    model = build_model(preset, with_training_heads=True, input_size=(65, 129)).train()
    assert isinstance(model.aux_semantic_head, Res5SemanticHead) and model.output_stride == 2
    assert model.backbone.strides["stem"] == 2 and model.backbone.feature_order[-1] == "stem"
    x = torch.randn(2, 3, 65, 129)
    feats = model.backbone(x)
    assert feats["stem"].shape[-2:] == (33, 65)
    multi, pixel = model.pixel_decoder(feats)
    assert pixel.shape == (2, 128, 33, 65)
    assert [m.shape[-2:] for m in multi] == [(3, 5), (5, 9), (9, 17)]
    out = model(x)
    assert out["pred_masks"].shape == (2, 256, 33, 65) and out["pred_logits"].shape == (2, 256, 20)
    tensors = _all_tensors(out)
    assert all(t.shape[-2:] == (33, 65) for t in tensors if t.dim() == 4)
    assert all(torch.isfinite(t).all() for t in tensors)
    sum(t.float().mean() for t in tensors).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.drop_training_heads().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 129))
    assert set(out) == {"pred_logits", "pred_masks"} and out["pred_masks"].shape == (1, 256, 33, 65)


def test_ade20k_real_forward_backward() -> None:
    """The two ADE20K presets differ only in their input size, so one real pass at 65×97 covers both."""
    assert model_config("remax_ade20k_r50_641", input_size=(65, 97)) == model_config("remax_ade20k_r50_1281",
                                                                                    input_size=(65, 97))
    torch.manual_seed(0)
    model = build_model("remax_ade20k_r50_641", with_training_heads=True, input_size=(65, 97)).train()
    assert isinstance(model.aux_semantic_head, AuxSemanticDecoder) and model.output_stride == 4
    out = model(torch.randn(2, 3, 65, 97))
    assert out["pred_masks"].shape == (2, 128, 17, 25) and out["pred_logits"].shape == (2, 128, 151)
    sum(t.float().mean() for t in _all_tensors(out)).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.drop_training_heads().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 97))["pred_masks"].shape == (1, 128, 17, 25)


# remax_cityscapes_mnv3s shrunk for the CPU: a narrower backbone and decoders, 16 centres; the fifth, stride-2
# stage and everything else stay.
SHRINK = [
    "model.backbone=mobilenetv3_small_050", "model.input_size=[65,129]",
    "model.pixel_decoder_channels=[64,32,32,16,8]", "model.num_queries=16", "model.hidden_dim=64",
    "model.ffn_dim=128", "model.self_attention_heads=4", "model.kmeans_bottleneck_dim=64",
    "model.pixel_embedding_dim=32", "model.pixel_head_dim=64", "model.axial_heads=4",
    "model.semantic_head_channels=32", "model.drop_path=0.0",
]


def test_shrunk_cityscapes_preset_trains_its_stride2_stage(tmp_path: Path) -> None:
    """Eight Trainer steps on synthetic images: the stride-2 stage (its fuse, LayerNorm and block) receives
    non-zero gradients and its weights move, and the mask losses are computed on the stride-2 grid."""
    from remax.engine import build_parts
    from remax.engine.trainer import Trainer

    root = write_synthetic_dataset(tmp_path / "synthetic", num_train=4, num_val=0, size=64, seed=0)
    steps = 8
    cfg = get_config("remax_cityscapes_mnv3s", data="synthetic").override([
        *SHRINK, f"data.root={root}", "data.val_split=train", "data.num_workers=0", "data.crop_size=[65,129]",
        "data.resize_longer_side=128", "data.copy_paste=false", "data.color_jitter=false",
        "train.batch_size=2", "train.base_batch_size=2", "train.lr=0.003", f"train.max_steps={steps}",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.keep_checkpoints=0", "train.device=cpu",
        "loss.instance_discrimination_sample_k=64", "loss.semantic_sample_k=64",
    ])
    assert cfg.loss.mask_loss_stride == 2 and cfg.model.pixel_decoder_stem_feature == "stride2"
    parts = build_parts(cfg, progress=False)
    parts.evaluate = parts.after_training = None  # training only
    model = parts.model
    assert model.output_stride == 2
    stage = {n: p for n, p in model.named_parameters()
             if n.startswith(("pixel_decoder.stages.4.", "pixel_decoder.fuses.3.", "pixel_decoder.backbone_norms.4."))}
    assert len(stage) >= 20
    before = {n: p.detach().clone() for n, p in stage.items()}
    grad_norms: dict[str, list[float]] = {n: [] for n in stage}
    for name, p in stage.items():
        p.register_hook(lambda g, name=name: grad_norms[name].append(float(g.norm())))
    result = Trainer(cfg, tmp_path / "run", parts, progress=False).run()
    assert result["status"] == "completed" and result["step"] == steps
    no_grad = [n for n, norms in grad_norms.items() if not any(v > 0 for v in norms)]
    assert not no_grad
    unchanged = [n for n, p in stage.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged
    x = torch.zeros(1, 3, 65, 129)
    model.eval()
    with torch.no_grad():
        assert model(x)["pred_masks"].shape == (1, 16, 33, 65)
