"""Training augmentation and batch collation: geometry, id-map consistency, copy-paste, determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from data_helpers import write_dataset

from remax.config import DataConfig
from remax.data.coco_panoptic import COCOPanopticDataset
from remax.data.loader import build_dataset, collate_panoptic, fit_size
from remax.data.transforms import TrainTransform, copy_paste, hflip_pair, resize_image, resize_nearest
from remax.structures import PanopticTarget


def _cfg(**kw) -> DataConfig:
    base = dict(crop_size=(16, 20), resize_longer_side=32, min_scale=1.0, max_scale=1.0, hflip=False,
                color_jitter=False, copy_paste=False, copy_paste_prob=0.0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture()
def ds(tmp_path) -> COCOPanopticDataset:
    write_dataset(tmp_path, "train", n=3)
    return COCOPanopticDataset.from_root(tmp_path, "train")


def _original_ids(t: PanopticTarget) -> torch.Tensor:
    lut = torch.cat([torch.zeros(1, dtype=torch.int64), t.segment_ids])
    return lut[t.id_map]


def _check_consistent(t: PanopticTarget) -> None:
    S = t.num_segments
    assert t.id_map.dtype == torch.int64 and int(t.id_map.min()) >= 0 and int(t.id_map.max()) <= S
    counts = torch.bincount(t.id_map.reshape(-1), minlength=S + 1)
    assert (counts[1:] > 0).all(), "a segment without pixels was kept"
    assert t.areas.tolist() == counts[1:].tolist()
    assert len(set(t.segment_ids.tolist())) == S
    assert t.classes.numel() == t.is_thing.numel() == t.is_crowd.numel() == S


def test_resize_nearest_is_pixel_centred():
    m = torch.arange(48).reshape(6, 8)
    assert torch.equal(resize_nearest(m, (3, 4)), m[1::2, 1::2])
    assert torch.equal(resize_nearest(m, (12, 16)), m.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_crop_is_a_window_and_collate_pads_with_void(ds):
    t = TrainTransform(_cfg(), ds)
    image, target = ds.raw_item(0)
    full_ids = _original_ids(target)
    torch.manual_seed(3)
    out_img, out_t = t(image.clone(), target, 0)
    assert tuple(out_img.shape) == (3, 16, 20) and tuple(out_t.id_map.shape) == (16, 20)
    crop_ids = _original_ids(out_t)
    hits = [(y, x) for y in range(24 - 16 + 1) for x in range(32 - 20 + 1)
            if torch.equal(full_ids[y:y + 16, x:x + 20], crop_ids)
            and torch.equal(image[:, y:y + 16, x:x + 20], out_img)]
    assert hits, "the crop is not a window of the original"
    _check_consistent(out_t)
    # Crowd and thing flags follow the original segment ids.
    orig = {int(s): (bool(c), bool(th)) for s, c, th in zip(target.segment_ids, target.is_crowd, target.is_thing)}
    for s, c, th in zip(out_t.segment_ids, out_t.is_crowd, out_t.is_thing):
        assert orig[int(s)] == (bool(c), bool(th))

    images, targets = collate_panoptic([{"image": out_img, "target": out_t}], (21, 25),
                                       normalize=lambda x: x / 127.5 - 1)
    assert tuple(images.shape) == (1, 3, 21, 25) and images.dtype == torch.float32
    assert torch.equal(images[0, :, :16, :20], out_img.float() / 127.5 - 1)
    assert (images[0, :, 16:] == 0).all() and (images[0, :, :, 20:] == 0).all()
    assert tuple(targets[0].id_map.shape) == (21, 25)
    assert torch.equal(targets[0].id_map[:16, :20], out_t.id_map)
    assert (targets[0].id_map[16:] == 0).all() and (targets[0].id_map[:, 20:] == 0).all()


def test_small_scale_keeps_the_whole_image_and_pads(ds):
    t = TrainTransform(_cfg(min_scale=0.5, max_scale=0.5), ds)
    image, target = ds.raw_item(1)
    out_img, out_t = t(image, target, 1)
    assert tuple(out_img.shape) == (3, 12, 16)  # smaller than the crop: no crop, no padding here
    assert torch.equal(_original_ids(out_t), resize_nearest(_original_ids(target), (12, 16)))
    images, targets = collate_panoptic([{"image": out_img, "target": out_t}], (16, 20))
    assert torch.equal(images[0, :, :12, :16], out_img.float())  # normalize=None keeps 0..255
    assert (targets[0].id_map[12:] == 0).all() and (targets[0].id_map[:, 16:] == 0).all()


def test_hflip_mirrors_exactly(ds):
    image, target = ds.raw_item(0)
    img_f, t_f = hflip_pair(image, target)
    assert torch.equal(img_f[:, :, 0], image[:, :, -1]) and torch.equal(t_f.id_map[:, 0], target.id_map[:, -1])
    assert torch.equal(hflip_pair(img_f, t_f)[1].id_map, target.id_map)
    t = TrainTransform(_cfg(crop_size=(24, 32), hflip=True), ds)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_img, out_t = t(image, target, 0)
        flipped = torch.equal(out_img, image.flip(-1)) and torch.equal(_original_ids(out_t),
                                                                       _original_ids(target).flip(-1))
        plain = torch.equal(out_img, image) and torch.equal(_original_ids(out_t), _original_ids(target))
        assert flipped != plain
        seen.add(flipped)
    assert seen == {True, False}


def _hand_targets():
    # Destination 8×8: floor (class 2, id 300) everywhere, a cat (class 0, id 12) at [0:3, 0:3].
    dst_ids = torch.ones(8, 8, dtype=torch.int64)
    dst_ids[0:3, 0:3] = 2
    dst = PanopticTarget(id_map=dst_ids, classes=torch.tensor([2, 0]), is_thing=torch.tensor([False, True]),
                         is_crowd=torch.tensor([False, False]), segment_ids=torch.tensor([300, 12]),
                         areas=torch.tensor([55, 9]))
    # Source 16×16 (pasted at 8×8): wall (class 3) top, floor (class 2) bottom, a dog (class 1) at [4:12, 4:8],
    # a crowd of dogs at [12:16, 12:16].
    src_ids = torch.ones(16, 16, dtype=torch.int64)
    src_ids[8:] = 2
    src_ids[4:12, 4:8] = 3
    src_ids[12:, 12:] = 4
    src = PanopticTarget(id_map=src_ids, classes=torch.tensor([3, 2, 1, 1]),
                         is_thing=torch.tensor([False, False, True, True]),
                         is_crowd=torch.tensor([False, False, False, True]), segment_ids=torch.tensor([5, 6, 77, 88]),
                         areas=None)
    dst_img = torch.full((3, 8, 8), 10, dtype=torch.uint8)
    src_img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return dst_img, dst, src_img, src


def test_copy_paste_hand_case():
    dst_img, dst, src_img, src = _hand_targets()
    half = resize_image(src_img, (8, 8))
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        img, t = copy_paste(dst_img, dst, src_img, src)
        _check_consistent(t)
        assert not t.is_crowd.any()  # the crowd region is never pasted
        ids = t.segment_ids.tolist()
        assert ids[0] == 300  # the floor keeps its segment
        dog = [k for k in range(t.num_segments) if int(t.classes[k]) == 1]
        assert len(dog) == 1 and ids[dog[0]] > 300  # new thing, new id
        dog_mask = t.id_map == dog[0] + 1
        expected_dog = torch.zeros(8, 8, dtype=torch.bool)
        expected_dog[2:6, 2:4] = True
        assert torch.equal(dog_mask, expected_dog)
        assert torch.equal(img[:, dog_mask], half[:, dog_mask])
        floor = t.id_map == 1
        wall_segments = [k for k in range(t.num_segments) if int(t.classes[k]) == 3]
        assert sum(int(c) == 2 for c in t.classes) == 1  # pasted floor, if any, merged into the floor
        if wall_segments:  # wall pasted over the top half: the cat is covered and removed
            outcomes.add("wall")
            assert 0 not in t.classes.tolist() and 12 not in ids
            wall = t.id_map == wall_segments[0] + 1
            assert torch.equal(wall, torch.zeros(8, 8, dtype=torch.bool).index_fill_(0, torch.arange(4), True)
                               & ~expected_dog)
            assert floor[4:].logical_or(dog_mask[4:]).all() and not floor[:4].any()
        else:  # floor pasted over the bottom half: the cat survives minus the dog's pixels
            outcomes.add("floor")
            cat = [k for k in range(t.num_segments) if ids[k] == 12]
            assert len(cat) == 1
            expected_cat = torch.zeros(8, 8, dtype=torch.bool)
            expected_cat[0:3, 0:3] = True
            expected_cat &= ~expected_dog
            assert torch.equal(t.id_map == cat[0] + 1, expected_cat)
            assert t.num_segments == 3
            # Pasted floor pixels show the source image; the crowd area shows floor from the source too.
            pasted_floor = torch.zeros(8, 8, dtype=torch.bool)
            pasted_floor[4:] = True
            pasted_floor &= ~expected_dog
            pasted_floor[6:, 6:] = False  # the crowd of the source is not pasted
            assert torch.equal(img[:, pasted_floor], half[:, pasted_floor])
            assert (img[:, 6:, 6:] == 10).all()
    assert outcomes == {"wall", "floor"}


def test_full_augmentation_keeps_targets_consistent_and_is_deterministic(ds):
    cfg = _cfg(min_scale=0.5, max_scale=2.0, hflip=True, color_jitter=True, copy_paste=True, copy_paste_prob=1.0)
    t = TrainTransform(cfg, ds)
    ds.transform = t
    for seed in range(8):
        torch.manual_seed(seed)
        a = ds[seed % 3]
        torch.manual_seed(seed)
        b = ds[seed % 3]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"].id_map, b["target"].id_map)
        assert a["image"].shape[1] <= 16 and a["image"].shape[2] <= 20
        _check_consistent(a["target"])
    torch.manual_seed(0)
    x = ds[0]["image"]
    torch.manual_seed(1)
    y = ds[0]["image"]
    assert x.shape != y.shape or not torch.equal(x, y)
    # The transform travels to worker processes with its data set.
    clone = pickle.loads(pickle.dumps(ds))
    torch.manual_seed(4)
    c = clone[2]
    torch.manual_seed(4)
    d = ds[2]
    assert torch.equal(c["image"], d["image"])


def test_build_dataset_and_eval_collate(tmp_path):
    write_dataset(tmp_path, "train", n=2)
    write_dataset(tmp_path, "val", n=1)
    cfg = _cfg(root=str(tmp_path))
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert isinstance(train.transform, TrainTransform) and train.transform.dataset is train
    assert val.transform is None and len(val) == 1
    item = val[0]
    assert fit_size(24, 32, (13, 17)) == (13, 17) and fit_size(24, 32, (33, 33)) == (24, 32)
    images, targets = collate_panoptic([item, item], (13, 21))
    assert tuple(images.shape) == (2, 3, 13, 21)
    h, w = fit_size(24, 32, (13, 21))
    assert (h, w) == (13, 17)
    assert torch.equal(targets[0].id_map[:h, :w], resize_nearest(item["target"].id_map, (h, w)))
    assert (targets[1].id_map[:, w:] == 0).all() and (images[:, :, :, w:] == 0).all()
    np.testing.assert_allclose(images[0, :, :h, :w].numpy(), resize_image(item["image"], (h, w)).float().numpy())
