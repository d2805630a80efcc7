"""Checkpoints of a training run: written atomically, often enough, and on the way out.

In ``OUTPUT_DIR``:

- ``last.ckpt``: the whole training state (model, optimizer, schedule, loops, data
  position, self-balance sums), written every ``SOLVER.CHECKPOINT_ITERS`` iterations
  within an epoch and at every epoch's end; before a new one is written, the one it
  replaces is renamed ``last.prev.ckpt``, so a good checkpoint survives even a newest
  one damaged later;
- ``checkpoints/epochNNN.ckpt``: after every ``SOLVER.CHECKPOINT_PERIOD`` epochs;
- on SIGTERM (and SLURM's requeue signal) or a training image that cannot be read,
  ``last.ckpt`` with the progress up to the last completed iteration.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..data.sampling import DataError
from ..io import atomic_write, safe_load
from ..run_folder import RunFolder
from ..weights import WeightsCheckpointer

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "WeightsCheckpointer"]

logger = logging.getLogger("alrp_d2")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, flushes it to disk,
    then renames it over the target: readers see the old file or the new one, never
    a partial one. (Lightning's own writer may stage the file on another filesystem,
    where the final move is a copy.)

    Reads a checkpoint (``--resume``) without running code from it
    (:func:`alrp_d2.io.safe_load`), whatever ``weights_only`` Lightning asks for: the
    training state holds tensors, numbers, strings and containers only."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load(os.fspath(path))

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)


def _replace_by_link(source: str, target: str) -> None:
    """``target`` becomes a second name of ``source`` (a copy where links are not
    supported), atomically."""
    tmp = os.path.join(os.path.dirname(target) or ".", f".tmp-link-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _caused_by_data(exception: BaseException) -> bool:
    # A DataError raised in a DataLoader worker comes back re-raised as a new DataError;
    # one raised in the main process may be wrapped by another exception.
    while exception is not None:
        if isinstance(exception, DataError):
            return True
        exception = exception.__cause__
    return False


class RunCheckpoint(Checkpoint):
    """Writes the run's checkpoints (module docstring).

    A Lightning ``Checkpoint`` callback, so it runs after the other callbacks of the
    same hook (the self-balance weight of a finished epoch is set before it is saved).

    Args:
        dirpath: ``OUTPUT_DIR``.
        every_n_iters: ``last.ckpt`` every this many iterations inside an epoch (0: only
            at epoch ends).
        every_n_epochs: ``checkpoints/epochNNN.ckpt`` every this many epochs (0: none).
    """

    def __init__(self, dirpath: str, every_n_iters: int = 0, every_n_epochs: int = 0):
        super().__init__()
        self.dirpath = dirpath
        self.every_n_iters = every_n_iters
        self.every_n_epochs = every_n_epochs
        self.last_path: Optional[str] = None  # the newest checkpoint written

    @property
    def path(self) -> str:
        return RunFolder(self.dirpath).last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_iters <= 0 or trainer.global_step % self.every_n_iters:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end writes it, once the epoch is complete
        self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer)
        epochs = trainer.current_epoch + 1
        if self.every_n_epochs > 0 and epochs % self.every_n_epochs == 0 and trainer.is_global_zero:
            numbered = RunFolder(self.dirpath).numbered_checkpoint(epochs)
            os.makedirs(os.path.dirname(numbered), exist_ok=True)
            _replace_by_link(self.path, numbered)
            logger.info("Checkpoint of epoch %d saved to %s", epochs, numbered)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            # Lightning raises it on every rank at the same step boundary.
            if trainer.is_global_zero:
                self._write_now(trainer, "stopped by a signal")
        elif _caused_by_data(exception):
            # Raised on the rank that read the image; the others may be waiting in a
            # collective, so this rank writes alone, without Lightning's barrier (its
            # state equals every rank's after the last completed iteration).
            self._write_now(trainer, "a training image cannot be used")

    def _keep_previous(self) -> None:
        # A rename, not a copy: the previous checkpoint stays a file of its own, and until
        # the new one is complete it is the newest one (what a resume then takes).
        if os.path.isfile(self.path):
            os.replace(self.path, RunFolder(self.dirpath).previous)

    def _save(self, trainer: "pl.Trainer") -> None:
        if trainer.is_global_zero:
            self._keep_previous()
        trainer.save_checkpoint(self.path)  # every rank: Lightning synchronises them
        self.last_path = self.path

    def _write_now(self, trainer: "pl.Trainer", reason: str) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self._keep_previous()
        AtomicCheckpointIO().save_checkpoint(checkpoint, self.path)
        self.last_path = self.path
        logger.warning(
            "%s: progress up to iteration %d saved to %s",
            reason.capitalize(),
            trainer.global_step,
            self.path,
        )

    def state_dict(self):
        return {"dirpath": self.dirpath}
