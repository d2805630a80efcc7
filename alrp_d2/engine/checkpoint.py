"""Checkpoints that a crash never leaves half-written."""

from __future__ import annotations

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..io import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, flushes it to disk,
    then renames it over the target: readers see the old file or the new one, never
    a partial one. (Lightning's own writer may stage the file on another filesystem,
    where the final move is a copy.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)
