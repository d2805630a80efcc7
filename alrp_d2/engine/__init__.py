"""Training with PyTorch Lightning: module, data, callbacks and the command line."""

from .callbacks import SelfBalanceCallback
from .checkpoint import AtomicCheckpointIO
from .data import DetectionDataModule, batches_per_epoch
from .module import DetectionModule, schedule_in_iterations

__all__ = [
    "AtomicCheckpointIO",
    "DetectionDataModule",
    "DetectionModule",
    "SelfBalanceCallback",
    "batches_per_epoch",
    "schedule_in_iterations",
]
