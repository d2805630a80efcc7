"""The best model by a validation metric, as ``model_best.pth``."""

from __future__ import annotations

import logging
import math
import operator
import os
from typing import Optional

import pytorch_lightning as pl
import torch

from ..io import atomic_write
from ..run_folder import RunFolder

__all__ = ["BestCheckpoint", "metric_mode"]

logger = logging.getLogger("alrp_d2")


def metric_mode(metric: str, mode: str = "auto") -> str:
    """``"max"`` or ``"min"``: ``"auto"`` is ``"min"`` for LRP figures (``lrp/...``,
    lower is better) and ``"max"`` otherwise (AP). Raises ``ValueError`` for another mode."""
    normalised = mode.lower() if isinstance(mode, str) else mode
    if normalised == "auto":
        return "min" if metric.startswith("lrp/") or "LRP" in metric else "max"
    if normalised not in ("max", "min"):
        raise ValueError(f"TEST.BEST_CHECKPOINT.MODE must be 'auto', 'max' or 'min', got {mode!r}")
    return normalised


class BestCheckpoint(pl.Callback):
    """After each evaluation of a training, saves the model as ``<dirpath>/model_best.pth``
    when ``metric`` beats every earlier evaluation of the run, as Detectron2's
    ``BestCheckpointer``: Detectron2's format (``model``, loadable by its
    ``DetectionCheckpointer``) with ``metric``, ``value``, ``mode``, ``epoch`` (the last
    epoch trained, from 0), ``iteration`` and ``lrp_thresholds`` (``{dataset: the box
    thresholds table of that very evaluation}``, from the module's ``last_lrp_thresholds``;
    ``alrp_d2.predict`` uses them), written atomically.

    The best value so far is saved in the training checkpoints, so a resumed run does not
    replace a better model by a worse one. A metric the evaluation does not report is
    named in a warning with those it does. An evaluation without training (``--eval-only``)
    saves nothing.
    """

    def __init__(
        self,
        dirpath: str,
        metric: str = "bbox/AP",
        mode: str = "auto",
        filename: str = RunFolder.BEST_MODEL,
    ):
        super().__init__()
        self.dirpath, self.metric, self.filename = dirpath, metric, filename
        self.mode = metric_mode(metric, mode)
        self._better = operator.gt if self.mode == "max" else operator.lt
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self._warned = False

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.pth")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.global_step == 0:
            return  # nothing trained: --eval-only, or an evaluation before the first step
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            if not self._warned and trainer.is_global_zero:
                known = ", ".join(sorted(k for k in trainer.callback_metrics if "/" in k))
                logger.warning(
                    "model_best: the evaluation reports no %r (it reports: %s)", self.metric, known
                )
                self._warned = True
            return
        value = float(value)
        if math.isnan(value) or (self.best is not None and not self._better(value, self.best)):
            return
        # In the fit loop the evaluation follows epoch current_epoch; after fit (the final
        # evaluation of train_net.py) current_epoch counts the epochs trained.
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        epoch = trainer.current_epoch if fitting else max(trainer.current_epoch - 1, 0)
        self.best, self.best_epoch = value, epoch
        if trainer.is_global_zero:  # every process holds the same model
            self._save(pl_module, value, epoch, trainer.global_step)
            logger.info(
                "model_best: %s = %.4g (epoch %d, iteration %d), saved to %s",
                self.metric,
                value,
                epoch,
                trainer.global_step,
                self.path,
            )

    def _save(self, pl_module, value: float, epoch: int, iteration: int) -> None:
        model = pl_module.model
        data = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metric": self.metric,
            "value": value,
            "mode": self.mode,
            "epoch": epoch,
            "iteration": iteration,
        }
        thresholds = getattr(pl_module, "last_lrp_thresholds", None)
        if thresholds:
            data["lrp_thresholds"] = dict(thresholds)
        with atomic_write(self.path, "wb") as f:
            torch.save(data, f)

    def state_dict(self):
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state_dict):
        # A run resumed with another metric or direction starts its own record.
        if (
            state_dict.get("metric") == self.metric
            and state_dict.get("mode", self.mode) == self.mode
        ):
            self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
