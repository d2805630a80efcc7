"""FoveaBox (Kong et al., "FoveaBox: Beyond Anchor-based Object Detector") trained by any
loss of the head adapter, as the aLRP authors train it (their mmdetection ``FoveaHead``,
``APLossFoveaHead`` and ``aLRPLossFoveaHead``).

``RankingFoveaBox`` (META_ARCHITECTURE) predicts at every location of every pyramid level,
anchor-free, the classes' logits and four log-distances from the location to the box's
sides, each distance in units of the level's base edge. Training targets:

- a ground truth is learnt on each level whose scale range holds ``sqrt(w h)``
  (``MODEL.FOVEABOX.SCALE_RANGES``; the ranges overlap);
- on such a level, its positives are the locations in its fovea: the box shrunk about
  its centre to ``SIGMA`` times its width and height, as whole cells of the level's grid
  (a location whose centre lies in it; a fovea narrower than a cell on the map's border
  still takes the border's cell). A location in several foveas learns the smallest
  ground truth (the authors write them from the largest down);
- a positive's target distances are ``(x - x1, y - y1, x2 - x, y2 - y) / base edge``,
  clamped to ``[1/16, 16]``, predicted as their logarithm. The target box of a positive is
  the box these clamped distances describe (the ground truth unless a clamp acted).

Every other location is a negative; none is ignored. The classification and box outputs go
to ``MODEL.RANKING_LOSS.NAME`` (:mod:`.head_losses`): ``FocalHeadLoss`` (the authors'
baseline: smooth L1 on the log-distances), ``APHeadLoss`` (the same smooth L1) or
``ALRPHeadLoss`` (GIoU of the decoded boxes), and ``RankSortHeadLoss`` as well.

Test time: on each level the ``TOPK_CANDIDATES_TEST`` locations of highest best-class
score, then each of their classes above ``SCORE_THRESH_TEST``, boxes clipped to the image
(``MODEL.ALRP.TEST_CANDIDATES: anchors``, the authors'); or Detectron2's top (location,
class) pairs (``pairs``); then NMS per class and the best ``TEST.DETECTIONS_PER_IMAGE``.

Keys: the head's from ``MODEL.RETINANET`` (``NUM_CLASSES``, ``IN_FEATURES``, ``NUM_CONVS``,
``NORM``, ``PRIOR_PROB``, ``SCORE_THRESH_TEST``, ``TOPK_CANDIDATES_TEST``,
``NMS_THRESH_TEST``), ``MODEL.FOVEABOX``, ``MODEL.ALRP.TEST_CANDIDATES``,
``TEST.DETECTIONS_PER_IMAGE``; the loss's own keys. RetinaNet's anchor keys do not apply.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor

from .head_losses import HeadLoss, HeadOutputs, build_head_loss
from .retinanet import classwise_targets

__all__ = ["RankingFoveaBox", "decode_distances", "fovea_targets", "location_centres"]

# The clamp of a target distance, in base edges (the authors' 1/16 and 16).
_MIN_DISTANCE, _MAX_DISTANCE = 1.0 / 16, 16.0


def location_centres(
    grid_sizes: List[Tuple[int, int]], strides: List[int], dtype: torch.dtype, device: torch.device
) -> List[Tensor]:
    """Per level, the ``(H W, 2)`` image coordinates ``(x, y)`` of its locations' centres,
    ``stride * (index + 0.5)``, row by row (the order of the head's flattened outputs)."""
    centres: List[Tensor] = []
    for (height, width), stride in zip(grid_sizes, strides):
        xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) * stride
        ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) * stride
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([x.reshape(-1), y.reshape(-1)], dim=1))
    return centres


def decode_distances(centres: Tensor, base_edges: Tensor, log_distances: Tensor) -> Tensor:
    """xyxy boxes of locations at ``centres`` ``(P, 2)`` from their predicted or target
    ``log_distances`` ``(P, 4)`` (left, top, right, bottom) in units of ``base_edges``
    ``(P,)``; computed in float32 at least (exp overflows float16 from 11).

    A log-distance counts as at most log(1e6): 1e6 base edges, a box far larger than any
    image whose exp stays finite in float32 (exp overflows from 88.7, and the gradient
    through an infinite box is NaN); beyond it the box gets no gradient, as beyond the
    localisation error's own bound (``alrp_d2.losses.bounded``)."""
    dtype = torch.promote_types(log_distances.dtype, torch.float32)
    # log(1e6), written out: TorchScript cannot read a module-level float
    distances = log_distances.to(dtype).clamp(max=13.815510557964274).exp()
    distances = distances * base_edges.to(dtype)[:, None]
    centres = centres.to(dtype)
    return torch.cat([centres - distances[:, :2], centres + distances[:, 2:]], dim=1)


