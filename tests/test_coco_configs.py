"""The COCO configs reproduce the authors' training (configs/COCO-Detection/README.md).

1. Every training- and test-affecting value of every COCO config, pinned in a table: the
   values audited against the authors' mmdetection configs (kemaloksuz/aLRPLoss,
   configs/alrp_loss/, and kemaloksuz/RankSortLoss, configs/ranksort_loss/, with the _base_
   files they inherit).
2. ``ALRPRetinaNet``'s losses and gradients on fixed anchors, head outputs and ground truth
   equal the authors' head computation, transcribed below from their code's description:
   max-IoU or ATSS assignment, deltas normalised by the target stds (0.1, 0.1, 0.2, 0.2),
   boxes decoded around a unit anchor, GIoU (or IoU) error, the loss computed on the
   (level, image, y, x, anchor, class)-flattened batch, and their loop over positives.
"""

import glob
import math
import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from alrp_d2.config import get_cfg
    from alrp_d2.modeling import LastLevelP6P7NoReLU, MaxIoUMatcher

COCO_DIR = os.path.join(ROOT, "configs", "COCO-Detection")

# --------------------------------------------------------------------------------------
# 1. The audited values
# --------------------------------------------------------------------------------------

R50 = {
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/torchvision/R-50.pkl",  # torchvision://
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],  # img_norm_cfg, to_rgb=True
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "INPUT.FORMAT": "RGB",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,  # style='pytorch'
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],  # dcn=None
    "MODEL.RESNETS.NORM": "FrozenBN",  # norm_eval=True (statistics frozen)
    "MODEL.BACKBONE.FREEZE_AT": 2,  # frozen_stages=1
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
}
R101 = {"MODEL.WEIGHTS": "weights/R-101-torchvision.pkl", "MODEL.RESNETS.DEPTH": 101}
X101 = {
    "MODEL.WEIGHTS": "weights/X-101-64x4d-open-mmlab.pkl",  # open-mmlab://resnext101_64x4d
    "MODEL.RESNETS.DEPTH": 101,
    "MODEL.RESNETS.NUM_GROUPS": 64,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 4,
}
SOLVER = {  # schedule_1x.py (SGD, linear warm-up) with the alrp_loss configs' epochs
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.NESTEROV": False,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_BIAS": None,  # = WEIGHT_DECAY: mmdetection decays biases too
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.MAX_EPOCHS": 100,
    "SOLVER.GAMMA": 0.1,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.WARMUP_ITERS": 500,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False,  # grad_clip=None
    "SOLVER.AMP.ENABLED": False,
}
PIPELINE_500 = {  # coco500_detection_augm.py
    "INPUT.ALRP_AUG.ENABLED": True,
    "INPUT.ALRP_AUG.PHOTOMETRIC": True,
    "INPUT.ALRP_AUG.EXPAND_RATIO": [1.0, 4.0],
    "INPUT.ALRP_AUG.MIN_IOUS": [0.1, 0.3, 0.5, 0.7, 0.9],
    "INPUT.ALRP_AUG.MIN_CROP_SIZE": 0.3,
    "INPUT.ALRP_AUG.SIZE": [512, 512],
    "INPUT.ALRP_AUG.FLIP": True,
    "INPUT.MIN_SIZE_TEST": 500,  # img_scale=(833, 500), keep_ratio
    "INPUT.MAX_SIZE_TEST": 833,
    "TEST.DETECTIONS_PER_IMAGE": 100,  # max_per_img
}
SCALES_2 = [
    [32, 45.254834],
    [64, 90.509668],
    [128, 181.019336],
    [256, 362.038672],
    [512, 724.077344],
]  # octave_base_scale=4, scales_per_octave=2, strides 8-128
SCALES_3 = [
    [32, 40.317474, 50.796834],
    [64, 80.634947, 101.593667],
    [128, 161.269894, 203.187335],
    [256, 322.539789, 406.374669],
    [512, 645.079578, 812.749339],
]  # scales_per_octave=3
RETINANET_500 = {  # alrp_loss_retinanet_r50_fpn_100e_coco500.py and retinanet_r50_fpn.py
    **R50,
    **SOLVER,
    **PIPELINE_500,
    "MODEL.META_ARCHITECTURE": "ALRPRetinaNet",
    "MODEL.BACKBONE.NAME": "build_alrp_retinanet_resnet_fpn_backbone",  # no ReLU before P7
    "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],
    "MODEL.ANCHOR_GENERATOR.SIZES": SCALES_2,
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RETINANET.NUM_CONVS": 4,
    "MODEL.RETINANET.NORM": "",
    "MODEL.RETINANET.PRIOR_PROB": 0.01,
    "MODEL.RETINANET.IOU_THRESHOLDS": [0.4, 0.5],  # neg_iou_thr, pos_iou_thr
    "MODEL.RETINANET.IOU_LABELS": [0, -1, 1],
    "MODEL.ALRP.MIN_POS_IOU": 0.0,  # min_pos_iou, match_low_quality=True
    "MODEL.RETINANET.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],  # target_stds 0.1, 0.2
    "MODEL.RETINANET.SCORE_THRESH_TEST": 0.05,
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 1000,  # nms_pre
    "MODEL.RETINANET.NMS_THRESH_TEST": 0.5,
    "MODEL.ALRP.TEST_CANDIDATES": "anchors",
    "MODEL.ALRP.ASSIGNER": "iou",
    "MODEL.ALRP.LOC_ERROR": "giou",
    "MODEL.ALRP.TAU": 0.5,
    "MODEL.ALRP.DELTA": 1.0,
    "MODEL.ALRP.EPS": 1e-5,
    "MODEL.ALRP.SB_INIT": 50.0,
    "SOLVER.IMS_PER_BATCH": 32,  # 4 GPUs x samples_per_gpu=8
    "SOLVER.BASE_LR": 0.008,
    "SOLVER.STEPS_EPOCHS": [60, 80],
}
ATSS_500 = {  # alrp_loss_retinanet_*_ATSS_100e_coco500.py
    **RETINANET_500,
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0]],
    "MODEL.ALRP.ASSIGNER": "atss",
    "MODEL.ALRP.ATSS_TOPK": 9,
    "SOLVER.STEPS_EPOCHS": [75, 95],
}
ATSS_800 = {  # alrp_loss_retinanet_*_ATSS_100e_coco800.py, coco800_detection_augm.py
    **ATSS_500,
    "MODEL.ANCHOR_GENERATOR.SIZES": SCALES_3,
    "INPUT.ALRP_AUG.SIZE": [800, 800],
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "SOLVER.IMS_PER_BATCH": 16,  # 4 GPUs x samples_per_gpu=4
    "SOLVER.BASE_LR": 0.004,
    "SOLVER.STEPS_EPOCHS": [60, 80],
}
FASTER_RCNN = {  # faster_rcnn_r50_fpn(_100e_coco500).py
    **R50,
    **SOLVER,
    **PIPELINE_500,
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": False,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],  # scales=[8]
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.PROPOSAL_GENERATOR.NAME": "MaxIoURPN",
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.IOU_THRESHOLDS": [0.3, 0.7],
    "MODEL.RPN.IOU_LABELS": [0, -1, 1],
    "MODEL.ALRP.RPN_MIN_POS_IOU": 0.3,  # min_pos_iou=0.3, match_low_quality=True
    "MODEL.RPN.BOUNDARY_THRESH": -1,  # allowed_border=-1
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256,
    "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.RPN.SMOOTH_L1_BETA": 0.0,  # L1Loss
    "MODEL.RPN.LOSS_WEIGHT": 1.0,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,  # rpn_proposal nms_pre
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,  # nms_post
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.5],
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25,
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,  # add_gt_as_proposals=True
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,  # L1Loss
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0,
    "SOLVER.IMS_PER_BATCH": 32,
    "SOLVER.BASE_LR": 0.04,
    "SOLVER.STEPS_EPOCHS": [75, 95],
}

