"""Localisation errors of matched box pairs, normalised for aLRP Loss, finite (with finite
gradients) for a prediction anywhere."""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou_loss

__all__ = ["bounded", "giou_loss", "localisation_error", "matched_box_iou"]

# How far from its target a predicted coordinate may be, in target sizes: its IoU is 0 and
# its GIoU -1 to within 1e-6 long before, and its GIoU's enclosing area stays finite.
_FAR = 1e6


def bounded(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """``pred_boxes`` (xyxy, one pair per row) held within ``1e6`` target sizes (at least
    1 pixel) of their target's centre: every ordinary prediction exactly as it is (so are
    its error and gradient), one decoded far off the image (translation deltas are
    unbounded) near enough that products of its coordinates stay finite in float32 (at
    ``x = y = 3e21`` the enclosing area of GIoU overflowed to inf and the loss was inf/inf)."""
    centre = ((target_boxes[:, :2] + target_boxes[:, 2:]) / 2).repeat(1, 2)
    reach = _FAR * (target_boxes[:, 2:] - target_boxes[:, :2]).clamp_min(1.0).repeat(1, 2)
    return torch.maximum(torch.minimum(pred_boxes, centre + reach), centre - reach)


def matched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each box of ``boxes1`` (P, 4) with the box in the same row of ``boxes2``
    (xyxy); torchvision's ``box_iou`` is pairwise (P x P). Finite for any finite boxes of
    ``boxes2`` with an area (the union is at least that area)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(boxes1.dtype).eps)


def giou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` of each matched pair (torchvision's ``generalized_box_iou_loss``, no
    reduction) of the predictions :func:`bounded` near their targets: finite, with finite
    gradients, for any finite prediction."""
    return generalized_box_iou_loss(
        bounded(pred_boxes, target_boxes), target_boxes, reduction="none"
    )


def localisation_error(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, kind: str = "giou", tau: float = 0.5
) -> torch.Tensor:
    """``E_loc`` of each positive for aLRP Loss (spec, section 1):

        iou:  (1 - IoU) / (1 - tau)
        giou: (1 - GIoU) / 2 / (1 - tau)        (GIoU in [-1, 1])

    Differentiable in ``pred_boxes`` (xyxy, one row per positive); finite, with finite
    gradients, for any finite prediction (far off the image, of zero area).
    """
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if kind == "iou":
        return (1 - matched_box_iou(bounded(pred_boxes, target_boxes), target_boxes)) / (1 - tau)
    if kind == "giou":
        return giou_loss(pred_boxes, target_boxes) / 2 / (1 - tau)
    raise ValueError(f"localisation error must be 'iou' or 'giou', got {kind!r}")
