"""Data in real epochs for Lightning, from Detectron2's dataset catalog and mappers."""

from __future__ import annotations

import logging
import math
from typing import List

import pytorch_lightning as pl
import torch.distributed as dist
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler
from torch.utils.data import DataLoader

from ..data import build_mapper
from ..data.check import unusable_annotations
from ..data.sampling import EpochShardSampler, SeededMapDataset

__all__ = ["DetectionDataModule", "batches_per_epoch"]

logger = logging.getLogger("alrp_d2")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def batches_per_epoch(num_images: int, ims_per_batch: int, world_size: int) -> int:
    """Batches each rank runs per epoch: its shard (padded to equal size, as
    DistributedSampler does) in batches of ``ims_per_batch / world_size``."""
    per_rank = math.ceil(num_images / world_size)
    return math.ceil(per_rank / (ims_per_batch // world_size))


class DetectionDataModule(pl.LightningDataModule):
    """Training data in epochs: each rank gets its own shard of the dataset,
    reshuffled every epoch (``EpochShardSampler.set_epoch``, called by Lightning),
    with the same number of batches on every rank, each image augmented under random
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

    def train_dataloader(self):
        world_size, rank = _world()
        batch_size = self.per_rank_batch(world_size)
        seed = max(self.cfg.SEED, 0)
        dicts = self.train_dicts()
        # Serialised records: workers read them without copying the list's pages.
        records = DatasetFromList(dicts, copy=False, serialize=True)
        dataset = SeededMapDataset(
            records, build_mapper(self.cfg, True), seed=seed, datasets=self._train_datasets
        )
        sampler = EpochShardSampler(
            len(dicts), num_replicas=world_size, rank=rank, seed=seed, batch_size=batch_size
        )
        if self._resume_at is not None:
            epoch, done = self._resume_at
            batches = math.ceil(len(sampler) / batch_size)
            # A checkpoint of an epoch's end resumes with the next epoch.
            sampler.resume_at(*((epoch + 1, 0) if done >= batches else (epoch, done)))
            self._resume_at = None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
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