FCOS_1X = {
    "MODEL.META_ARCHITECTURE": "RankingFCOS",
    "MODEL.RANKING_LOSS.NAME": "ALRPHeadLoss",
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",  # train.init_checkpoint
    "MODEL.BACKBONE.NAME": "build_fcos_resnet_fpn_backbone",  # top_block in_feature "p5"
    "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],
    "MODEL.RETINANET.NUM_CONVS": 4,
    "MODEL.RETINANET.NORM": "GN",  # model.head.norm = "GN"
    "MODEL.RETINANET.PRIOR_PROB": 0.01,
    "MODEL.FCOS.CENTER_SAMPLING_RADIUS": 1.5,
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 1000,
    "MODEL.RETINANET.NMS_THRESH_TEST": 0.6,  # test_nms_thresh
    "MODEL.RETINANET.SCORE_THRESH_TEST": 0.05,  # ATSS's (upstream FCOS: 0.2 on sqrt(cls*ctr))
    "MODEL.ALRP.DELTA": 1.0,
    "MODEL.ALRP.TAU": 0.5,
    "MODEL.ALRP.LOC_ERROR": "giou",
    "MODEL.ALRP.SB_INIT": 50.0,
    "INPUT.MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800],  # common/data/coco.py
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.004,  # aLRP ATSS 800 at 16 images
    "SOLVER.MAX_EPOCHS": 12,  # 90k iterations at 16 images
    "SOLVER.STEPS_EPOCHS": [8, 11],
    "SOLVER.WARMUP_ITERS": 500,
}

EXPECTED = {
    "alrp_retinanet_R_50_FPN_500_giou.yaml": RETINANET_500,
    "alrp_retinanet_R_50_FPN_500_iou.yaml": {**RETINANET_500, "MODEL.ALRP.LOC_ERROR": "iou"},
    "alrp_atss_R_50_FPN_500.yaml": ATSS_500,
    "alrp_atss_R_101_FPN_500.yaml": {**ATSS_500, **R101},
    "alrp_atss_X_101_64x4d_FPN_500.yaml": {**ATSS_500, **X101},
    "alrp_atss_R_50_FPN_800.yaml": ATSS_800,
    "alrp_atss_R_101_FPN_800.yaml": {**ATSS_800, **R101},
    "alrp_atss_X_101_64x4d_FPN_800.yaml": {**ATSS_800, **X101},
    "aploss_retinanet_R_50_FPN_500.yaml": {  # ap_loss_retinanet_r50_fpn_100e_coco500.py
        **RETINANET_500,
        "MODEL.META_ARCHITECTURE": "APLossRetinaNet",
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "smooth_l1",
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 1.0,
        "MODEL.ALRP.AP_SELF_BALANCE": False,  # loss weight 1
        "SOLVER.BASE_LR": 0.002,
    },
    "focal_retinanet_R_50_FPN_500.yaml": {  # retinanet_r50_fpn.py in the 500 setting
        **RETINANET_500,
        "MODEL.META_ARCHITECTURE": "RetinaNet",
        "MODEL.ANCHOR_GENERATOR.SIZES": SCALES_3,
        "MODEL.RETINANET.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],  # target_stds 1
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA": 2.0,
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA": 0.25,
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "smooth_l1",
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.0,  # L1Loss
        "SOLVER.BASE_LR": 0.02,
    },
    "ce_faster_rcnn_R_50_FPN.yaml": FASTER_RCNN,
    "alrp_faster_rcnn_R_50_FPN.yaml": {  # alrp_loss_faster_rcnn_r50_fpn_100e_coco500.py
        **FASTER_RCNN,
        "MODEL.PROPOSAL_GENERATOR.NAME": "ALRPRPN",  # every anchor, no sampler
        "MODEL.RPN.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
        "MODEL.ALRP.RPN_TAU": 0.7,
        "MODEL.ALRP.RPN_LOSS_WEIGHT": 0.2,  # head_weight
        "MODEL.ROI_HEADS.NAME": "ALRPROIHeads",  # PseudoSampler: every proposal
        "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": False,
        "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": True,
        "MODEL.ALRP.LOC_ERROR": "giou",
        "MODEL.ALRP.TAU": 0.5,
        "MODEL.ALRP.DELTA": 1.0,
        "MODEL.ALRP.EPS": 1e-5,
        "MODEL.ALRP.SB_INIT": 50.0,
        "SOLVER.BASE_LR": 0.012,
    },
}

