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

from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from torch import Tensor

from .head_losses import HeadLoss, build_head_loss
from .retinanet import classwise_targets, dense_head_outputs

__all__ = ["RankingFCOS", "ScriptableBox2BoxTransformLinear", "ScriptableFCOSHead"]


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
            "head": ScriptableFCOSHead(
                input_shape=shapes,
                conv_dims=[channels] * r.NUM_CONVS,
                num_classes=r.NUM_CLASSES,
                norm=r.NORM,
                prior_prob=r.PRIOR_PROB,
            ),
            "head_in_features": r.IN_FEATURES,
            "box2box_transform": ScriptableBox2BoxTransformLinear(normalize_by_size=True),
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

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R): the class, or num_classes for background
        positive = (gt_labels >= 0) & (gt_labels != self.num_classes)
        targets = classwise_targets(gt_labels, self.num_classes)
        losses = self.head_loss(
            dense_head_outputs(
                self.box2box_transform,
                anchors,
                cat(pred_logits, dim=1),
                targets,
                positive,
                pred_anchor_deltas,
                gt_boxes,
                num_images,
            )
        )
        centerness = cat(pred_centerness, dim=1).squeeze(dim=2)
        ctr_targets = self.compute_ctrness_targets(anchors, gt_boxes)
        ctr_loss = F.binary_cross_entropy_with_logits(
            centerness[positive], ctr_targets[positive], reduction="sum"
        )
        losses["loss_fcos_ctr"] = ctr_loss / max(int(positive.sum()), 1)
        return losses


class ScriptableFCOSHead(FCOSHead):
    """Detectron2's ``FCOSHead`` (same layers, parameter names and outputs) whose forward
    TorchScript can compile: upstream's leaves ``features`` untyped, which scripting reads
    as one tensor."""

    def forward(self, features: List[Tensor]):
        assert len(features) == self._num_features
        logits, bbox_reg, ctrness = [], [], []
        for feature in features:
            logits.append(self.cls_score(self.cls_subnet(feature)))
            bbox_feature = self.bbox_subnet(feature)
            bbox_reg.append(self.bbox_pred(bbox_feature))
            ctrness.append(self.ctrness(bbox_feature))
        return logits, bbox_reg, ctrness


@torch.jit.script
class ScriptableBox2BoxTransformLinear:
    """Detectron2's ``Box2BoxTransformLinear`` (FCOS's box transform: distances from the
    anchor's centre to the box's sides, by the anchor's size), the same arithmetic as a
    TorchScript class, as Detectron2's ``Box2BoxTransform`` is: upstream's is a plain
    Python object, which scripting cannot hold."""

    def __init__(self, normalize_by_size: bool = True):
        self.normalize_by_size = normalize_by_size

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """The deltas ``(l, t, r, b)`` that turn the square ``src_boxes`` (whose centres lie
        in their targets) into ``target_boxes``."""
        src_ctr_x = 0.5 * (src_boxes[:, 0] + src_boxes[:, 2])
        src_ctr_y = 0.5 * (src_boxes[:, 1] + src_boxes[:, 3])
        deltas = torch.stack(
            (
                src_ctr_x - target_boxes[:, 0],
                src_ctr_y - target_boxes[:, 1],
                target_boxes[:, 2] - src_ctr_x,
                target_boxes[:, 3] - src_ctr_y,
            ),
            dim=1,
        )
        if self.normalize_by_size:
            stride_w = src_boxes[:, 2] - src_boxes[:, 0]
            stride_h = src_boxes[:, 3] - src_boxes[:, 1]
            deltas = deltas / torch.stack([stride_w, stride_h, stride_w, stride_h], dim=1)
        return deltas

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """``boxes`` ``(N, 4)`` moved by ``deltas`` ``(N, k * 4)`` (negative distances count 0,
        so every box is valid)."""
        deltas = F.relu(deltas)
        boxes = boxes.to(deltas.dtype)
        ctr_x = 0.5 * (boxes[:, 0] + boxes[:, 2])
        ctr_y = 0.5 * (boxes[:, 1] + boxes[:, 3])
        if self.normalize_by_size:
            stride_w = boxes[:, 2] - boxes[:, 0]
            stride_h = boxes[:, 3] - boxes[:, 1]
            deltas = deltas * torch.stack([stride_w, stride_h, stride_w, stride_h], dim=1)
        pred_boxes = torch.zeros_like(deltas)
        pred_boxes[:, 0::4] = ctr_x[:, None] - deltas[:, 0::4]
        pred_boxes[:, 1::4] = ctr_y[:, None] - deltas[:, 1::4]
        pred_boxes[:, 2::4] = ctr_x[:, None] + deltas[:, 2::4]
        pred_boxes[:, 3::4] = ctr_y[:, None] + deltas[:, 3::4]
        return pred_boxes
