"""Detectors trained by Rank & Sort Loss (Oksuz et al., ICCV 2021), as the authors train them.

Every head ranks its class-wise logits with :func:`alrp_d2.losses.rank_sort_loss`, each
positive labelled by the IoU of its predicted box with its ground truth, and regresses
its positives' boxes with a GIoU loss weighted by their scores and balanced against the
ranking loss each iteration (:class:`RankSortTerms`):

- ``RankSortRetinaNet`` (META_ARCH_REGISTRY): RetinaNet's head with IoU or ATSS anchor
  labelling (``MODEL.ALRP.ASSIGNER``), optionally with a learnable box scale per level
  (``ScaledBoxRetinaNetHead``); with ATSS and the scales, RS-ATSS.
- ``RankSortRPN`` (PROPOSAL_GENERATOR_REGISTRY): the RPN on all its anchors, no sampling.
- ``RankSortROIHeads`` (ROI_HEADS_REGISTRY): class-wise sigmoid box classifiers on all
  proposals, no sampling; with ``RankSortMaskHead`` (ROI_MASK_HEAD_REGISTRY), the masks'
  Dice loss weighted and balanced the same way (RS-Mask R-CNN).
- ``build_rs_atss_resnet_fpn_backbone`` (BACKBONE_REGISTRY): ATSS's FPN, P6 and P7 from P5.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_HEADS_REGISTRY,
)
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from ..losses import giou_loss, matched_box_iou, rank_sort_loss
from .alrp_terms import ranking_group, scale_gradient
from .backbone import LastLevelP6P7NoReLU
from .rcnn import ALRPROIHeads, MaxIoURPN, classwise_proposal_targets
from .retinanet import _RankingRetinaNet

__all__ = [
    "RankSortFastRCNNOutputLayers",
    "RankSortMaskHead",
    "RankSortROIHeads",
    "RankSortRPN",
    "RankSortRetinaNet",
    "RankSortTerms",
    "ScaledBoxRetinaNetHead",
    "build_rs_atss_resnet_fpn_backbone",
    "rank_sort_mask_loss",
    "score_weighted_mean",
]

# Below this, a sum of score weights counts as empty (the authors' guard).
_WEIGHT_FLOOR = 1e-10


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


class RankSortTerms:
    """Turns a head's flattened predictions into its three Rank & Sort loss terms::

        L_rank, L_sort = rank_sort_loss(logits, targets with each positive's IoU)
        L_box = sum_i w_i GIoU_loss(i) / sum_i w_i,  w_i = max_c sigmoid(s_ic) (detached)
        loss_box = L_box * (L_rank + L_sort) / L_box          (values detached)

    With ``ranking_scope="global"`` the ranking and sorting terms are those of one ranking
    over every process's batch (their gradients scaled for DDP's averaging); the box loss
    stays this process's weighted mean, scaled to the global ranking terms.

    Args:
        prefix: ``"rs"`` gives ``loss_rs_rank``, ``loss_rs_sort``, ``loss_rs_box`` and the
            scalars ``rs/...``.
        weight: multiplies all three terms (the RPN's 0.2).
        ranking_scope: ``"process"`` or ``"global"`` (``MODEL.ALRP.RANKING_SCOPE``).
    """

    def __init__(self, *, prefix: str = "rs", delta: float = 0.5, eps: float = 1e-10,
                 weight: float = 1.0, validate: bool = False, ranking_scope: str = "process"):
        self.prefix = prefix
        self.delta, self.eps = delta, eps
        self.weight = weight
        self.validate = validate
        ranking_group(ranking_scope)  # checks the name
        self.ranking_scope = ranking_scope

    @staticmethod
    def config_kwargs(cfg, **overrides) -> dict:
        """The constructor's keyword arguments from ``MODEL.RANK_SORT`` (and the ranking
        scope, ``MODEL.ALRP.RANKING_SCOPE``, shared by every ranking head)."""
        r = cfg.MODEL.RANK_SORT
        kwargs = dict(delta=r.DELTA, eps=r.EPS, validate=r.VALIDATE_INPUTS,
                      ranking_scope=cfg.MODEL.ALRP.RANKING_SCOPE)
        kwargs.update(overrides)
        return kwargs

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, pred_boxes: torch.Tensor,
                 target_boxes: torch.Tensor, box_weights: torch.Tensor,
                 num_images: int) -> Dict[str, torch.Tensor]:
        """
        Args:
            logits: ``(M,)`` class-wise flattened logits of the whole batch.
            targets: ``(M,)`` 1 positive, 0 negative, -1 ignored (any dtype).
            pred_boxes, target_boxes: ``(P, 4)`` xyxy boxes of the positives, in the order
                the positives appear in ``logits``; ``pred_boxes`` carries the box gradient.
            box_weights: ``(P,)`` each positive's highest class score (probability).
        """
        pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
        with torch.no_grad():
            # Each positive's continuous label: the IoU of its prediction (the authors').
            labels = targets.to(torch.float32)
            labels[targets == 1] = matched_box_iou(pred_boxes.detach(), target_boxes)
        group = ranking_group(self.ranking_scope)
        ranking, sorting = rank_sort_loss(logits, labels, self.delta, self.eps,
                                          validate=self.validate, process_group=group)
        box = score_weighted_mean(
            giou_loss(pred_boxes, target_boxes), box_weights)
        box = balanced(box, ranking + sorting)
        processes = dist.get_world_size(group) if group is not None else 1
        self._log(len(pred_boxes), ranking, sorting, num_images, num_images * processes)
        p, w = self.prefix, self.weight
        return {f"loss_{p}_rank": scale_gradient(ranking * w, processes),
                f"loss_{p}_sort": scale_gradient(sorting * w, processes),
                f"loss_{p}_box": box * w}

    @torch.no_grad()
    def _log(self, num_pos, ranking, sorting, num_images, ranked_images):
        storage = get_event_storage()
        p = self.prefix
        storage.put_scalar(f"{p}/num_pos", num_pos / num_images)
        # Images whose anchors were ranked together: this process's, or every process's.
        storage.put_scalar(f"{p}/ranked_images", ranked_images)
        storage.put_scalar(f"{p}/rank", float(ranking))
        storage.put_scalar(f"{p}/sort", float(sorting))


class ScaledBoxRetinaNetHead(RetinaNetHead):
    """Detectron2's RetinaNet head whose box deltas are multiplied by one learnable scale
    per pyramid level, initialised at 1 (the ``Scale`` layers of the authors' ATSS head)."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], **kwargs):
        super().__init__(input_shape=input_shape, **kwargs)
        self.box_scales = nn.Parameter(torch.ones(len(input_shape)))

    def forward(self, features):
        logits, bbox_reg = super().forward(features)
        return logits, [deltas * scale for deltas, scale in zip(bbox_reg, self.box_scales)]


@META_ARCH_REGISTRY.register()
class RankSortRetinaNet(_RankingRetinaNet):
    """RetinaNet trained by Rank & Sort Loss; with ``MODEL.ALRP.ASSIGNER: atss``, RS-ATSS.

    Losses ``loss_rs_rank``, ``loss_rs_sort``, ``loss_rs_box``; inference, evaluation and
    checkpoints are Detectron2's RetinaNet's. With ``MODEL.RANK_SORT.LEARNED_BOX_SCALES``
    the head is :class:`ScaledBoxRetinaNetHead` (the authors' RS-ATSS).
    """

    @configurable
    def __init__(self, *, rank_sort_terms: dict, **kwargs):
        super().__init__(**kwargs)
        self.rank_sort_terms = RankSortTerms(prefix="rs", **rank_sort_terms)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["rank_sort_terms"] = RankSortTerms.config_kwargs(cfg)
        if cfg.MODEL.RANK_SORT.LEARNED_BOX_SCALES:
            shapes = [ret["backbone"].output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
            ret["head"] = ScaledBoxRetinaNetHead(cfg, shapes)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels, logits, targets, positive = self._flatten(pred_logits, gt_labels)
        pred_boxes, target_boxes = self._positive_boxes(anchors, pred_anchor_deltas, gt_boxes,
                                                        positive)
        box_weights = logits.detach()[positive].sigmoid().amax(-1)
        return self.rank_sort_terms(logits.reshape(-1), targets.reshape(-1), pred_boxes,
                                    target_boxes, box_weights, num_images)


@PROPOSAL_GENERATOR_REGISTRY.register()
class RankSortRPN(MaxIoURPN):
    """RPN whose objectness and box losses are Rank & Sort's, over every anchor (no
    sampling), weighted by ``MODEL.RANK_SORT.RPN_LOSS_WEIGHT``."""

    @configurable
    def __init__(self, *, rank_sort_terms: dict, **kwargs):
        super().__init__(**kwargs)
        self.rank_sort_terms = RankSortTerms(prefix="rpn_rs", **rank_sort_terms)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["rank_sort_terms"] = RankSortTerms.config_kwargs(
            cfg, weight=cfg.MODEL.RANK_SORT.RPN_LOSS_WEIGHT)
        return ret

    def _subsample_labels(self, label):
        return label  # every anchor takes part in the ranking

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        gt_labels = torch.stack(gt_labels)  # (N, R): 1, 0, -1
        positive = gt_labels == 1
        logits = cat(pred_objectness_logits, dim=1)
        proposals = cat(self._decode_proposals(anchors, pred_anchor_deltas), dim=1)
        return self.rank_sort_terms(
            logits.reshape(-1), gt_labels.reshape(-1), proposals[positive],
            torch.stack(gt_boxes)[positive], logits.detach()[positive].sigmoid(), len(gt_labels))


class RankSortFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor whose class-wise sigmoid classifiers and boxes are trained by Rank &
    Sort Loss (``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE: True``; the background output is unused).

    Its losses also give every proposal ``rs_weight`` (its highest class score, detached)
    and ``rs_balance`` (``L_rank + L_sort``, detached): the mask head's weights and scale.
    """

    @configurable
    def __init__(self, input_shape, *, rank_sort_terms: dict, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not self.use_sigmoid_ce:
            raise ValueError("Rank & Sort R-CNN needs MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE: True")
        self.rank_sort_terms = RankSortTerms(prefix="roi_rs", **rank_sort_terms)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["rank_sort_terms"] = RankSortTerms.config_kwargs(cfg)
        return ret

    def losses(self, predictions, proposals):
        class_scores = predictions[0][:, : self.num_classes]
        targets, positive, pred_boxes, gt_boxes = classwise_proposal_targets(
            self, predictions, proposals)
        weights = class_scores.detach().sigmoid().amax(-1)
        losses = self.rank_sort_terms(
            class_scores.reshape(-1), targets.reshape(-1), pred_boxes[positive],
            gt_boxes[positive], weights[positive], len(proposals))
        balance = (losses["loss_roi_rs_rank"] + losses["loss_roi_rs_sort"]).detach()
        for image, image_weights in zip(proposals, weights.split([len(p) for p in proposals])):
            image.rs_weight = image_weights
            image.rs_balance = balance.expand(len(image))
        return losses


@ROI_HEADS_REGISTRY.register()
class RankSortROIHeads(StandardROIHeads):
    """Standard ROI heads trained on all proposals (no sampling) with the Rank & Sort box
    predictor (and, for masks, ``MODEL.ROI_MASK_HEAD.NAME: RankSortMaskHead``)."""

    _sample_proposals = ALRPROIHeads._sample_proposals  # every proposal, labelled

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = RankSortFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


def rank_sort_mask_loss(mask_logits: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
    """The masks' loss of RS-Mask R-CNN, over the positive proposals ``i``::

        L_mask = sum_i w_i (1 - Dice(i)) / sum_i w_i,     w_i = rs_weight (its box score)
        Dice(i) = 2 sum_px m p / (sum_px m^2 + sum_px p^2 + 1e-5),  m = sigmoid(logits)
        loss = L_mask * rs_balance / L_mask                (values detached)

    ``instances``: the positive proposals of each image, with ``gt_classes``,
    ``gt_masks``, ``proposal_boxes`` and the ``rs_weight``/``rs_balance`` fields written
    by :class:`RankSortFastRCNNOutputLayers`.
    """
    side = mask_logits.size(2)
    classes, targets, weights, balances = [], [], [], []
    for image in instances:
        if len(image) == 0:
            continue
        if not (image.has("rs_weight") and image.has("rs_balance")):
            raise ValueError("RankSortMaskHead needs MODEL.ROI_HEADS.NAME: RankSortROIHeads")
        classes.append(image.gt_classes.to(torch.int64))
        targets.append(image.gt_masks.crop_and_resize(image.proposal_boxes.tensor, side)
                       .to(device=mask_logits.device))
        weights.append(image.rs_weight)
        balances.append(image.rs_balance[:1])
    if not targets:
        return mask_logits.sum() * 0
    if mask_logits.size(1) == 1:  # class-agnostic masks
        logits = mask_logits[:, 0]
    else:
        gt_classes = cat(classes)
        logits = mask_logits[torch.arange(len(gt_classes), device=gt_classes.device), gt_classes]
    masks = logits.sigmoid().flatten(1)
    target = cat(targets).to(masks.dtype).flatten(1)
    dice = 2 * (masks * target).sum(1) / ((masks**2).sum(1) + (target**2).sum(1) + 1e-5)
    loss = score_weighted_mean(1 - dice, cat(weights))
    return balanced(loss, balances[0][0])


@ROI_MASK_HEAD_REGISTRY.register()
class RankSortMaskHead(MaskRCNNConvUpsampleHead):
    """Detectron2's mask head trained by :func:`rank_sort_mask_loss` (its layers and
    inference unchanged).

    ``max_masks`` (``MODEL.RANK_SORT.MAX_MASKS``; 0: no limit): in training, at most this
    many positive proposals of the process's batch, drawn at random, train the masks
    (the authors' 200), each with its own box-score weight.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, max_masks: int = 0, **kwargs):
        super().__init__(input_shape, **kwargs)
        if max_masks < 0:
            raise ValueError(f"MODEL.RANK_SORT.MAX_MASKS must be >= 0, got {max_masks}")
        self.max_masks = max_masks

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["max_masks"] = cfg.MODEL.RANK_SORT.MAX_MASKS
        return ret

    def forward(self, x, instances: List[Instances]):
        if not self.training:
            return super().forward(x, instances)
        x, instances = self._subsample(x, instances)
        return {"loss_mask": rank_sort_mask_loss(self.layers(x), instances) * self.loss_weight}

    def _subsample(self, x, instances: List[Instances]):
        """At most ``max_masks`` of the rows of ``x`` (the images' proposals, in order)
        and the matching instances."""
        if not self.max_masks or len(x) <= self.max_masks:
            return x, instances
        keep = torch.randperm(len(x), device=x.device)[: self.max_masks].sort().values
        kept, start = [], 0
        for image in instances:
            end = start + len(image)
            kept.append(image[keep[(keep >= start) & (keep < end)] - start])
            start = end
        return x[keep], kept


@BACKBONE_REGISTRY.register()
def build_rs_atss_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN with P6 and P7 computed from P5 by stride-2 convolutions, no ReLU in
    between (the authors' ATSS: ``add_extra_convs='on_output'``)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = LastLevelP6P7NoReLU(out_channels, out_channels)
    top_block.in_feature = "p5"
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