EXPECTED.update(
    {
        # alrp_loss_retinanet_x101_64x4d_fpn_dcn_ATSS_100e_coco800.py: the X101 800 config with
        # dcn=dict(type='DCNv2', deformable_groups=1, fallback_on_stride=False) and
        # stage_with_dcn=(False, True, True, True)
        "alrp_atss_X_101_64x4d_FPN_DCN_800.yaml": {
            **EXPECTED["alrp_atss_X_101_64x4d_FPN_800.yaml"],
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True],
            "MODEL.RESNETS.DEFORM_MODULATED": True,
            "MODEL.RESNETS.DEFORM_NUM_GROUPS": 1,
        },
        # faster_rcnn_r50_fpn_giou_100e_coco500.py: the CE config with reg_decoded_bbox=True and
        # loss_bbox=GIoULoss(loss_weight=10.0) in the RoI head
        "ce_faster_rcnn_R_50_FPN_giou.yaml": {
            **FASTER_RCNN,
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "giou",
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 10.0,
        },
        # Table S4's best AP Loss (supplementary S7.1; the ablation code's GIoULoss, divided by
        # 4 per positive, and self-balance): the AP Loss config with these
        "aploss_retinanet_R_50_FPN_500_giou_sb.yaml": {
            **EXPECTED["aploss_retinanet_R_50_FPN_500.yaml"],
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "giou",
            "MODEL.ALRP.AP_SELF_BALANCE": True,
            "MODEL.ALRP.SB_INIT": 50.0,
        },
    }
)

# Rank & Sort Loss (kemaloksuz/RankSortLoss, configs/ranksort_loss/ and the _base_ files
# they inherit: schedule_1x.py, coco_detection.py / coco_instance.py).
SOLVER_1X = {
    **SOLVER,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0001,  # mmdetection decays every parameter
    "SOLVER.MAX_EPOCHS": 12,
    "SOLVER.STEPS_EPOCHS": [8, 11],
    "SOLVER.IMS_PER_BATCH": 16,  # 4 GPUs x samples_per_gpu=4
}
PIPELINE_1X = {  # Resize (1333, 800) keep_ratio, RandomFlip 0.5
    "INPUT.ALRP_AUG.ENABLED": False,
    "INPUT.MIN_SIZE_TRAIN": [800],
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "TEST.DETECTIONS_PER_IMAGE": 100,
}
RANK_SORT = {
    "MODEL.RANK_SORT.DELTA": 0.5,
    "MODEL.RANK_SORT.EPS": 1e-10,
    "MODEL.ALRP.RANKING_SCOPE": "process",
}
RS_RCNN = {  # ranksort_faster_rcnn_r50_fpn_1x_coco.py
    **FASTER_RCNN,
    **SOLVER_1X,
    **PIPELINE_1X,
    **RANK_SORT,
    "MODEL.PROPOSAL_GENERATOR.NAME": "RankSortRPN",  # RankBasedRPNHead, PseudoSampler
    "MODEL.RPN.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.RANK_SORT.RPN_LOSS_WEIGHT": 0.2,  # head_weight
    "MODEL.ROI_HEADS.NAME": "RankSortROIHeads",  # RandomSampler(num=1e10): every proposal
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,  # add_gt_as_proposals=True
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.4,  # rcnn score_thr=0.40
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": True,  # 80 sigmoid classifiers
    "SOLVER.BASE_LR": 0.012,
}
EXPECTED.update(
    {
        "rs_atss_R_50_FPN_1x.yaml": {  # ranksort_atss_r50_fpn_1x_coco.py
            **R50,
            **SOLVER_1X,
            **PIPELINE_1X,
            **RANK_SORT,
            "MODEL.META_ARCHITECTURE": "RankSortRetinaNet",
            "MODEL.BACKBONE.NAME": "build_rs_atss_resnet_fpn_backbone",  # add_extra_convs on_output
            "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
            "MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],
            "MODEL.ANCHOR_GENERATOR.SIZES": SCALES_3,  # octave_base_scale=4, scales_per_octave=3
            "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0]],
            "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
            "MODEL.RETINANET.NUM_CONVS": 4,  # stacked_convs=4
            "MODEL.RETINANET.NORM": "GN",  # norm_cfg GN(32)
            "MODEL.RETINANET.PRIOR_PROB": 0.01,
            "MODEL.RETINANET.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            "MODEL.RANK_SORT.LEARNED_BOX_SCALES": True,  # Scale(1.0) per level
            "MODEL.ALRP.ASSIGNER": "atss",  # ATSSAssigner(topk=9)
            "MODEL.ALRP.ATSS_TOPK": 9,
            "MODEL.ALRP.TEST_CANDIDATES": "anchors",
            "MODEL.RETINANET.SCORE_THRESH_TEST": 0.05,
            "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 1000,  # nms_pre
            "MODEL.RETINANET.NMS_THRESH_TEST": 0.6,  # nms iou_threshold=0.6
            "SOLVER.BASE_LR": 0.008,
        },
        "rs_faster_rcnn_R_50_FPN_1x.yaml": RS_RCNN,
        # Detectron2's FCOS 1x (upstream configs/COCO-Detection/fcos_R_50_FPN_1x.py and
        # common/models/fcos.py), each loss with its authors' ATSS settings.
        "alrp_fcos_R_50_FPN_1x.yaml": FCOS_1X,
        "rs_fcos_R_50_FPN_1x.yaml": {
            **FCOS_1X,
            "MODEL.RANKING_LOSS.NAME": "RankSortHeadLoss",
            "MODEL.RANK_SORT.DELTA": 0.5,
            "MODEL.RANK_SORT.EPS": 1e-10,
            "SOLVER.BASE_LR": 0.008,  # RS-ATSS at 16 images
            "SOLVER.WEIGHT_DECAY_NORM": 0.0001,
        },
        "rs_mask_rcnn_R_50_FPN_1x.yaml": {  # ranksort_mask_rcnn_r50_fpn_1x_coco.py
            **RS_RCNN,
            "MODEL.MASK_ON": True,
            "MODEL.ROI_MASK_HEAD.NAME": "RankSortMaskHead",  # RankBasedFCNMaskHead: Dice loss
            "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
            "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
            "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,  # mask_roi_extractor output_size=14
            "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
            "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
            "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False,  # 80 class-wise masks
            "MODEL.RANK_SORT.MAX_MASKS": 200,  # resample_for_mask_head(max_mask=200)
            "INPUT.MASK_FORMAT": "bitmask",
        },
    }
)

