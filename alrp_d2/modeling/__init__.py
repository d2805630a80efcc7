"""Detectron2 meta-architectures and heads trained by ranking-based losses.

One class per detector family, its loss chosen by config (``MODEL.RANKING_LOSS.NAME``:
``ALRPHeadLoss``, ``APHeadLoss``, ``RankSortHeadLoss``, and the focal-loss baseline
``FocalHeadLoss`` for dense heads) through one adapter (:mod:`.head_losses`,
``HEAD_LOSS_REGISTRY``):
``RankingRetinaNet`` (META_ARCH_REGISTRY; IoU or ATSS assignment), ``RankingRPN``
(PROPOSAL_GENERATOR_REGISTRY), ``RankingROIHeads`` (ROI_HEADS_REGISTRY) and
``RankSortMaskHead`` (ROI_MASK_HEAD_REGISTRY), Detectron2's FCOS as ``RankingFCOS``
(META_ARCH_REGISTRY; backbone ``build_fcos_resnet_fpn_backbone``) and FoveaBox as
``RankingFoveaBox`` (META_ARCH_REGISTRY). The names of before stay registered, each
fixing its loss: ``ALRPRetinaNet``, ``APLossRetinaNet``, ``RankSortRetinaNet``, ``ALRPRPN``,
``RankSortRPN``, ``ALRPROIHeads``, ``RankSortROIHeads``. Cascade R-CNN's stages as
``RankingCascadeROIHeads`` (and ``RankSortCascadeROIHeads``, ROI_HEADS_REGISTRY). Also
``MaxIoURPN`` and the backbones ``build_alrp_retinanet_resnet_fpn_backbone``,
``build_rs_atss_resnet_fpn_backbone``, ``build_rcnn_resnet_fpn_backbone`` and
``build_carafe_resnet_fpn_backbone`` (the FPN upsampling by ``CARAFE``; BACKBONE_REGISTRY),
whose deformable convolutions run on torchvision (``TorchvisionDeformConv``,
``TorchvisionModulatedDeformConv``, ``convert_deform_convs``). Importing this package
registers them all.
"""

from .atss import atss_match
from .backbone import (
    LastLevelP6P7NoReLU,
    build_alrp_retinanet_resnet_fpn_backbone,
    build_fcos_resnet_fpn_backbone,
    build_rcnn_resnet_fpn_backbone,
)
from .carafe import CARAFE, CARAFEFPN, build_carafe_resnet_fpn_backbone, carafe
from .cascade import RankingCascadeROIHeads, RankSortCascadeROIHeads
from .deform import TorchvisionDeformConv, TorchvisionModulatedDeformConv, convert_deform_convs
from .fcos import RankingFCOS
from .foveabox import RankingFoveaBox, fovea_targets
from .head_losses import (
    HEAD_LOSS_REGISTRY,
    ALRPHeadLoss,
    APHeadLoss,
    FocalHeadLoss,
    HeadLoss,
    HeadOutputs,
    RankSortHeadLoss,
    build_head_loss,
)
from .matcher import MaxIoUMatcher
from .rank_sort import RankSortMaskHead, build_rs_atss_resnet_fpn_backbone, rank_sort_mask_loss
from .rcnn import (
    ALRPRPN,
    ALRPROIHeads,
    MaxIoURPN,
    RankingFastRCNNOutputLayers,
    RankingROIHeads,
    RankingRPN,
    RankSortROIHeads,
    RankSortRPN,
)
from .retinanet import (
    ALRPRetinaNet,
    APLossRetinaNet,
    RankingRetinaNet,
    RankSortRetinaNet,
    ScaledBoxRetinaNetHead,
    classwise_targets,
)
from .self_balance import SelfBalance

__all__ = [
    "ALRPHeadLoss",
    "CARAFE",
    "CARAFEFPN",
    "ALRPROIHeads",
    "ALRPRPN",
    "ALRPRetinaNet",
    "APHeadLoss",
    "APLossRetinaNet",
    "FocalHeadLoss",
    "HEAD_LOSS_REGISTRY",
    "HeadLoss",
    "HeadOutputs",
    "LastLevelP6P7NoReLU",
    "MaxIoUMatcher",
    "MaxIoURPN",
    "RankSortHeadLoss",
    "RankSortMaskHead",
    "RankSortCascadeROIHeads",
    "RankSortROIHeads",
    "RankSortRPN",
    "RankSortRetinaNet",
    "RankingCascadeROIHeads",
    "RankingFCOS",
    "RankingFoveaBox",
    "RankingFastRCNNOutputLayers",
    "RankingROIHeads",
    "RankingRPN",
    "RankingRetinaNet",
    "ScaledBoxRetinaNetHead",
    "SelfBalance",
    "TorchvisionDeformConv",
    "TorchvisionModulatedDeformConv",
    "atss_match",
    "carafe",
    "build_alrp_retinanet_resnet_fpn_backbone",
    "build_carafe_resnet_fpn_backbone",
    "build_fcos_resnet_fpn_backbone",
    "build_head_loss",
    "build_rcnn_resnet_fpn_backbone",
    "build_rs_atss_resnet_fpn_backbone",
    "classwise_targets",
    "convert_deform_convs",
    "fovea_targets",
    "rank_sort_mask_loss",
]
