"""The resumable sample stream: positions, shuffling, ranks and per-position seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from remax.engine.sampling import SeededDataset, StreamSampler, position_seed


def _take(sampler: StreamSampler, n: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_stream_is_a_permutation_per_epoch_and_resumes() -> None:
    s = StreamSampler(num_images=5, micro_batch=2, seed=3)
    items = _take(s, 10)
    assert [p for _, p in items] == list(range(10))
    assert sorted(i for i, _ in items[:5]) == list(range(5))
    assert sorted(i for i, _ in items[5:]) == list(range(5))
    resumed = _take(StreamSampler(num_images=5, micro_batch=2, seed=3, start_step=3), 4)
    assert resumed == items[6:10]


def test_ranks_and_accumulation_split_the_same_global_batch() -> None:
    one = StreamSampler(num_images=7, micro_batch=1, accum_steps=4, world_size=1, seed=1)
    two = [StreamSampler(num_images=7, micro_batch=1, accum_steps=2, world_size=2, rank=r, seed=1) for r in (0, 1)]
    for step in range(3):
        union = sorted(two[0].positions(step) + two[1].positions(step))
        assert union == sorted(one.positions(step)) == list(range(4 * step, 4 * step + 4))
    # Micro-batch m of rank r is global slice m * world + r.
    assert two[0].positions(0) == [0, 2] and two[1].positions(0) == [1, 3]
    assert one.index_at(5) == two[1].index_at(5)


class _RandomItems:
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seeded_dataset_depends_on_position_only_and_keeps_global_rngs() -> None:
    ds = SeededDataset(_RandomItems(), seed=7)
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state().clone(), random.getstate())
    a = ds[(1, 10)]
    after = (torch.get_rng_state(), random.getstate())
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert ds[(1, 10)] == a
    assert ds[(1, 11)] != a
    assert SeededDataset(_RandomItems(), seed=8)[(1, 10)] != a
    assert position_seed(0, 1) != position_seed(0, 2) != position_seed(1, 1)
