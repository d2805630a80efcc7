"""Data in real epochs for Lightning, from Detectron2's dataset catalog and mappers."""

from __future__ import annotations

import logging
import math
from typing import List

import pytorch_lightning as pl
import torch.distributed as dist
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler, RepeatFactorTrainingSampler
from torch.utils.data import DataLoader

from ..data import build_mapper
from ..data.check import unusable_annotations
from ..data.sampling import (
    EpochBatchSampler,
    EpochShardSampler,
    SeededMapDataset,
    aspect_ratio_groups,
)

__all__ = ["DetectionDataModule", "batches_per_epoch"]

logger = logging.getLogger("alrp_d2")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# DATALOADER.SAMPLER_TRAIN values the data module implements (Detectron2's others are refused)
TRAINING_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")


def batches_per_epoch(num_images: int, ims_per_batch: int, world_size: int) -> int:
    """Batches each rank runs per epoch: its shard of ``num_images`` (padded to equal
    size, as DistributedSampler does) in batches of ``ims_per_batch / world_size``."""
    per_rank = math.ceil(num_images / world_size)
    return math.ceil(per_rank / (ims_per_batch // world_size))


class DetectionDataModule(pl.LightningDataModule):
    """Training data in epochs: each rank gets its own shard of the dataset,
    reshuffled every epoch (``EpochBatchSampler.set_epoch``, called by Lightning),
    with the same number of batches on every rank, grouped by aspect ratio with
    ``DATALOADER.ASPECT_RATIO_GROUPING``, each image augmented under random
    states of its own (``SeededMapDataset``). Its state in a checkpoint is the epoch and
    the batches of it already trained: a run resumed from a checkpoint written in the
    middle of an epoch goes on with the next batch of the same permutation. Test data:
    Detectron2's ``InferenceSampler`` shards, one image per batch, no image twice.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._train_dicts = None
        self._train_datasets: List[tuple] = []  # (name, number of images) of each training set
        self._resume_at = None  # (epoch, batches done) from a checkpoint
        self._repeat_factors = None  # of the training images, with RepeatFactorTrainingSampler

    def train_dicts(self) -> List[dict]:
        if self._train_dicts is None:
            dicts, datasets = [], []
            filter_empty = self.cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            for name in self.cfg.DATASETS.TRAIN:  # one by one, to name the dataset of a bad image
                part = get_detection_dataset_dicts([name], filter_empty=filter_empty)
                unusable = unusable_annotations(name, part)
                if unusable:
                    logger.warning("%s", unusable)
                dicts.extend(part)
                datasets.append((name, len(part)))
            self._train_dicts, self._train_datasets = dicts, datasets
        return self._train_dicts

    def per_rank_batch(self, world_size: int) -> int:
        total = self.cfg.SOLVER.IMS_PER_BATCH
        if total % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes"
                f" ({world_size})"
            )
        return total // world_size

    def epoch_sampler(self, world_size: int = 1, rank: int = 0) -> EpochShardSampler:
        """The images of each epoch (``DATALOADER.SAMPLER_TRAIN``): each once, or repeated by
        Detectron2's repeat factors (``REPEAT_THRESHOLD``, ``REPEAT_SQRT``) rounded by
        ``REPEAT_ROUNDING``."""
        loader = self.cfg.DATALOADER
        dicts = self.train_dicts()
        if loader.SAMPLER_TRAIN not in TRAINING_SAMPLERS:
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN {loader.SAMPLER_TRAIN!r} is not supported by the"
                f" Lightning engine; use one of {', '.join(TRAINING_SAMPLERS)}"
            )
        factors = None
        if loader.SAMPLER_TRAIN == "RepeatFactorTrainingSampler":
            if self._repeat_factors is None:  # once: Detectron2 logs a line per category
                self._repeat_factors = (
                    RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                        dicts, loader.REPEAT_THRESHOLD, sqrt=loader.REPEAT_SQRT
                    )
                )
            factors = self._repeat_factors
        return EpochShardSampler(
            len(dicts),
            num_replicas=world_size,
            rank=rank,
            seed=max(self.cfg.SEED, 0),
            repeat_factors=factors,
            rounding=loader.REPEAT_ROUNDING,
        )

    def epoch_size(self) -> int:
        """Training images per epoch over all processes (more than the dataset's with
        repeat factors)."""
        return self.epoch_sampler().epoch_size

    def batch_groups(self):
        """Each training image's aspect-ratio bucket with ``DATALOADER.ASPECT_RATIO_GROUPING``
        (:func:`~alrp_d2.data.sampling.aspect_ratio_groups`), else None."""
        if not self.cfg.DATALOADER.ASPECT_RATIO_GROUPING:
            return None
        return aspect_ratio_groups(self.train_dicts(), self.cfg.DATALOADER.ASPECT_RATIO_BINS)

    def train_dataloader(self):
        world_size, rank = _world()
        batch_size = self.per_rank_batch(world_size)
        dicts = self.train_dicts()
        # Serialised records: workers read them without copying the list's pages.
        records = DatasetFromList(dicts, copy=False, serialize=True)
        seed = max(self.cfg.SEED, 0)
        dataset = SeededMapDataset(
            records, build_mapper(self.cfg, True), seed=seed, datasets=self._train_datasets
        )
        batches = EpochBatchSampler(
            self.epoch_sampler(world_size, rank), batch_size, self.batch_groups()
        )
        if self._resume_at is not None:
            epoch, done = self._resume_at
            # A checkpoint of an epoch's end resumes with the next epoch.
            batches.resume_at(*((epoch + 1, 0) if done >= len(batches) else (epoch, done)))
            self._resume_at = None
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
            collate_fn=trivial_batch_collator,
            persistent_workers=self.cfg.DATALOADER.NUM_WORKERS > 0,
        )

    def state_dict(self):
        """The position in the training data: the epoch and its batches trained so far."""
        loop = self.trainer.fit_loop
        return {
            "epoch": self.trainer.current_epoch,
            "batches_done": loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state_dict):
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def test_dataloader_for(self, dataset_name: str):
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        dataset = MapDataset(DatasetFromList(dicts, copy=False), build_mapper(self.cfg, False))
        return DataLoader(
            dataset,
            batch_size=1,
            sampler=InferenceSampler(len(dataset)),
            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
            collate_fn=trivial_batch_collator,
        )

    def val_dataloader(self):
        return [self.test_dataloader_for(name) for name in self.cfg.DATASETS.TEST]
