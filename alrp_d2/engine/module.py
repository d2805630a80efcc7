"""A LightningModule around a Detectron2 model."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from .. import modeling  # noqa: F401  (registers the models)
from ..evaluation import LRPEvaluator, LVISAPEvaluator, LVISLRPEvaluator, is_lvis_dataset
from ..run_folder import RunFolder

__all__ = ["CLIP_TYPES", "DetectionModule", "clip_gradients", "schedule_in_iterations"]

logger = logging.getLogger(__name__)


def schedule_in_iterations(cfg, iters_per_epoch: int):
    """A copy of ``cfg`` whose ``SOLVER.MAX_ITER`` and ``SOLVER.STEPS`` count the
    iterations of ``SOLVER.MAX_EPOCHS`` and ``SOLVER.STEPS_EPOCHS`` (warm-up stays in
    iterations); gradient clipping is left to :func:`clip_gradients` (Detectron2's
    optimizer wrapper clips before the step's closure has computed the gradients)."""
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.SOLVER.MAX_EPOCHS > 0:
        cfg.SOLVER.MAX_ITER = cfg.SOLVER.MAX_EPOCHS * iters_per_epoch
        late = [e for e in cfg.SOLVER.STEPS_EPOCHS if e > cfg.SOLVER.MAX_EPOCHS]
        if late:  # said here in the user's key (Detectron2 would name SOLVER.STEPS)
            logger.warning(
                "SOLVER.STEPS_EPOCHS %s: the steps at epochs %s come after the last epoch"
                " (SOLVER.MAX_EPOCHS %d) and never happen",
                tuple(cfg.SOLVER.STEPS_EPOCHS),
                late,
                cfg.SOLVER.MAX_EPOCHS,
            )
        cfg.SOLVER.STEPS = tuple(
            int(e * iters_per_epoch) for e in cfg.SOLVER.STEPS_EPOCHS if e <= cfg.SOLVER.MAX_EPOCHS
        )
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    cfg.freeze()
    return cfg


# SOLVER.CLIP_GRADIENTS.CLIP_TYPE: Detectron2's two, and the whole model's norm
CLIP_TYPES = ("value", "norm", "full_model")


def clip_gradients(parameters, clip) -> None:
    """Gradient clipping by ``SOLVER.CLIP_GRADIENTS`` (``clip``), in place.

    - ``value`` (Detectron2): every gradient element into ``[-CLIP_VALUE, CLIP_VALUE]``;
    - ``norm`` (Detectron2): each parameter's gradient ``g`` scaled to
      ``g * min(1, CLIP_VALUE / ||g||_p)``, ``p = NORM_TYPE``, parameter by parameter;
    - ``full_model`` (mmdetection's ``grad_clip``, Detectron2 projects' key): the same with
      ``||g||_p`` the norm of all gradients together.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if clip.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(parameters, clip.CLIP_VALUE)
    elif clip.CLIP_TYPE == "norm":
        for parameter in parameters:
            torch.nn.utils.clip_grad_norm_(parameter, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.CLIP_TYPE == "full_model":
        torch.nn.utils.clip_grad_norm_(parameters, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {', '.join(CLIP_TYPES)},"
            f" got {clip.CLIP_TYPE!r}"
        )


class DetectionModule(pl.LightningModule):
    """Trains and evaluates a Detectron2 model built from ``cfg``.

    Each training step runs inside a Detectron2 ``EventStorage`` (the model's
    scalars, e.g. ``alrp/num_pos``, are logged with its losses); the optimizer and
    learning-rate schedule come from Detectron2's builders, stepped every iteration.
    Validation runs Detectron2's ``COCOEvaluator`` and this project's ``LRPEvaluator``
    across ranks (on LVIS datasets Detectron2's ``LVISEvaluator`` and ``LVISLRPEvaluator``:
    :meth:`build_evaluator`); their results are printed as Detectron2 prints them and logged
    flattened (``bbox/AP50``, ``lrp/oLRP``).
    """

    def __init__(self, cfg, iters_per_epoch: int = 1, num_processes_per_machine: int = 1):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        self.iters_per_epoch = iters_per_epoch
        self.num_processes_per_machine = num_processes_per_machine
        self.evaluators: List[DatasetEvaluators] = []
        self.last_metrics: Optional[Dict[str, float]] = None
        # {dataset: lrp_thresholds.json's content} of the last evaluation (main process).
        self.last_lrp_thresholds: Dict[str, Dict] = {}
        self._lrp_evaluators: Dict[str, LRPEvaluator] = {}

    # -- set-up --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The process group exists now: give detectron2.utils.comm its local group.
        if dist.is_available() and dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None:
            comm.create_local_process_group(self.num_processes_per_machine)

    def configure_optimizers(self):
        solver_cfg = schedule_in_iterations(self.cfg, self.iters_per_epoch)
        optimizer = build_optimizer(solver_cfg, self.model)
        scheduler = build_lr_scheduler(solver_cfg, optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        # Lightning calls this after the backward pass (and, with AMP, after unscaling).
        if self.cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            clip_gradients(parameters, self.cfg.SOLVER.CLIP_GRADIENTS)

    def on_save_checkpoint(self, checkpoint):
        # What a --resume checks its own config against (alrp_d2.engine.resume).
        checkpoint["alrp_d2"] = {"config": self.cfg.dump(), "world_size": self.trainer.world_size}

    # -- training ------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        with EventStorage(self.global_step) as storage:
            loss_dict = self.model(batch)
            # The self-balance weight is constant within an epoch: SelfBalanceCallback logs it.
            scalars = {k: v[0] for k, v in storage.latest().items() if not k.endswith("/sb_weight")}
        total = sum(loss_dict.values())
        if not torch.isfinite(total):
            raise FloatingPointError(self._divergence_message(loss_dict))
        size = len(batch)
        self.log("total_loss", total.detach(), prog_bar=True, batch_size=size)
        self.log_dict({k: v.detach() for k, v in loss_dict.items()}, batch_size=size)
        self.log_dict({k: float(v) for k, v in scalars.items()}, batch_size=size)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return total

    def _divergence_message(self, loss_dict) -> str:
        """What to do when the loss is not finite: its likely cause and where to go on from."""
        solver = self.cfg.SOLVER
        last = RunFolder(self.cfg.OUTPUT_DIR).last
        resume = (
            f" The last checkpoint, {last}, holds the weights before it: train on from them"
            f" into a new OUTPUT_DIR with MODEL.WEIGHTS {last} and the lower rate."
            if os.path.isfile(last)
            else ""
        )
        values = ", ".join(f"{k}: {float(v):.4g}" for k, v in loss_dict.items())
        return (
            f"Loss became infinite or NaN at iteration {self.global_step} ({values}). The likely"
            f" cause is a learning rate too high for the batch: SOLVER.BASE_LR"
            f" {solver.BASE_LR:g} for SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH} (Detectron2's"
            f" rule: scale the rate with the batch; SOLVER.WARMUP_ITERS {solver.WARMUP_ITERS}"
            f" also helps); lower it.{resume}"
        )

    # -- evaluation ----------------------------------------------------------------
    @staticmethod
    def evaluation_tasks(cfg) -> tuple:
        """The COCO tasks that validation evaluates: boxes, and masks with ``MODEL.MASK_ON``."""
        return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)

    def build_evaluator(self, dataset_name: str) -> DatasetEvaluators:
        """AP and, with ``TEST.LRP_EVALUATOR``, optimal LRP of boxes and, with
        ``MODEL.MASK_ON``, masks (``segm/AP``, ``lrp_segm/oLRP``), by the dataset's rules:
        LVIS's (Detectron2's ``LVISEvaluator``, ``LVISLRPEvaluator``) for an LVIS dataset
        (``is_lvis_dataset``: ``evaluator_type`` ``"lvis"`` or an LVIS json), else COCO's.
        The one place that chooses a dataset's evaluators."""
        output_dir = RunFolder(self.cfg.OUTPUT_DIR).inference(dataset_name)
        tasks = self.evaluation_tasks(self.cfg)
        lvis = is_lvis_dataset(dataset_name)
        ap_evaluator, lrp_evaluator = (
            (LVISAPEvaluator, LVISLRPEvaluator) if lvis else (COCOEvaluator, LRPEvaluator)
        )
        evaluators = [
            ap_evaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_dir)
        ]
        if self.cfg.TEST.LRP_EVALUATOR:
            lrp = lrp_evaluator(dataset_name, output_dir=output_dir, distributed=True, tasks=tasks)
            self._lrp_evaluators[dataset_name] = lrp
            evaluators.append(lrp)
        return DatasetEvaluators(evaluators)

    def on_validation_epoch_start(self):
        self.evaluators = [self.build_evaluator(name) for name in self.cfg.DATASETS.TEST]
        for evaluator in self.evaluators:
            evaluator.reset()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        outputs = self.model(batch)
        self.evaluators[dataloader_idx].process(batch, outputs)

    def on_validation_epoch_end(self):
        results = OrderedDict()
        self.last_lrp_thresholds = {}
        for name, evaluator in zip(self.cfg.DATASETS.TEST, self.evaluators):
            result = evaluator.evaluate()  # gathered on the main process
            lrp = self._lrp_evaluators.get(name)
            if lrp is not None and "bbox" in lrp.threshold_tables:
                self.last_lrp_thresholds[name] = lrp.threshold_tables["bbox"]
            if comm.is_main_process():
                logger.info("Evaluation results for %s in csv format:", name)
                print_csv_format(result)
            results[name] = result
        if len(results) == 1:
            results = next(iter(results.values()))
        flat = (
            {k: float(v) for k, v in flatten_results_dict(results).items()}
            if comm.is_main_process()
            else {}
        )
        # Every rank logs the main process's figures so that monitors agree.
        if dist.is_available() and dist.is_initialized():
            holder = [flat]
            dist.broadcast_object_list(holder, src=0)
            flat = holder[0]
        for key, value in flat.items():
            self.log(key, value, rank_zero_only=True, add_dataloader_idx=False, sync_dist=False)
        self.last_metrics = flat
        self.evaluators = []
