"""COCO-panoptic PNG helpers: id <-> colour round trip, the formula's byte order, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from remax.evaluation import id2rgb, read_panoptic_png, rgb2id, write_panoptic_png


def test_id_colour_formula_and_round_trip(tmp_path):
    # id = R + 256·G + 256²·B (panopticapi's rgb2id code; its IdGenerator docstring has it wrong)
    assert id2rgb(np.array([[1 + 256 * 2 + 65536 * 3]])).tolist() == [[[1, 2, 3]]]
    assert rgb2id(np.array([[[1, 2, 3]]], dtype=np.uint8)).tolist() == [[197121]]
    ids = np.random.default_rng(0).integers(0, 256**3, size=(13, 17))
    write_panoptic_png(tmp_path / "a.png", ids)
    back = read_panoptic_png(tmp_path / "a.png")
    assert back.dtype == np.uint32 and np.array_equal(back, ids)
    # An alpha channel is ignored, as panopticapi ignores it.
    Image.fromarray(np.dstack([id2rgb(ids), np.full(ids.shape, 9, np.uint8)])).save(tmp_path / "b.png")
    assert np.array_equal(read_panoptic_png(tmp_path / "b.png"), ids)


def test_bad_files_and_ids(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray.png: a COCO-panoptic PNG must be RGB"):
        read_panoptic_png(tmp_path / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read panoptic PNG .*broken.png"):
        read_panoptic_png(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_panoptic_png(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="fit an RGB PNG"):
        id2rgb(np.array([[256**3]]))