# The rest of the Rank & Sort model zoo (kemaloksuz/RankSortLoss, configs/ranksort_loss/):
# deeper backbones, DCN, multi-scale 3x, the "+" models (FPN_CARAFE), Cascade R-CNN and LVIS.
MS_3X = {  # lr_config step=[27, 33], total_epochs=36; Resize multiscale_mode='value'
    "SOLVER.MAX_EPOCHS": 36,
    "SOLVER.STEPS_EPOCHS": [27, 33],
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
    "INPUT.MAX_SIZE_TRAIN": 1333,
}
SCALES_640_800 = [640, 672, 704, 736, 768, 800]  # img_scale (1333, 640) ... (1333, 800)
SCALES_480_960 = [480, 560, 640, 720, 800, 880, 960]  # img_scale (1333, 480) ... (1333, 960)
DCN_4 = {  # dcn=dict(type='DCNv2', deform_groups=4), stage_with_dcn=(False, True, True, True)
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True],
    "MODEL.RESNETS.DEFORM_MODULATED": True,
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": 4,
}
CARAFE_FPN = {  # neck=dict(type='FPN_CARAFE', upsample_cfg=dict(type='carafe', ...))
    "MODEL.BACKBONE.NAME": "build_carafe_resnet_fpn_backbone",
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],  # start_level=0, num_outs=5
    "MODEL.FPN.NORM": "",  # norm_cfg=None
    "MODEL.CARAFE.UP_KERNEL": 5,
    "MODEL.CARAFE.UP_GROUP": 1,
    "MODEL.CARAFE.ENCODER_KERNEL": 3,
    "MODEL.CARAFE.ENCODER_DILATION": 1,
    "MODEL.CARAFE.COMPRESSED_CHANNELS": 64,
}
RS_MASK_RCNN = EXPECTED["rs_mask_rcnn_R_50_FPN_1x.yaml"]
RS_MASK_R101_MS_3X = {  # ranksort_mask_rcnn_r101_fpn_mstrain_3x_coco.py
    **RS_MASK_RCNN,
    **R101,
    **MS_3X,
    "INPUT.MIN_SIZE_TRAIN": SCALES_640_800,
}
RS_MASK_PLUS_R101_DCN = {  # ranksort_mask_rcnn+_r101_dcn_fpn_mstrain_3x_coco.py
    **RS_MASK_R101_MS_3X,
    **DCN_4,
    **CARAFE_FPN,
    "INPUT.MIN_SIZE_TRAIN": SCALES_480_960,
}
EXPECTED.update(
    {
        "rs_faster_rcnn_R_101_FPN_1x.yaml": {**RS_RCNN, **R101},
        "rs_faster_rcnn_R_101_FPN_DCN_ms_3x.yaml": {
            **RS_RCNN,
            **R101,
            **MS_3X,
            **DCN_4,
            "MODEL.BACKBONE.NAME": "build_rcnn_resnet_fpn_backbone",  # DCN on torchvision
            "INPUT.MIN_SIZE_TRAIN": SCALES_480_960,
        },
        "rs_mask_rcnn_R_101_FPN_ms_3x.yaml": RS_MASK_R101_MS_3X,
        "rs_mask_rcnn_plus_R_101_FPN_DCN_ms_3x.yaml": RS_MASK_PLUS_R101_DCN,
        "rs_mask_rcnn_plus_X_101_64x4d_FPN_DCN_ms_3x.yaml": {**RS_MASK_PLUS_R101_DCN, **X101},
        "rs_cascade_rcnn_R_50_FPN_1x.yaml": {  # ranksort_cascade_rcnn_r50_fpn_1x_coco.py
            **RS_RCNN,
            "MODEL.RPN.BOUNDARY_THRESH": 0,  # rpn allowed_border=0
            "MODEL.ROI_HEADS.NAME": "RankSortCascadeROIHeads",  # RankBasedCascadeRoIHead
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True,  # reg_class_agnostic=True
            # MaxIoUAssigner pos = neg = min_pos_iou, match_low_quality=False, per stage
            "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": [0.5, 0.6, 0.7],
            # target_stds [0.1, 0.1, 0.2, 0.2] at every stage
            "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": [[10.0, 10.0, 5.0, 5.0]] * 3,
            "MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS": [1.0, 1.0, 1.0],
        },
        "rs_mask_rcnn_R_50_FPN_1x_lvis_v1.yaml": {  # ranksort_mask_rcnn_r50_fpn_1x_lvis_v1.py
            **RS_MASK_RCNN,
            "DATASETS.TRAIN": ["lvis_v1_train"],  # lvis_v1_instance.py
            "DATASETS.TEST": ["lvis_v1_val"],
            "MODEL.ROI_HEADS.NUM_CLASSES": 1203,  # num_classes=1203
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.6,  # score_thr=0.60
            "TEST.DETECTIONS_PER_IMAGE": 300,  # max_per_img=300
            # ClassBalancedDataset(oversample_thr=1e-3): ceil of the repeat factor
            "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
            "DATALOADER.REPEAT_THRESHOLD": 0.001,
            "DATALOADER.REPEAT_SQRT": True,
            "DATALOADER.REPEAT_ROUNDING": "ceil",
            "INPUT.MIN_SIZE_TRAIN": SCALES_640_800,
            "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
            "INPUT.MAX_SIZE_TRAIN": 1333,
        },
    }
)

