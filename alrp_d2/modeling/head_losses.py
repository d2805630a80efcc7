"""The one adapter between a detection head and a ranking loss.

A head (dense, RPN, RoI box predictor) hands its training outputs to a :class:`HeadLoss`
as :class:`HeadOutputs`: its class-wise flattened logits and targets, and its positives'
predicted and target boxes (and deltas). The head loss, chosen by config
(``MODEL.RANKING_LOSS.NAME``, a name of ``HEAD_LOSS_REGISTRY``, or the registered alias
of the head), owns what differs between losses:

- :class:`ALRPHeadLoss`: binary targets; the localisation error (IoU or GIoU)
  ranked with the logits, weighted by the epoch-level self-balance;
- :class:`RankSortHeadLoss`: each positive labelled by the IoU of its
  predicted box; a GIoU loss weighted by the positives' scores and scaled every iteration
  to the ranking terms;
- :class:`APHeadLoss`: AP Loss on binary targets; smooth L1 on the box deltas;
- :class:`FocalHeadLoss`: no ranking: sigmoid focal loss and smooth L1 on the box
  deltas, the baseline the ranking losses are compared with.

What every loss shares is here once: the ranking scope (one ranking per process, or over
every process's batch) and the gradient scaling DDP's averaging needs, the loss weight
(the RPN's 0.2), the names of the losses and scalars, and the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import getitem
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import get_cfg as detectron2_defaults
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry
from fvcore.nn import smooth_l1_loss
from torch import nn

from ..losses import (
    alrp_loss,
    ap_loss,
    bounded,
    giou_loss,
    localisation_error,
    matched_box_iou,
    rank_sort_loss,
)
from .self_balance import SelfBalance

__all__ = [
    "BOX_LOSS_KEYS",
    "BOX_LOSS_SETTINGS",
    "HEAD_LOSS_REGISTRY",
    "HEADS",
    "RANKING_SCOPES",
    "ALRPHeadLoss",
    "APHeadLoss",
    "FocalHeadLoss",
    "HeadLoss",
    "HeadOutputs",
    "RankSortHeadLoss",
    "balanced",
    "build_head_loss",
    "configured_scope",
    "focal_loss_sum",
    "head_loss_name",
    "ranking_group",
    "scale_gradient",
    "score_weighted_mean",
]

HEAD_LOSS_REGISTRY = Registry("HEAD_LOSS")
HEAD_LOSS_REGISTRY.__doc__ = "Ranking losses of a detection head, by MODEL.RANKING_LOSS.NAME."

RANKING_SCOPES = ("process", "global")
HEADS = ("dense", "rpn", "roi")  # the head families a loss is built for
# Detectron2's key of each head family's box loss, and its default: a head loss with a box
# loss of its own (HeadLoss.own_box_loss) refuses any other value rather than ignore it.
BOX_LOSS_KEYS = {
    "dense": "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "rpn": "MODEL.RPN.BBOX_REG_LOSS_TYPE",
    "roi": "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
}
DEFAULT_BOX_LOSS = "smooth_l1"
# The other settings of each family's Detectron2 box loss, ignored by a loss of its own too:
# refused when they differ from Detectron2's defaults.
BOX_LOSS_SETTINGS = {
    "dense": ("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",),
    "rpn": ("MODEL.RPN.SMOOTH_L1_BETA", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT"),
    "roi": ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT"),
}
# Below this, a sum of score weights counts as empty (the Rank & Sort authors' guard).
_WEIGHT_FLOOR = 1e-10


def ranking_group(scope: str):
    """The process group whose anchors a head ranks together: None for ``"process"`` or
    outside a multi-process run, the training's (default) group for ``"global"``."""
    if scope not in RANKING_SCOPES:
        raise ValueError(
            f"MODEL.RANKING_LOSS.RANKING_SCOPE (or MODEL.ALRP.RANKING_SCOPE) must be one of"
            f" {RANKING_SCOPES}, got {scope!r}"
        )
    if (
        scope == "global"
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    ):
        return dist.group.WORLD
    return None