@torch.no_grad()
def fovea_targets(
    gt_boxes: Tensor,
    gt_classes: Tensor,
    centres: List[Tensor],
    grid_sizes: List[Tuple[int, int]],
    strides: Sequence[int],
    base_edges: Sequence[float],
    scale_ranges: Sequence[Tuple[float, float]],
    sigma: float,
    num_classes: int,
) -> Tuple[Tensor, Tensor]:
    """The targets of one image's locations (module docstring): ``labels`` ``(R,)``, the
    class or ``num_classes`` for a negative, and ``distances`` ``(R, 4)``, the positives'
    clamped target distances in base edges (1 for negatives), levels one after the other.

    ``gt_boxes`` ``(G, 4)`` xyxy in the image's pixels; ``centres`` and ``grid_sizes`` per
    level (:func:`location_centres`)."""
    labels, distances = [], []
    side = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])).sqrt()
    for level, ((height, width), stride) in enumerate(zip(grid_sizes, strides)):
        lower, upper = scale_ranges[level]
        in_range = (side >= lower) & (side <= upper)
        # The fovea's first and last cell along x and y, as cell indices (a cell's centre
        # is at index + 0.5), clamped to the map, in the authors' arithmetic.
        grid = gt_boxes / stride
        half_w = 0.5 * (grid[:, 2] - grid[:, 0])
        half_h = 0.5 * (grid[:, 3] - grid[:, 1])
        left = torch.ceil(grid[:, 0] + (1 - sigma) * half_w - 0.5).long().clamp(0, width - 1)
        right = torch.floor(grid[:, 0] + (1 + sigma) * half_w - 0.5).long().clamp(0, width - 1)
        top = torch.ceil(grid[:, 1] + (1 - sigma) * half_h - 0.5).long().clamp(0, height - 1)
        bottom = torch.floor(grid[:, 1] + (1 + sigma) * half_h - 0.5).long().clamp(0, height - 1)
        cols = torch.arange(width, device=gt_boxes.device)
        rows = torch.arange(height, device=gt_boxes.device)
        in_x = (cols[None] >= left[:, None]) & (cols[None] <= right[:, None])  # (G, W)
        in_y = (rows[None] >= top[:, None]) & (rows[None] <= bottom[:, None])  # (G, H)
        inside = (in_y[:, :, None] & in_x[:, None, :]).reshape(len(gt_boxes), height * width)
        inside &= in_range[:, None]
        # The smallest ground truth wins; of equal ones the later (the authors' sort by
        # decreasing size writes it last): argmin returns the first minimum, so search the
        # ground truths in reverse.
        size = torch.where(inside, side[:, None], torch.full_like(side[:, None], math.inf))
        if len(gt_boxes):
            matched = len(gt_boxes) - 1 - size.flip(0).argmin(0)
            positive = inside.any(0)
        else:
            matched = torch.zeros(height * width, dtype=torch.long, device=gt_boxes.device)
            positive = torch.zeros(height * width, dtype=torch.bool, device=gt_boxes.device)
        level_labels = torch.full(
            (height * width,), num_classes, dtype=torch.long, device=gt_boxes.device
        )
        level_labels[positive] = gt_classes[matched[positive]]
        box = gt_boxes[matched[positive]]
        x, y = centres[level][positive].to(gt_boxes.dtype).unbind(1)
        level_distances = torch.ones(
            height * width, 4, dtype=gt_boxes.dtype, device=gt_boxes.device
        )
        level_distances[positive] = (
            torch.stack([x - box[:, 0], y - box[:, 1], box[:, 2] - x, box[:, 3] - y], dim=1)
            .div(base_edges[level])
            .clamp(_MIN_DISTANCE, _MAX_DISTANCE)
        )
        labels.append(level_labels)
        distances.append(level_distances)
    return torch.cat(labels), torch.cat(distances)


