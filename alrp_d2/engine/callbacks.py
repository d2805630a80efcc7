"""Lightning callbacks: the epoch-level self-balance of aLRP Loss, and random states
that a resumed run reproduces."""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from ..data.sampling import derived_seed
from ..modeling.self_balance import SelfBalance

__all__ = ["SelfBalanceCallback", "StepSeedCallback"]


class SelfBalanceCallback(pl.Callback):
    """Sets each :class:`SelfBalance` weight of the model once per training epoch.

    At the end of an epoch the weight becomes ``(mean L_cls + mean L_loc) / mean L_loc``,
    the means over every iteration of that epoch on every process; it applies from the
    next epoch. Logged as ``<name>/sb_weight`` (``alrp/sb_weight``). The weights live in
    the model's buffers (saved with it).

    Each iteration's ``(L_cls, L_loc, 1)`` is summed over the processes
    (``trainer.strategy.reduce``: one 3-number all-reduce, no host synchronisation)
    before it is added to the epoch's running sums, so every rank holds the sums of
    the whole run so far. Any one rank's checkpoint therefore carries the partial sums
    of an unfinished epoch, and a resumed run counts each iteration exactly once.

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
        device = trainer.strategy.root_device
        for name, balance in self._balances(pl_module).items():
            # Every rank reduces every step, with or without losses, so that the
            # collectives stay matched.
            if balance.last_losses is None:
                row = torch.zeros(3, dtype=torch.float64, device=device)
            else:
                cls_loss, loc_loss = balance.last_losses
                balance.last_losses = None
                row = torch.stack(
                    [
                        cls_loss.double(),
                        loc_loss.double(),
                        cls_loss.new_ones((), dtype=torch.float64),
                    ]
                )
                if self.record_dir:
                    self._iterations.setdefault(name, []).append(row[:2].clone())
            total = trainer.strategy.reduce(row.to(device), reduce_op="sum")
            self._sums[name] = (
                self._sums.get(name, torch.zeros_like(total)).to(total.device) + total
            )

    def on_train_epoch_end(self, trainer, pl_module):
        for name, balance in self._balances(pl_module).items():
            totals = self._sums.pop(name, None)
            sum_cls, sum_loc, count = totals.tolist() if totals is not None else (0.0, 0.0, 0.0)
            used = float(balance.weight)
            if count > 0 and sum_loc > 0:
                balance.set_weight((sum_cls + sum_loc) / sum_loc)
            pl_module.log(f"{name}/sb_weight", float(balance.weight), rank_zero_only=True)
            if self.record_dir:
                self._write(trainer, name, used, float(balance.weight))

    def _write(self, trainer, name, used, weight):
        os.makedirs(self.record_dir, exist_ok=True)
        path = os.path.join(self.record_dir, f"self_balance_rank{trainer.global_rank}.jsonl")
        rows = (
            torch.stack(self._iterations.pop(name, [])).tolist()
            if self._iterations.get(name)
            else []
        )
        with open(path, "a") as f:
            for cls_loss, loc_loss in rows:
                f.write(
                    json.dumps(
                        {
                            "epoch": trainer.current_epoch,
                            "name": name,
                            "cls": cls_loss,
                            "loc": loc_loss,
                        }
                    )
                    + "\n"
                )
            f.write(
                json.dumps(
                    {
                        "epoch": trainer.current_epoch,
                        "name": name,
                        "weight_used": used,
                        "weight": weight,
                    }
                )
                + "\n"
            )

    def state_dict(self):
        return {"sums": {k: v.cpu() for k, v in self._sums.items()}}

    def load_state_dict(self, state_dict):
        self._sums = dict(state_dict.get("sums", {}))


class StepSeedCallback(pl.Callback):
    """Seeds Python's, NumPy's and torch's random generators before every training
    step from ``(seed, global step, rank)``.

    What a model draws at random in a step (Detectron2's proposal and RoI sampling, for
    instance) then depends on nothing but the step and the rank, so a run resumed at any
    step draws what the uninterrupted run drew, with no generator state to save. (The
    data's randomness is seeded per image: :class:`alrp_d2.data.sampling.SeededMapDataset`.)
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seed = derived_seed(self.seed, trainer.global_step, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
