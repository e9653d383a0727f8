"""The kMaX decoder: hard argmax assignment under stop-gradient, the k-means update rule, per-layer shapes."""

from __future__ import annotations

import math

import pytest
import torch

from remax.models.kmax_decoder import (KMaXTransformerDecoder, KMaXTransformerLayer, kmeans_assignment,
                                       kmeans_cross_attention)

SMALL = dict(hidden_dim=8, bottleneck_dim=8, num_heads=2, ffn_dim=16, head_dim=8, embedding_dim=4)


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_assignment_is_one_hot_argmax_over_queries_hand_case() -> None:
    # B=1, N=3 queries, 1×4 pixels; the argmax per pixel is query 1, 1, 2, 0.
    logits = torch.tensor([[1.0, 0.0, 0.0, 5.0],
                           [2.0, 3.0, 0.0, 0.0],
                           [0.0, 1.0, 4.0, 0.0]]).reshape(1, 3, 1, 4)
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.0],
                             [1.0, 1.0, 0.0, 0.0],
                             [0.0, 0.0, 1.0, 0.0]]).reshape(1, 3, 4)
    assert torch.equal(kmeans_assignment(logits), expected)


def test_kmeans_read_out_sums_assigned_values_and_blocks_the_argmax_gradient() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 5.0],
                           [2.0, 3.0, 0.0, 0.0],
                           [0.0, 1.0, 4.0, 0.0]]).reshape(1, 3, 1, 4).requires_grad_(True)
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0],
                           [16.0, 32.0, 64.0, 128.0]]).reshape(1, 2, 1, 4).requires_grad_(True)
    out = kmeans_cross_attention(logits, values)
    # Per cluster the *sum* of its pixels' values (not the mean): q0 <- pixel 3, q1 <- pixels 0+1, q2 <- pixel 2.
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[[8.0, 3.0, 4.0], [128.0, 48.0, 64.0]]]))
    upstream = torch.tensor([[[1.0, 10.0, 100.0], [1000.0, 10000.0, 100000.0]]])
    (out * upstream).sum().backward()
    assert logits.grad is None  # nothing reaches the assignment logits through the argmax
    # Each pixel's value receives the upstream gradient of the one cluster it is assigned to.
    assert torch.equal(values.grad.reshape(2, 4),
                       torch.tensor([[10.0, 10.0, 100.0, 1.0], [1e4, 1e4, 1e5, 1e3]]))


