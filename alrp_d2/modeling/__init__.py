"""Detectron2 meta-architectures and heads trained by ranking-based losses.

Importing this package registers them in Detectron2's registries:
``ALRPRetinaNet`` and ``APLossRetinaNet`` (META_ARCH_REGISTRY), ``ALRPRPN``
(PROPOSAL_GENERATOR_REGISTRY) and ``ALRPROIHeads`` (ROI_HEADS_REGISTRY).
"""

from .atss import atss_match
from .rcnn import ALRPRPN, ALRPFastRCNNOutputLayers, ALRPROIHeads
from .retinanet import ALRPRetinaNet, APLossRetinaNet, classwise_targets
from .self_balance import SelfBalance

__all__ = [
    "ALRPFastRCNNOutputLayers",
    "ALRPROIHeads",
    "ALRPRPN",
    "ALRPRetinaNet",
    "APLossRetinaNet",
    "SelfBalance",
    "atss_match",
    "classwise_targets",
]
