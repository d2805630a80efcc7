"""Training data that a resumed run reproduces exactly.

A training run is resumable at any batch only if the data it sees after the resume is
the data it would have seen without the interruption. Two things make that so here:

- :class:`EpochShardSampler` gives each rank its shard of one shuffled permutation
  per epoch (a function of the seed and the epoch alone) and can start an epoch in its
  middle, at the first batch not yet trained;
- :class:`SeededMapDataset` maps each image under random states derived from
  ``(seed, epoch, index)``, so an image's augmentation does not depend on the images
  mapped before it, on the data-loader worker that maps it, nor on the number of workers.

Nothing of either needs saving beyond ``(epoch, batches done)``.
"""

from __future__ import annotations

import bisect
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["DataError", "EpochShardSampler", "SeededMapDataset", "derived_seed"]

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A training image or annotation that cannot be used; the message names the file
    and its dataset."""


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (``numpy.random.SeedSequence``): nearby
    tuples give unrelated seeds."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(1)[0]
    )


class EpochShardSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank's shard of the epoch's permutation.

    The permutation of epoch ``e`` is ``torch.randperm(n)`` under seed ``seed + e``,
    padded by repetition to a multiple of ``num_replicas`` and dealt round-robin, as
    ``torch.utils.data.DistributedSampler`` does, so every rank gets ``len(self)``
    indices. :meth:`resume_at` makes the next iteration over epoch ``e`` start after its
    first ``batches_done`` batches; ``len(self)`` stays the whole shard, as Lightning
    expects of a loader that restores its position.
    """

    def __init__(
        self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1
    ):
        if size <= 0:
            raise ValueError("the training set is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, indices to skip)

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration over ``epoch`` skips its first ``batches_done`` batches."""
        self.epoch = epoch
        self._resume = (epoch, batches_done * self.batch_size)

    def shard(self, epoch: int) -> List[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        total = len(self) * self.num_replicas
        order += (order * (total // self.size + 1))[: total - self.size]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        indices = self.shard(epoch)
        if self._resume is not None and self._resume[0] == epoch:
            indices = indices[self._resume[1] :]
            self._resume = None
        return iter([(epoch, index) for index in indices])


class SeededMapDataset(Dataset):
    """``mapper(dicts[index])`` for ``(epoch, index)`` keys, under Python, NumPy and
    torch random states seeded from ``(seed, epoch, index)``; the caller's random states
    are restored afterwards.

    ``dicts`` is best Detectron2's ``DatasetFromList`` (serialised records, which
    data-loader workers share without copying) and ``mapper`` one that copies the record
    it is given, as Detectron2's ``DatasetMapper`` does. ``datasets`` names the datasets
    ``dicts`` concatenates, with their lengths: a mapper that fails raises
    :class:`DataError` naming the image file and its dataset.
    """

    def __init__(
        self,
        dicts: Sequence[dict],
        mapper: Callable[[dict], dict],
        seed: int,
        datasets: Sequence[Tuple[str, int]] = (),
    ):
        self.dicts = dicts
        self.mapper = mapper
        self.seed = seed
        self._names = [name for name, _ in datasets]
        self._ends = list(np.cumsum([count for _, count in datasets]))

    def __len__(self) -> int:
        return len(self.dicts)

    def dataset_of(self, index: int) -> str:
        position = bisect.bisect_right(self._ends, index)
        return self._names[position] if position < len(self._names) else "?"

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        epoch, index = key
        record = self.dicts[index]
        seed = derived_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                mapped = self.mapper(record)
        except Exception as err:
            raise DataError(
                f"training image {record.get('file_name', '?')!r} of dataset "
                f"{self.dataset_of(index)!r} cannot be used: {type(err).__name__}: {err}"
            ) from err
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        if mapped is None:
            raise DataError(
                f"training image {record.get('file_name', '?')!r} of dataset "
                f"{self.dataset_of(index)!r}: the mapper returned no data"
            )
        return mapped