# FoveaBox (kemaloksuz/aLRPLoss, configs/alrp_loss/*fovea_r50_fpn_4x4_100e_coco500.py: FOVEA
# with the FoveaHead, APLossFoveaHead and aLRPLossFoveaHead); heads checked against a
# transcription of theirs in tests/test_foveabox.py.
FOVEABOX_500 = {
    **R50,
    **SOLVER,
    **PIPELINE_500,
    "MODEL.META_ARCHITECTURE": "RankingFoveaBox",
    # FPN start_level=1, num_outs=5, add_extra_convs='on_input' (P6 from C5), no ReLU
    "MODEL.BACKBONE.NAME": "build_alrp_retinanet_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],  # strides 8 to 128
    "MODEL.RETINANET.NUM_CONVS": 4,  # stacked_convs=4, feat_channels=256
    "MODEL.RETINANET.NORM": "",  # norm_cfg=None
    "MODEL.RETINANET.PRIOR_PROB": 0.01,  # bias_init_with_prob(0.01)
    "MODEL.FOVEABOX.BASE_EDGES": [16, 32, 64, 128, 256],  # base_edge_list
    "MODEL.FOVEABOX.SCALE_RANGES": [[1, 64], [32, 128], [64, 256], [128, 512], [256, 2048]],
    "MODEL.FOVEABOX.SIGMA": 0.4,  # sigma=0.4, with_deform=False
    "MODEL.RETINANET.SCORE_THRESH_TEST": 0.05,  # score_thr
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 1000,  # nms_pre: top locations by best class
    "MODEL.ALRP.TEST_CANDIDATES": "anchors",
    "MODEL.RETINANET.NMS_THRESH_TEST": 0.5,  # nms iou_thr=0.5
    "SOLVER.IMS_PER_BATCH": 32,  # 4 GPUs x samples_per_gpu=8 (the dataset config's)
    "SOLVER.STEPS_EPOCHS": [75, 95],  # lr_config step=[75, 95], total_epochs=100
}
EXPECTED.update(
    {
        "focal_foveabox_R_50_FPN_500.yaml": {  # fovea_r50_fpn_4x4_100e_coco500.py
            **FOVEABOX_500,
            "MODEL.RANKING_LOSS.NAME": "FocalHeadLoss",
            "MODEL.RETINANET.FOCAL_LOSS_GAMMA": 1.5,  # FocalLoss gamma=1.50, alpha=0.4
            "MODEL.RETINANET.FOCAL_LOSS_ALPHA": 0.4,
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "smooth_l1",  # SmoothL1Loss beta=0.11
            "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.11,
            "SOLVER.BASE_LR": 0.02,
        },
        "aploss_foveabox_R_50_FPN_500.yaml": {  # ap_loss_fovea_r50_fpn_4x4_100e_coco500.py
            **FOVEABOX_500,
            "MODEL.RANKING_LOSS.NAME": "APHeadLoss",
            "MODEL.ALRP.DELTA": 1.0,  # APLoss delta=1
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "smooth_l1",  # SmoothL1Loss beta=0.11
            "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.11,
            "SOLVER.BASE_LR": 0.002,
        },
        "alrp_foveabox_R_50_FPN_500.yaml": {  # alrp_loss_fovea_r50_fpn_4x4_100e_coco500.py
            **FOVEABOX_500,
            "MODEL.RANKING_LOSS.NAME": "ALRPHeadLoss",
            "MODEL.ALRP.LOC_ERROR": "giou",  # GIoULoss
            "MODEL.ALRP.TAU": 0.5,
            "MODEL.ALRP.DELTA": 1.0,
            "MODEL.ALRP.EPS": 1e-5,
            "MODEL.ALRP.SB_INIT": 50.0,  # SB_weight = 50
            "SOLVER.BASE_LR": 0.008,
        },
    }
)


