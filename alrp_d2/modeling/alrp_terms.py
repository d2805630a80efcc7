"""aLRP losses of a detection head: one call per batch, logged to Detectron2's EventStorage."""

from __future__ import annotations

from typing import Dict

import torch
from detectron2.utils.events import get_event_storage

from ..losses import alrp_loss, localisation_error
from .self_balance import SelfBalance

__all__ = ["ALRPLossTerms"]


class ALRPLossTerms:
    """Turns a head's flattened predictions into its two aLRP loss terms.

    Args:
        balance: the head's self-balance weight.
        prefix: ``"alrp"`` gives the losses ``loss_alrp_cls`` and ``loss_alrp_loc`` and
            the scalars ``alrp/...``.
        weight: multiplies both terms (the RPN's 0.2 in Faster R-CNN).
    """

    def __init__(self, balance: SelfBalance, *, prefix: str = "alrp", delta: float = 1.0,
                 eps: float = 1e-5, tau: float = 0.5, loc_error: str = "giou",
                 weight: float = 1.0, validate: bool = False):
        self.balance = balance
        self.prefix = prefix
        self.delta, self.eps, self.tau = delta, eps, tau
        self.loc_error = loc_error
        self.weight = weight
        self.validate = validate

    @staticmethod
    def config_kwargs(cfg, **overrides) -> dict:
        """The constructor's keyword arguments from ``MODEL.ALRP`` (for ``from_config``)."""
        a = cfg.MODEL.ALRP
        kwargs = dict(delta=a.DELTA, eps=a.EPS, tau=a.TAU, loc_error=a.LOC_ERROR, validate=a.VALIDATE_INPUTS)
        kwargs.update(overrides)
        return kwargs

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, pred_boxes: torch.Tensor,
                 target_boxes: torch.Tensor, num_images: int) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: ``(M,)`` class-wise flattened logits of the whole batch.
            targets: ``(M,)`` 1 positive, 0 negative, -1 ignored.
            pred_boxes, target_boxes: ``(P, 4)`` xyxy boxes of the positives, in the order
                the positives appear in ``logits``; ``pred_boxes`` carries the box branch's
                gradient.
        """
        loc_errors = localisation_error(pred_boxes.float(), target_boxes.float(), self.loc_error, self.tau)
        cls_loss, loc_loss = alrp_loss(logits, targets, loc_errors, self.delta, self.eps, validate=self.validate)
        weighted_loc = self.balance(cls_loss, loc_loss)
        self._log(logits, targets, len(loc_errors), cls_loss, loc_loss, num_images)
        return {
            f"loss_{self.prefix}_cls": cls_loss * self.weight,
            f"loss_{self.prefix}_loc": weighted_loc * self.weight,
        }

    @torch.no_grad()
    def _log(self, logits, targets, num_pos, cls_loss, loc_loss, num_images):
        storage = get_event_storage()
        if num_pos:
            lowest = logits.detach()[targets == 1].min()
            relevant = int(((targets == 0) & (logits.detach() >= lowest - self.delta)).sum())
        else:
            relevant = 0
        p = self.prefix
        storage.put_scalar(f"{p}/num_pos", num_pos / num_images)
        storage.put_scalar(f"{p}/num_relevant_neg", relevant / num_images)
        cls_value, loc_value = float(cls_loss.detach()), float(loc_loss.detach())
        storage.put_scalar(f"{p}/cls", cls_value)
        storage.put_scalar(f"{p}/loc", loc_value)
        storage.put_scalar(f"{p}/loss", cls_value + loc_value)
        storage.put_scalar(f"{p}/sb_weight", float(self.balance.weight))
