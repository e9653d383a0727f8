"""remax.data.io: id codec, panoptic PNGs, photos of every mode, JSON, segment statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import encode_rgb
from PIL import Image

from remax.data.io import (
    id2rgb,
    image_size,
    load_json,
    read_image,
    read_panoptic_png,
    rgb2id,
    segment_stats,
    write_json,
    write_panoptic_png,
)


def test_id_codec_matches_the_formula():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 70001]], np.int64)
    rgb = id2rgb(ids)
    np.testing.assert_array_equal(rgb, encode_rgb(ids))
    assert rgb[1, 3].tolist() == [70001 % 256, (70001 // 256) % 256, 70001 // 65536]
    np.testing.assert_array_equal(rgb2id(rgb), ids)


def test_panoptic_png_round_trip_and_deterministic_bytes(tmp_path):
    ids = np.random.default_rng(0).integers(0, 2**24, (17, 23))
    write_panoptic_png(tmp_path / "a.png", ids)
    write_panoptic_png(tmp_path / "b.png", ids.copy())
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    back = read_panoptic_png(tmp_path / "a.png")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, ids)
    # A PNG written by another tool (PIL directly, our own encoding) reads the same.
    Image.fromarray(encode_rgb(ids)).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "c.png"), ids)


def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    t = read_image(tmp_path / "rgb.png")
    assert t.dtype.is_floating_point is False and tuple(t.shape) == (3, 5, 7)
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), rgb)

    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    g = read_image(tmp_path / "grey.png").numpy()
    for c in range(3):
        np.testing.assert_array_equal(g[c], grey)

    pal = Image.fromarray(grey, mode="L").convert("P")
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png").numpy(),
                                  np.asarray(pal.convert("RGB")).transpose(2, 0, 1))

    # 16-bit grey: the peak maps to 255.
    deep = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    d = read_image(tmp_path / "deep.png").numpy()
    np.testing.assert_array_equal(d[0], np.rint(deep * (255.0 / deep.max())).astype(np.uint8))

    # RGBA: composited over black, value * alpha / 255.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 0], [128, 64]]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    a = read_image(tmp_path / "rgba.png").permute(1, 2, 0).numpy().astype(int)
    expected = np.rint(np.array([200, 100, 50])[None, None] * rgba[..., 3:4] / 255.0)
    assert np.abs(a - expected).max() <= 1
    assert a[0, 1].tolist() == [0, 0, 0] and a[0, 0].tolist() == [200, 100, 50]


def test_read_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((8, 12, 3), np.uint8)
    arr[:4, :4] = [255, 0, 0]  # red top-left block
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise for display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100, subsampling=0)
    t = read_image(tmp_path / "rot.jpg")
    assert tuple(t.shape) == (3, 12, 8)
    assert image_size(tmp_path / "rot.jpg") == (12, 8)
    # After a clockwise rotation the old top-left corner is the top-right one.
    assert t[0, 1, 6] > 200 and t[0, 1, 1] < 60 and t[0, 10, 6] < 60


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(OSError, match="junk.jpg"):
        read_image(tmp_path / "junk.jpg")
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    assert image_size(tmp_path / "cut.png") == (64, 64)  # the header alone is intact
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_json_helpers(tmp_path):
    obj = {"images": [{"id": "a", "file_name": "é.jpg"}], "n": 3}
    write_json(tmp_path / "x" / "d.json", obj)
    text = (tmp_path / "x" / "d.json").read_text(encoding="utf-8")
    assert " " not in text.replace("remax", "") and json.loads(text) == obj
    assert load_json(tmp_path / "x" / "d.json") == obj
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["d.json"]  # no temporary file left
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        load_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        load_json(tmp_path / "none.json")


def test_segment_stats_against_a_direct_count():
    ids = np.random.default_rng(3).integers(0, 6, (13, 17)) * 1000
    stats = segment_stats(ids)
    assert sorted(stats) == [v for v in range(1000, 6000, 1000) if (ids == v).any()]
    for v, (area, bbox) in stats.items():
        ys, xs = np.nonzero(ids == v)
        assert area == len(ys)
        assert bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert segment_stats(np.zeros((3, 3), np.int64)) == {}