def _plain(value):
    """Tuples as lists, recursively (YAML tuples load as tuples, lists as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def load(name):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(COCO_DIR, name))
    return cfg


def test_every_coco_config_is_in_the_table():
    on_disk = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COCO_DIR, "*.yaml")))
    assert on_disk == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_has_the_audited_values(name):
    cfg = load(name)
    wrong = {}
    for key, expected in EXPECTED[name].items():
        actual = _plain(_lookup(cfg, key))
        if isinstance(expected, float):
            same = actual == pytest.approx(expected)
        else:
            same = actual == expected
        if not same:
            wrong[key] = (actual, expected)
    assert not wrong, f"{name}: (config, audited) differ: {wrong}"


def test_batch_is_divisible_by_the_authors_gpus():
    # 4 GPUs: the authors' ranking spans the images of one GPU (8, or 4 at 800 and for the
    # Rank & Sort 1x setups; the FCOS configs' 16 images likewise).
    for name in EXPECTED:
        cfg = load(name)
        per_gpu = 4 if "800" in name or name.startswith("rs_") or "_fcos_" in name else 8
        assert cfg.SOLVER.IMS_PER_BATCH == 4 * per_gpu, name


# --------------------------------------------------------------------------------------
# 2. The pieces of the authors' code the configs now select
# --------------------------------------------------------------------------------------


def test_p7_is_computed_from_p6_without_relu():
    torch.manual_seed(0)
    block = LastLevelP6P7NoReLU(8, 4)
    c5 = torch.randn(1, 8, 16, 16)
    p6, p7 = block(c5)
    assert torch.equal(p6, block.p6(c5))
    assert torch.equal(p7, block.p7(p6))
    assert (p6 < 0).any()  # a ReLU would have changed P7


def small_model(name, num_classes=3):
    cfg = load(name)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.RESNETS.DEPTH = 18  # the backbone takes no part in these tests
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return cfg, build_model(cfg)


def test_p7_backbone_has_detectron2s_parameters():
    cfg, model = small_model("alrp_atss_R_50_FPN_500.yaml")
    assert isinstance(model.backbone.top_block, LastLevelP6P7NoReLU)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    reference = build_model(cfg).backbone
    ours = {k: v.shape for k, v in model.backbone.state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


def test_test_candidates_are_the_authors_top_anchors():
    # One level, 6 anchors, 3 classes: the authors keep the top-k anchors by their best
    # class score, then every class above the threshold, with boxes clipped to the image.
    _, model = small_model("alrp_atss_R_50_FPN_500.yaml")
    assert model.test_candidates == "anchors"
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5 + [[90.0, 90.0, 110.0, 110.0]]))
    scores = torch.tensor(
        [
            [0.90, 0.80, 0.01],  # best 0.90: kept, two classes above 0.05
            [0.04, 0.03, 0.02],  # best 0.04: in the top 3 anchors, but no class above 0.05
            [0.30, 0.00, 0.00],  # best 0.30: kept
            [0.06, 0.07, 0.08],  # best 0.08: 4th anchor, outside the top 3
            [0.00, 0.00, 0.01],
            [0.00, 0.50, 0.00],  # best 0.50: kept; its box is clipped to the 100 x 100 image
        ]
    )
    deltas = torch.zeros(6, 4)
    out = model._decode_multi_level_predictions([anchors], [scores], [deltas], 0.05, 3, (100, 100))
    got = sorted(zip(out.scores.tolist(), out.pred_classes.tolist()))
    assert got == [
        (pytest.approx(0.3), 0),
        (pytest.approx(0.5), 1),
        (pytest.approx(0.8), 1),
        (pytest.approx(0.9), 0),
    ]
    assert out.pred_boxes.tensor.max() <= 100
    # Detectron2's rule would have kept the top 3 pairs: 0.9, 0.8, 0.5.
    model.test_candidates = "pairs"
    out = model._decode_multi_level_predictions([anchors], [scores], [deltas], 0.05, 3, (100, 100))
    assert sorted(out.scores.tolist()) == pytest.approx([0.5, 0.8, 0.9])


def test_max_iou_matcher_minimum_and_later_ground_truth_wins():
    iou = torch.tensor(
        [
            [0.45, 0.20, 0.10, 0.00],  # gt 0: best anchor 0 (0.45)
            [0.42, 0.35, 0.00, 0.00],  # gt 1: best anchor 0 too (0.42)
            [0.00, 0.00, 0.25, 0.05],  # gt 2: best anchor 2 (0.25)
        ]
    )
    matched, labels = MaxIoUMatcher(0.3, 0.7, min_pos_iou=0.3)(iou)
    # anchor 0: a low-quality match of gts 0 and 1; the later gt takes it, although the
    #   anchor overlaps gt 0 more (Detectron2's Matcher would keep gt 0)
    # anchor 1: 0.35, between the thresholds: ignored
    # anchor 2: gt 2's best, but 0.25 < the minimum 0.3: negative
    assert labels.tolist() == [1, -1, 0, 0]
    assert matched[0] == 1
    matched, labels = MaxIoUMatcher(0.3, 0.7, min_pos_iou=0.0)(iou)
    assert labels.tolist() == [1, -1, 1, 0] and matched[2] == 2
    matched, labels = MaxIoUMatcher(0.4, 0.5)(torch.zeros(0, 5))
    assert labels.tolist() == [0] * 5 and matched.tolist() == [0] * 5


# --------------------------------------------------------------------------------------
# 3. ALRPRetinaNet's losses equal the authors' head computation
# --------------------------------------------------------------------------------------
#
# Transcription of the authors' aLRP RetinaNet head (mmdetection, their alrp_loss_retina_head
# with the max-IoU or ATSS assigner and aLRPLoss autograd function), in float64.

STDS = (0.1, 0.1, 0.2, 0.2)
CLIP = abs(math.log(16 / 1000))


def ref_overlaps(a, b):
    """(len(a), len(b)) IoU of xyxy boxes, mmdetection's formula (eps 1e-6 on the union)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-6)


def ref_max_iou_assign(iou, neg=0.4, pos=0.5, min_pos=0.0):
    """iou: (anchors, gts). 0 background, -1 ignored, g + 1 for ground truth g."""
    assigned = torch.full((iou.shape[0],), -1, dtype=torch.long)
    if iou.shape[1] == 0:
        return assigned.fill_(0)
    best, best_gt = iou.max(dim=1)
    assigned[(best >= 0) & (best < neg)] = 0
    assigned[best >= pos] = best_gt[best >= pos] + 1
    for g in range(iou.shape[1]):  # low-quality matches, ground truths in order
        top = iou[:, g].max()
        if top >= min_pos:
            assigned[iou[:, g] == top] = g + 1
    return assigned


