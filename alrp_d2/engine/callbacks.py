"""Lightning callbacks: the epoch-level self-balance of aLRP Loss."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ..modeling.self_balance import SelfBalance

__all__ = ["SelfBalanceCallback"]


class SelfBalanceCallback(pl.Callback):
    """Sets each :class:`SelfBalance` weight of the model once per training epoch.

    At the end of an epoch the weight becomes ``(mean L_cls + mean L_loc) / mean L_loc``,
    the means over every iteration of that epoch on every process (sums and counts
    all-reduced, so all ranks end with the same value); it applies from the next epoch.
    Logged as ``<name>/sb_weight`` (``alrp/sb_weight``). The weights live in the model's
    buffers (saved with it); the callback's state (the running sums of an unfinished
    epoch) is saved and restored with Lightning checkpoints.

    Args:
        record_dir: if given, every rank appends to ``self_balance_rank<r>.jsonl`` there
            each iteration's ``L_cls`` and ``L_loc`` and, per epoch, the weight used
            during it and the new one.
    """

    def __init__(self, record_dir: Optional[str] = None):
        super().__init__()
        self.record_dir = record_dir
        self._sums: Dict[str, torch.Tensor] = {}  # name -> [sum cls, sum loc, count] (float64)
        self._iterations: Dict[str, List[torch.Tensor]] = {}

    @staticmethod
    def _balances(pl_module) -> Dict[str, SelfBalance]:
        return {m.name: m for m in pl_module.modules() if isinstance(m, SelfBalance)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, balance in self._balances(pl_module).items():
            if balance.last_losses is None:
                continue
            cls_loss, loc_loss = balance.last_losses
            balance.last_losses = None
            row = torch.stack([cls_loss.double(), loc_loss.double(), cls_loss.new_ones((), dtype=torch.float64)])
            self._sums[name] = self._sums.get(name, torch.zeros_like(row)).to(row.device) + row
            if self.record_dir:
                self._iterations.setdefault(name, []).append(row[:2])

    def on_train_epoch_end(self, trainer, pl_module):
        for name, balance in self._balances(pl_module).items():
            totals = self._sums.pop(name, None)
            if totals is None:
                totals = torch.zeros(3, dtype=torch.float64, device=balance.weight.device)
            if dist.is_available() and dist.is_initialized():
                totals = totals.to(_reduction_device(trainer))
                dist.all_reduce(totals)
            sum_cls, sum_loc, count = totals.tolist()
            used = float(balance.weight)
            if count > 0 and sum_loc > 0:
                balance.set_weight((sum_cls + sum_loc) / sum_loc)
            pl_module.log(f"{name}/sb_weight", float(balance.weight), rank_zero_only=True)
            if self.record_dir:
                self._write(trainer, name, used, float(balance.weight))

    def _write(self, trainer, name, used, weight):
        os.makedirs(self.record_dir, exist_ok=True)
        path = os.path.join(self.record_dir, f"self_balance_rank{trainer.global_rank}.jsonl")
        rows = torch.stack(self._iterations.pop(name, [])).tolist() if self._iterations.get(name) else []
        with open(path, "a") as f:
            for cls_loss, loc_loss in rows:
                f.write(json.dumps({"epoch": trainer.current_epoch, "name": name, "cls": cls_loss, "loc": loc_loss}) + "\n")
            f.write(json.dumps({"epoch": trainer.current_epoch, "name": name, "weight_used": used,
                                "weight": weight}) + "\n")

    def state_dict(self):
        return {"sums": {k: v.cpu() for k, v in self._sums.items()}}

    def load_state_dict(self, state_dict):
        self._sums = dict(state_dict.get("sums", {}))


def _reduction_device(trainer) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return trainer.strategy.root_device