def configured_scope(cfg) -> str:
    """The ranking scope of every head: ``MODEL.RANKING_LOSS.RANKING_SCOPE``, or where that
    is empty its older alias ``MODEL.ALRP.RANKING_SCOPE``; ``ValueError`` naming both where
    they are set to different scopes."""
    new, old = cfg.MODEL.RANKING_LOSS.RANKING_SCOPE, cfg.MODEL.ALRP.RANKING_SCOPE
    if new and old != "process" and new != old:
        raise ValueError(
            f"MODEL.RANKING_LOSS.RANKING_SCOPE {new!r} and its alias MODEL.ALRP.RANKING_SCOPE"
            f" {old!r} differ: set one of them"
        )
    return new or old


def scale_gradient(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """``loss`` with its value unchanged and its gradient multiplied by ``factor``.

    Every process of a global ranking holds the global loss ``L`` and computes the
    gradient of ``L`` through its own outputs; DDP averages those over the ``W``
    processes, which would apply ``dL/dtheta / W``: a factor ``W`` makes it ``dL/dtheta``.
    """
    return loss * factor - loss.detach() * (factor - 1)


def score_weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i loss_i / sum_i w_i`` (``weights`` detached; a sum below 1e-10 counts 1)."""
    weights = weights.detach().to(losses.dtype)
    total = weights.sum()
    return (weights * losses).sum() / torch.where(total < _WEIGHT_FLOOR, 1.0, total)


def balanced(loss: torch.Tensor, target_value: torch.Tensor) -> torch.Tensor:
    """``loss * target_value / loss`` (both values detached): the value of ``target_value``,
    the direction of ``loss``'s gradient. Rank & Sort's replacement of a tuned loss weight:
    every iteration the regression term is scaled to the size of the ranking terms."""
    value = loss.detach()
    scale = torch.where(value > 0, target_value.detach() / value.clamp_min(_WEIGHT_FLOOR), 0.0)
    return loss * scale


@dataclass
class HeadOutputs:
    """What a head hands to its loss for one batch.

    ``logits``, ``targets``: ``(M,)`` class-wise flattened logits of the whole batch and
    their targets (1 positive, 0 negative, -1 ignored). The positives' rows, in the order
    the positives appear in ``logits``: ``pred_boxes`` (xyxy, carrying the box branch's
    gradient), ``target_boxes``, ``scores`` (the highest class probability, detached), and,
    where the head regresses deltas, ``pred_deltas`` and ``target_deltas``.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    pred_boxes: torch.Tensor
    target_boxes: torch.Tensor
    scores: torch.Tensor
    num_images: int
    pred_deltas: Optional[torch.Tensor] = None
    target_deltas: Optional[torch.Tensor] = None


class HeadLoss:
    """A ranking loss of a detection head (module docstring); subclasses define
    :meth:`terms` and their config (:meth:`config_kwargs`).

    Args:
        prefix: names the losses (``loss_<prefix>_...``) and scalars (``<prefix>/...``).
        weight: multiplies every term (the RPN's 0.2).
        ranking_scope: ``"process"`` or ``"global"`` (:func:`configured_scope`).
        validate: re-check the loss inputs every step (one synchronisation).
    """

    #: Submodules the head registers under these names (so checkpoints keep their keys).
    modules: Dict[str, nn.Module]

    def __init__(
        self,
        *,
        prefix: str,
        weight: float = 1.0,
        ranking_scope: str = "process",
        validate: bool = False,
    ):
        ranking_group(ranking_scope)  # checks the name
        self.prefix, self.weight = prefix, weight
        self.ranking_scope, self.validate = ranking_scope, validate
        self.modules = {}

    @classmethod
    def config_kwargs(cls, cfg, head: str) -> dict:
        """The constructor's keyword arguments for a head of family ``head`` (:data:`HEADS`)."""
        raise NotImplementedError

    @classmethod
    def own_box_loss(cls, cfg) -> Optional[str]:
        """What the loss trains the boxes with in place of Detectron2's box loss
        (:data:`BOX_LOSS_KEYS`), for the refusal of that key; None when the loss honours
        the key (or checks it itself)."""
        return None

    def attach(self, head: nn.Module) -> None:
        """Becomes ``head.head_loss``; its :attr:`modules` become the head's submodules (so
        ``self_balance.weight`` is where checkpoints hold it)."""
        head.head_loss = self
        for name, module in self.modules.items():
            head.add_module(name, module)

    def terms(self, outputs: HeadOutputs, group, processes: int) -> Dict[str, torch.Tensor]:
        """The loss terms (unweighted, gradients not yet scaled for DDP), named by suffix."""
        raise NotImplementedError

    #: The suffixes of the terms that a global ranking shares (their gradients are scaled).
    ranked = ()

    def __call__(self, outputs: HeadOutputs) -> Dict[str, torch.Tensor]:
        group = ranking_group(self.ranking_scope)
        processes = dist.get_world_size(group) if group is not None else 1
        losses = {}
        for suffix, value in self.terms(outputs, group, processes).items():
            value = value * self.weight
            losses[f"loss_{self.prefix}_{suffix}"] = (
                scale_gradient(value, processes) if suffix in self.ranked else value
            )
        return losses

    def ranking_value(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The detached sum of the ranking terms of ``losses`` (what Rank & Sort's mask loss
        is scaled to)."""
        return sum(losses[f"loss_{self.prefix}_{s}"] for s in self.ranked).detach()

    def _put(self, name: str, value: float) -> None:
        get_event_storage().put_scalar(f"{self.prefix}/{name}", value)


@HEAD_LOSS_REGISTRY.register()
class ALRPHeadLoss(HeadLoss):
    """aLRP Loss: ``loss_<prefix>_cls`` and ``loss_<prefix>_loc``, the latter times the
    head's self-balance weight (registered on the head as ``self_balance``)."""

    ranked = ("cls", "loc")

    def __init__(
        self,
        *,
        sb_init: float = 50.0,
        delta: float = 1.0,
        eps: float = 1e-5,
        tau: float = 0.5,
        loc_error: str = "giou",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.delta, self.eps, self.tau, self.loc_error = delta, eps, tau, loc_error
        self.balance = SelfBalance(sb_init, name=self.prefix)
        self.modules = {"self_balance": self.balance}

    @classmethod
    def config_kwargs(cls, cfg, head: str) -> dict:
        a = cfg.MODEL.ALRP
        rpn = head == "rpn"
        return dict(
            prefix="rpn_alrp" if rpn else "alrp",
            sb_init=a.SB_INIT,
            delta=a.DELTA,
            eps=a.EPS,
            tau=a.RPN_TAU if rpn else a.TAU,
            loc_error=a.LOC_ERROR,
            weight=a.RPN_LOSS_WEIGHT if rpn else 1.0,
            validate=a.VALIDATE_INPUTS,
            ranking_scope=configured_scope(cfg),
        )

    @classmethod
    def own_box_loss(cls, cfg) -> str:
        error = cfg.MODEL.ALRP.LOC_ERROR
        return f"aLRP Loss's localisation error, MODEL.ALRP.LOC_ERROR ({error!r})"

    def terms(self, outputs, group, processes):
        loc_errors = localisation_error(
            outputs.pred_boxes.float(), outputs.target_boxes.float(), self.loc_error, self.tau
        )
        cls_loss, loc_loss = alrp_loss(
            outputs.logits,
            outputs.targets,
            loc_errors,
            self.delta,
            self.eps,
            validate=self.validate,
            process_group=group,
        )
        weighted_loc = self.balance(cls_loss, loc_loss)
        self._log(outputs, len(loc_errors), cls_loss, loc_loss, processes)
        return {"cls": cls_loss, "loc": weighted_loc}

    @torch.no_grad()
    def _log(self, outputs, num_pos, cls_loss, loc_loss, processes):
        logits, targets, num_images = outputs.logits.detach(), outputs.targets, outputs.num_images
        if num_pos:
            lowest = logits[targets == 1].min()
            relevant = int(((targets == 0) & (logits >= lowest - self.delta)).sum())
        else:
            relevant = 0
        self._put("num_pos", num_pos / num_images)
        self._put("num_relevant_neg", relevant / num_images)
        # Images whose anchors were ranked together: this process's, or every process's.
        self._put("ranked_images", num_images * processes)
        cls_value, loc_value = float(cls_loss), float(loc_loss)
        self._put("cls", cls_value)
        self._put("loc", loc_value)
        self._put("loss", cls_value + loc_value)
        self._put("sb_weight", float(self.balance.weight))


@HEAD_LOSS_REGISTRY.register()
class RankSortHeadLoss(HeadLoss):
    """Rank & Sort Loss (Oksuz et al., ICCV 2021), as the authors train a head::

        L_rank, L_sort = rank_sort_loss(logits, targets with each positive's IoU)
        L_box = sum_i w_i GIoU_loss(i) / sum_i w_i,  w_i = the positive's score (detached)
        loss_box = L_box * (L_rank + L_sort) / L_box          (values detached)

    ``loss_<prefix>_rank``, ``_sort`` and ``_box``. With a global ranking the ranking and
    sorting terms are those of one ranking over every process's batch; the box loss stays
    this process's weighted mean, scaled to the global ranking terms.
    """

    ranked = ("rank", "sort")

    def __init__(self, *, delta: float = 0.5, eps: float = 1e-10, **kwargs):
        super().__init__(**kwargs)
        self.delta, self.eps = delta, eps

    @classmethod
    def config_kwargs(cls, cfg, head: str) -> dict:
        r = cfg.MODEL.RANK_SORT
        return dict(
            prefix={"dense": "rs", "rpn": "rpn_rs", "roi": "roi_rs"}[head],
            delta=r.DELTA,
            eps=r.EPS,
            weight=r.RPN_LOSS_WEIGHT if head == "rpn" else 1.0,
            validate=r.VALIDATE_INPUTS,
            ranking_scope=configured_scope(cfg),
        )

    @classmethod
    def own_box_loss(cls, cfg) -> str:
        return "Rank & Sort Loss's GIoU loss, weighted by the positives' scores"

    def terms(self, outputs, group, processes):
        pred_boxes, target_boxes = outputs.pred_boxes.float(), outputs.target_boxes.float()
        targets = outputs.targets
        with torch.no_grad():
            # Each positive's continuous label: the IoU of its prediction (the authors').
            labels = targets.to(torch.float32)
            labels[targets == 1] = matched_box_iou(pred_boxes.detach(), target_boxes)
        # No num_positives: a positive whose predicted box misses its target (IoU 0) gets
        # label 0, a negative, so that only the device knows how many positives remain.
        ranking, sorting = rank_sort_loss(
            outputs.logits,
            labels,
            self.delta,
            self.eps,
            validate=self.validate,
            process_group=group,
        )
        box = balanced(
            score_weighted_mean(giou_loss(pred_boxes, target_boxes), outputs.scores),
            ranking + sorting,
        )
        with torch.no_grad():
            self._put("num_pos", len(pred_boxes) / outputs.num_images)
            self._put("ranked_images", outputs.num_images * processes)
            self._put("rank", float(ranking))
            self._put("sort", float(sorting))
        return {"rank": ranking, "sort": sorting, "box": box}


@HEAD_LOSS_REGISTRY.register()
class APHeadLoss(HeadLoss):
    """AP Loss and a box loss, the paper's baseline and its Table S4 variants:
    ``loss_ap_cls`` and ``loss_box_reg``. Dense heads only.

    The box loss (``box_loss``, ``MODEL.RETINANET.BBOX_REG_LOSS_TYPE``): ``"smooth_l1"`` on
    the box deltas (beta ``MODEL.RETINANET.SMOOTH_L1_LOSS_BETA``), ``"iou"`` (``1 - IoU``)
    or ``"giou"`` (``1 - GIoU``) of the decoded boxes; each summed over the positives and
    divided by 4 per positive (their box parameters), as the official AP Loss code and the
    aLRP authors' ablation code normalise all three. With ``self_balance``
    (``MODEL.ALRP.AP_SELF_BALANCE``) it is multiplied by a self-balance weight, registered
    on the head as ``self_balance`` (starting at ``MODEL.ALRP.SB_INIT``, then
    ``(mean L_cls + mean L_box) / mean L_box`` of the previous epoch, as aLRP Loss's);
    without, by 1.
    """

    ranked = ("cls",)
    BOX_LOSSES = ("smooth_l1", "iou", "giou")

    def __init__(
        self,
        *,
        delta: float = 1.0,
        smooth_l1_beta: float = 0.1,
        box_loss: str = "smooth_l1",
        self_balance: bool = False,
        sb_init: float = 50.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if box_loss not in self.BOX_LOSSES:
            raise ValueError(
                f"AP Loss's box loss (MODEL.RETINANET.BBOX_REG_LOSS_TYPE) must be one of"
                f" {self.BOX_LOSSES}, got {box_loss!r}"
            )
        self.delta, self.smooth_l1_beta, self.box_loss = delta, smooth_l1_beta, box_loss
        self.balance = SelfBalance(sb_init, name=self.prefix) if self_balance else None
        if self.balance is not None:
            self.modules = {"self_balance": self.balance}

    @classmethod
    def config_kwargs(cls, cfg, head: str) -> dict:
        if head != "dense":
            raise ValueError(
                f"AP Loss trains dense (RetinaNet-style) heads only, not the {head} head"
            )
        a, r = cfg.MODEL.ALRP, cfg.MODEL.RETINANET
        return dict(
            prefix="ap",
            delta=a.DELTA,
            ranking_scope=configured_scope(cfg),
            validate=a.VALIDATE_INPUTS,
            smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA,
            box_loss=r.BBOX_REG_LOSS_TYPE,
            self_balance=a.AP_SELF_BALANCE,
            sb_init=a.SB_INIT,
        )

    def __call__(self, outputs: HeadOutputs) -> Dict[str, torch.Tensor]:
        losses = super().__call__(outputs)
        # Detectron2's name for a box loss (the key a RetinaNet user knows)
        losses["loss_box_reg"] = losses.pop(f"loss_{self.prefix}_box")
        return losses

    def terms(self, outputs, group, processes):
        num_pos = len(outputs.pred_boxes)
        get_event_storage().put_scalar("num_pos_anchors", num_pos / outputs.num_images)
        # A global ranking covers the classification; the box loss stays per process.
        cls = ap_loss(
            outputs.logits,
            outputs.targets,
            self.delta,
            validate=self.validate,
            process_group=group,
            num_positives=num_pos,  # one positive box per target 1, as aLRP's loc_errors
        )
        if self.box_loss == "smooth_l1":
            box = smooth_l1_loss(
                outputs.pred_deltas,
                outputs.target_deltas,
                beta=self.smooth_l1_beta,
                reduction="sum",
            )
        else:
            # IoUs in float32 at least (reduced-precision boxes lose small overlaps)
            dtype = torch.promote_types(outputs.pred_boxes.dtype, torch.float32)
            pred, target = outputs.pred_boxes.to(dtype), outputs.target_boxes.to(dtype)
            if self.box_loss == "iou":
                box = (1 - matched_box_iou(bounded(pred, target), target)).sum()
            else:
                box = giou_loss(pred, target).sum()
        box = box / max(4 * num_pos, 1)
        if self.balance is not None:
            box = self.balance(cls, box)
            self._put("sb_weight", float(self.balance.weight))
        return {"cls": cls, "box": box}


def focal_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """The sigmoid focal loss (Lin et al.) of ``logits`` for binary ``targets``, summed;
    ``alpha < 0``: no class weighting (Detectron2's convention). Computed in the logits'
    dtype, at least float32 (fvcore's casts everything to float32, float64 too)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.dtype)
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


@HEAD_LOSS_REGISTRY.register()
class FocalHeadLoss(HeadLoss):
    """Sigmoid focal loss and smooth L1 on the box deltas (mmdetection's anchor-free heads,
    the FoveaBox baseline of the aLRP paper): ``loss_focal_cls``, the focal loss summed over
    every (row, class) not ignored and divided by the number of positives plus the number
    of images (never 0, and an image without objects still counts), and ``loss_box_reg``,
    smooth L1 summed over the positives' deltas and divided by the number of positives.

    Ranks nothing: a global ranking scope is refused. Dense heads only. Reads
    ``MODEL.RETINANET.FOCAL_LOSS_GAMMA``, ``FOCAL_LOSS_ALPHA`` and ``SMOOTH_L1_LOSS_BETA``.
    """

    def __init__(
        self, *, gamma: float = 2.0, alpha: float = 0.25, smooth_l1_beta: float = 0.1, **kwargs
    ):
        super().__init__(**kwargs)
        if kwargs.get("ranking_scope", "process") != "process":
            raise ValueError(
                "FocalHeadLoss ranks nothing: MODEL.RANKING_LOSS.RANKING_SCOPE (or"
                " MODEL.ALRP.RANKING_SCOPE) must be 'process' with it, got"
                f" {kwargs['ranking_scope']!r}"
            )
        self.gamma, self.alpha, self.smooth_l1_beta = gamma, alpha, smooth_l1_beta

    @classmethod
    def config_kwargs(cls, cfg, head: str) -> dict:
        if head != "dense":
            raise ValueError(
                f"FocalHeadLoss trains dense (RetinaNet-style) heads only, not the {head} head"
            )
        r = cfg.MODEL.RETINANET
        if r.BBOX_REG_LOSS_TYPE != "smooth_l1":
            raise ValueError(
                "FocalHeadLoss regresses the box deltas by smooth L1:"
                f" MODEL.RETINANET.BBOX_REG_LOSS_TYPE must be 'smooth_l1', got"
                f" {r.BBOX_REG_LOSS_TYPE!r}"
            )
        return dict(
            prefix="focal",
            gamma=r.FOCAL_LOSS_GAMMA,
            alpha=r.FOCAL_LOSS_ALPHA,
            smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA,
            ranking_scope=configured_scope(cfg),
        )

    def __call__(self, outputs: HeadOutputs) -> Dict[str, torch.Tensor]:
        losses = super().__call__(outputs)
        losses["loss_box_reg"] = losses.pop(f"loss_{self.prefix}_box")
        return losses

    def terms(self, outputs, group, processes):
        num_pos = len(outputs.pred_boxes)
        get_event_storage().put_scalar("num_pos_anchors", num_pos / outputs.num_images)
        valid = outputs.targets >= 0
        cls = focal_loss_sum(outputs.logits[valid], outputs.targets[valid], self.alpha, self.gamma)
        box = smooth_l1_loss(
            outputs.pred_deltas, outputs.target_deltas, beta=self.smooth_l1_beta, reduction="sum"
        )
        return {"cls": cls / (num_pos + outputs.num_images), "box": box / max(num_pos, 1)}


# META_ARCHITECTURE / PROPOSAL_GENERATOR / ROI_HEADS names kept from before the single
# classes, each fixing its loss.
ALIASES = {
    "ALRPRetinaNet": "ALRPHeadLoss",
    "APLossRetinaNet": "APHeadLoss",
    "RankSortRetinaNet": "RankSortHeadLoss",
    "ALRPRPN": "ALRPHeadLoss",
    "RankSortRPN": "RankSortHeadLoss",
    "ALRPROIHeads": "ALRPHeadLoss",
    "RankSortROIHeads": "RankSortHeadLoss",
    "RankSortCascadeROIHeads": "RankSortHeadLoss",
}


def _names():
    return sorted(name for name, _ in HEAD_LOSS_REGISTRY)


def head_loss_name(cfg, head_class: type) -> str:
    """The loss a head of class ``head_class`` trains with: the one its registered alias
    fixes (for a subclass too), else ``MODEL.RANKING_LOSS.NAME``; ``ValueError`` naming
    both where they disagree, or where none is given."""
    chosen = cfg.MODEL.RANKING_LOSS.NAME
    alias = next((c.__name__ for c in head_class.__mro__ if c.__name__ in ALIASES), None)
    if alias is not None:
        fixed = ALIASES[alias]
        if chosen and chosen != fixed:
            raise ValueError(
                f"MODEL.RANKING_LOSS.NAME {chosen!r} contradicts {alias}, which trains with"
                f" {fixed!r}: use the generic Ranking... name to choose the loss"
            )
        return fixed
    if not chosen:
        raise ValueError(f"{head_class.__name__} needs MODEL.RANKING_LOSS.NAME, one of {_names()}")
    if chosen not in HEAD_LOSS_REGISTRY:
        raise ValueError(f"MODEL.RANKING_LOSS.NAME must be one of {_names()}, got {chosen!r}")
    return chosen


def build_head_loss(cfg, head_class: type, head: str) -> HeadLoss:
    """The :class:`HeadLoss` of a head of class ``head_class`` and family ``head``
    (:data:`HEADS`), from ``cfg``. ``ValueError`` naming the head family's Detectron2 box
    loss key (:data:`BOX_LOSS_KEYS`) when it is not Detectron2's default and the loss
    trains the boxes by its own loss (:meth:`HeadLoss.own_box_loss`): the key would
    otherwise be ignored."""
    cls = HEAD_LOSS_REGISTRY.get(head_loss_name(cfg, head_class))
    instead = cls.own_box_loss(cfg)
    if instead is not None:
        defaults = detectron2_defaults()
        for key in (BOX_LOSS_KEYS[head], *BOX_LOSS_SETTINGS[head]):
            value, default = (reduce(getitem, key.split("."), c) for c in (cfg, defaults))
            if value != default:
                raise ValueError(
                    f"{key} is {value!r}, but {cls.__name__} does not use it: its box loss is"
                    f" {instead}; leave {key} at Detectron2's default {default!r}"
                )
    return cls(**cls.config_kwargs(cfg, head))