def ref_atss_assign(anchors, per_level, gts, topk=9):
    """ATSS: top-k anchors per level by centre distance, IoU >= mean + std (unbiased) of
    the candidates, centre inside the box (margin 0.01), the highest IoU wins."""
    assigned = torch.zeros(len(anchors), dtype=torch.long)
    if len(gts) == 0:
        return assigned
    iou = ref_overlaps(anchors, gts)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gts[:, :2] + gts[:, 2:]) / 2
    dist = (a_ctr[:, None, :] - g_ctr[None, :, :]).pow(2).sum(-1).sqrt()
    cands, start = [], 0
    for n in per_level:
        cands.append(dist[start : start + n].topk(topk, dim=0, largest=False).indices + start)
        start += n
    cands = torch.cat(cands, dim=0)  # (levels * k, gts)
    best = torch.full_like(iou, -1.0)
    for g in range(len(gts)):
        c = cands[:, g]
        ious = iou[c, g]
        thr = ious.mean() + ious.std()
        x, y = a_ctr[c, 0], a_ctr[c, 1]
        margin = torch.stack([x - gts[g, 0], y - gts[g, 1], gts[g, 2] - x, gts[g, 3] - y]).min(0)
        ok = (ious >= thr) & (margin.values > 0.01)
        best[c[ok], g] = iou[c[ok], g]
    top, top_gt = best.max(dim=1)
    assigned[top >= 0] = top_gt[top >= 0] + 1
    return assigned


def ref_encode(anchors, gts):
    """Deltas of gts w.r.t. anchors, divided by the target stds (means 0)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    gw, gh = gts[:, 2] - gts[:, 0], gts[:, 3] - gts[:, 1]
    gx, gy = gts[:, 0] + gw / 2, gts[:, 1] + gh / 2
    d = torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], 1)
    return d / torch.tensor(STDS, dtype=d.dtype)


def ref_decode_unit(deltas):
    """The authors' loss-time decoding: a box relative to a unit anchor centred at 0."""
    d = deltas * torch.tensor(STDS, dtype=deltas.dtype)
    w, h = d[:, 2].clamp(-CLIP, CLIP).exp(), d[:, 3].clamp(-CLIP, CLIP).exp()
    return torch.stack([d[:, 0] - w / 2, d[:, 1] - h / 2, d[:, 0] + w / 2, d[:, 1] + h / 2], 1)


def ref_loc_error(pred, target, kind, eps=1e-6):
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = area_p + area_t - inter + eps
    iou = inter / union
    if kind == "iou":  # ablation code: (1 - IoU) / (1 - tau), tau = 0.5
        return (1 - iou) / 0.5
    hull = torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])
    hull_area = hull.clamp(min=0).prod(1) + eps
    giou = iou - (hull_area - union) / hull_area
    return 1 - giou  # (1 - GIoU) / 2 / (1 - tau) with tau = 0.5


def ref_alrp(logits, targets, loc_err, delta=1.0, eps=1e-5):
    """The authors' loop over positives (ascending score). Returns the classification loss,
    the localisation loss (before self-balance) and the classification gradient."""
    pos = targets == 1
    s_pos = logits[pos]
    low = s_pos.min() - delta
    neg = (targets == 0) & (logits >= low)
    s_neg = logits[neg]
    n_pos = len(s_pos)
    rank = torch.zeros(n_pos, dtype=logits.dtype)
    prec = torch.zeros(n_pos, dtype=logits.dtype)
    g_pos = torch.zeros(n_pos, dtype=logits.dtype)
    g_neg = torch.zeros(len(s_neg), dtype=logits.dtype)
    order = torch.argsort(s_pos)
    e = loc_err.detach()
    for i in order.tolist():
        h_pos = ((s_pos - s_pos[i]) / (2 * delta) + 0.5).clamp(0, 1)
        h_pos[i] = 0
        h_neg = ((s_neg - s_pos[i]) / (2 * delta) + 0.5).clamp(0, 1)
        rank_plus = 1 + h_pos.sum()
        fp = h_neg.sum()
        rank[i] = rank_plus + fp
        prec[i] = rank_plus / rank[i]
        if fp > eps:
            g_pos[i] = -((h_pos * e).sum() + fp) / rank[i]
            g_neg += h_neg * (-g_pos[i] / fp)
    grad = torch.zeros_like(logits)
    grad[pos] = g_pos
    grad[neg] = g_neg
    grad /= n_pos
    cls = 1 - prec.mean()
    desc = order.flip(0)
    loc = (torch.cumsum(loc_err[desc], 0) / rank[desc]).mean()
    return cls, loc, grad


