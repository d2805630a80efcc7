"""The Lightning Trainer of a run: strategy, precision, callbacks, loggers."""

from __future__ import annotations

from typing import List

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from .callbacks import SelfBalanceCallback, StepSeedCallback
from .checkpoint import AtomicCheckpointIO, RunCheckpoint
from .cluster import Topology

__all__ = ["build_trainer"]


def _precision(cfg, accelerator: str) -> str:
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    return "16-mixed" if accelerator == "gpu" else "bf16-mixed"


def build_trainer(cfg, topology: Topology, accelerator: str, iters_per_epoch: int, seed: int) -> pl.Trainer:
    """A Trainer for ``cfg`` on ``topology``; ``seed`` seeds each training step
    (:class:`StepSeedCallback`)."""
    if topology.world_size > 1:
        backend = "nccl" if accelerator == "gpu" else "gloo"
        strategy = DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    else:
        strategy = "auto"
    plugins: List = [AtomicCheckpointIO()]
    if topology.launcher == "slurm":
        # The requeue signal is handled by alrp_d2.engine.cluster: at an iteration boundary.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    out = cfg.OUTPUT_DIR
    callbacks: List[pl.Callback] = [
        StepSeedCallback(seed),
        SelfBalanceCallback(record_dir=out),
        RunCheckpoint(out, every_n_iters=cfg.SOLVER.CHECKPOINT_ITERS, every_n_epochs=cfg.SOLVER.CHECKPOINT_PERIOD),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, min(20, iters_per_epoch // 5))),
    ]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    period = cfg.TEST.EVAL_PERIOD
    return pl.Trainer(
        accelerator=accelerator,
        devices=topology.devices,
        num_nodes=topology.num_nodes,
        strategy=strategy,
        max_epochs=max(cfg.SOLVER.MAX_EPOCHS, 1),
        precision=_precision(cfg, accelerator),
        gradient_clip_val=clip.CLIP_VALUE if clip.ENABLED else None,
        gradient_clip_algorithm=("value" if clip.CLIP_TYPE == "value" else "norm") if clip.ENABLED else None,
        callbacks=callbacks,
        plugins=plugins,
        logger=[TensorBoardLogger(out, name="tensorboard"), CSVLogger(out, name="csv")],
        enable_checkpointing=True,
        check_val_every_n_epoch=period if period > 0 else None,
        limit_val_batches=1.0 if period > 0 else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=max(1, min(20, iters_per_epoch)),
        default_root_dir=out,
        enable_model_summary=False,
    )
