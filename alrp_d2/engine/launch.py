"""Command-line training and evaluation with PyTorch Lightning (``train_net.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from ..config import get_cfg
from ..io import atomic_write
from ..data.synthetic import register_synthetic
from .callbacks import SelfBalanceCallback
from .checkpoint import AtomicCheckpointIO
from .data import DetectionDataModule, batches_per_epoch
from .module import DetectionModule

__all__ = ["UsageError", "argument_parser", "main", "setup_cfg"]

logger = logging.getLogger("alrp_d2")


class UsageError(Exception):
    """Bad command-line input: reported in one line, before anything is written."""


def argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.add_argument("--accelerator", choices=["auto", "gpu", "cpu"], default="auto",
                        help="where to train; cpu with --devices N runs N gloo processes")
    parser.add_argument("--devices", type=int, default=None,
                        help="processes per machine (default: --num-gpus)")
    return parser


def setup_cfg(args):
    """The config of ``args``: file, then trailing ``KEY VALUE`` overrides; every
    problem raises :class:`UsageError` naming it."""
    if not args.config_file:
        raise UsageError("--config-file is required")
    if not os.path.isfile(args.config_file):
        raise UsageError(f"config file not found: {args.config_file}")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(args.config_file)
    except KeyError as err:
        raise UsageError(f"{args.config_file}: {err.args[0] if err.args else err}") from None
    except Exception as err:  # yaml syntax, wrong value types
        raise UsageError(f"{args.config_file}: {err}") from None
    if len(args.opts) % 2:
        raise UsageError(f"overrides must come in KEY VALUE pairs, got {args.opts}")
    try:
        cfg.merge_from_list(args.opts)
    except (KeyError, AssertionError) as err:
        raise UsageError(f"bad override: {err.args[0] if err.args else err}") from None
    except Exception as err:
        raise UsageError(f"bad override: {err}") from None
    return cfg


def check_inputs(cfg, args) -> None:
    """Datasets registered and loadable, weights present: fail before writing anything."""
    known = set(DatasetCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in known:
            raise UsageError(f"unknown dataset name {name!r} (not registered in Detectron2's DatasetCatalog)")
    for name in cfg.DATASETS.TEST:  # the training sets are loaded (and checked) by the data module
        _load_dataset(lambda: DatasetCatalog.get(name), name)
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UsageError(f"weights file not found: {weights} (MODEL.WEIGHTS)")
    if args.eval_only and not weights:
        raise UsageError("--eval-only needs MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth)")
    if cfg.SOLVER.MAX_EPOCHS <= 0 and not args.eval_only:
        raise UsageError("train_net.py trains in epochs: set SOLVER.MAX_EPOCHS > 0")
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE != "value" \
            and cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE != 2.0:
        raise UsageError("norm clipping supports SOLVER.CLIP_GRADIENTS.NORM_TYPE 2.0 only")


def _load_dataset(load, name):
    try:
        return load()
    except Exception as err:
        raise UsageError(f"dataset {name!r} cannot be loaded: {err}") from None


def _accelerator(args) -> str:
    if args.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise UsageError("--accelerator gpu, but no CUDA device is available")
    return args.accelerator


def _distributed_env(args) -> None:
    """Lightning reads the rendezvous from the environment: take it from --dist-url."""
    if args.num_machines > 1:
        url = urlparse(args.dist_url)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise UsageError(f"--dist-url must be tcp://HOST:PORT with several machines, got {args.dist_url}")
        os.environ.setdefault("MASTER_ADDR", url.hostname)
        os.environ.setdefault("MASTER_PORT", str(url.port))
        os.environ.setdefault("NODE_RANK", str(args.machine_rank))


def write_metrics(path: str, metrics: Dict[str, float]) -> None:
    """Writes ``metrics`` as json (NaN as null, which strict readers accept), atomically."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    with atomic_write(path) as f:
        json.dump(clean, f, indent=2, sort_keys=True)


def _precision(cfg, accelerator: str) -> str:
    if not cfg.SOLVER.AMP.ENABLED:
        return "32-true"
    return "16-mixed" if accelerator == "gpu" else "bf16-mixed"


def _self_balance_weights(module) -> Dict[str, float]:
    from ..modeling.self_balance import SelfBalance

    return {f"{m.name}/sb_weight": float(m.weight) for m in module.modules() if isinstance(m, SelfBalance)}