def _bn_eval(x: torch.Tensor, bn: torch.nn.Module) -> torch.Tensor:
    """BatchNorm in eval mode over dim 1 of a B×C×… tensor, written out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - bn.running_mean.reshape(shape)) / torch.sqrt(bn.running_var.reshape(shape) + bn.eps)
            * bn.weight.reshape(shape) + bn.bias.reshape(shape))


def _randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=m.running_mean.dtype) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen, dtype=m.weight.dtype) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=m.bias.dtype) * 0.2)


def test_fresh_layer_leaves_centres_unchanged_up_to_the_activations() -> None:
    """Zero-initialised last BN in the k-means, self-attention and FFN branches: at init every update is 0."""
    layer = KMaXTransformerLayer(6, num_classes=3, **SMALL).double().eval()
    centers = torch.randn(2, 8, 5, dtype=torch.float64)
    with torch.no_grad():
        out, _, _ = layer(torch.randn(2, 6, 4, 4, dtype=torch.float64), centers)
    torch.testing.assert_close(out, torch.nn.functional.gelu(torch.nn.functional.gelu(centers)))


def test_cluster_update_equals_c_plus_bn_of_assigned_value_sum() -> None:
    """With the self-attention and FFN branches silenced, the layer computes GELU(GELU(C + BN(W·BN(A·Vᵀ)))),
    where A = one_hot(argmax of the layer's own mask logits) and V = BN(W_v·P); checked by an explicit loop."""
    gen = torch.Generator().manual_seed(5)
    layer = KMaXTransformerLayer(6, num_classes=3, **SMALL).double().eval()
    with torch.no_grad():
        _randomize_bn(layer, gen)
        for conv in (layer.query_conv3, layer.ffn_conv2):  # silence the self-attention and FFN updates
            conv.norm.weight.zero_()
            conv.norm.bias.zero_()
    b, n, h, w = 2, 5, 3, 4
    centers = torch.randn(b, 8, n, generator=gen, dtype=torch.float64)
    feature = torch.randn(b, 6, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got, prediction, pixel = layer(feature, centers)
    masks = prediction["pred_masks"]
    assert masks.shape == (b, n, h, w)
    wv = layer.pixel_v.conv.weight[:, :, 0, 0]
    w3 = layer.kmeans_conv3.conv.weight[:, :, 0]
    want = torch.zeros_like(centers)
    for bi in range(b):
        # V = BN(W_v · P) per pixel; A·Vᵀ: the sum of the values of the pixels whose argmax query is q.
        value = _bn_eval(torch.einsum("oc,chw->ohw", wv, pixel[bi])[None], layer.pixel_v.norm)[0]
        summed = torch.zeros(8, n, dtype=torch.float64)
        for y in range(h):
            for x in range(w):
                q = max(range(n), key=lambda k: masks[bi, k, y, x].item())
                summed[:, q] += value[:, y, x]
        delta = _bn_eval((w3 @ _bn_eval(summed[None], layer.kmeans_value_bn)[0])[None], layer.kmeans_conv3.norm)[0]
        for c in range(8):
            for q in range(n):
                want[bi, c, q] = _gelu(_gelu(centers[bi, c, q].item() + delta[c, q].item()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_layer_gradient_skips_the_assignment_but_reaches_values_and_self_attention() -> None:
    torch.manual_seed(0)
    layer = KMaXTransformerLayer(6, num_classes=3, **SMALL).train()
    with torch.no_grad():  # open the zero-initialised branches so gradient can pass through them
        layer.kmeans_conv3.norm.weight.fill_(1.0)
        layer.query_conv3.norm.weight.fill_(1.0)
    centers = torch.randn(2, 8, 5, requires_grad=True)
    out, _, _ = layer(torch.randn(2, 6, 4, 4), centers)
    (out * torch.randn_like(out)).sum().backward()
    # The predictor only feeds the argmax assignment: a loss on the centres gives it no gradient at all.
    assert all(p.grad is None for p in layer.predictor.parameters())
    # The k-means update carries gradient into the pixel values V (and the pixel projection P before it) ...
    assert layer.pixel_v.conv.weight.grad.abs().sum() > 0
    assert layer.pixel_conv1.conv.weight.grad.abs().sum() > 0
    # ... and the self-attention, computed from the same projected centres Q, into Q and the centres.
    assert layer.query_qkv.conv.weight.grad.abs().sum() > 0
    assert layer.query_conv1.conv.weight.grad.abs().sum() > 0
    assert centers.grad.abs().sum() > 0


def test_decoder_shapes_per_layer() -> None:
    torch.manual_seed(0)
    dec = KMaXTransformerDecoder([16, 12, 10], 6, num_classes=4, layers=(1, 2, 1), num_queries=5, **SMALL).train()
    sizes = [(3, 4), (5, 7), (9, 13)]
    feats = [torch.randn(2, c, *s) for c, s in zip([16, 12, 10], sizes)]
    final, aux, keys = dec(feats, torch.randn(2, 6, 17, 25))
    assert dec.cluster_centers.shape == (8, 5)
    assert len(dec.layers) == len(aux) == len(keys) == 4
    for pred, key, size in zip(aux, keys, [sizes[0], sizes[1], sizes[1], sizes[2]]):
        assert pred["pred_masks"].shape == (2, 5, *size)
        assert pred["pred_logits"].shape == (2, 5, 5)
        assert pred["pixel_embeddings"].shape == (2, 4, *size)
        assert key.shape == (2, 8, *size)  # the bottleneck pixel feature P (input of a ReMaX head)
    assert final["pred_masks"].shape == (2, 5, 17, 25)
    assert final["pred_logits"].shape == (2, 5, 5)


def test_decoder_needs_one_layer_count_per_stride() -> None:
    with pytest.raises(ValueError, match="one count per input stride"):
        KMaXTransformerDecoder([16, 12, 10], 6, num_classes=4, layers=(1, 1), **SMALL)


def test_initialisation_knobs_of_the_mask_scale_and_kmeans_update():
    """The reference starts the mask-logit BN scale at 0.1 and the k-means update closed (0); both can be set."""
    from remax.models import build_model

    plain = build_model("nano", input_size=(65, 65))
    assert all(m.mask_bn.weight.item() == pytest.approx(0.1) for m in plain.modules() if hasattr(m, "mask_bn"))
    assert all(not layer.kmeans_conv3.norm.weight.any() for layer in plain.transformer_decoder.layers)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 65, 65)
    open_ = build_model("nano", input_size=(65, 65), mask_scale_init=1.0, kmeans_update_init=0.5).eval()
    assert all(m.mask_bn.weight.item() == 1.0 for m in open_.modules() if hasattr(m, "mask_bn"))
    assert all(bool((layer.kmeans_conv3.norm.weight == 0.5).all()) for layer in open_.transformer_decoder.layers)
    # With the k-means update closed (and the reference's zero-initialised self-attention and FFN residuals) the
    # centres, and so the class logits, are the same for every image at initialisation; open, they depend on it.
    closed = build_model("nano", input_size=(65, 65)).eval()
    logits = closed(x)["pred_logits"]
    assert torch.allclose(logits[0], logits[1])
    logits = open_(x)["pred_logits"]
    assert not torch.allclose(logits[0], logits[1])
