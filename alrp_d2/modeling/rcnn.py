"""Faster R-CNN trained by aLRP Loss (supplementary S7.4).

The RPN is trained on all its anchors (no sampling) by aLRP with TAU 0.7 and a loss
weight of 0.2; the box head has class-wise sigmoid classifiers trained by aLRP on all
proposals (no sampling). Each head has its own self-balance weight.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads

from .alrp_terms import ALRPLossTerms
from .matcher import MaxIoUMatcher
from .retinanet import classwise_targets
from .self_balance import SelfBalance

__all__ = ["ALRPRPN", "ALRPFastRCNNOutputLayers", "ALRPROIHeads", "MaxIoURPN",
           "classwise_proposal_targets"]


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
    gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                    for p in proposals], dim=0)
    return targets, positive, pred_boxes, gt_boxes


@PROPOSAL_GENERATOR_REGISTRY.register()
class MaxIoURPN(RPN):
    """Detectron2's RPN whose anchors are labelled by the authors' max-IoU rule
    (:class:`MaxIoUMatcher`): a ground truth's best anchors become positive only where
    their IoU reaches ``MODEL.ALRP.RPN_MIN_POS_IOU`` (0.3 in the authors' configs)."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["anchor_matcher"] = MaxIoUMatcher.from_thresholds(
            cfg.MODEL.RPN.IOU_THRESHOLDS, cfg.MODEL.RPN.IOU_LABELS, cfg.MODEL.ALRP.RPN_MIN_POS_IOU)
        return ret


@PROPOSAL_GENERATOR_REGISTRY.register()
class ALRPRPN(MaxIoURPN):
    """RPN whose objectness and box losses are aLRP, over every anchor."""

    @configurable
    def __init__(self, *, alrp_terms: dict, sb_init: float = 50.0, **kwargs):
        super().__init__(**kwargs)
        self.self_balance = SelfBalance(sb_init, name="rpn_alrp")
        self.alrp_terms = ALRPLossTerms(self.self_balance, prefix="rpn_alrp", **alrp_terms)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["sb_init"] = cfg.MODEL.ALRP.SB_INIT
        ret["alrp_terms"] = ALRPLossTerms.config_kwargs(
            cfg, tau=cfg.MODEL.ALRP.RPN_TAU, weight=cfg.MODEL.ALRP.RPN_LOSS_WEIGHT)
        return ret

    def _subsample_labels(self, label):
        return label  # every anchor takes part in the ranking

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R): 1, 0, -1
        positive = gt_labels == 1
        proposals = cat(self._decode_proposals(anchors, pred_anchor_deltas), dim=1)  # (N, R, 4)
        return self.alrp_terms(
            cat(pred_objectness_logits, dim=1).reshape(-1), gt_labels.reshape(-1),
            proposals[positive], torch.stack(gt_boxes)[positive], num_images,
        )


class ALRPFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor whose class-wise sigmoid classifiers and boxes are trained by aLRP.

    The layers, box decoding and inference are Detectron2's with
    ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE`` (its background output is unused: inference
    drops it).
    """

    @configurable
    def __init__(self, input_shape, *, alrp_terms: dict, sb_init: float = 50.0, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not self.use_sigmoid_ce:
            raise ValueError("aLRP Faster R-CNN needs MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE: True")
        self.self_balance = SelfBalance(sb_init, name="alrp")
        self.alrp_terms = ALRPLossTerms(self.self_balance, prefix="alrp", **alrp_terms)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["sb_init"] = cfg.MODEL.ALRP.SB_INIT
        ret["alrp_terms"] = ALRPLossTerms.config_kwargs(cfg)
        return ret

    def losses(self, predictions, proposals):
        scores, _ = predictions
        targets, positive, pred_boxes, gt_boxes = classwise_proposal_targets(
            self, predictions, proposals)
        return self.alrp_terms(
            scores[:, : self.num_classes].reshape(-1), targets.reshape(-1),
            pred_boxes[positive], gt_boxes[positive], len(proposals),
        )


@ROI_HEADS_REGISTRY.register()
class ALRPROIHeads(StandardROIHeads):
    """Standard ROI heads trained on all proposals (no sampling) with the aLRP box predictor."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = ALRPFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = self.num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        return torch.arange(len(labels), device=labels.device), labels
