"""aLRP losses of a detection head: one call per batch, logged to Detectron2's EventStorage."""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from detectron2.utils.events import get_event_storage

from ..losses import alrp_loss, localisation_error
from .self_balance import SelfBalance

__all__ = ["ALRPLossTerms", "RANKING_SCOPES", "ranking_group", "scale_gradient"]

RANKING_SCOPES = ("process", "global")


def ranking_group(scope: str):
    """The process group whose anchors a head ranks together: None for ``"process"`` or
    outside a multi-process run, the training's (default) group for ``"global"``."""
    if scope not in RANKING_SCOPES:
        raise ValueError(f"MODEL.ALRP.RANKING_SCOPE must be one of {RANKING_SCOPES}, got {scope!r}")
    if scope == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def scale_gradient(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """``loss`` with its value unchanged and its gradient multiplied by ``factor``.

    Every process of a global ranking holds the global loss ``L`` and computes the
    gradient of ``L`` through its own outputs; DDP averages those over the ``W``
    processes, which would apply ``dL/dtheta / W``: a factor ``W`` makes it ``dL/dtheta``.
    """
    return loss * factor - loss.detach() * (factor - 1)


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
                 weight: float = 1.0, validate: bool = False, ranking_scope: str = "process"):
        self.balance = balance
        self.prefix = prefix
        self.delta, self.eps, self.tau = delta, eps, tau
        self.loc_error = loc_error
        self.weight = weight
        self.validate = validate
        ranking_group(ranking_scope)  # checks the name
        self.ranking_scope = ranking_scope

    @staticmethod
    def config_kwargs(cfg, **overrides) -> dict:
        """The constructor's keyword arguments from ``MODEL.ALRP`` (for ``from_config``)."""
        a = cfg.MODEL.ALRP
        kwargs = dict(delta=a.DELTA, eps=a.EPS, tau=a.TAU, loc_error=a.LOC_ERROR, validate=a.VALIDATE_INPUTS,
                      ranking_scope=a.RANKING_SCOPE)
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
        group = ranking_group(self.ranking_scope)
        cls_loss, loc_loss = alrp_loss(logits, targets, loc_errors, self.delta, self.eps, validate=self.validate,
                                       process_group=group)
        weighted_loc = self.balance(cls_loss, loc_loss)
        processes = dist.get_world_size(group) if group is not None else 1
        self._log(logits, targets, len(loc_errors), cls_loss, loc_loss, num_images, num_images * processes)
        losses = {
            f"loss_{self.prefix}_cls": cls_loss * self.weight,
            f"loss_{self.prefix}_loc": weighted_loc * self.weight,
        }
        return {name: scale_gradient(value, processes) for name, value in losses.items()}

    @torch.no_grad()
    def _log(self, logits, targets, num_pos, cls_loss, loc_loss, num_images, ranked_images):
        storage = get_event_storage()
        if num_pos:
            lowest = logits.detach()[targets == 1].min()
            relevant = int(((targets == 0) & (logits.detach() >= lowest - self.delta)).sum())
        else:
            relevant = 0
        p = self.prefix
        storage.put_scalar(f"{p}/num_pos", num_pos / num_images)
        storage.put_scalar(f"{p}/num_relevant_neg", relevant / num_images)
        # Images whose anchors were ranked together: this process's, or every process's.
        storage.put_scalar(f"{p}/ranked_images", ranked_images)
        cls_value, loc_value = float(cls_loss.detach()), float(loc_loss.detach())
        storage.put_scalar(f"{p}/cls", cls_value)
        storage.put_scalar(f"{p}/loc", loc_value)
        storage.put_scalar(f"{p}/loss", cls_value + loc_value)
        storage.put_scalar(f"{p}/sb_weight", float(self.balance.weight))
