"""The Lightning Trainer of a run: strategy, precision, callbacks, loggers."""

from __future__ import annotations

import importlib.util
import os
from typing import List, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from .best import BestCheckpoint
from .callbacks import SelfBalanceCallback, StepSeedCallback
from .checkpoint import AtomicCheckpointIO, RunCheckpoint
from .cluster import Topology
from .printer import MetricPrinter
from .signals import StopOnSignal

__all__ = ["LOGGERS", "build_loggers", "build_trainer", "check_loggers"]

# --logger name: the package it needs beside Lightning (None: none)
LOGGERS = {"tensorboard": "tensorboard", "csv": None, "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(names: Sequence[str]) -> None:
    """Raises ``ValueError`` for an unknown logger name, ``ImportError`` naming the
    package of a logger that is not installed."""
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; choose among {', '.join(LOGGERS)}")
        package = LOGGERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise ImportError(
                f"--logger {name} needs the package {package!r}, which is not installed:"
                f" pip install {package}"
            )


def build_loggers(names: Sequence[str], out: str) -> List:
    """Lightning loggers by name (``LOGGERS``), writing under ``out``: TensorBoard in
    ``out/tensorboard``, CSV in ``out/csv``, MLflow in ``out/mlruns`` (unless
    ``MLFLOW_TRACKING_URI`` is set), W&B in ``out/wandb`` (its project: ``WANDB_PROJECT``,
    default ``alrp_d2``). A logger whose package is missing raises ``ImportError`` naming
    it."""
    check_loggers(names)
    built = []
    for name in names:
        if name == "tensorboard":
            built.append(TensorBoardLogger(out, name="tensorboard"))
        elif name == "csv":
            built.append(CSVLogger(out, name="csv"))
        elif name == "wandb":
            built.append(
                WandbLogger(save_dir=out, project=os.environ.get("WANDB_PROJECT", "alrp_d2"))
            )
        else:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(
                os.path.abspath(out), "mlruns"
            )
            built.append(MLFlowLogger(experiment_name="alrp_d2", tracking_uri=uri))
    return built


def _precision(cfg, accelerator: str) -> str:
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    return "16-mixed" if accelerator == "gpu" else "bf16-mixed"


def build_trainer(
    cfg,
    topology: Topology,
    accelerator: str,
    iters_per_epoch: int,
    seed: int,
    loggers: Sequence[str] = ("tensorboard", "csv"),
    training: bool = True,
) -> pl.Trainer:
    """A Trainer for ``cfg`` on ``topology``; ``seed`` seeds each training step
    (:class:`StepSeedCallback`); ``loggers`` names its loggers (:func:`build_loggers`).
    ``training=False`` (``--eval-only``): no ``model_best.pth``, which only a training's
    evaluations may replace."""
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
        StopOnSignal(),
        StepSeedCallback(seed),
        SelfBalanceCallback(record_dir=out),
        RunCheckpoint(
            out,
            every_n_iters=cfg.SOLVER.CHECKPOINT_ITERS,
            every_n_epochs=cfg.SOLVER.CHECKPOINT_PERIOD,
        ),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, min(20, iters_per_epoch // 5))),
        MetricPrinter(cfg.SOLVER.LOG_PERIOD),
    ]
    if training and cfg.TEST.BEST_CHECKPOINT.METRIC:
        callbacks.append(
            BestCheckpoint(out, cfg.TEST.BEST_CHECKPOINT.METRIC, cfg.TEST.BEST_CHECKPOINT.MODE)
        )
    period = cfg.TEST.EVAL_PERIOD
    return pl.Trainer(
        accelerator=accelerator,
        devices=topology.devices,
        num_nodes=topology.num_nodes,
        strategy=strategy,
        max_epochs=max(cfg.SOLVER.MAX_EPOCHS, 1),
        precision=_precision(cfg, accelerator),
        callbacks=callbacks,
        plugins=plugins,
        logger=build_loggers(loggers, out),
        enable_checkpointing=True,
        check_val_every_n_epoch=period if period > 0 else None,
        limit_val_batches=1.0 if period > 0 else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=max(1, min(20, iters_per_epoch)),
        default_root_dir=out,
        enable_model_summary=False,
    )
