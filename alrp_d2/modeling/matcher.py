"""Anchor labelling by IoU with the rule of the authors' code (mmdetection's max-IoU rule)."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["MaxIoUMatcher"]


class MaxIoUMatcher:
    """Labels anchors by IoU like the authors' mmdetection assigner, in the output format
    of Detectron2's ``Matcher``: ``(matched_idxs (R,), labels (R,))`` with labels 1
    positive, 0 negative, -1 ignored.

    Every anchor first takes the ground truth it overlaps most: negative below
    ``neg_iou``, positive from ``pos_iou``, ignored in between. Then, for each ground
    truth in turn whose best IoU over all anchors is at least ``min_pos_iou``, every
    anchor reaching that best IoU becomes positive and is matched to this ground truth
    (so a later ground truth wins an anchor that is the best of two).

    Detectron2's ``Matcher`` with low-quality matches differs in two ways: it takes no
    minimum IoU, and such an anchor keeps the ground truth it overlaps most.
    """

    def __init__(
        self,
        neg_iou: float,
        pos_iou: float,
        min_pos_iou: float = 0.0,
        low_quality_matches: bool = True,
    ):
        if not 0 <= neg_iou <= pos_iou <= 1:
            raise ValueError(f"need 0 <= neg_iou <= pos_iou <= 1, got {neg_iou}, {pos_iou}")
        self.neg_iou, self.pos_iou = neg_iou, pos_iou
        self.min_pos_iou = min_pos_iou
        self.low_quality_matches = low_quality_matches

    @classmethod
    def from_thresholds(cls, thresholds, labels, min_pos_iou: float) -> "MaxIoUMatcher":
        """From Detectron2's ``IOU_THRESHOLDS`` ``[neg, pos]`` and ``IOU_LABELS`` ``[0, -1, 1]``."""
        if len(thresholds) != 2 or list(labels) != [0, -1, 1]:
            raise ValueError(
                f"the max-IoU matcher needs IOU_THRESHOLDS [neg, pos] and IOU_LABELS "
                f"[0, -1, 1], got {list(thresholds)} and {list(labels)}"
            )
        return cls(thresholds[0], thresholds[1], min_pos_iou)

    @torch.no_grad()
    def __call__(self, iou: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``iou``: ``(G, R)`` IoU of every ground truth with every anchor."""
        num_gt, num_anchors = iou.shape
        if num_gt == 0:
            return (
                iou.new_zeros(num_anchors, dtype=torch.int64),
                iou.new_zeros(num_anchors, dtype=torch.int8),
            )
        best_iou, matched = iou.max(dim=0)
        labels = torch.full((num_anchors,), -1, dtype=torch.int8, device=iou.device)
        labels[best_iou < self.neg_iou] = 0
        labels[best_iou >= self.pos_iou] = 1
        if self.low_quality_matches:
            gt_best = iou.max(dim=1).values
            is_best = (iou == gt_best[:, None]) & (gt_best >= self.min_pos_iou)[:, None]
            hit = is_best.any(dim=0)
            # the last ground truth for which the anchor is a best one
            last = num_gt - 1 - is_best.flip(0).to(torch.int32).argmax(dim=0)
            matched = torch.where(hit, last, matched)
            labels[hit] = 1
        return matched, labels
