"""Data in real epochs for Lightning, from Detectron2's dataset catalog and mappers."""

from __future__ import annotations

import math
from typing import List

import pytorch_lightning as pl
import torch.distributed as dist
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler
from torch.utils.data import DataLoader, DistributedSampler

from ..data import build_mapper

__all__ = ["DetectionDataModule", "batches_per_epoch"]


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
    reshuffled every epoch (``DistributedSampler.set_epoch``, called by Lightning),
    with the same number of batches on every rank. Test data: Detectron2's
    ``InferenceSampler`` shards, one image per batch, no image twice.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._train_dicts = None

    def train_dicts(self) -> List[dict]:
        if self._train_dicts is None:
            self._train_dicts = get_detection_dataset_dicts(
                self.cfg.DATASETS.TRAIN,
                filter_empty=self.cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            )
        return self._train_dicts

    def per_rank_batch(self, world_size: int) -> int:
        total = self.cfg.SOLVER.IMS_PER_BATCH
        if total % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes ({world_size})")
        return total // world_size

    def train_dataloader(self):
        world_size, rank = _world()
        dataset = MapDataset(DatasetFromList(self.train_dicts(), copy=False), build_mapper(self.cfg, True))
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=max(self.cfg.SEED, 0), drop_last=False)
        return DataLoader(
            dataset, batch_size=self.per_rank_batch(world_size), sampler=sampler,
            num_workers=self.cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator,
            persistent_workers=self.cfg.DATALOADER.NUM_WORKERS > 0,
        )

    def test_dataloader_for(self, dataset_name: str):
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        dataset = MapDataset(DatasetFromList(dicts, copy=False), build_mapper(self.cfg, False))
        return DataLoader(dataset, batch_size=1, sampler=InferenceSampler(len(dataset)),
                          num_workers=self.cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)

    def val_dataloader(self):
        return [self.test_dataloader_for(name) for name in self.cfg.DATASETS.TEST]
