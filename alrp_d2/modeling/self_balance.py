"""The self-balance weight of aLRP Loss's localisation part (paper, Section 4.2)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["SelfBalance"]


class SelfBalance(nn.Module):
    """Holds the weight ``w`` that multiplies ``L_loc`` and the last training
    iteration's ``(L_cls, L_loc)``.

    ``w`` is a buffer, so it is saved in checkpoints and broadcast by DDP. It stays
    at its initial value (50 in the paper) until an epoch-level callback sets it to
    ``(mean L_cls + mean L_loc) / mean L_loc`` of the previous epoch
    (:class:`alrp_d2.engine.SelfBalanceCallback`).
    """

    def __init__(self, initial_weight: float = 50.0, name: str = "alrp"):
        super().__init__()
        self.name = name  # metrics are logged as "<name>/sb_weight"
        if not initial_weight > 0:
            raise ValueError(f"the initial self-balance weight must be > 0, got {initial_weight}")
        self.register_buffer("weight", torch.tensor(float(initial_weight)))
        self.last_losses: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, cls_loss: torch.Tensor, loc_loss: torch.Tensor) -> torch.Tensor:
        """Records this iteration's losses and returns the weighted localisation loss."""
        if self.training:
            self.last_losses = (cls_loss.detach(), loc_loss.detach())
        return loc_loss * self.weight

    @torch.no_grad()
    def set_weight(self, value: float) -> None:
        self.weight.fill_(float(value))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={float(self.weight):.4g}"
