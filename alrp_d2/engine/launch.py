"""Command-line training and evaluation with PyTorch Lightning (``train_net.py``)."""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import logging
import logging.handlers
import math
import os
import signal
import sys
import warnings
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..cli import add_dataset_flag, load_config, run_command
from ..config import model_num_classes
from ..data.check import check_datasets
from ..data.register import datasets_from_env, register_coco_datasets
from ..data.sampling import DataError
from ..data.synthetic import register_synthetic
from ..io import UnsafeFileError, atomic_write
from ..run_folder import RunFolder
from ..weights import WeightsError, load_weights
from .best import metric_mode
from .checkpoint import WeightsCheckpointer
from .cluster import (
    UsageError,
    install_requeue_handler,
    requeue_slurm_job,
    resolve_topology,
    slurm_restarted,
)
from .data import DetectionDataModule, batches_per_epoch
from .module import CLIP_TYPES, DetectionModule
from .resume import config_differences, find_resume_checkpoint
from .trainer import LOGGERS, build_trainer, check_loggers
from .unhonoured_keys import unhonoured_keys
from .world_size import scale_to_world_size

__all__ = ["UsageError", "argument_parser", "main", "setup_cfg"]

logger = logging.getLogger("alrp_d2")

# Exit status of a run stopped by SIGTERM after saving its checkpoint: that of a process
# ended by the signal, so that job controllers do not take the run for finished.
EXIT_STOPPED = 128 + 15


def argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.add_argument(
        "--accelerator",
        choices=["auto", "gpu", "cpu"],
        default="auto",
        help="where to train; cpu with --devices N runs N gloo processes",
    )
    parser.add_argument(
        "--devices", type=int, default=None, help="processes per machine (default: --num-gpus)"
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="read every image and annotation of the config's datasets, list the problems, exit",
    )
    add_dataset_flag(
        parser,
        "register a COCO- or LVIS-format dataset under NAME before the config is read"
        " (repeatable; also $ALRP_DATASETS: NAME JSON IMAGE_ROOT ...; for LVIS, IMAGE_ROOT"
        " holds the split folders of the images' coco_url, e.g. train2017/)",
    )
    parser.add_argument(
        "--logger",
        default="tensorboard,csv",
        type=_logger_names,
        help=f"comma-separated loggers among {','.join(LOGGERS)} (default: tensorboard,csv)",
    )
    return parser


def _logger_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown logger(s) {', '.join(unknown) or '(none given)'};"
            f" choose among {', '.join(LOGGERS)}"
        )
    return names


def register_datasets(args) -> None:
    """The COCO- or LVIS-format datasets of ``$ALRP_DATASETS`` and ``--dataset``, registered."""
    try:
        register_coco_datasets(datasets_from_env() + [tuple(d) for d in args.dataset])
    except ValueError as err:
        raise UsageError(str(err)) from None


def setup_cfg(args):
    """The config of ``args``: file, then trailing ``KEY VALUE`` overrides
    (:func:`alrp_d2.cli.load_config`)."""
    return load_config(args.config_file, args.opts)


