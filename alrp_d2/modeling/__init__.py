"""Detectron2 meta-architectures and heads trained by ranking-based losses.

Importing this package registers them in Detectron2's registries:
``ALRPRetinaNet`` and ``APLossRetinaNet`` (META_ARCH_REGISTRY), ``ALRPRPN`` and
``MaxIoURPN`` (PROPOSAL_GENERATOR_REGISTRY), ``ALRPROIHeads`` (ROI_HEADS_REGISTRY) and
``build_alrp_retinanet_resnet_fpn_backbone`` (BACKBONE_REGISTRY); trained by Rank & Sort
Loss: ``RankSortRetinaNet``, ``RankSortRPN``, ``RankSortROIHeads``, ``RankSortMaskHead``
(ROI_MASK_HEAD_REGISTRY) and ``build_rs_atss_resnet_fpn_backbone``.
"""

from .atss import atss_match
from .backbone import LastLevelP6P7NoReLU, build_alrp_retinanet_resnet_fpn_backbone
from .matcher import MaxIoUMatcher
from .rcnn import ALRPRPN, ALRPFastRCNNOutputLayers, ALRPROIHeads, MaxIoURPN
from .rank_sort import (
    RankSortFastRCNNOutputLayers,
    RankSortMaskHead,
    RankSortROIHeads,
    RankSortRPN,
    RankSortRetinaNet,
    RankSortTerms,
    ScaledBoxRetinaNetHead,
    build_rs_atss_resnet_fpn_backbone,
    rank_sort_mask_loss,
)
from .retinanet import ALRPRetinaNet, APLossRetinaNet, classwise_targets
from .self_balance import SelfBalance

__all__ = [
    "ALRPFastRCNNOutputLayers",
    "ALRPROIHeads",
    "ALRPRPN",
    "ALRPRetinaNet",
    "APLossRetinaNet",
    "LastLevelP6P7NoReLU",
    "MaxIoUMatcher",
    "MaxIoURPN",
    "RankSortFastRCNNOutputLayers",
    "RankSortMaskHead",
    "RankSortROIHeads",
    "RankSortRPN",
    "RankSortRetinaNet",
    "RankSortTerms",
    "ScaledBoxRetinaNetHead",
    "SelfBalance",
    "atss_match",
    "build_alrp_retinanet_resnet_fpn_backbone",
    "build_rs_atss_resnet_fpn_backbone",
    "classwise_targets",
    "rank_sort_mask_loss",
]
