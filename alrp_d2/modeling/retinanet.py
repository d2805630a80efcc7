"""RetinaNet trained by a ranking loss (aLRP, AP, Rank & Sort; IoU or ATSS assignment)."""

from __future__ import annotations

from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from .atss import atss_match
from .head_losses import HeadLoss, HeadOutputs, build_head_loss
from .matcher import MaxIoUMatcher

__all__ = [
    "ALRPRetinaNet",
    "APLossRetinaNet",
    "RankSortRetinaNet",
    "RankingRetinaNet",
    "ScaledBoxRetinaNetHead",
    "classwise_targets",
    "dense_head_outputs",
]


def classwise_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-anchor labels (-1 ignored, K background, else the class) to class-wise
    targets ``(..., K)``: 1 at the anchor's class, 0 elsewhere, -1 on every class of
    an ignored anchor."""
    targets = torch.zeros(*gt_labels.shape, num_classes, dtype=torch.int8, device=gt_labels.device)
    foreground = (gt_labels >= 0) & (gt_labels < num_classes)
    targets[foreground, gt_labels[foreground]] = 1
    targets[gt_labels < 0] = -1
    return targets


def dense_head_outputs(
    box2box_transform,
    anchors,
    logits,
    targets,
    positive,
    pred_anchor_deltas,
    gt_boxes,
    num_images: int,
) -> HeadOutputs:
    """What a dense head (one row per anchor) hands to its ranking loss: ``logits`` and
    ``targets`` ``(N, R, K)`` flattened, and for the ``positive`` anchors ``(N, R)``, in
    (image, anchor) order, the predicted deltas decoded around their anchors, their matched
    ground truths, their highest class probabilities and both boxes as deltas."""
    anchor_boxes = Boxes.cat(anchors).tensor[positive.nonzero()[:, 1]]
    deltas = cat(pred_anchor_deltas, dim=1)[positive]
    target_boxes = torch.stack(gt_boxes)[positive]
    return HeadOutputs(
        logits=logits.reshape(-1),
        targets=targets.reshape(-1),
        pred_boxes=box2box_transform.apply_deltas(deltas, anchor_boxes),
        target_boxes=target_boxes,
        scores=logits.detach()[positive].sigmoid().amax(-1),
        num_images=num_images,
        pred_deltas=deltas,
        target_deltas=box2box_transform.get_deltas(anchor_boxes, target_boxes),
    )


class _RankingRetinaNet(RetinaNet):
    """RetinaNet whose anchors are labelled by the authors' max-IoU rule or by ATSS, and
    whose test-time candidates may be chosen as in the authors' code; the shared part of
    the ranking losses.

    With ``test_candidates="anchors"``, each level keeps the ``TOPK_CANDIDATES_TEST``
    anchors of highest best-class score, then every (anchor, class) above the score
    threshold, with boxes clipped to the image before NMS (the authors' mmdetection
    head). ``"pairs"`` is Detectron2's: the top (anchor, class) pairs above the threshold.
    """

    @configurable
    def __init__(
        self, *, assigner: str = "iou", atss_topk: int = 9, test_candidates: str = "pairs", **kwargs
    ):
        super().__init__(**kwargs)
        if assigner not in ("iou", "atss"):
            raise ValueError(f"MODEL.ALRP.ASSIGNER must be 'iou' or 'atss', got {assigner!r}")
        if test_candidates not in ("pairs", "anchors"):
            raise ValueError(
                f"MODEL.ALRP.TEST_CANDIDATES must be 'pairs' or 'anchors', got {test_candidates!r}"
            )
        self.assigner = assigner
        self.atss_topk = atss_topk
        self.test_candidates = test_candidates

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["assigner"] = cfg.MODEL.ALRP.ASSIGNER
        ret["atss_topk"] = cfg.MODEL.ALRP.ATSS_TOPK
        ret["test_candidates"] = cfg.MODEL.ALRP.TEST_CANDIDATES
        if cfg.MODEL.ALRP.ASSIGNER == "iou":
            ret["anchor_matcher"] = MaxIoUMatcher.from_thresholds(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                cfg.MODEL.ALRP.MIN_POS_IOU,
            )
        return ret

    def _decode_multi_level_predictions(
        self,
        anchors: List[Boxes],
        pred_scores: List[Tensor],
        pred_deltas: List[Tensor],
        score_thresh: float,
        topk_candidates: int,
        image_size: Tuple[int, int],
    ) -> Instances:
        # Dispatches here, not in _decode_per_level_predictions: TorchScript cannot compile
        # super(), and Detectron2's per-level decoding stays the one its "pairs" rule runs.
        if self.test_candidates == "pairs":
            levels = [
                self._decode_per_level_predictions(
                    a, s, d, score_thresh, topk_candidates, image_size
                )
                for s, d, a in zip(pred_scores, pred_deltas, anchors)
            ]
        else:
            levels = [
                self._decode_top_anchors(a, s, d, score_thresh, topk_candidates, image_size)
                for s, d, a in zip(pred_scores, pred_deltas, anchors)
            ]
        return levels[0].cat(levels)

    def _decode_top_anchors(
        self,
        anchors: Boxes,
        pred_scores: Tensor,
        pred_deltas: Tensor,
        score_thresh: float,
        topk_candidates: int,
        image_size: Tuple[int, int],
    ) -> Instances:
        """One level's candidates by the authors' rule (class docstring); a candidate whose
        box is not finite (diverged weights, inf/NaN features) is dropped, so that such a
        model detects nothing instead of failing the clipping."""
        num_anchors = pred_scores.shape[0]
        if isinstance(num_anchors, Tensor):  # a traced size: kept a tensor, so the trace
            k = torch.clamp(num_anchors, max=topk_candidates)  # serves other image sizes
        else:
            k = min(num_anchors, topk_candidates)
        anchor_idxs = pred_scores.max(dim=1).values.topk(k).indices
        scores = pred_scores[anchor_idxs]
        rows, classes = (scores > score_thresh).nonzero().unbind(1)
        anchor_idxs = anchor_idxs[rows]
        boxes = self.box2box_transform.apply_deltas(
            pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
        )
        finite = torch.isfinite(boxes).all(dim=1)
        boxes = Boxes(boxes[finite])
        boxes.clip(image_size)
        return Instances(
            image_size,
            pred_boxes=boxes,
            scores=scores[rows, classes][finite],
            pred_classes=classes[finite],
        )

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        if self.assigner == "iou":
            return super().label_anchors(anchors, gt_instances)
        all_anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for gt in gt_instances:
            matched, labels = atss_match(anchors, gt.gt_boxes, self.atss_topk)
            if len(gt) > 0:
                classes = gt.gt_classes[matched]
                classes[labels == 0] = self.num_classes
                boxes = gt.gt_boxes.tensor[matched]
            else:
                classes = torch.full_like(matched, self.num_classes)
                boxes = torch.zeros_like(all_anchors.tensor)
            gt_labels.append(classes)
            matched_gt_boxes.append(boxes)
        return gt_labels, matched_gt_boxes

    def _flatten(self, pred_logits, gt_labels):
        """Class-wise logits and targets of the whole batch, and the positives' boxes."""
        gt_labels = torch.stack(gt_labels)  # (N, R)
        logits = cat(pred_logits, dim=1)  # (N, R, K)
        targets = classwise_targets(gt_labels, self.num_classes)
        positive = (gt_labels >= 0) & (gt_labels < self.num_classes)
        return gt_labels, logits, targets, positive


