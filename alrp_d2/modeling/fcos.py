"""Detectron2's FCOS trained by a ranking loss: the cost of a new detector is this adapter.

``RankingFCOS`` (META_ARCH_REGISTRY) is Detectron2's ``FCOS`` (one anchor point per
location, centre sampling, multi-level ranges, the linear box transform normalised by the
stride, the centerness branch) built from a yacs config, whose classification and box
branches hand their outputs to the ranking loss ``MODEL.RANKING_LOSS.NAME``
(:mod:`alrp_d2.modeling.head_losses`) instead of focal and GIoU loss. The centerness branch,
which FCOS multiplies into the scores at test time, keeps Detectron2's binary cross-entropy,
averaged over the positives (``loss_fcos_ctr``).

Keys: the head's as RetinaNet's (``MODEL.RETINANET.NUM_CLASSES``, ``IN_FEATURES``,
``NUM_CONVS``, ``NORM``, ``PRIOR_PROB``, ``SCORE_THRESH_TEST``, ``TOPK_CANDIDATES_TEST``,
``NMS_THRESH_TEST``), ``TEST.DETECTIONS_PER_IMAGE`` and ``MODEL.FCOS.CENTER_SAMPLING_RADIUS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

from .head_losses import HeadLoss, build_head_loss
from .retinanet import classwise_targets, dense_head_outputs

__all__ = ["RankingFCOS"]


@META_ARCH_REGISTRY.register()
class RankingFCOS(FCOS):
    """Detectron2's FCOS trained by a ranking loss (module docstring)."""

    @configurable
    def __init__(self, *, head_loss: HeadLoss, **kwargs):
        super().__init__(**kwargs)
        head_loss.attach(self)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        r = cfg.MODEL.RETINANET
        shapes = [backbone.output_shape()[f] for f in r.IN_FEATURES]
        channels = shapes[0].channels
        return {
            "backbone": backbone,
            "head": FCOSHead(input_shape=shapes, conv_dims=[channels] * r.NUM_CONVS,
                             num_classes=r.NUM_CLASSES, norm=r.NORM, prior_prob=r.PRIOR_PROB),
            "head_in_features": r.IN_FEATURES,
            "num_classes": r.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            "test_score_thresh": r.SCORE_THRESH_TEST,
            "test_topk_candidates": r.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": r.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "head_loss": build_head_loss(cfg, cls, "dense"),
        }

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R): the class, or num_classes for background
        positive = (gt_labels >= 0) & (gt_labels != self.num_classes)
        targets = classwise_targets(gt_labels, self.num_classes)
        losses = self.head_loss(dense_head_outputs(
            self.box2box_transform, anchors, cat(pred_logits, dim=1), targets, positive,
            pred_anchor_deltas, gt_boxes, num_images))
        centerness = cat(pred_centerness, dim=1).squeeze(dim=2)
        ctr_targets = self.compute_ctrness_targets(anchors, gt_boxes)
        ctr_loss = F.binary_cross_entropy_with_logits(
            centerness[positive], ctr_targets[positive], reduction="sum")
        losses["loss_fcos_ctr"] = ctr_loss / max(int(positive.sum()), 1)
        return losses
