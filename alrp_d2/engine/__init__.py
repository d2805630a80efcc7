"""Training with PyTorch Lightning: module, data, callbacks and the command line."""

from .callbacks import SelfBalanceCallback, StepSeedCallback
from .checkpoint import AtomicCheckpointIO, RunCheckpoint, WeightsCheckpointer
from .data import DetectionDataModule, batches_per_epoch
from .module import DetectionModule, schedule_in_iterations

__all__ = [
    "AtomicCheckpointIO",
    "RunCheckpoint",
    "StepSeedCallback",
    "WeightsCheckpointer",
    "DetectionDataModule",
    "DetectionModule",
    "SelfBalanceCallback",
    "batches_per_epoch",
    "schedule_in_iterations",
]