@META_ARCH_REGISTRY.register()
class RankingFoveaBox(DenseDetector):
    """FoveaBox trained by the head loss ``MODEL.RANKING_LOSS.NAME`` (module docstring); the
    head is Detectron2's RetinaNet head with one prediction per location."""

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head,
        head_in_features: List[str],
        num_classes: int,
        base_edges: Sequence[float],
        scale_ranges: Sequence[Sequence[float]],
        sigma: float,
        head_loss: HeadLoss,
        test_candidates: str = "anchors",
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
    ):
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        levels = len(head_in_features)
        if len(base_edges) != levels or len(scale_ranges) != levels:
            raise ValueError(
                f"MODEL.FOVEABOX.BASE_EDGES ({len(base_edges)} values) and SCALE_RANGES"
                f" ({len(scale_ranges)}) need one entry per level of MODEL.RETINANET.IN_FEATURES"
                f" ({levels}: {head_in_features})"
            )
        if not all(edge > 0 for edge in base_edges):
            raise ValueError(f"MODEL.FOVEABOX.BASE_EDGES must be positive, got {list(base_edges)}")
        if not all(len(r) == 2 and 0 <= r[0] <= r[1] for r in scale_ranges):
            raise ValueError(
                "MODEL.FOVEABOX.SCALE_RANGES must be (lower, upper) pairs with"
                f" 0 <= lower <= upper, got {[list(r) for r in scale_ranges]}"
            )
        if not 0 < sigma <= 1:
            raise ValueError(
                "MODEL.FOVEABOX.SIGMA must be in (0, 1] (the fovea's share of the"
                f" box), got {sigma}"
            )
        if test_candidates not in ("pairs", "anchors"):
            raise ValueError(
                f"MODEL.ALRP.TEST_CANDIDATES must be 'pairs' or 'anchors', got {test_candidates!r}"
            )
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in head_in_features]
        self.num_classes = num_classes
        self.base_edges = [float(e) for e in base_edges]
        self.scale_ranges = [(float(lo), float(hi)) for lo, hi in scale_ranges]
        self.sigma = float(sigma)
        self.test_candidates = test_candidates
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        head_loss.attach(self)

    @classmethod
    def from_config(cls, cfg):
        r, f = cfg.MODEL.RETINANET, cfg.MODEL.FOVEABOX
        if cfg.MODEL.ALRP.ASSIGNER != "iou":
            raise ValueError(
                "RankingFoveaBox assigns its locations by MODEL.FOVEABOX (scale ranges"
                f" and fovea), not MODEL.ALRP.ASSIGNER {cfg.MODEL.ALRP.ASSIGNER!r}"
            )
        if cfg.MODEL.RANK_SORT.LEARNED_BOX_SCALES:
            raise ValueError(
                "MODEL.RANK_SORT.LEARNED_BOX_SCALES is RetinaNet's (RS-ATSS head);"
                " RankingFoveaBox's distances are scaled by MODEL.FOVEABOX.BASE_EDGES"
            )
        if r.NUM_CONVS < 1:
            raise ValueError(f"MODEL.RETINANET.NUM_CONVS must be at least 1, got {r.NUM_CONVS}")
        backbone = build_backbone(cfg)
        shapes = [backbone.output_shape()[name] for name in r.IN_FEATURES]
        head = RetinaNetHead(
            input_shape=shapes,
            num_classes=r.NUM_CLASSES,
            num_anchors=1,
            conv_dims=[shapes[0].channels] * r.NUM_CONVS,
            norm=r.NORM,
            prior_prob=r.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": r.IN_FEATURES,
            "num_classes": r.NUM_CLASSES,
            "base_edges": f.BASE_EDGES,
            "scale_ranges": f.SCALE_RANGES,
            "sigma": f.SIGMA,
            "head_loss": build_head_loss(cfg, cls, "dense"),
            "test_candidates": cfg.MODEL.ALRP.TEST_CANDIDATES,
            "test_score_thresh": r.SCORE_THRESH_TEST,
            "test_topk_candidates": r.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": r.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def _grid(self, features: List[Tensor]) -> Tuple[List[Tuple[int, int]], List[Tensor]]:
        """Each level's ``(H, W)`` and its locations' centres (sizes as the features give
        them: traced sizes while tracing, so that a trace serves other image sizes)."""
        sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        return sizes, location_centres(sizes, self.strides, torch.float32, features[0].device)

    def _base_edge_per_location(self, sizes: List[Tuple[int, int]], like: Tensor) -> Tensor:
        """``(R,)`` the base edge of each location's level."""
        return torch.cat(
            [
                torch.full((h * w,), e, dtype=like.dtype, device=like.device)
                for (h, w), e in zip(sizes, self.base_edges)
            ]
        )

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        sizes, centres = self._grid(features)
        gt_labels, gt_distances = self.label_locations(sizes, centres, gt_instances)
        return self.losses(sizes, centres, pred_logits, gt_labels, pred_deltas, gt_distances)

    @torch.no_grad()
    def label_locations(
        self, sizes: List[Tuple[int, int]], centres: List[Tensor], gt_instances: List[Instances]
    ):
        """Per image, :func:`fovea_targets`: ``(R,)`` labels and ``(R, 4)`` distances."""
        labels, distances = [], []
        for inst in gt_instances:
            boxes = inst.gt_boxes.tensor
            lab, dist = fovea_targets(
                boxes,
                inst.gt_classes,
                centres,
                sizes,
                self.strides,
                self.base_edges,
                self.scale_ranges,
                self.sigma,
                self.num_classes,
            )
            labels.append(lab)
            distances.append(dist)
        return labels, distances

    def losses(self, sizes, centres, pred_logits, gt_labels, pred_deltas, gt_distances):
        """The head loss of the batch's (image, level, location, class) rows; the positives'
        predicted and target boxes decoded around their locations."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        positive = gt_labels != self.num_classes
        logits = cat(pred_logits, dim=1)  # (N, R, K)
        location = positive.nonzero()[:, 1]
        all_centres = torch.cat(centres)[location]
        edges = self._base_edge_per_location(sizes, all_centres)[location]
        deltas = cat(pred_deltas, dim=1)[positive]
        target_deltas = torch.stack(gt_distances)[positive].log()
        return self.head_loss(
            HeadOutputs(
                logits=logits.reshape(-1),
                targets=classwise_targets(gt_labels, self.num_classes).reshape(-1),
                pred_boxes=decode_distances(all_centres, edges, deltas),
                target_boxes=decode_distances(all_centres, edges, target_deltas),
                scores=logits.detach()[positive].sigmoid().amax(-1),
                num_images=num_images,
                pred_deltas=deltas,
                target_deltas=target_deltas.to(deltas.dtype),
            )
        )

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        sizes, centres = self._grid(features)
        results: List[Instances] = []
        for index, image_size in enumerate(images.image_sizes):
            levels = [
                self._decode_level(
                    centres[level],
                    self.base_edges[level],
                    pred_logits[level][index].sigmoid(),
                    pred_deltas[level][index],
                    image_size,
                )
                for level in range(len(centres))
            ]
            result = levels[0].cat(levels)  # Instances.cat cannot be scripted; this can
            keep = batched_nms(
                result.pred_boxes.tensor, result.scores, result.pred_classes, self.test_nms_thresh
            )
            results.append(result[keep[: self.max_detections_per_image]])
        return results

    def _at_most_topk(self, values: Tensor):
        """How many of the 1-d ``values`` to keep: all, at most ``TOPK_CANDIDATES_TEST``; a
        tensor while tracing (so the trace serves other image sizes), else an int."""
        count = values.shape[0]
        if isinstance(count, Tensor):
            return torch.clamp(count, max=self.test_topk_candidates)
        return min(count, self.test_topk_candidates)

    def _decode_level(
        self,
        centres: Tensor,
        base_edge: float,
        scores: Tensor,
        deltas: Tensor,
        image_size: Tuple[int, int],
    ) -> Instances:
        """One level's detections of one image before NMS (module docstring). A candidate
        whose prediction is not finite is dropped (the clamp to the image would turn an
        infinite box into the whole image); the others are clipped to the image, to its last
        pixel as the authors' code."""
        if self.test_candidates == "anchors":
            best = scores.max(dim=1).values
            top = best.topk(self._at_most_topk(best)).indices
            rows, classes = (scores[top] > self.test_score_thresh).nonzero().unbind(1)
            locations = top[rows]
        else:
            candidates = (scores > self.test_score_thresh).nonzero()
            candidate_scores = scores[candidates[:, 0], candidates[:, 1]]
            order = candidate_scores.topk(self._at_most_topk(candidate_scores)).indices
            locations, classes = candidates[order].unbind(1)
        kept_scores = scores[locations, classes]
        kept_deltas = deltas[locations]
        finite = torch.isfinite(kept_deltas).all(dim=1)
        edges = torch.full_like(locations, 1, dtype=centres.dtype) * base_edge
        boxes = decode_distances(centres[locations], edges, kept_deltas)[finite]
        height, width = image_size
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(0, width - 1),
                boxes[:, 1].clamp(0, height - 1),
                boxes[:, 2].clamp(0, width - 1),
                boxes[:, 3].clamp(0, height - 1),
            ],
            dim=1,
        )
        return Instances(
            image_size,
            pred_boxes=Boxes(boxes),
            scores=kept_scores[finite],
            pred_classes=classes[finite],
        )
