"""ResNet-FPN backbones of the detectors: RetinaNet's with the aLRP authors' P7 (no ReLU
between P6 and P7), FCOS's (P6 and P7 from P5) and the R-CNNs' (P6 by max pooling); their
deformable convolutions (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) on torchvision's kernels
(:mod:`.deform`)."""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .deform import convert_deform_convs

__all__ = [
    "LastLevelP6P7NoReLU",
    "build_alrp_retinanet_resnet_fpn_backbone",
    "build_fcos_resnet_fpn_backbone",
    "build_rcnn_resnet_fpn_backbone",
    "resnet_fpn",
]


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """P6 from C5 and P7 from P6 by stride-2 3x3 convolutions, with no ReLU in between
    (the authors' mmdetection FPN, ``add_extra_convs='on_input'`` and
    ``relu_before_extra_convs=False``). Same parameters as Detectron2's ``LastLevelP6P7``."""

    def forward(self, c5):
        p6 = self.p6(c5)
        return [p6, self.p7(p6)]


def resnet_fpn(cfg, input_shape: ShapeSpec, make_top_block) -> FPN:
    """Detectron2's ResNet-FPN from ``MODEL.RESNETS`` and ``MODEL.FPN`` whose extra levels
    are ``make_top_block(bottom_up)`` (how P6 and P7 are made: what the detectors'
    backbones differ in). Detectron2's ``DeformBottleneckBlock`` stages compute their
    deformable convolutions with torchvision (CPU and CUDA, forward and backward)."""
    bottom_up = convert_deform_convs(build_resnet_backbone(cfg, input_shape))
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=make_top_block(bottom_up),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_alrp_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_retinanet_resnet_fpn_backbone`` with :class:`LastLevelP6P7NoReLU`."""
    out = cfg.MODEL.FPN.OUT_CHANNELS
    return resnet_fpn(
        cfg,
        input_shape,
        lambda bottom_up: LastLevelP6P7NoReLU(bottom_up.output_shape()["res5"].channels, out),
    )


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN with P6 and P7 from P5 (ReLU before P7), as Detectron2's FCOS config."""
    out = cfg.MODEL.FPN.OUT_CHANNELS
    return resnet_fpn(cfg, input_shape, lambda bottom_up: LastLevelP6P7(out, out, in_feature="p5"))


@BACKBONE_REGISTRY.register()
def build_rcnn_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_fpn_backbone`` (P2-P6, P6 by max pooling of P5, the same
    parameters and keys) whose deformable convolutions run on torchvision (CPU and CUDA):
    the R-CNN configs with ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``."""
    return resnet_fpn(cfg, input_shape, lambda bottom_up: LastLevelMaxPool())
