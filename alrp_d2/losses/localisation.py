"""Localisation errors of matched box pairs, normalised for aLRP Loss, computed so that a
prediction anywhere gives finite values and gradients."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["giou_loss", "localisation_error", "matched_box_iou", "target_frame"]

# Coordinates, in target sizes from the target's centre, beyond which a prediction is held:
# its IoU is 0 and its GIoU -1 to within 1e-6 long before, so nothing is lost but overflow.
_FAR = 1e6


def target_frame(pred_boxes: torch.Tensor,
                 target_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both boxes (xyxy, one pair per row) in their target's frame: the target's centre at
    the origin, its width and height 1, the prediction held within ``1e6`` of it; and each
    target's area, the frame's unit of area.

    IoU and GIoU are ratios of areas, each a product of an x-extent and a y-extent, so the
    frame leaves them unchanged; but a prediction decoded far off the image (translation
    deltas are unbounded) keeps coordinates whose products stay finite in float32 (at
    ``x = y = 3e21`` the enclosing area of GIoU overflows to inf and the loss is inf/inf)."""
    centre = (target_boxes[:, :2] + target_boxes[:, 2:]).repeat(1, 2) / 2
    tiny = torch.finfo(target_boxes.dtype).tiny
    size = (target_boxes[:, 2:] - target_boxes[:, :2]).clamp_min(tiny)
    pred = ((pred_boxes - centre) / size.repeat(1, 2)).clamp(-_FAR, _FAR)
    return pred, (target_boxes - centre) / size.repeat(1, 2), size.prod(1)


def matched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each box of ``boxes1`` (P, 4) with the box in the same row of ``boxes2``
    (xyxy); torchvision's ``box_iou`` is pairwise (P x P). Finite for any finite boxes of
    ``boxes2`` with an area (the union is at least that area), so no frame is needed."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(boxes1.dtype).eps)


def giou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` of each matched pair, torchvision's ``generalized_box_iou_loss`` (its
    ``1e-7`` in the denominators, in square pixels, included) computed in the target's
    frame (:func:`target_frame`): finite, with finite gradients, for any prediction::

        GIoU = I / (U + 1e-7) - (C - U) / (C + 1e-7)

    (``I``, ``U``, ``C``: the areas of the intersection, the union and the enclosing box.)"""
    pred, target, unit = target_frame(pred_boxes, target_boxes)
    eps = 1e-7 / unit  # torchvision's 1e-7 square pixels, in the frame's unit of area
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = target.unbind(-1)
    xi1, yi1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xi2, yi2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (xi2 > xi1) & (yi2 > yi1)
    inter = torch.where(overlap, (xi2 - xi1) * (yi2 - yi1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def localisation_error(pred_boxes: torch.Tensor, target_boxes: torch.Tensor,
                       kind: str = "giou", tau: float = 0.5) -> torch.Tensor:
    """``E_loc`` of each positive for aLRP Loss (spec, section 1):

        iou:  (1 - IoU) / (1 - tau)
        giou: (1 - GIoU) / 2 / (1 - tau)        (GIoU in [-1, 1])

    Differentiable in ``pred_boxes`` (xyxy, one row per positive); finite, with finite
    gradients, for any finite prediction (far off the image, of zero area).
    """
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    if kind == "iou":
        return (1 - matched_box_iou(pred_boxes, target_boxes)) / (1 - tau)
    if kind == "giou":
        return giou_loss(pred_boxes, target_boxes) / 2 / (1 - tau)
    raise ValueError(f"localisation error must be 'iou' or 'giou', got {kind!r}")
