"""Training data that a resumed run reproduces exactly.

A training run is resumable at any batch only if the data it sees after the resume is
the data it would have seen without the interruption. Two things make that so here:

- :class:`EpochShardSampler` gives each rank its shard of one shuffled image list per
  epoch (a function of the seed and the epoch alone; with repeat factors, images of rare
  classes more than once), and :class:`EpochBatchSampler` cuts it into batches (grouped
  by aspect ratio or not, again a function of the seed and the epoch) and can start an
  epoch in its middle, at the first batch not yet trained;
- :class:`SeededMapDataset` maps each image under random states derived from
  ``(seed, epoch, index)``, so an image's augmentation does not depend on the images
  mapped before it, on the data-loader worker that maps it, nor on the number of workers.

Nothing of either needs saving beyond ``(epoch, batches done)``.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "ASPECT_RATIO_BINS",
    "DataError",
    "EpochBatchSampler",
    "EpochShardSampler",
    "SeededMapDataset",
    "aspect_ratio_groups",
    "derived_seed",
]

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


# Width / height between the common photo formats 9:16, 2:3, 3:4, 1:1, 4:3, 3:2 and 16:9
# (their geometric means), and 1 itself: landscape and portrait are never batched together.
ASPECT_RATIO_BINS = (0.612, 0.707, 0.866, 1.0, 1.155, 1.414, 1.633)


def aspect_ratio_groups(
    dicts: Sequence[dict], bins: Sequence[float] = ASPECT_RATIO_BINS
) -> List[int]:
    """Aspect-ratio buckets of dataset records: the number of ``bins`` edges that an image's
    ``width / height`` exceeds. ``bins=(1.0,)`` gives Detectron2's two buckets (landscape,
    ``width > height``, and the rest); the default also separates the common photo formats,
    whose batches would otherwise pad the narrower images to the widest. Read from the
    records (COCO's ``width`` and ``height``), so that the batches of an epoch are known
    before any image is read."""
    edges = sorted(bins)
    groups = []
    for position, record in enumerate(dicts):
        if "width" not in record or "height" not in record:
            raise DataError(
                f"training image {record.get('file_name', position)!r} has no 'width' and"
                " 'height' in its dataset record, which DATALOADER.ASPECT_RATIO_GROUPING needs:"
                " add them to the dataset, or set DATALOADER.ASPECT_RATIO_GROUPING False"
            )
        ratio = record["width"] / record["height"]
        groups.append(bisect.bisect_left(edges, ratio))
    return groups


REPEAT_ROUNDINGS = ("stochastic", "ceil")


class EpochShardSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank's shard of the epoch's image list.

    Without repeat factors the list of epoch ``e`` is ``torch.randperm(n)`` under seed
    ``seed + e``. With per-image repeat factors ``r_i`` (Detectron2's
    ``RepeatFactorTrainingSampler``), image ``i`` enters the list ``floor(r_i)`` times plus
    once more with probability ``r_i - floor(r_i)`` (``rounding="stochastic"``, Detectron2's
    rule, drawn anew each epoch) or ``ceil(r_i)`` times (``"ceil"``, mmdetection's
    ``ClassBalancedDataset``), then shuffled under the same seed. An epoch has a fixed
    number of images, :attr:`epoch_size` (``n``; ``ceil(sum r_i)`` for stochastic rounding,
    whose draws are cut or extended cyclically to it; ``sum ceil(r_i)`` for ceil), because the
    schedule counts epochs of known length.

    The list is padded by repetition to a multiple of ``num_replicas`` and dealt
    round-robin, as ``torch.utils.data.DistributedSampler`` does, so every rank gets
    ``len(self)`` indices.
    """

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        repeat_factors: Optional[torch.Tensor] = None,
        rounding: str = "stochastic",
    ):
        if size <= 0:
            raise ValueError("the training set is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        if rounding not in REPEAT_ROUNDINGS:
            raise ValueError(
                f"repeat rounding must be one of {', '.join(REPEAT_ROUNDINGS)}, got {rounding!r}"
            )
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.rounding = rounding
        self.epoch = 0
        self.repeat_factors = None
        if repeat_factors is not None:
            factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
            if factors.shape != (size,) or not bool(torch.all(factors >= 1)):
                raise ValueError(f"repeat factors must be {size} numbers of at least 1")
            self.repeat_factors = factors

    @property
    def epoch_size(self) -> int:
        """Images in one epoch, over all ranks, before padding."""
        if self.repeat_factors is None:
            return self.size
        if self.rounding == "ceil":
            return int(torch.ceil(self.repeat_factors).sum())
        return math.ceil(float(self.repeat_factors.sum()) - 1e-9)

    def __len__(self) -> int:
        return -(-self.epoch_size // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, epoch: int) -> List[int]:
        """The image list of ``epoch`` (all ranks), a function of the seed and the epoch."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        if self.repeat_factors is None:
            return torch.randperm(self.size, generator=generator).tolist()
        factors = self.repeat_factors
        if self.rounding == "ceil":
            counts = torch.ceil(factors)
        else:
            whole = torch.floor(factors)
            counts = whole + (
                torch.rand(self.size, generator=generator, dtype=torch.float64) < factors - whole
            )
        indices = torch.repeat_interleave(torch.arange(self.size), counts.long())
        order = indices[torch.randperm(len(indices), generator=generator)].tolist()
        size = self.epoch_size
        return (order * (size // len(order) + 1))[:size]

    def shard(self, epoch: int) -> List[int]:
        order = self.epoch_indices(epoch)
        total = len(self) * self.num_replicas
        order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, index) for index in self.shard(epoch)])


class EpochBatchSampler(Sampler):
    """This rank's batches of each epoch of ``sampler``, as lists of ``(epoch, index)``.

    Without ``groups`` a batch is the next ``batch_size`` indices of the shard. With
    ``groups`` (one bucket id per image, :func:`aspect_ratio_groups`), the shard is
    streamed into one bucket per group and a batch is emitted when a bucket fills, as
    Detectron2's ``AspectRatioGroupedDataset`` does; at the epoch's end the images left in
    the buckets are batched in shard order, so an epoch has ``ceil(len(sampler) /
    batch_size)`` batches either way, the same on every rank.

    Every batch of an epoch is a function of the seed and the epoch: :meth:`resume_at`
    makes the next iteration over epoch ``e`` start after its first ``batches_done``
    batches, and ``len(self)`` stays the whole epoch, as Lightning expects of a loader that
    restores its position.
    """

    def __init__(
        self, sampler: EpochShardSampler, batch_size: int, groups: Optional[Sequence[int]] = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if groups is not None and len(groups) != sampler.size:
            raise ValueError(f"{len(groups)} groups for {sampler.size} images")
        self.sampler = sampler
        self.batch_size = batch_size
        self.groups = None if groups is None else list(groups)
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, batches to skip)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration over ``epoch`` skips its first ``batches_done`` batches."""
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, batches_done)

    def batches(self, epoch: int) -> List[List[int]]:
        """This rank's batches of ``epoch``, as dataset indices."""
        shard, size = self.sampler.shard(epoch), self.batch_size
        if self.groups is None:
            return [shard[start : start + size] for start in range(0, len(shard), size)]
        batches: List[List[int]] = []
        buckets: dict = {}  # group -> [(position in the shard, index)]
        for position, index in enumerate(shard):
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append((position, index))
            if len(bucket) == size:
                batches.append([i for _, i in bucket])
                bucket.clear()
        rest = [i for _, i in sorted(p for bucket in buckets.values() for p in bucket)]
        batches += [rest[start : start + size] for start in range(0, len(rest), size)]
        return batches

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        # A generator: nothing happens before the first batch is asked for. A loader with
        # workers calls iter() twice before using the second iterator, and the first must
        # not consume the resume position.
        epoch = self.sampler.epoch
        batches = self.batches(epoch)
        if self._resume is not None and self._resume[0] == epoch:
            batches = batches[self._resume[1] :]
            self._resume = None
        for batch in batches:
            yield [(epoch, index) for index in batch]


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