def check_inputs(cfg, args) -> None:
    """Keys the engine honours, datasets registered and loadable, weights present: fail
    before writing anything."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise UsageError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {', '.join(CLIP_TYPES)},"
            f" got {clip.CLIP_TYPE!r}"
        )
    unhonoured = unhonoured_keys(cfg)
    if unhonoured:
        raise UsageError(
            "the config sets Detectron2 keys that this engine does not honour (set them back"
            " to Detectron2's defaults):\n  " + "\n  ".join(unhonoured)
        )
    known = set(DatasetCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in known:
            raise UsageError(
                f"unknown dataset name {name!r} (not registered in Detectron2's DatasetCatalog)"
            )
    for name in cfg.DATASETS.TEST:  # the training sets are loaded (and checked) by the data module
        _load_dataset(lambda: DatasetCatalog.get(name), name)
    check_num_classes(cfg, cfg.DATASETS.TEST, "test")
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UsageError(f"weights file not found: {weights} (MODEL.WEIGHTS)")
    if args.eval_only and not weights:
        raise UsageError("--eval-only needs MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth)")
    if cfg.SOLVER.MAX_EPOCHS <= 0 and not args.eval_only:
        raise UsageError("train_net.py trains in epochs: set SOLVER.MAX_EPOCHS > 0")


def check_num_classes(cfg, names, role: str) -> None:
    """The model's classes (:func:`alrp_d2.config.model_num_classes`) are the datasets':
    :class:`UsageError` with both numbers otherwise (datasets loaded: their metadata is
    complete)."""
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        return  # class-agnostic
    num_classes = model_num_classes(cfg)
    key = (
        "MODEL.ROI_HEADS.NUM_CLASSES"
        if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        else "MODEL.RETINANET.NUM_CLASSES"
    )
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise UsageError(
                f"{key} is {num_classes}, but the {role} dataset {name!r} has {len(classes)}"
                f" classes ({', '.join(map(str, classes[:10]))}"
                f"{', ...' if len(classes) > 10 else ''}):"
                f" set {key} {len(classes)}"
            )


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


def write_metrics(path: str, metrics: Dict[str, float]) -> None:
    """Writes ``metrics`` as json (NaN as null, which strict readers accept), atomically."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    with atomic_write(path) as f:
        json.dump(clean, f, indent=2, sort_keys=True)


def _self_balance_weights(module) -> Dict[str, float]:
    from ..modeling.self_balance import SelfBalance

    return {
        f"{m.name}/sb_weight": float(m.weight)
        for m in module.modules()
        if isinstance(m, SelfBalance)
    }


def _evaluate(trainer: pl.Trainer, module: DetectionModule, datamodule) -> Dict[str, float]:
    if not module.cfg.DATASETS.TEST:
        return {}
    trainer.limit_val_batches = 1.0
    trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    return module.last_metrics or {}


def _is_first_process(args) -> bool:
    """Whether this process will be global rank 0 (known before Lightning starts)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit() and (
            name != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", 1)) > 1
        ):
            return int(os.environ[name]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and args.machine_rank == 0


_HELD_LOCKS: List = []


def _lock_output_dir(output_dir: str):
    """An exclusive lock on OUTPUT_DIR for the run's first process, held until it exits:
    a second training started into the same folder stops before writing anything."""
    os.makedirs(output_dir, exist_ok=True)
    handle = open(os.path.join(output_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(
            f"another training is running in {output_dir} ({owner}); wait for it to end"
            " or choose another OUTPUT_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    for stale in glob.glob(os.path.join(output_dir, ".tmp-*")):  # left by a killed write
        os.remove(stale)
    return handle


def _resume_checkpoint(cfg, args, world_size: int) -> Optional[str]:
    """The checkpoint to continue from, or None for a fresh run; refuses to train a
    fresh run into another run's folder or to resume a different training."""
    out = cfg.OUTPUT_DIR
    resume = args.resume or slurm_restarted()
    if not resume:
        used = RunFolder(out).checkpoints()
        if used:
            raise UsageError(
                f"OUTPUT_DIR {out} holds another run's checkpoints ({', '.join(sorted(used))}):"
                " add --resume to continue that run, or choose another OUTPUT_DIR"
            )
        return None
    try:
        found = find_resume_checkpoint(out)
    except (FileNotFoundError, UnsafeFileError) as err:
        raise UsageError(f"--resume: {err}") from None
    if found is None:
        # A first start with --resume is how requeued cluster jobs run: not an error; but a
        # mistyped folder must not pass unseen.
        state = "does not exist" if not os.path.isdir(out) else "holds no checkpoint"
        logger.warning(
            "--resume: OUTPUT_DIR %s %s; starting a new training%s",
            os.path.abspath(out),
            state,
            f" from MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}" if cfg.MODEL.WEIGHTS else "",
        )
        return None
    path, saved = found
    changes = config_differences(saved["config"], cfg)
    if saved.get("world_size", world_size) != world_size:
        changes.append(f"number of processes: {saved['world_size']} -> {world_size}")
    if changes:
        raise UsageError(
            f"--resume from {path}: the config differs from the checkpointed run's in what"
            " changes training:\n  "
            + "\n  ".join(changes)
            + "\n(SOLVER.MAX_EPOCHS, DATALOADER.NUM_WORKERS, checkpointing, DATASETS.TEST,"
            " TEST.* and"
            " *_TEST keys may change; start a new run with MODEL.WEIGHTS to train otherwise)"
        )
    logger.info("Resuming from %s", path)
    return path


