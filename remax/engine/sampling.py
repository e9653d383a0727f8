"""Deterministic, resumable sampling of training images.

Training reads one endless stream of *sample positions* ``p = 0, 1, 2, …``: position ``p`` is image
``perm_e[p mod n]`` of the shuffled epoch ``e = p // n``, and its augmentation is drawn from RNGs seeded by
``(seed, p)`` only. The global batch of optimiser step ``s`` is the positions ``[s·B, (s+1)·B)``, split into
gradient-accumulation micro-batches and DDP ranks. Therefore:

- resuming at step ``s`` restarts the stream at position ``s·B`` and reproduces the run exactly, with any number of
  data-loader workers (the workers' own seeds play no part);
- the same global batch gives the same images and augmentations whatever the number of ranks or micro-batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def position_seed(seed: int, position: int, stream: int = 0) -> int:
    """A 63-bit seed for one sample position (or micro-batch) of one run, independent of workers and ranks."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(position)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class StreamSampler(Sampler):
    """Endless ``(index, position)`` pairs for one rank, in the order that rank consumes them.

    With ``micro_batch`` images per forward pass, ``accum_steps`` forward passes per optimiser step and
    ``world_size`` ranks, a global batch is ``micro_batch · accum_steps · world_size`` positions; micro-batch ``m``
    of rank ``r`` takes the slice starting at ``(m · world_size + r) · micro_batch``.
    """

    def __init__(self, num_images: int, micro_batch: int, accum_steps: int = 1, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, start_step: int = 0) -> None:
        if num_images <= 0:
            raise ValueError("the training set is empty")
        self.num_images = num_images
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.start_step = start_step
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    def index_at(self, position: int) -> int:
        """The image index at a stream position."""
        epoch, offset = divmod(position, self.num_images)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(int(self.seed) * 100_003 + epoch)
            self._perm = torch.randperm(self.num_images, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def positions(self, step: int) -> list[int]:
        """This rank's positions for optimiser step ``step``, micro-batch after micro-batch."""
        out = []
        for m in range(self.accum_steps):
            base = step * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch
            out.extend(range(base, base + self.micro_batch))
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            for p in self.positions(step):
                yield self.index_at(p), p
            step += 1


class SeededDataset(Dataset):
    """Wraps a data set so that item ``(index, position)`` is drawn with RNGs seeded from the position.

    Python's ``random``, NumPy's global RNG and torch's CPU RNG are seeded for the call and restored afterwards, so
    loading in the main process (``num_workers=0``) leaves the training RNG streams untouched.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, position = item
        s = position_seed(self.seed, position, stream=1)
        py_state = random.getstate()
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)
