"""The best model by a validation metric, as ``model_best.pth``."""

from __future__ import annotations

import logging
import math
import operator
from typing import Optional

import pytorch_lightning as pl

from .checkpoint import WeightsCheckpointer

__all__ = ["BestCheckpoint", "metric_mode"]

logger = logging.getLogger("alrp_d2")


def metric_mode(metric: str, mode: str = "auto") -> str:
    """``"max"`` or ``"min"``: ``"auto"`` is ``"min"`` for LRP figures (``lrp/...``,
    lower is better) and ``"max"`` otherwise (AP)."""
    if mode == "auto":
        return "min" if metric.startswith("lrp/") or "LRP" in metric else "max"
    if mode not in ("max", "min"):
        raise ValueError(f"best-checkpoint mode must be 'auto', 'max' or 'min', got {mode!r}")
    return mode


class BestCheckpoint(pl.Callback):
    """After each evaluation, saves the model as ``<dirpath>/model_best.pth`` (Detectron2's
    format, with ``metric``, ``value``, ``epoch`` and ``iteration``) when ``metric`` beats
    every earlier evaluation of the run, as Detectron2's ``BestCheckpointer``.

    The best value so far is saved in the training checkpoints, so a resumed run does not
    replace a better model by a worse one. A metric the evaluation does not report is
    named in a warning with those it does.
    """

    def __init__(self, dirpath: str, metric: str = "bbox/AP", mode: str = "auto", filename: str = "model_best"):
        super().__init__()
        self.dirpath, self.metric, self.filename = dirpath, metric, filename
        self.mode = metric_mode(metric, mode)
        self._better = operator.gt if self.mode == "max" else operator.lt
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self._warned = False

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            if not self._warned and trainer.is_global_zero:
                known = ", ".join(sorted(k for k in trainer.callback_metrics if "/" in k))
                logger.warning("model_best: the evaluation reports no %r (it reports: %s)", self.metric, known)
                self._warned = True
            return
        value = float(value)
        if math.isnan(value) or (self.best is not None and not self._better(value, self.best)):
            return
        self.best, self.best_epoch = value, trainer.current_epoch
        # Detectron2's checkpointer writes on the main process only.
        WeightsCheckpointer(pl_module.model, save_dir=self.dirpath).save(
            self.filename, metric=self.metric, value=value, epoch=trainer.current_epoch,
            iteration=trainer.global_step)
        if trainer.is_global_zero:
            logger.info("model_best: %s = %.4g (epoch %d), saved to %s/%s.pth", self.metric, value,
                        trainer.current_epoch, self.dirpath, self.filename)

    def state_dict(self):
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict):
        if state_dict.get("metric") == self.metric:
            self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