def _data_error_message(err: BaseException) -> str:
    # A DataError from a DataLoader worker is re-raised with the worker's traceback: keep
    # the original message, its last line.
    lines = [line for line in str(err).splitlines() if "DataError: " in line]
    return lines[-1].split("DataError: ", 1)[1] if lines else str(err)


# Lightning cannot see that DetectionDataModule resumes its data mid-epoch (it does).
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


class _EarlyLines(logging.handlers.MemoryHandler):
    """What the run logs before its log.txt may be written (Detectron2's dataset summary,
    resume decisions, data warnings), kept to be written there first."""

    LOGGERS = ("detectron2", "alrp_d2")

    def __init__(self):
        super().__init__(capacity=1 << 30)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def shouldFlush(self, record):
        return False

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def write_into(self, handler: logging.Handler) -> None:
        self.detach()
        for record in self.buffer:
            if record.levelno >= handler.level:
                handler.handle(record)
        self.buffer.clear()


_EARLY: List[_EarlyLines] = []


def _setup_run_logs(output_dir: str, rank: int) -> None:
    """log.txt in ``output_dir`` for Detectron2's and this project's loggers, beginning
    with what they logged before."""
    alrp = logging.getLogger("alrp_d2")
    before = list(alrp.handlers)
    setup_logger(
        output=output_dir, distributed_rank=rank, name="detectron2", configure_stdout=False
    )
    setup_logger(
        output=output_dir,
        distributed_rank=rank,
        name="alrp_d2",
        abbrev_name="alrp_d2",
        configure_stdout=False,
    )
    added = [h for h in alrp.handlers if h not in before]
    while _EARLY:
        early = _EARLY.pop()
        if added:  # both loggers write to the one log.txt: replay through one handler
            early.write_into(added[0])
        early.detach()


