"""Cascade R-CNN trained by a ranking loss: the Rank & Sort authors' RS-Cascade R-CNN
(``RankBasedCascadeRoIHead`` with ``RankBasedShared2FCBBoxHead`` at each stage).

Each stage ``t`` is the ranking-loss box predictor of :class:`RankingROIHeads`
(class-wise sigmoid classifiers, class-agnostic boxes) trained on every proposal: those
of stage 0 are the RPN's plus the ground truths; those of stage ``t > 0`` are the boxes
that stage ``t - 1`` regressed from the RPN's proposals (empty ones included), plus the
ground truths again. A proposal is positive at stage ``t`` from IoU ``IOUS[t]`` with its
best ground truth (no ignored band, no low-quality matches). The losses::

    L = sum_t w_t (L_rank^t + L_sort^t + L_box^t),   w_t = STAGE_LOSS_WEIGHTS[t]

At test time each proposal's class scores are ``sigmoid(mean_t logits^t)`` (the stages'
logits averaged, as mmdetection's cascade averages its classifiers' outputs) and its box
is the last stage's.
"""

from __future__ import annotations

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances

from .head_losses import build_head_loss
from .rcnn import RankingFastRCNNOutputLayers, label_every_proposal

__all__ = ["RankSortCascadeROIHeads", "RankingCascadeROIHeads"]

# Detectron2 keys these heads do not read, with the only value that means what they do:
# any other value would be silently ignored, so it is refused by name.
_UNUSED_KEYS = {
    # every proposal is trained on (no sampling)
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25,
    # the ranking loss (MODEL.RANKING_LOSS.NAME) chooses the box loss
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False,
    # boxes are class-agnostic at every stage (the authors' reg_class_agnostic=True)
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True,
    # the cascade trains boxes only (the authors' RS-Cascade R-CNN has no mask head)
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
}


def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_cascade_keys(cfg, owner: str) -> None:
    """``ValueError`` naming the first key of ``cfg`` that ``owner`` would silently ignore
    or that contradicts its stages."""
    for key, expected in _UNUSED_KEYS.items():
        if _value(cfg, key) != expected:
            raise ValueError(
                f"{key} {_value(cfg, key)!r}: {owner} does not use it (only {expected!r} is"
                " accepted: every proposal is trained, the ranking loss chooses the box loss,"
                " boxes are class-agnostic, no mask or keypoint head)"
            )
    cascade = cfg.MODEL.ROI_BOX_CASCADE_HEAD
    ious = list(cascade.IOUS)
    for name in ("BBOX_REG_WEIGHTS", "STAGE_LOSS_WEIGHTS"):
        key, values = f"MODEL.ROI_BOX_CASCADE_HEAD.{name}", cascade[name]
        if len(values) != len(ious):
            raise ValueError(
                f"{key} has {len(values)} entries, MODEL.ROI_BOX_CASCADE_HEAD.IOUS {len(ious)}:"
                " one per stage"
            )
    thresholds = list(cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS)
    if thresholds != ious[:1] or list(cfg.MODEL.ROI_HEADS.IOU_LABELS) != [0, 1]:
        raise ValueError(
            f"MODEL.ROI_HEADS.IOU_THRESHOLDS {thresholds} and IOU_LABELS"
            f" {list(cfg.MODEL.ROI_HEADS.IOU_LABELS)}: {owner} labels each stage's proposals"
            f" by MODEL.ROI_BOX_CASCADE_HEAD.IOUS alone (here {ious}); set them to"
            f" [{ious[0]}] and [0, 1]"
        )


