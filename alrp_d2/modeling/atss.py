"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020) for anchor labelling."""

from __future__ import annotations

from typing import List, Tuple

import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["atss_match"]


@torch.no_grad()
def atss_match(
    anchors_per_level: List[Boxes], gt_boxes: Boxes, topk: int = 9
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Label anchors by ATSS, in the output format of Detectron2's ``Matcher``.

    For each ground truth: on every pyramid level, the ``topk`` anchors whose centres
    are nearest to its centre are candidates; those whose IoU is at least the mean
    plus the standard deviation of the candidates' IoUs, and whose centre lies inside
    the ground truth, are positives. An anchor that is positive for several ground
    truths goes to the one it overlaps most.

    Returns:
        matched_idxs ``(R,)``: index of the assigned ground truth (0 where none), and
        labels ``(R,)``: 1 positive, 0 negative (ATSS ignores no anchor).
    """
    anchors = Boxes.cat(anchors_per_level)
    num_anchors = len(anchors)
    device = anchors.tensor.device
    matched = torch.zeros(num_anchors, dtype=torch.int64, device=device)
    labels = torch.zeros(num_anchors, dtype=torch.int8, device=device)
    if len(gt_boxes) == 0 or num_anchors == 0:
        return matched, labels

    iou = pairwise_iou(gt_boxes, anchors)  # (G, R)
    gt_centres = gt_boxes.get_centers()  # (G, 2)
    anchor_centres = anchors.get_centers()  # (R, 2)
    distances = torch.cdist(gt_centres, anchor_centres)  # (G, R)

    candidates = []
    start = 0
    for level in anchors_per_level:
        end = start + len(level)
        k = min(topk, end - start)
        candidates.append(distances[:, start:end].topk(k, dim=1, largest=False).indices + start)
        start = end
    candidates = torch.cat(candidates, dim=1)  # (G, L * k)
    candidate_iou = iou.gather(1, candidates)
    threshold = candidate_iou.mean(1) + candidate_iou.std(1)  # unbiased, as the authors' code

    # Centre of the candidate anchor strictly inside its ground truth.
    cx, cy = anchor_centres[candidates, 0], anchor_centres[candidates, 1]
    g = gt_boxes.tensor
    inside = (
        torch.stack(
            [cx - g[:, None, 0], cy - g[:, None, 1], g[:, None, 2] - cx, g[:, None, 3] - cy]
        ).amin(0)
        > 0.01
    )
    positive = (candidate_iou >= threshold[:, None]) & inside

    # Scatter the positives into a (G, R) IoU map; keep the best ground truth per anchor.
    scores = torch.full_like(iou, -1.0)
    scores.scatter_(
        1, candidates, torch.where(positive, candidate_iou, torch.full_like(candidate_iou, -1.0))
    )
    best_score, best_gt = scores.max(0)
    assigned = best_score >= 0
    matched[assigned] = best_gt[assigned]
    labels[assigned] = 1
    return matched, labels
