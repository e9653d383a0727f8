"""Prediction heads: unit-norm pixel embeddings, one shared mask-logit BN scale (γ=0.1), the void prior, and the
shapes of the training-only semantic heads."""

from __future__ import annotations

import math

import pytest
import torch

from remax.models.heads import AuxSemanticDecoder, KMaXPredictor, ReMaskSemanticHead, void_prior_bias


def _predictor(num_classes: int = 4) -> KMaXPredictor:
    return KMaXPredictor(6, 8, num_classes, head_dim=8, embedding_dim=4)


def test_pixel_embeddings_are_l2_normalised() -> None:
    torch.manual_seed(0)
    out = _predictor().train()(torch.randn(2, 6, 5, 7), torch.randn(2, 8, 3), torch.randn(2, 8, 3))
    emb = out["pixel_embeddings"]
    assert emb.shape == (2, 4, 5, 7)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 5, 7))


def test_mask_logits_use_one_shared_bn_scale_initialised_to_0_1() -> None:
    torch.manual_seed(0)
    pred = _predictor().eval()
    assert pred.mask_bn.weight.numel() == 1 and pred.mask_bn.bias.numel() == 1
    assert pred.mask_bn.weight.item() == pytest.approx(0.1)
    assert pred.mask_bn.bias.item() == 0.0
    queries = torch.randn(2, 8, 3)
    with torch.no_grad():
        out = pred(torch.randn(2, 6, 5, 7), queries, queries)
        kernels = pred.mask_head(queries)
    # Eval-mode BN with fresh running stats (mean 0, var 1): logits = 0.1·(e·w)/sqrt(1 + eps) for every query.
    dot = torch.einsum("bdhw,bdn->bnhw", out["pixel_embeddings"], kernels)
    torch.testing.assert_close(out["pred_masks"], 0.1 * dot / math.sqrt(1.0 + pred.mask_bn.eps))


@pytest.mark.parametrize("num_classes", [4, 133])
def test_void_prior_gives_p_void_0_9_at_init(num_classes: int) -> None:
    # log((K_total - 1)·0.9/0.1) with K_total = K + 1; COCO (K = 133): log(1197) ≈ 7.09.
    assert void_prior_bias(num_classes, 0.9) == pytest.approx(math.log(num_classes * 9.0))
    torch.manual_seed(0)
    pred = _predictor(num_classes).eval()
    queries = torch.randn(2, 8, 3)
    feature = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        p_void = pred(feature, queries, queries)["pred_logits"].softmax(-1)[..., -1]
        assert p_void.shape == (2, 3)
        # Random class weights (std 0.01): P(void) is close to the prior ...
        assert torch.allclose(p_void, torch.full_like(p_void, 0.9), atol=0.02)
        # ... and exactly the prior when the other logits are zero; the prior is not stored in the bias.
        pred.class_head.weight.zero_()
        assert torch.count_nonzero(pred.class_head.bias) == 0
        p_void = pred(feature, queries, queries)["pred_logits"].softmax(-1)[..., -1]
    torch.testing.assert_close(p_void, torch.full_like(p_void, 0.9))


def test_aux_semantic_decoder_outputs_classes_at_stride_4() -> None:
    torch.manual_seed(0)
    channels = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}
    head = AuxSemanticDecoder(channels, num_classes=5, channels=16).train()
    feats = {"res2": torch.randn(2, 8, 17, 9), "res3": torch.randn(2, 12, 9, 5), "res5": torch.randn(2, 20, 3, 2)}
    assert head(feats).shape == (2, 5, 17, 9)
    # Fusion widths follow the reference (res3 projected to channels/4, res2 to channels/8).
    assert head.proj_os8.conv.out_channels == 4 and head.proj_os4.conv.out_channels == 2


def test_remask_semantic_head_keeps_the_layer_resolution() -> None:
    torch.manual_seed(0)
    head = ReMaskSemanticHead(8, num_classes=5, channels=16).train()
    assert head(torch.randn(2, 8, 9, 5)).shape == (2, 5, 9, 5)
