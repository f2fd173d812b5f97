"""The endless, seeded training stream shared by the CT and RGB tasks, and its sampler.

Training reads an endless *stream*: item ``p`` of :class:`StreamDataset` is sample ``perm_k[p mod n]``
(``perm_k`` a seeded permutation for the k-th pass over the ``n`` samples) with its random crop, flip and
noise drawn from a generator seeded by ``(seed, p)``. The stream is a pure function of the seed, so a run
resumed at iteration i (``StreamSampler(start_iteration=i)``) sees exactly the batches an uninterrupted
run would, whatever the number of loader workers.

MONAI's ``Dataset`` reseeds nothing per item and torch's samplers are epoch-based; neither gives a stream
that is a function of (seed, position), hence these two classes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = ["StreamDataset", "StreamSampler"]


class StreamDataset(Dataset):
    """The endless, seeded training stream over a dataset of clean samples (see the module docstring).

    Args:
        base: dataset of clean samples (e.g. ``ldct_clip.data.ct_dataset.CTSliceDataset`` without transform).
        transform: random per-sample transforms (MONAI ``Randomizable``/``Compose``), reseeded per item.
        seed: seed of the whole stream.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self._pass: int | None = None
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.base)

    def _index(self, position: int) -> int:
        n = len(self.base)
        k = position // n
        if k != self._pass:
            self._perm = np.random.default_rng([self.seed, k, 0]).permutation(n)
            self._pass = k
        return int(self._perm[position % n])

    def __getitem__(self, position: int) -> dict:
        item = dict(self.base[self._index(position)])
        if hasattr(self.transform, "set_random_state"):
            seed = int(np.random.default_rng([self.seed, position, 1]).integers(2**31 - 1))
            self.transform.set_random_state(seed=seed)
        return self.transform(item)


class StreamSampler(Sampler):
    """Endless sampler of stream positions for :class:`StreamDataset`, sharded over ranks.

    Iteration i (0-based) of rank r gets positions ``(i * world_size + r) * batch_size + j``, j < batch_size,
    so the data depend only on the seed and the iteration. Use with ``DataLoader(batch_size=batch_size)``
    and an ``epoch_length`` on the engine (the sampler has no end). ``start_iteration`` is where the
    next ``iter()`` starts; ``ldct_clip.training.StreamPositionHandler`` sets it from the engine when a
    run starts or resumes.

    Args:
        batch_size: samples per iteration and rank.
        rank: this process's rank (None: the process group's, else 0).
        world_size: number of ranks (None: the process group's, else 1).
        start_iteration: the iteration the next ``iter()`` starts at.
    """

    def __init__(
        self,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        start_iteration: int = 0,
    ) -> None:
        if rank is None or world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised and rank is None else (rank or 0)
            world_size = dist.get_world_size() if initialised and world_size is None else (world_size or 1)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iteration = int(start_iteration)

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count(self.start_iteration):
            first = (i * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