def run(args) -> int:
    # The console from the start (dataset summaries, resume decisions, warnings); log.txt
    # once writing is safe, beginning with those lines.
    console_rank = 0 if _is_first_process(args) else 1
    setup_logger(distributed_rank=console_rank, name="alrp_d2", abbrev_name="alrp_d2")
    setup_logger(distributed_rank=console_rank, name="detectron2")
    _EARLY.append(_EarlyLines())
    register_synthetic()
    register_datasets(args)
    cfg = setup_cfg(args)
    accelerator = _accelerator(args)
    topology = resolve_topology(args)
    if not args.eval_only:
        try:
            cfg = scale_to_world_size(cfg, topology.world_size)
        except ValueError as err:
            raise UsageError(str(err)) from None
    check_inputs(cfg, args)
    try:
        check_loggers(args.logger)
        metric_mode(cfg.TEST.BEST_CHECKPOINT.METRIC, cfg.TEST.BEST_CHECKPOINT.MODE)
        if cfg.SOLVER.LOG_PERIOD < 1:
            raise ValueError(
                f"SOLVER.LOG_PERIOD must be at least 1 iteration, got {cfg.SOLVER.LOG_PERIOD}"
            )
    except (ImportError, ValueError) as err:
        raise UsageError(str(err)) from None
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda" if accelerator == "gpu" else "cpu"
    if args.eval_only:
        cfg.OUTPUT_DIR = RunFolder(cfg.OUTPUT_DIR).evaluation_of(cfg.MODEL.WEIGHTS).root
    cfg.freeze()
    if args.check_data:
        return check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))

    world = topology.world_size
    datamodule = DetectionDataModule(cfg)
    if args.eval_only:
        iters_per_epoch = 1
    else:
        ims = cfg.SOLVER.IMS_PER_BATCH
        if ims % world:
            raise UsageError(
                f"SOLVER.IMS_PER_BATCH ({ims}) must be divisible by the number of processes"
                f" ({world})"
            )
        _load_dataset(datamodule.train_dicts, ", ".join(cfg.DATASETS.TRAIN))
        check_num_classes(cfg, cfg.DATASETS.TRAIN, "training")
        try:
            datamodule.batch_groups()
            epoch_size = datamodule.epoch_size()
        except (ValueError, DataError) as err:
            raise UsageError(str(err)) from None
        iters_per_epoch = batches_per_epoch(epoch_size, ims, world)
    ckpt_path = None if args.eval_only else _resume_checkpoint(cfg, args, world)
    # SEED < 0: a random seed, shared with the DDP processes through PL_GLOBAL_SEED.
    seed = pl.seed_everything(cfg.SEED if cfg.SEED >= 0 else None, workers=True, verbose=False)
    try:
        module = DetectionModule(
            cfg, iters_per_epoch=iters_per_epoch, num_processes_per_machine=topology.devices
        )
    except ValueError as err:  # a model key refused by name (e.g. MODEL.RANKING_LOSS.NAME)
        raise UsageError(f"the config's model cannot be built: {err}") from None
    # The weights before anything is written: a file that would run code, or (evaluation)
    # another model's weights, stops the run with the folder as it was.
    if args.eval_only or (ckpt_path is None and cfg.MODEL.WEIGHTS):
        try:
            load_weights(
                module.model,
                cfg.MODEL.WEIGHTS,
                strict=args.eval_only,
                model_name=f"the config's {cfg.MODEL.META_ARCHITECTURE}",
            )
        except WeightsError as err:
            raise UsageError(f"MODEL.WEIGHTS: {err}") from None
    first = _is_first_process(args)
    if first and not args.eval_only:
        _HELD_LOCKS.append(_lock_output_dir(cfg.OUTPUT_DIR))  # released when main() returns
    trainer = build_trainer(
        cfg,
        topology,
        accelerator,
        iters_per_epoch,
        seed,
        loggers=args.logger,
        training=not args.eval_only,
    )
    rank = trainer.global_rank
    folder = RunFolder(cfg.OUTPUT_DIR)
    _setup_run_logs(cfg.OUTPUT_DIR, rank)
    if rank == 0:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with atomic_write(folder.config) as f:
            f.write(cfg.dump())
        logger.info("Full config saved to %s", folder.config)

    final_path = folder.final_metrics
    if args.eval_only:
        metrics = _evaluate(trainer, module, datamodule)
        metrics.update(_self_balance_weights(module))
        if rank == 0:
            write_metrics(final_path, metrics)
            logger.info("Final metrics written to %s", final_path)
        return 0

    install_requeue_handler()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        requeued = rank == 0 and requeue_slurm_job()
        logger.warning(
            "Training stopped by a signal at iteration %d; %s",
            trainer.global_step,
            "the requeued job resumes by itself"
            if requeued
            else f"continue with --resume (from {folder.last})",
        )
        return EXIT_STOPPED
    except DataError as err:
        # The other processes wait for this one in a collective: end those this one started.
        kill = getattr(trainer.strategy.launcher, "kill", None)
        if kill is not None:
            kill(signal.SIGKILL)
        message = _data_error_message(err)
        logger.error("%s", message)
        print(
            f"error: {message}\nThe progress so far is saved in {folder.last}:"
            " repair or remove the image (train_net.py --check-data lists every problem), then"
            " continue"
            " with --resume",
            file=sys.stderr,
        )
        return 1

    # The model first, so that a crash in the evaluation loses nothing of the training.
    if rank == 0:
        WeightsCheckpointer(module.model, save_dir=cfg.OUTPUT_DIR).save(RunFolder.FINAL_MODEL)
    period = cfg.TEST.EVAL_PERIOD
    evaluated_at_end = (
        period > 0 and cfg.SOLVER.MAX_EPOCHS % period == 0 and module.last_metrics is not None
    )
    metrics = (
        dict(module.last_metrics) if evaluated_at_end else _evaluate(trainer, module, datamodule)
    )
    metrics.update(_self_balance_weights(module))
    if rank == 0:
        write_metrics(final_path, metrics)
        logger.info("Final metrics written to %s", final_path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        return run_command(run, args)
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().close()
        while _EARLY:
            _EARLY.pop().detach()