@META_ARCH_REGISTRY.register()
class RankingRetinaNet(_RankingRetinaNet):
    """RetinaNet (IoU or ATSS assignment) trained by the ranking loss ``MODEL.RANKING_LOSS.NAME``
    (:mod:`alrp_d2.modeling.head_losses`): all images of the batch ranked together.

    Inference, evaluation and checkpoints are Detectron2's RetinaNet's. With
    ``MODEL.RANK_SORT.LEARNED_BOX_SCALES`` the head is :class:`ScaledBoxRetinaNetHead` (the
    Rank & Sort authors' ATSS head).
    """

    @configurable
    def __init__(self, *, head_loss: HeadLoss, **kwargs):
        super().__init__(**kwargs)
        head_loss.attach(self)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["head_loss"] = build_head_loss(cfg, cls, "dense")
        if cfg.MODEL.RANK_SORT.LEARNED_BOX_SCALES:
            shapes = [ret["backbone"].output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
            ret["head"] = ScaledBoxRetinaNetHead(cfg, shapes)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels, logits, targets, positive = self._flatten(pred_logits, gt_labels)
        return self.head_loss(
            dense_head_outputs(
                self.box2box_transform,
                anchors,
                logits,
                targets,
                positive,
                pred_anchor_deltas,
                gt_boxes,
                num_images,
            )
        )


@META_ARCH_REGISTRY.register()
class ALRPRetinaNet(RankingRetinaNet):
    """:class:`RankingRetinaNet` trained by aLRP Loss (losses ``loss_alrp_cls`` and
    ``loss_alrp_loc``, the latter times the self-balance weight ``self.self_balance``)."""


@META_ARCH_REGISTRY.register()
class APLossRetinaNet(RankingRetinaNet):
    """:class:`RankingRetinaNet` trained by AP Loss and smooth L1, the paper's baseline."""


@META_ARCH_REGISTRY.register()
class RankSortRetinaNet(RankingRetinaNet):
    """:class:`RankingRetinaNet` trained by Rank & Sort Loss; with ``MODEL.ALRP.ASSIGNER: atss``
    and ``MODEL.RANK_SORT.LEARNED_BOX_SCALES``, RS-ATSS."""


class ScaledBoxRetinaNetHead(RetinaNetHead):
    """Detectron2's RetinaNet head whose box deltas are multiplied by one learnable scale
    per pyramid level, initialised at 1 (the ``Scale`` layers of the authors' ATSS head)."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], **kwargs):
        super().__init__(input_shape=input_shape, **kwargs)
        self.box_scales = nn.Parameter(torch.ones(len(input_shape)))

    def forward(self, features: List[Tensor]):
        # Detectron2's RetinaNetHead.forward with the scales, written out: TorchScript
        # cannot compile super().
        assert len(features) == self._num_features
        logits, bbox_reg = [], []
        for level, feature in enumerate(features):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            bbox_reg.append(self.bbox_pred(self.bbox_subnet(feature)) * self.box_scales[level])
        return logits, bbox_reg
