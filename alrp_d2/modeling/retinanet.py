"""RetinaNet trained by aLRP Loss (IoU or ATSS assignment) and by AP Loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..losses import ap_loss
from .alrp_terms import ALRPLossTerms, ranking_group, scale_gradient
from .atss import atss_match
from .matcher import MaxIoUMatcher
from .self_balance import SelfBalance

__all__ = ["ALRPRetinaNet", "APLossRetinaNet", "classwise_targets"]


def classwise_targets(gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-anchor labels (-1 ignored, K background, else the class) to class-wise
    targets ``(..., K)``: 1 at the anchor's class, 0 elsewhere, -1 on every class of
    an ignored anchor."""
    targets = torch.zeros(*gt_labels.shape, num_classes, dtype=torch.int8, device=gt_labels.device)
    foreground = (gt_labels >= 0) & (gt_labels < num_classes)
    targets[foreground, gt_labels[foreground]] = 1
    targets[gt_labels < 0] = -1
    return targets


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
    def __init__(self, *, assigner: str = "iou", atss_topk: int = 9,
                 test_candidates: str = "pairs", **kwargs):
        super().__init__(**kwargs)
        if assigner not in ("iou", "atss"):
            raise ValueError(f"MODEL.ALRP.ASSIGNER must be 'iou' or 'atss', got {assigner!r}")
        if test_candidates not in ("pairs", "anchors"):
            raise ValueError(
                f"MODEL.ALRP.TEST_CANDIDATES must be 'pairs' or 'anchors', got {test_candidates!r}")
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
                cfg.MODEL.RETINANET.IOU_THRESHOLDS, cfg.MODEL.RETINANET.IOU_LABELS,
                cfg.MODEL.ALRP.MIN_POS_IOU)
        return ret

    def _decode_per_level_predictions(self, anchors, pred_scores, pred_deltas, score_thresh,
                                      topk_candidates, image_size):
        if self.test_candidates == "pairs":
            return super()._decode_per_level_predictions(
                anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size)
        k = min(topk_candidates, pred_scores.shape[0])
        anchor_idxs = pred_scores.max(dim=1).values.topk(k).indices
        scores = pred_scores[anchor_idxs]
        keep = scores > score_thresh
        rows, classes = keep.nonzero(as_tuple=True)
        anchor_idxs = anchor_idxs[rows]
        deltas, anchor_boxes = pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs]
        boxes = Boxes(self.box2box_transform.apply_deltas(deltas, anchor_boxes))
        boxes.clip(image_size)
        return Instances(image_size, pred_boxes=boxes, scores=scores[keep], pred_classes=classes)

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

    def _positive_boxes(self, anchors, pred_anchor_deltas, gt_boxes, positive):
        """``(pred_boxes, target_boxes)`` of the positives, in (image, anchor) order: the
        predicted deltas decoded around their anchors, and the matched ground truths."""
        anchor_index = positive.nonzero()[:, 1]
        deltas = cat(pred_anchor_deltas, dim=1)[positive]
        pred_boxes = self.box2box_transform.apply_deltas(
            deltas, Boxes.cat(anchors).tensor[anchor_index])
        return pred_boxes, torch.stack(gt_boxes)[positive]


@META_ARCH_REGISTRY.register()
class ALRPRetinaNet(_RankingRetinaNet):
    """RetinaNet trained by aLRP Loss: all images of the batch ranked together.

    Losses ``loss_alrp_cls`` and ``loss_alrp_loc`` (the latter times the self-balance
    weight ``self.self_balance.weight``); inference, evaluation and checkpoints are
    Detectron2's RetinaNet's.
    """

    @configurable
    def __init__(self, *, alrp_terms: dict, sb_init: float = 50.0, **kwargs):
        super().__init__(**kwargs)
        self.self_balance = SelfBalance(sb_init, name="alrp")
        self.alrp_terms = ALRPLossTerms(self.self_balance, prefix="alrp", **alrp_terms)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["sb_init"] = cfg.MODEL.ALRP.SB_INIT
        ret["alrp_terms"] = ALRPLossTerms.config_kwargs(cfg)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels, logits, targets, positive = self._flatten(pred_logits, gt_labels)
        pred_boxes, target_boxes = self._positive_boxes(
            anchors, pred_anchor_deltas, gt_boxes, positive)
        return self.alrp_terms(logits.reshape(-1), targets.reshape(-1), pred_boxes, target_boxes, num_images)


@META_ARCH_REGISTRY.register()
class APLossRetinaNet(_RankingRetinaNet):
    """RetinaNet trained by AP Loss and smooth L1, the paper's baseline.

    As in the official AP Loss code, the smooth L1 loss is averaged over the box
    parameters of the positives (4 per positive).
    """

    @configurable
    def __init__(self, *, delta: float = 1.0, ranking_scope: str = "process", **kwargs):
        super().__init__(**kwargs)
        self.delta = delta
        ranking_group(ranking_scope)  # checks the name
        self.ranking_scope = ranking_scope

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["delta"] = cfg.MODEL.ALRP.DELTA
        ret["ranking_scope"] = cfg.MODEL.ALRP.RANKING_SCOPE
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        num_images = len(gt_labels)
        gt_labels, logits, targets, positive = self._flatten(pred_logits, gt_labels)
        num_pos = int(positive.sum())
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        # A global ranking covers the classification; the box loss stays per process.
        group = ranking_group(self.ranking_scope)
        loss_cls = ap_loss(logits.reshape(-1), targets.reshape(-1), self.delta, validate=False,
                           process_group=group)
        loss_cls = scale_gradient(loss_cls, dist.get_world_size(group) if group is not None else 1)
        loss_box = _dense_box_regression_loss(
            anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, positive,
            box_reg_loss_type="smooth_l1", smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_ap_cls": loss_cls, "loss_box_reg": loss_box / max(4 * num_pos, 1)}
