"""What Rank & Sort Loss (Oksuz et al., ICCV 2021) adds to the ranking-loss detectors.

The heads themselves are the single ranking-loss classes (``RankingRetinaNet``,
``RankingRPN``, ``RankingROIHeads``; the names ``RankSortRetinaNet``, ``RankSortRPN`` and
``RankSortROIHeads`` fix their loss to Rank & Sort's, :mod:`alrp_d2.modeling.head_losses`).
Here:

- ``RankSortMaskHead`` (ROI_MASK_HEAD_REGISTRY): the masks' Dice loss weighted by the box
  scores and balanced against the RoI ranking terms (RS-Mask R-CNN);
- ``build_rs_atss_resnet_fpn_backbone`` (BACKBONE_REGISTRY): ATSS's FPN, P6 and P7 from P5.
"""

from __future__ import annotations

from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
)
from detectron2.structures import Instances

from .backbone import LastLevelP6P7NoReLU, resnet_fpn
from .head_losses import balanced, score_weighted_mean

__all__ = ["RankSortMaskHead", "build_rs_atss_resnet_fpn_backbone", "rank_sort_mask_loss"]


def rank_sort_mask_loss(mask_logits: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
    """The masks' loss of RS-Mask R-CNN, over the positive proposals ``i``::

        L_mask = sum_i w_i (1 - Dice(i)) / sum_i w_i,     w_i = rs_weight (its box score)
        Dice(i) = 2 sum_px m p / (sum_px m^2 + sum_px p^2 + 1e-5),  m = sigmoid(logits)
        loss = L_mask * rs_balance / L_mask                (values detached)

    ``instances``: the positive proposals of each image, with ``gt_classes``,
    ``gt_masks``, ``proposal_boxes`` and the ``rs_weight``/``rs_balance`` fields written
    by the ranking-loss box predictor (:class:`~alrp_d2.modeling.rcnn.RankingFastRCNNOutputLayers`).
    """
    side = mask_logits.size(2)
    classes, targets, weights, balances = [], [], [], []
    for image in instances:
        if len(image) == 0:
            continue
        if not (image.has("rs_weight") and image.has("rs_balance")):
            raise ValueError(
                "RankSortMaskHead needs MODEL.ROI_HEADS.NAME: RankSortROIHeads (or RankingROIHeads)"
            )
        classes.append(image.gt_classes.to(torch.int64))
        targets.append(
            image.gt_masks.crop_and_resize(image.proposal_boxes.tensor, side).to(
                device=mask_logits.device
            )
        )
        weights.append(image.rs_weight)
        balances.append(image.rs_balance[:1])
    if not targets:
        return mask_logits.sum() * 0
    if mask_logits.size(1) == 1:  # class-agnostic masks
        logits = mask_logits[:, 0]
    else:
        gt_classes = cat(classes)
        logits = mask_logits[torch.arange(len(gt_classes), device=gt_classes.device), gt_classes]
    masks = logits.sigmoid().flatten(1)
    target = cat(targets).to(masks.dtype).flatten(1)
    dice = 2 * (masks * target).sum(1) / ((masks**2).sum(1) + (target**2).sum(1) + 1e-5)
    loss = score_weighted_mean(1 - dice, cat(weights))
    return balanced(loss, balances[0][0])


@ROI_MASK_HEAD_REGISTRY.register()
class RankSortMaskHead(MaskRCNNConvUpsampleHead):
    """Detectron2's mask head trained by :func:`rank_sort_mask_loss` (its layers and
    inference unchanged).

    ``max_masks`` (``MODEL.RANK_SORT.MAX_MASKS``; 0: no limit): in training, at most this
    many positive proposals of the process's batch, drawn at random, train the masks
    (the authors' 200), each with its own box-score weight.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, max_masks: int = 0, **kwargs):
        super().__init__(input_shape, **kwargs)
        if max_masks < 0:
            raise ValueError(f"MODEL.RANK_SORT.MAX_MASKS must be >= 0, got {max_masks}")
        self.max_masks = max_masks

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["max_masks"] = cfg.MODEL.RANK_SORT.MAX_MASKS
        return ret

    def forward(self, x, instances: List[Instances]):
        # Detectron2's inference written out: TorchScript cannot compile super().
        if self.training:
            return self._losses(x, instances)
        mask_rcnn_inference(self.layers(x), instances)
        return instances

    @torch.jit.unused
    def _losses(self, x, instances: List[Instances]):
        x, instances = self._subsample(x, instances)
        return {"loss_mask": rank_sort_mask_loss(self.layers(x), instances) * self.loss_weight}

    def _subsample(self, x, instances: List[Instances]):
        """At most ``max_masks`` of the rows of ``x`` (the images' proposals, in order)
        and the matching instances."""
        if not self.max_masks or len(x) <= self.max_masks:
            return x, instances
        keep = torch.randperm(len(x), device=x.device)[: self.max_masks].sort().values
        kept, start = [], 0
        for image in instances:
            end = start + len(image)
            kept.append(image[keep[(keep >= start) & (keep < end)] - start])
            start = end
        return x[keep], kept


@BACKBONE_REGISTRY.register()
def build_rs_atss_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN with P6 and P7 computed from P5 by stride-2 convolutions, no ReLU in
    between (the authors' ATSS: ``add_extra_convs='on_output'``)."""
    out = cfg.MODEL.FPN.OUT_CHANNELS

    def top_block(bottom_up):
        block = LastLevelP6P7NoReLU(out, out)
        block.in_feature = "p5"
        return block

    return resnet_fpn(cfg, input_shape, top_block)
