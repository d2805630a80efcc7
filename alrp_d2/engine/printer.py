"""Detectron2-style iteration lines in ``log.txt`` and on the console."""

from __future__ import annotations

import datetime
import logging
import time
from collections import deque
from typing import Deque, Dict, Optional

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["MetricPrinter"]

logger = logging.getLogger("alrp_d2")


class MetricPrinter(pl.Callback):
    """Every ``period`` iterations (and at the last one) the main process logs a line as
    Detectron2's ``CommonMetricPrinter`` does (one line, shown here on two)::

        eta: 0:02:41  iter: 40  epoch: 0  total_loss: 1.52  loss_cls: 0.81  loss_box_reg: 0.014
        time: 0.5311  last_time: 0.5203  data_time: 0.0021  last_data_time: 0.0018  lr: 0.0079

    Losses are the medians over the last ``period`` iterations of what the module logged
    (every logged key containing ``loss``); ``time`` and ``data_time`` are means over the
    same window, ``data_time`` the wait for the batch; ``eta`` the remaining iterations of
    the run at that pace; ``lr`` the learning rate of the iteration; ``max_mem`` the peak
    GPU memory (on GPU only). Iterations count from 1, as ``trainer.global_step`` after
    the step.
    """

    def __init__(self, period: int = 20):
        super().__init__()
        if period < 1:
            raise ValueError(f"the log period must be at least 1 iteration, got {period}")
        self.period = period
        self._losses: Dict[str, Deque[torch.Tensor]] = {}
        self._times: Deque[float] = deque(maxlen=period)
        self._data_times: Deque[float] = deque(maxlen=period)
        self._end: Optional[float] = None  # when the previous iteration ended

    def on_train_epoch_start(self, trainer, pl_module):
        self._end = time.perf_counter()  # data loading of the first batch counts as data time

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._end is not None:
            self._data_times.append(time.perf_counter() - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._end is not None:
            self._times.append(now - self._end)
        self._end = now
        for key, value in trainer.callback_metrics.items():
            if "loss" in key and isinstance(value, torch.Tensor) and value.numel() == 1:
                self._losses.setdefault(key, deque(maxlen=self.period)).append(value.detach())
        step = trainer.global_step
        total = trainer.estimated_stepping_batches  # max_steps included
        if trainer.is_global_zero and (step % self.period == 0 or step >= total):
            logger.info(self.format_line(trainer, step, total))

    def format_line(self, trainer, step: int, total: float) -> str:
        # np.median, as Detectron2's HistoryBuffer (torch's median of an even window is the
        # lower value)
        losses = "  ".join(
            f"{k}: {float(np.median(torch.stack(list(v)).float().cpu().numpy())):.4g}"
            for k, v in self._losses.items()
        )
        parts = []
        if self._times:
            avg = float(np.mean(self._times))
            remaining = max(0, int(total - step)) if np.isfinite(total) else None
            if remaining is not None:
                parts.append(f"eta: {datetime.timedelta(seconds=int(avg * remaining))}  ")
        parts.append(f"iter: {step}  epoch: {trainer.current_epoch}  {losses}  ")
        if self._times:
            parts.append(f"time: {np.mean(self._times):.4f}  last_time: {self._times[-1]:.4f}  ")
        if self._data_times:
            parts.append(
                f"data_time: {np.mean(self._data_times):.4f}  "
                f"last_data_time: {self._data_times[-1]:.4f}  "
            )
        lr = self._lr(trainer)
        parts.append(f"lr: {lr:.5g}  ")
        device = trainer.strategy.root_device
        if device.type == "cuda":
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated(device) / 1024**2:.0f}M")
        return " " + "".join(parts).rstrip()

    @staticmethod
    def _lr(trainer) -> float:
        """The learning rate of the iteration: what the module logged in its step (the
        optimizer's has been stepped by the schedule since), else the optimizer's."""
        logged = trainer.callback_metrics.get("lr")
        if logged is not None:
            return float(logged)
        return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