@ROI_HEADS_REGISTRY.register()
class RankingCascadeROIHeads(CascadeROIHeads):
    """Detectron2's :class:`CascadeROIHeads` as the Rank & Sort authors train it (module
    docstring), each stage's box predictor a :class:`RankingFastRCNNOutputLayers` trained
    by ``MODEL.RANKING_LOSS.NAME`` and its stage weight.

    What differs from Detectron2's cascade, each the authors':

    - no sampling: every proposal trains every stage (``_sample_proposals``);
    - the ground truths are proposals of every stage, not only of the first
      (``_match_and_label_boxes``); the boxes regressed from them are dropped;
    - the regressed boxes stay proposals when empty (``_create_proposals_from_boxes``);
    - the stages' losses are weighted by ``STAGE_LOSS_WEIGHTS`` and their gradients reach
      the features whole (``_run_stage``; Detectron2 scales them by 1 / stages);
    - test-time scores are the sigmoid of the stages' mean logits (``_forward_box``;
      Detectron2 averages probabilities).
    """

    @configurable
    def __init__(self, *, stage_loss_weights: List[float], **kwargs):
        super().__init__(**kwargs)
        for predictor, weight in zip(self.box_predictor, stage_loss_weights):
            predictor.head_loss.weight *= weight
        self.stage_loss_weights = list(stage_loss_weights)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_cascade_keys(cfg, cls.__name__)
        ret = super().from_config(cfg, input_shape)
        ret["stage_loss_weights"] = list(cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS)
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            RankingFastRCNNOutputLayers(
                cfg,
                head.output_shape,
                head_loss=build_head_loss(cfg, cls, "roi"),
                box2box_transform=Box2BoxTransform(weights=weights),
            )
            for head, weights in zip(
                ret["box_heads"], cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
            )
        ]
        return ret

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        return label_every_proposal(matched_idxs, matched_labels, gt_classes, self.num_classes)

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        if self.proposal_append_gt:
            # The previous stage's proposals end with the ground truths (appended by
            # label_and_sample_proposals, then here): their regressed boxes are dropped and
            # the ground truths appended again (the authors' sampler adds them at every
            # stage and their refine_bboxes drops the boxes regressed from them).
            proposals = [
                Instances.cat(
                    [
                        image[: len(image) - len(gts)],
                        Instances(image.image_size, proposal_boxes=gts.gt_boxes.clone()),
                    ]
                )
                for image, gts in zip(proposals, targets)
            ]
        return super()._match_and_label_boxes(proposals, stage, targets)

    def _create_proposals_from_boxes(self, boxes, image_sizes):
        # Detectron2 drops empty boxes in training; the authors' keep them (negatives),
        # which also keeps the ground truths' boxes last.
        proposals = []
        for boxes_per_image, image_size in zip(boxes, image_sizes):
            clipped = Boxes(boxes_per_image.detach())
            clipped.clip(image_size)
            proposals.append(Instances(image_size, proposal_boxes=clipped))
        return proposals

    def _run_stage(self, features, proposals, stage):
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        return self.box_predictor[stage](self.box_head[stage](box_features))

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        logits: List[torch.Tensor] = []
        predictions = None
        finite = None  # per proposal: its boxes were finite at every stage so far
        for stage in range(self.num_cascade_stages):
            if stage > 0:
                boxes = self.box_predictor[stage - 1].predict_boxes(predictions, proposals)
                finite = _finite_rows(boxes, finite)
                # A diverged model's box that is not finite goes on as an empty one (Boxes
                # refuses it) and its proposal detects nothing (below).
                boxes = [torch.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0) for b in boxes]
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, stage)
            logits.append(predictions[0])
        predictor = self.box_predictor[-1]
        mean_logits = sum(logits) / len(logits)
        scores = predictor.predict_probs((mean_logits, predictions[1]), proposals)
        boxes = predictor.predict_boxes(predictions, proposals)
        if finite is not None:
            # fast_rcnn_inference drops boxes that are not finite
            boxes = [b.masked_fill(~f[:, None], float("nan")) for b, f in zip(boxes, finite)]
        instances, _ = fast_rcnn_inference(
            boxes,
            scores,
            image_sizes,
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances


def _finite_rows(boxes: List[torch.Tensor], finite=None) -> List[torch.Tensor]:
    """Per image, which rows of ``boxes`` are finite (and were in ``finite``)."""
    rows = [torch.isfinite(b).all(dim=1) for b in boxes]
    return rows if finite is None else [r & f for r, f in zip(rows, finite)]


@ROI_HEADS_REGISTRY.register()
class RankSortCascadeROIHeads(RankingCascadeROIHeads):
    """:class:`RankingCascadeROIHeads` trained by Rank & Sort Loss (RS-Cascade R-CNN)."""
