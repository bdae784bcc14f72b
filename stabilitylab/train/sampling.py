"""The batches of one training epoch: a seeded order that can start at any batch.

Each epoch draws its sample order from a generator seeded by the run's seed and the epoch.
A run resumed in the middle of an epoch rebuilds the same order and skips the batches
already trained on, without loading them.

Random per-image transforms (the ImageNet-style two-view augmentation of an image folder)
draw from the global random generators of the process that loads the batch. Those streams
would depend on the number of DataLoader workers and on how many batches each worker had
already loaded, which a resumed run cannot restore. So every batch is loaded with the
global torch, NumPy and Python generators seeded from (run seed, epoch, batch index), and in
the training process the previous generator states are restored afterwards. The
augmentation of a batch is then the same with any ``--workers`` value and after a resume.
Batch-level augmentation on the training device (``DataBundle.batch_views``) draws from the
training process's own generators, which checkpoints save.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, RandomSampler, Sampler

# (dataset index, batch seed): what the batch sampler passes to SeededBatches.
SeededIndex = tuple[int, int]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Return the 64-bit seed of one batch, from NumPy's SeedSequence hash of the three ints."""
    state = np.random.SeedSequence((seed, epoch, batch)).generate_state(1, dtype=np.uint64)
    return int(state[0])


class EpochBatches(Sampler[list[SeededIndex]]):
    """The full batches of one epoch from batch ``start`` on, each index paired with its seed.

    The order is that of ``RandomSampler`` with ``generator``, cut into ``batch_size`` batches
    with the last partial batch dropped. Skipped batches cost one permutation, no loading.

    With ``world_size`` processes, ``batch_size`` is the global batch: every process draws
    the same order and yields slice ``rank`` of each batch, of batch_size / world_size
    indices. Rank 0 loads its slice under the batch's seed, the others under seeds of their
    own, so that no two processes draw the same augmentation.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        generator: torch.Generator,
        seed: int,
        epoch: int,
        start: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(
                f"a batch of {batch_size} cannot be split into {world_size} equal slices "
                f"for rank {rank}"
            )
        self.rank = rank
        self.world_size = world_size
        self._slice = batch_size // world_size
        self._batches = BatchSampler(
            RandomSampler(range(size), generator=generator), batch_size, drop_last=True
        )
        if not 0 <= start <= len(self._batches):
            raise ValueError(f"start batch {start} is outside the {len(self._batches)} batches")
        self.seed = seed
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return len(self._batches) - self.start

    def __iter__(self) -> Iterator[list[SeededIndex]]:
        for index, batch in enumerate(self._batches):
            if index < self.start:
                continue
            seed = batch_seed(self.seed, self.epoch, index)
            if self.rank > 0:
                seed = batch_seed(seed, self.rank, 0)
            first = self.rank * self._slice
            yield [(sample, seed) for sample in batch[first : first + self._slice]]


@contextlib.contextmanager
def seeded_global_generators(seed: int) -> Iterator[None]:
    """Seed the global CPU torch, NumPy and Python generators, and restore them on exit.

    Only the CPU generator of torch is seeded, so the CUDA generators that draw the
    augmentation on the device are left alone.
    """
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededBatches(Dataset):
    """A dataset that loads each batch of :class:`EpochBatches` under the batch's seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: SeededIndex) -> Any:
        index, seed = item
        with seeded_global_generators(batch_seed(seed, index, 0)):
            return self.dataset[index]

    def __getitems__(self, items: Sequence[SeededIndex]) -> list[Any]:
        seed = items[0][1]
        indices = [index for index, _ in items]
        with seeded_global_generators(seed):
            fetch = getattr(self.dataset, "__getitems__", None)
            if fetch is not None:
                return list(fetch(indices))
            return [self.dataset[index] for index in indices]


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """Let a DataLoader worker ignore SIGINT, which the training process handles for it.

    Ctrl-C in a terminal reaches every process of the group. The training process finishes
    its step and writes a checkpoint, and that needs the workers alive until it stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