def build_trainer(cfg, args, accelerator: str, devices: int, iters_per_epoch: int) -> pl.Trainer:
    world = devices * args.num_machines
    if world > 1:
        backend = "nccl" if accelerator == "gpu" else "gloo"
        strategy = DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    else:
        strategy = "auto"
    out = cfg.OUTPUT_DIR
    callbacks: List[pl.Callback] = [
        SelfBalanceCallback(record_dir=out),
        ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0, every_n_epochs=1),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=max(1, min(20, iters_per_epoch // 5))),
    ]
    if 0 < cfg.SOLVER.CHECKPOINT_PERIOD < cfg.SOLVER.MAX_EPOCHS:
        callbacks.append(_PeriodicCheckpoint(dirpath=os.path.join(out, "checkpoints"), filename="epoch{epoch:03d}",
                                             auto_insert_metric_name=False, save_top_k=-1,
                                             every_n_epochs=cfg.SOLVER.CHECKPOINT_PERIOD))
    clip = cfg.SOLVER.CLIP_GRADIENTS
    period = cfg.TEST.EVAL_PERIOD
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=args.num_machines,
        strategy=strategy,
        max_epochs=max(cfg.SOLVER.MAX_EPOCHS, 1),
        precision=_precision(cfg, accelerator),
        gradient_clip_val=clip.CLIP_VALUE if clip.ENABLED else None,
        gradient_clip_algorithm=("value" if clip.CLIP_TYPE == "value" else "norm") if clip.ENABLED else None,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=[TensorBoardLogger(out, name="tensorboard"), CSVLogger(out, name="csv")],
        check_val_every_n_epoch=period if period > 0 else None,
        limit_val_batches=1.0 if period > 0 else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=max(1, min(20, iters_per_epoch)),
        default_root_dir=out,
        enable_model_summary=False,
    )


class _PeriodicCheckpoint(ModelCheckpoint):
    """Numbered checkpoints every SOLVER.CHECKPOINT_PERIOD epochs, beside last.ckpt."""

    @property
    def state_key(self) -> str:
        return "periodic_" + super().state_key


def _evaluate(trainer: pl.Trainer, module: DetectionModule, datamodule) -> Dict[str, float]:
    if not module.cfg.DATASETS.TEST:
        return {}
    trainer.limit_val_batches = 1.0
    trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    return module.last_metrics or {}


def run(args) -> int:
    register_synthetic()
    cfg = setup_cfg(args)
    accelerator = _accelerator(args)
    devices = args.devices or args.num_gpus or 1
    _distributed_env(args)
    check_inputs(cfg, args)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda" if accelerator == "gpu" else "cpu"
    cfg.freeze()

    world = devices * args.num_machines
    datamodule = DetectionDataModule(cfg)
    if args.eval_only:
        iters_per_epoch = 1
    else:
        ims = cfg.SOLVER.IMS_PER_BATCH
        if ims % world:
            raise UsageError(f"SOLVER.IMS_PER_BATCH ({ims}) must be divisible by the number of processes ({world})")
        train_dicts = _load_dataset(datamodule.train_dicts, ", ".join(cfg.DATASETS.TRAIN))
        iters_per_epoch = batches_per_epoch(len(train_dicts), ims, world)
    # SEED < 0: a random seed, shared with the DDP processes through PL_GLOBAL_SEED.
    pl.seed_everything(cfg.SEED if cfg.SEED >= 0 else None, workers=True, verbose=False)
    trainer = build_trainer(cfg, args, accelerator, devices, iters_per_epoch)
    rank = trainer.global_rank
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=rank, name="detectron2")
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=rank, name="alrp_d2", abbrev_name="alrp_d2")
    if rank == 0:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        logger.info("Full config saved to %s", os.path.join(cfg.OUTPUT_DIR, "config.yaml"))

    module = DetectionModule(cfg, iters_per_epoch=iters_per_epoch, num_processes_per_machine=devices)
    final_path = os.path.join(cfg.OUTPUT_DIR, "final_metrics.json")
    if args.eval_only:
        DetectionCheckpointer(module.model, save_dir=cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS)
        metrics = _evaluate(trainer, module, datamodule)
        metrics.update(_self_balance_weights(module))
        if rank == 0:
            write_metrics(final_path, metrics)
            logger.info("Final metrics written to %s", final_path)
        return 0

    last = os.path.join(cfg.OUTPUT_DIR, "last.ckpt")
    ckpt_path: Optional[str] = None
    if args.resume and os.path.isfile(last):
        ckpt_path = last
        logger.info("Resuming from %s", last)
    else:
        if args.resume:
            logger.info("--resume: no %s yet, starting from MODEL.WEIGHTS", last)
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(module.model).load(cfg.MODEL.WEIGHTS)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    period = cfg.TEST.EVAL_PERIOD
    evaluated_at_end = period > 0 and cfg.SOLVER.MAX_EPOCHS % period == 0 and module.last_metrics is not None
    metrics = dict(module.last_metrics) if evaluated_at_end else _evaluate(trainer, module, datamodule)
    metrics.update(_self_balance_weights(module))
    if rank == 0:
        DetectionCheckpointer(module.model, save_dir=cfg.OUTPUT_DIR).save("model_final")
        write_metrics(final_path, metrics)
        logger.info("Final metrics written to %s", final_path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
