"""Faster and Mask R-CNN trained by a ranking loss (aLRP: supplementary S7.4; Rank & Sort).

The RPN is trained on all its anchors (no sampling), with the loss's RPN weight (0.2) and,
for aLRP, TAU 0.7; the box head has class-wise sigmoid classifiers trained on all
proposals (no sampling). With aLRP each head has its own self-balance weight.
"""

# No "from __future__ import annotations": TorchScript reads RankingROIHeads' Final
# annotations as objects.
from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import Boxes, Instances

from .head_losses import HeadLoss, HeadOutputs, build_head_loss
from .matcher import MaxIoUMatcher
from .retinanet import classwise_targets

__all__ = [
    "ALRPROIHeads",
    "ALRPRPN",
    "MaxIoURPN",
    "RankSortROIHeads",
    "RankSortRPN",
    "RankingFastRCNNOutputLayers",
    "RankingROIHeads",
    "RankingRPN",
    "classwise_proposal_targets",
    "label_every_proposal",
]


def label_every_proposal(
    matched_idxs: torch.Tensor,
    matched_labels: torch.Tensor,
    gt_classes: torch.Tensor,
    num_classes: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ROIHeads._sample_proposals`` without sampling, for the ranking losses: every
    proposal, in order, with its class (``num_classes`` for background, -1 ignored)."""
    if gt_classes.numel() > 0:
        labels = gt_classes[matched_idxs]
        labels[matched_labels == 0] = num_classes
        labels[matched_labels == -1] = -1
    else:
        labels = torch.full_like(matched_idxs, num_classes)
    return torch.arange(len(labels), device=labels.device), labels


def classwise_proposal_targets(predictor: FastRCNNOutputLayers, predictions, proposals):
    """What a ranking-loss box predictor trains on, over every proposal of the batch:
    ``(targets, positive, pred_boxes, gt_boxes)``: class-wise targets ``(R, K)`` (1 at the
    proposal's class, 0 elsewhere, -1 on every class of an ignored proposal), the positive
    proposals, each proposal's box decoded for its ground-truth class and its matched
    ground-truth box (the proposal itself in an image without ground truth)."""
    gt_classes = cat([p.gt_classes for p in proposals], dim=0)
    positive = (gt_classes >= 0) & (gt_classes < predictor.num_classes)
    targets = classwise_targets(gt_classes, predictor.num_classes)
    pred_boxes = cat(predictor.predict_boxes_for_gt_classes(predictions, proposals), dim=0)
    gt_boxes = cat(
        [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0
    )
    return targets, positive, pred_boxes, gt_boxes


@PROPOSAL_GENERATOR_REGISTRY.register()
class MaxIoURPN(RPN):
    """Detectron2's RPN whose anchors are labelled by the authors' max-IoU rule
    (:class:`MaxIoUMatcher`): a ground truth's best anchors become positive only where
    their IoU reaches ``MODEL.ALRP.RPN_MIN_POS_IOU`` (0.3 in the authors' configs).

    With ``MODEL.RPN.BOUNDARY_THRESH`` ``t >= 0`` (mmdetection's ``allowed_border``), an
    anchor reaching more than ``t`` pixels beyond its image (``x0 < -t``, ``y0 < -t``,
    ``x1 >= W + t`` or ``y1 >= H + t``) is ignored, as in Detectron2, and, as in the
    authors' code, takes no part in the matching either: a ground truth's best anchors are
    its best inside the image. (Detectron2 matches over every anchor, then ignores those
    outside: a ground truth whose best anchor lies outside gets no low-quality match.)
    """

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        if self.anchor_boundary_thresh < 0:
            return super().label_and_sample_anchors(anchors, gt_instances)
        anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for image in gt_instances:
            inside = anchors.inside_box(image.image_size, self.anchor_boundary_thresh)
            # Detectron2's labelling (and sampling) of the anchors inside only
            (labels_inside,), (boxes_inside,) = super().label_and_sample_anchors(
                [anchors[inside]], [image]
            )
            labels = labels_inside.new_full((len(anchors),), -1)
            labels[inside] = labels_inside
            boxes = boxes_inside.new_zeros((len(anchors), 4))
            boxes[inside] = boxes_inside
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        return gt_labels, matched_gt_boxes

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["anchor_matcher"] = MaxIoUMatcher.from_thresholds(
            cfg.MODEL.RPN.IOU_THRESHOLDS, cfg.MODEL.RPN.IOU_LABELS, cfg.MODEL.ALRP.RPN_MIN_POS_IOU
        )
        return ret


@PROPOSAL_GENERATOR_REGISTRY.register()
class RankingRPN(MaxIoURPN):
    """RPN whose objectness and boxes are trained by the ranking loss
    ``MODEL.RANKING_LOSS.NAME`` (:mod:`alrp_d2.modeling.head_losses`) over every anchor (no
    sampling), with the loss's RPN weight (``MODEL.ALRP.RPN_LOSS_WEIGHT``,
    ``MODEL.RANK_SORT.RPN_LOSS_WEIGHT``)."""

    @configurable
    def __init__(self, *, head_loss: HeadLoss, **kwargs):
        super().__init__(**kwargs)
        head_loss.attach(self)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["head_loss"] = build_head_loss(cfg, cls, "rpn")
        return ret

    def _subsample_labels(self, label):
        return label  # every anchor takes part in the ranking

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        gt_labels = torch.stack(gt_labels)  # (N, R): 1, 0, -1
        positive = gt_labels == 1
        logits = cat(pred_objectness_logits, dim=1)
        proposals = cat(self._decode_proposals(anchors, pred_anchor_deltas), dim=1)  # (N, R, 4)
        return self.head_loss(
            HeadOutputs(
                logits=logits.reshape(-1),
                targets=gt_labels.reshape(-1),
                pred_boxes=proposals[positive],
                target_boxes=torch.stack(gt_boxes)[positive],
                scores=logits.detach()[positive].sigmoid(),
                num_images=len(gt_labels),
            )
        )


@PROPOSAL_GENERATOR_REGISTRY.register()
class ALRPRPN(RankingRPN):
    """:class:`RankingRPN` trained by aLRP Loss (``TAU`` 0.7: ``MODEL.ALRP.RPN_TAU``)."""


@PROPOSAL_GENERATOR_REGISTRY.register()
class RankSortRPN(RankingRPN):
    """:class:`RankingRPN` trained by Rank & Sort Loss."""


class RankingFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor whose class-wise sigmoid classifiers and boxes are trained by a ranking
    loss over every proposal (``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE: True``; the background
    output is unused: inference drops it). Layers, decoding and inference are Detectron2's.

    Its losses also give every proposal ``rs_weight`` (its highest class score, detached)
    and ``rs_balance`` (the ranking terms' value, detached): what
    :class:`~alrp_d2.modeling.rank_sort.RankSortMaskHead` weights and scales its loss by.
    """

    @configurable
    def __init__(self, input_shape, *, head_loss: HeadLoss, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not self.use_sigmoid_ce:
            raise ValueError("a ranking-loss R-CNN needs MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE: True")
        head_loss.attach(self)

    @classmethod
    def from_config(cls, cfg, input_shape, head_loss: HeadLoss):
        ret = super().from_config(cfg, input_shape)
        ret["head_loss"] = head_loss
        return ret

    def losses(self, predictions, proposals):
        class_scores = predictions[0][:, : self.num_classes]
        targets, positive, pred_boxes, gt_boxes = classwise_proposal_targets(
            self, predictions, proposals
        )
        weights = class_scores.detach().sigmoid().amax(-1)
        losses = self.head_loss(
            HeadOutputs(
                logits=class_scores.reshape(-1),
                targets=targets.reshape(-1),
                pred_boxes=pred_boxes[positive],
                target_boxes=gt_boxes[positive],
                scores=weights[positive],
                num_images=len(proposals),
            )
        )
        balance = self.head_loss.ranking_value(losses)
        for image, image_weights in zip(proposals, weights.split([len(p) for p in proposals])):
            image.rs_weight = image_weights
            image.rs_balance = balance.expand(len(image))
        return losses


@ROI_HEADS_REGISTRY.register()
class RankingROIHeads(StandardROIHeads):
    """Standard ROI heads trained on all proposals (no sampling) with the ranking-loss box
    predictor (``MODEL.RANKING_LOSS.NAME``; masks: ``MODEL.ROI_MASK_HEAD.NAME:
    RankSortMaskHead``)."""

    # Constants to TorchScript, so that scripting compiles away an absent mask or keypoint
    # head. detectron2.export declares them on StandardROIHeads only; scripting gives every
    # class its own annotations (``training``), and TorchScript then reads no base class's:
    # each subclass repeats them.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = RankingFastRCNNOutputLayers(
            cfg, ret["box_head"].output_shape, head_loss=build_head_loss(cfg, cls, "roi")
        )
        return ret

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        return label_every_proposal(matched_idxs, matched_labels, gt_classes, self.num_classes)


@ROI_HEADS_REGISTRY.register()
class ALRPROIHeads(RankingROIHeads):
    """:class:`RankingROIHeads` trained by aLRP Loss."""

    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]


@ROI_HEADS_REGISTRY.register()
class RankSortROIHeads(RankingROIHeads):
    """:class:`RankingROIHeads` trained by Rank & Sort Loss."""

    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]
