"""A SIGTERM that stops every process of a run at the same iteration."""

from __future__ import annotations

import signal

import pytorch_lightning as pl
import torch

__all__ = ["StopOnSignal"]


class StopOnSignal(pl.Callback):
    """Stops training at the end of the same iteration on every process when any of them
    receives SIGTERM (``docker stop``, Kubernetes, a spot reclaim, SLURM's requeue signal
    turned into SIGTERM by :func:`alrp_d2.engine.cluster.install_requeue_handler`).

    Lightning 2.6's own SIGTERM handler runs ``torch.distributed.broadcast`` inside the
    signal handler, i.e. at whatever point each process happens to be; under DDP that
    collective pairs with another process's gradient all-reduce, and the run dies with a
    gloo/NCCL error instead of stopping (seen with 2 processes). Here the handler only
    sets a flag; after every training batch the processes sum their flags (one 1-element
    all-reduce) and, when one was signalled, all of them raise Lightning's
    ``SIGTERMException`` after that batch, so the checkpoint written then
    (:class:`alrp_d2.engine.checkpoint.RunCheckpoint`) is that of one iteration on every
    process.
    """

    def __init__(self):
        super().__init__()
        self.requested = False

    def _handler(self, signum, frame):
        self.requested = True  # no logging or communication inside a signal handler

    def on_train_start(self, trainer, pl_module):
        # Lightning installs its handler when fit starts, after the callbacks' setup: this
        # replaces it for the training loop (Lightning restores the handlers from before
        # fit when fit ends, normally or not).
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        requested = self.requested
        if trainer.world_size > 1:
            flag = torch.tensor(float(requested), device=trainer.strategy.root_device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if requested:
            # Lightning raises SIGTERMException after this batch, on every process alike.
            trainer._signal_connector.received_sigterm = True
