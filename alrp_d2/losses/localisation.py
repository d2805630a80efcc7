"""Localisation errors of matched box pairs, normalised for aLRP Loss."""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou_loss

__all__ = ["localisation_error", "matched_box_iou"]


def matched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each box of ``boxes1`` (P, 4) with the box in the same row of ``boxes2``
    (xyxy); torchvision's ``box_iou`` is pairwise (P x P)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(boxes1.dtype).eps)


def localisation_error(pred_boxes: torch.Tensor, target_boxes: torch.Tensor,
                       kind: str = "giou", tau: float = 0.5) -> torch.Tensor:
    """``E_loc`` of each positive for aLRP Loss (spec, section 1):

        iou:  (1 - IoU) / (1 - tau)
        giou: (1 - GIoU) / 2 / (1 - tau)        (GIoU in [-1, 1])

    Differentiable in ``pred_boxes`` (xyxy, one row per positive).
    """
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if kind == "iou":
        return (1 - matched_box_iou(pred_boxes, target_boxes)) / (1 - tau)
    if kind == "giou":
        return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none") / 2 / (1 - tau)
    raise ValueError(f"localisation error must be 'iou' or 'giou', got {kind!r}")
