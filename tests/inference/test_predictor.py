"""The Predictor on images of every mode and size, singly and in batches, from a model or a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inference_helpers import CATEGORIES, INPUT, nano_config, nano_model, write_checkpoint
from PIL import Image

from remax.checkpoint import CheckpointError
from remax.inference.postprocess import panoptic_postprocess, semantic_postprocess
from remax.inference.predictor import Predictor, load_image, resized_shape


@pytest.fixture(scope="module")
def cfg():
    return nano_config()


@pytest.fixture(scope="module")
def predictor(cfg):
    return Predictor(nano_model(cfg), cfg, CATEGORIES)


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: structure the random model turns into several segments."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def manual_prediction(predictor: Predictor, rgb: np.ndarray):
    """The pre/post-processing pipeline of kmax-reference §4 written out step by step, as an oracle."""
    h, w = rgb.shape[:2]
    scale = min((INPUT[0] - 1) / h, (INPUT[1] - 1) / w)  # a k·32+1 input is filled to k·32 and padded
    rh, rw = round(h * scale), round(w * scale)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 255)
    padded = torch.zeros(1, 3, *INPUT)
    padded[:, :, :rh, :rw] = x / 127.5 - 1.0
    with torch.no_grad():
        out = predictor.model(padded)
    masks = F.interpolate(out["pred_masks"], size=INPUT, mode="bilinear", align_corners=True)[:, :, :rh, :rw]
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[0]
    pan = panoptic_postprocess(out["pred_logits"][0], masks, torch.tensor([c.isthing for c in CATEGORIES]),
                               predictor.cfg.eval)
    return pan, semantic_postprocess(out["pred_logits"][0], masks)


def test_odd_size_matches_manual_pipeline(predictor):
    rgb = picture(37, 53)
    res = predictor.predict(rgb)
    pan, sem = manual_prediction(predictor, rgb)
    assert res.id_map.shape == (37, 53) and res.semantic.shape == (37, 53)
    assert (res.height, res.width) == (37, 53)
    assert len(res.segments_info) >= 2, "the test model should produce several segments"
    np.testing.assert_array_equal(res.id_map.numpy(), pan.id_map.numpy())
    np.testing.assert_array_equal(res.semantic.numpy(), sem.numpy())
    # segments_info: data-set ids through the categories, contiguous label kept, areas = pixel counts.
    for seg, ref in zip(res.segments_info, pan.segments_info, strict=True):
        assert seg["label"] == ref["category_id"]
        assert seg["category_id"] == CATEGORIES[ref["category_id"]].id
        assert seg["isthing"] == CATEGORIES[ref["category_id"]].isthing
        assert seg["area"] == int((res.id_map == seg["id"]).sum()) > 0
        assert 0.0 <= seg["score"] <= 1.0
    inst = res.instances
    assert inst.masks.shape == (len(inst), 37, 53) and inst.masks.dtype == torch.bool
    assert all(CATEGORIES[int(lbl)].isthing for lbl in inst.labels)
    assert res.instance_category_ids.tolist() == [CATEGORIES[int(lbl)].id for lbl in inst.labels]
    assert torch.all(inst.scores[:-1] >= 0)


def test_input_types_give_the_same_result(predictor, tmp_path):
    rgb = picture(40, 31, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    ref = predictor.predict(rgb).id_map
    for source in (path, str(path), Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1)):
        np.testing.assert_array_equal(predictor.predict(source).id_map.numpy(), ref.numpy())


def test_rgba_is_composited_on_black(predictor, tmp_path):
    rgb = picture(30, 45, seed=4)
    alpha = np.full((30, 45), 255, np.uint8)
    alpha[:, :20] = 0
    alpha[:10, 20:] = 128
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    expected = np.round(rgb.astype(np.float64) * (alpha[..., None] / 255.0)).astype(np.uint8)
    loaded = load_image(tmp_path / "a.png").permute(1, 2, 0).numpy()
    assert np.abs(loaded.astype(int) - expected.astype(int)).max() <= 1
    assert (loaded[:, :20] == 0).all()
    res = predictor.predict(tmp_path / "a.png")
    assert res.id_map.shape == (30, 45)
    np.testing.assert_array_equal(res.id_map.numpy(), predictor.predict(loaded).id_map.numpy())


def test_grayscale_is_expanded_to_rgb(predictor, tmp_path):
    gray = picture(33, 20, seed=5)[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.shape == (3, 33, 20)
    for c in range(3):
        np.testing.assert_array_equal(loaded[c].numpy(), gray)
    ref = predictor.predict(np.repeat(gray[..., None], 3, axis=2)).id_map.numpy()
    np.testing.assert_array_equal(predictor.predict(tmp_path / "g.png").id_map.numpy(), ref)
    np.testing.assert_array_equal(predictor.predict(gray).id_map.numpy(), ref)  # H×W array input


def test_exif_rotation_swaps_height_and_width(predictor, tmp_path):
    rgb = picture(24, 50, seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be rotated 90° clockwise for display
    Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
    loaded = load_image(tmp_path / "r.png").permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(loaded, np.rot90(rgb, k=-1))
    res = predictor.predict(tmp_path / "r.png")
    assert res.id_map.shape == (50, 24)
    np.testing.assert_array_equal(res.id_map.numpy(), predictor.predict(np.rot90(rgb, k=-1).copy()).id_map.numpy())


def test_batch_runs_one_forward_and_matches_single_images(predictor):
    images = [picture(37, 53, 0), picture(64, 20, 1), picture(129, 129, 2), picture(10, 300, 3)]
    calls = []
    handle = predictor.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        batch = predictor.predict(images)
    finally:
        handle.remove()
    assert calls == [torch.Size([4, 3, *INPUT])]
    assert [r.id_map.shape for r in batch] == [(37, 53), (64, 20), (129, 129), (10, 300)]
    for img, res in zip(images, batch):
        single = predictor.predict(img)
        # Batched convolutions may round differently in the last bits; the maps must still agree on the
        # overwhelming majority of pixels and on the segment structure.
        agree = (single.id_map == res.id_map).float().mean().item()
        assert agree > 0.995
        assert [s["category_id"] for s in single.segments_info] == [s["category_id"] for s in res.segments_info]
    # batch_size splits into several forward passes with the same results.
    calls.clear()
    handle = predictor.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        again = predictor.predict(images, batch_size=3)
    finally:
        handle.remove()
    assert calls == [3, 1]
    assert all(a.id_map.shape == b.id_map.shape for a, b in zip(again, batch))


def test_large_images_merge_at_the_model_resolution(cfg, predictor):
    """Beyond max_merge_pixels the merge runs at the resized size; outputs are upsampled (nearest) to the image."""
    big = Predictor(predictor.model, cfg, CATEGORIES, max_merge_pixels=10_000)
    rgb = picture(300, 400, seed=8)
    res = big.predict(rgb)
    assert res.id_map.shape == (300, 400) and res.semantic.shape == (300, 400)
    assert res.instances.masks.shape[1:] == (300, 400)
    # Oracle: the merge of the logits cropped at the resized 96×128 input, then nearest upsampling.
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(96, 128), mode="bilinear", align_corners=False, antialias=True).clamp(0, 255)
    padded = torch.zeros(1, 3, *INPUT)
    padded[:, :, :96, :128] = x / 127.5 - 1.0
    with torch.no_grad():
        out = predictor.model(padded)
    masks = F.interpolate(out["pred_masks"], size=INPUT, mode="bilinear", align_corners=True)[0, :, :96, :128]
    pan = panoptic_postprocess(out["pred_logits"][0], masks, predictor.is_thing, cfg.eval)
    rows = (np.arange(300) + 0.5) * 96 / 300
    cols = (np.arange(400) + 0.5) * 128 / 400
    expected = pan.id_map.numpy()[rows.astype(int)][:, cols.astype(int)]
    np.testing.assert_array_equal(res.id_map.numpy(), expected)
    assert [s["area"] for s in res.segments_info] == [int((expected == s["id"]).sum()) for s in res.segments_info]
    assert len(res.segments_info) == len(pan.segments_info) >= 2


def test_resized_shape_keeps_aspect_and_fits():
    assert resized_shape(480, 640, (641, 641)) == (480, 640)  # COCO: 640 fits 641 by padding one pixel
    assert resized_shape(300, 400, (641, 641)) == (480, 640)  # k·32+1: filled to k·32, padded
    assert resized_shape(400, 300, (641, 641)) == (640, 480)
    assert resized_shape(960, 1280, (641, 641)) == (480, 640)
    assert resized_shape(10, 10, (129, 129)) == (128, 128)  # small images are upscaled
    assert resized_shape(1024, 2048, (1025, 2049)) == (1024, 2048)  # within a pixel: padded, not stretched
    assert resized_shape(640, 427, (641, 641)) == (640, 427)
    assert resized_shape(2048, 1024, (1025, 2049)) == (1024, 512)
    assert resized_shape(3, 1000, (129, 129)) == (1, 128)


def test_unsupported_inputs_raise_clear_errors(predictor, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        load_image(np.zeros((5, 5, 2), np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError):
        load_image(tmp_path / "bad.jpg")


def test_from_checkpoint_ignores_training_heads_and_matches(cfg, predictor, tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.pt", cfg)
    loaded = Predictor.from_checkpoint(path)
    assert not any(k.startswith(("aux_semantic_head.", "remask_heads.")) for k in loaded.model.state_dict())
    assert [c.id for c in loaded.categories] == [c.id for c in CATEGORIES]
    assert loaded.cfg.eval.thing_threshold == 0.0
    rgb = picture(45, 38, seed=7)
    a, b = loaded.predict(rgb), predictor.predict(rgb)
    np.testing.assert_array_equal(a.id_map.numpy(), b.id_map.numpy())
    assert a.segments_info == b.segments_info


def test_checkpoint_errors(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Predictor.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        Predictor.from_checkpoint(tmp_path / "corrupt.pt")
    # Weights of another architecture: the error names the mismatching keys.
    path = write_checkpoint(tmp_path / "ok.pt", cfg)
    state = torch.load(path, weights_only=True)
    other = nano_config()
    other.model.num_classes = 4
    state["config"] = other.to_dict()
    state["categories"] = state["categories"][:4]
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        Predictor.from_checkpoint(tmp_path / "mismatch.pt")
    del state["model"]["backbone." + next(k.split("backbone.", 1)[1] for k in state["model"]
                                          if k.startswith("backbone."))]
    state["config"] = cfg.to_dict()
    state["categories"] = torch.load(path, weights_only=True)["categories"]
    torch.save(state, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match="missing"):
        Predictor.from_checkpoint(tmp_path / "missing_key.pt")


def test_keep_remask_at_test_time_from_a_training_checkpoint(cfg, tmp_path):
    """eval.keep_remask (the paper's Table 5) keeps the ReMaX heads and relaxes the decoder's stages in eval()."""
    path = write_checkpoint(tmp_path / "ckpt.pt", cfg)
    state = torch.load(path, weights_only=True)
    for key in state["model"]:  # open the k-means updates, closed at initialisation, so assignments matter
        if key.endswith("kmeans_conv3.norm.weight"):
            state["model"][key].fill_(1.0)
    torch.save(state, path)
    plain = Predictor.from_checkpoint(path)
    kept = Predictor.from_checkpoint(path, overrides=["eval.keep_remask=true", "remax.remask_activation=sigmoid"])
    assert plain.model.remask_heads is None and kept.model.remask_heads is not None
    assert kept.model.remask.at_test and kept.model.remask.stages == cfg.remax.remask_stages
    rgb = picture(40, 40, seed=3)
    out_plain, _ = plain.forward_batch([torch.from_numpy(rgb).permute(2, 0, 1)])
    out_kept, _ = kept.forward_batch([torch.from_numpy(rgb).permute(2, 0, 1)])
    assert not torch.equal(out_plain["pred_masks"], out_kept["pred_masks"])
    # Nothing to keep: no heads in the file, or a run without ReMask in the decoder.
    no_heads = {k: v for k, v in state["model"].items() if not k.startswith(("remask_heads.", "aux_semantic"))}
    torch.save({**state, "model": no_heads}, tmp_path / "eval_only.pt")
    with pytest.raises(CheckpointError, match="semantic heads"):
        Predictor.from_checkpoint(tmp_path / "eval_only.pt", overrides=["eval.keep_remask=true"])
    with pytest.raises(ValueError, match="ReMask in the decoder"):
        Predictor.from_checkpoint(path, overrides=["eval.keep_remask=true", "remax.remask_in_decoder=false"])
