"""Detectron2's box loss key of a head (``MODEL.RETINANET.BBOX_REG_LOSS_TYPE``, and the RPN's
and RoI box head's) either works as in Detectron2 or is refused by name: aLRP Loss and
Rank & Sort Loss train the boxes by their own loss (aLRP's localisation error, Rank &
Sort's GIoU), so a value other than Detectron2's default ``smooth_l1`` is refused rather
than ignored; AP Loss honours the key, the focal head loss takes ``smooth_l1`` only."""

import os
import re

import pytest
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.config import get_cfg as detectron2_cfg
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg
    from alrp_d2.modeling import (
        ALRPHeadLoss,
        APHeadLoss,
        FocalHeadLoss,
        RankSortHeadLoss,
        build_head_loss,
    )
    from alrp_d2.modeling.head_losses import BOX_LOSS_KEYS, HEADS
    from alrp_d2.modeling.rcnn import RankingROIHeads, RankingRPN
    from alrp_d2.modeling.retinanet import RankingRetinaNet

    HEAD_CLASSES = {"dense": RankingRetinaNet, "rpn": RankingRPN, "roi": RankingROIHeads}
    INSTEAD = {
        "ALRPHeadLoss": r"aLRP Loss's localisation error, MODEL.ALRP.LOC_ERROR \('giou'\)",
        "RankSortHeadLoss": r"Rank & Sort Loss's GIoU loss",
    }

QUICKSTART = os.path.join(ROOT, "configs", "quickstart")


def cfg_with(loss, key=None, value=None):
    cfg = get_cfg()
    cfg.MODEL.RANKING_LOSS.NAME = loss
    if key is not None:
        cfg.merge_from_list([key, value])
    return cfg


def test_the_keys_and_default_are_detectron2s():
    defaults = detectron2_cfg()
    for head in HEADS:
        node = defaults
        for part in BOX_LOSS_KEYS[head].split("."):
            node = node[part]
        assert node == "smooth_l1", head


@pytest.mark.parametrize("head", ["dense", "rpn", "roi"])
@pytest.mark.parametrize("loss", ["ALRPHeadLoss", "RankSortHeadLoss"])
@pytest.mark.parametrize("value", ["giou", "diou", "ciou", "iou"])
def test_a_loss_with_its_own_box_loss_refuses_the_key_by_name(loss, head, value):
    key = BOX_LOSS_KEYS[head]
    with pytest.raises(ValueError) as raised:
        build_head_loss(cfg_with(loss, key, value), HEAD_CLASSES[head], head)
    message = str(raised.value)
    assert message.startswith(f"{key} is {value!r}, but {loss} does not use it")
    assert f"leave {key} at Detectron2's default 'smooth_l1'" in message
    assert re.search(f"its box loss is {INSTEAD[loss]}", message), message


@pytest.mark.parametrize("head", ["dense", "rpn", "roi"])
def test_the_default_and_the_other_families_keys_build(head):
    """Detectron2's default builds; another family's key is not this head's."""
    others = [k for h, k in BOX_LOSS_KEYS.items() if h != head]
    for loss, cls in (("ALRPHeadLoss", ALRPHeadLoss), ("RankSortHeadLoss", RankSortHeadLoss)):
        cfg = cfg_with(loss)
        for key in others:
            cfg.merge_from_list([key, "giou"])
        assert type(build_head_loss(cfg, HEAD_CLASSES[head], head)) is cls


def test_ap_loss_honours_the_key_and_focal_keeps_its_check():
    cfg = cfg_with("APHeadLoss", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou")
    built = build_head_loss(cfg, RankingRetinaNet, "dense")
    assert type(built) is APHeadLoss and built.box_loss == "giou"
    cfg = cfg_with("FocalHeadLoss", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou")
    with pytest.raises(ValueError, match="BBOX_REG_LOSS_TYPE must be 'smooth_l1'"):
        build_head_loss(cfg, RankingRetinaNet, "dense")
    assert type(build_head_loss(cfg_with("FocalHeadLoss"), RankingRetinaNet, "dense")) is (
        FocalHeadLoss
    )


@pytest.mark.parametrize(
    "config, loss",
    [
        ("alrp_retinanet_synthetic.yaml", "ALRPHeadLoss"),
        ("rs_retinanet_synthetic.yaml", "RankSortHeadLoss"),
        ("rs_fcos_synthetic.yaml", "RankSortHeadLoss"),
        ("alrp_fovea_synthetic.yaml", "ALRPHeadLoss"),
    ],
)
def test_the_detectors_refuse_it(config, loss):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(QUICKSTART, config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "giou"
    with pytest.raises(
        ValueError, match=rf"MODEL.RETINANET.BBOX_REG_LOSS_TYPE is 'giou', but {loss}"
    ):
        build_model(cfg)


@pytest.mark.parametrize(
    "head,key,value",
    [
        ("dense", "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0),
        ("rpn", "MODEL.RPN.SMOOTH_L1_BETA", 1.0),
        ("rpn", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", 2.0),
        ("roi", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 1.0),
        ("roi", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 10.0),
    ],
)
@pytest.mark.parametrize("loss", ["ALRPHeadLoss", "RankSortHeadLoss"])
def test_the_box_loss_settings_are_refused_by_a_loss_of_its_own(loss, head, key, value):
    """The beta and weight of Detectron2's box loss are as unused as its type."""
    with pytest.raises(ValueError, match=re.escape(f"{key} is {value!r}, but {loss}")):
        build_head_loss(cfg_with(loss, key, value), HEAD_CLASSES[head], head)
    build_head_loss(cfg_with(loss), HEAD_CLASSES[head], head)  # Detectron2's default: built