def ref_head(
    cls_out,
    box_out,
    anchors_per_level,
    gt_boxes,
    gt_classes,
    num_classes,
    assigner,
    loc_kind,
    topk=9,
):
    """The authors' loss of a RetinaNet head for raw head outputs ``cls_out[l]``
    ``(N, A*K, H, W)`` and ``box_out[l]`` ``(N, A*4, H, W)``. Returns (cls, loc, labels
    (N, R) in (image, anchor) order), the losses differentiable in the head outputs."""
    anchors = torch.cat(anchors_per_level)
    per_level = [len(a) for a in anchors_per_level]
    labels, targets = [], []
    for boxes, classes in zip(gt_boxes, gt_classes):
        if assigner == "iou":
            assigned = ref_max_iou_assign(ref_overlaps(anchors, boxes))
        else:
            assigned = ref_atss_assign(anchors, per_level, boxes, topk)
        lab = torch.full((len(anchors),), num_classes, dtype=torch.long)
        lab[assigned < 0] = -1
        fg = assigned > 0
        lab[fg] = classes[assigned[fg] - 1]
        tgt = torch.zeros(len(anchors), 4, dtype=anchors.dtype)
        tgt[fg] = ref_encode(anchors[fg], boxes[assigned[fg] - 1])
        labels.append(lab)
        targets.append(tgt)
    labels, targets = torch.stack(labels), torch.stack(targets)  # (N, R), (N, R, 4)

    # Flatten level by level: (image, y, x, anchor) rows, classes innermost.
    flat_labels, flat_targets, flat_logits, flat_deltas, start = [], [], [], [], 0
    for n, c, b in zip(per_level, cls_out, box_out):
        flat_labels.append(labels[:, start : start + n].reshape(-1))
        flat_targets.append(targets[:, start : start + n].reshape(-1, 4))
        flat_logits.append(c.permute(0, 2, 3, 1).reshape(-1, num_classes))
        flat_deltas.append(b.permute(0, 2, 3, 1).reshape(-1, 4))
        start += n
    lab, tgt = torch.cat(flat_labels), torch.cat(flat_targets)
    logits, deltas = torch.cat(flat_logits), torch.cat(flat_deltas)
    onehot = torch.zeros(len(lab), num_classes, dtype=torch.long)
    fg = (lab >= 0) & (lab < num_classes)
    onehot[fg, lab[fg]] = 1
    onehot[lab < 0] = -1
    err = ref_loc_error(ref_decode_unit(deltas[fg]), ref_decode_unit(tgt[fg]), loc_kind)
    cls, loc, grad = ref_alrp(logits.detach().reshape(-1), onehot.reshape(-1), err)
    # classification: the loss value carrying the error-driven gradient
    cls = cls + (logits.reshape(-1) * grad).sum() - (logits.reshape(-1) * grad).sum().detach()
    return cls, loc, labels


CASES = {  # config, assigner, localisation error
    "iou-assigner-giou": ("alrp_retinanet_R_50_FPN_500_giou.yaml", "iou", "giou"),
    "iou-assigner-iou": ("alrp_retinanet_R_50_FPN_500_iou.yaml", "iou", "iou"),
    "atss-giou": ("alrp_atss_R_50_FPN_500.yaml", "atss", "giou"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_alrp_retinanet_losses_equal_the_authors_head(case):
    name, assigner, loc_kind = CASES[case]
    num_classes, size, num_images = 3, 384, 3
    # ATSS: the two anchors of a location share their centre, so a 9th candidate splits such
    # a pair, and which one topk returns is left unspecified (by both codes); 8 does not.
    topk = 8
    cfg, model = small_model(name, num_classes)
    model.atss_topk = topk
    assert model.box2box_transform.weights == (10.0, 10.0, 5.0, 5.0)

    strides = [8, 16, 32, 64, 128]
    features = [torch.zeros(num_images, 1, size // s, size // s) for s in strides]
    anchors = model.anchor_generator(features)
    a = model.anchor_generator.num_anchors[0]
    g = torch.Generator().manual_seed(3)
    cls_out = [
        (torch.randn(num_images, a * num_classes, *f.shape[2:], generator=g) * 2 - 3)
        .double()
        .requires_grad_()
        for f in features
    ]
    box_out = [
        (torch.randn(num_images, a * 4, *f.shape[2:], generator=g) * 0.5).double().requires_grad_()
        for f in features
    ]
    # Centres off the anchor grid and off its diagonals: no two anchor locations are
    # equally near a ground truth (ATSS's candidates are then unambiguous).
    gt_boxes = [
        torch.tensor(
            [
                [21.3, 30.9, 119.1, 108.5],
                [100.2, 90.7, 261.5, 300.1],
                [300.6, 40.1, 314.2, 54.9],
                [110.4, 101.3, 249.8, 291.1],
            ]
        ),
        torch.tensor([[3.7, 1.9, 380.2, 377.6], [50.3, 200.8, 90.1, 330.4]]),
        torch.zeros(0, 4),
    ]
    gt_classes = [torch.tensor([0, 2, 1, 1]), torch.tensor([1, 0]), torch.zeros(0).long()]
    instances = []
    for boxes, classes in zip(gt_boxes, gt_classes):
        inst = Instances((size, size))
        inst.gt_boxes, inst.gt_classes = Boxes(boxes), classes
        instances.append(inst)

    # This project: Detectron2's flattening, labelling and box coding, then ALRPRetinaNet.
    model.train()
    with EventStorage():
        logits, deltas = model._transpose_dense_predictions([cls_out, box_out], [num_classes, 4])
        labels, matched_boxes = model.label_anchors(anchors, instances)
        losses = model.losses(anchors, logits, labels, deltas, matched_boxes)

    # The authors' head on the same anchors, outputs and ground truth.
    ref_cls, ref_loc, ref_labels = ref_head(
        cls_out,
        box_out,
        [x.tensor.double() for x in anchors],
        [b.double() for b in gt_boxes],
        gt_classes,
        num_classes,
        assigner,
        loc_kind,
        topk,
    )

    ours = torch.stack(labels)
    assert torch.equal(ours, ref_labels)  # same positives, negatives, ignored, classes
    num_pos = int(((ours >= 0) & (ours < num_classes)).sum())
    assert num_pos >= 20 and (ours == -1).any() == (assigner == "iou")

    sb = cfg.MODEL.ALRP.SB_INIT
    assert losses["loss_alrp_cls"].item() == pytest.approx(ref_cls.item(), rel=1e-5)
    assert losses["loss_alrp_loc"].item() == pytest.approx(sb * ref_loc.item(), rel=1e-5)

    # Gradients with respect to the raw head outputs.
    for ours_loss, ref_loss, params in (
        (losses["loss_alrp_cls"], ref_cls, cls_out),
        (losses["loss_alrp_loc"], sb * ref_loc, box_out),
    ):
        got = torch.autograd.grad(ours_loss, params, retain_graph=True)
        want = torch.autograd.grad(ref_loss, params, retain_graph=True)
        for x, y in zip(got, want):
            scale = y.abs().max().item()
            assert scale > 0
            assert (x - y).abs().max().item() <= 1e-5 * scale
