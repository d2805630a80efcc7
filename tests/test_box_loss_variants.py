"""Box losses beside the ranking losses: AP Loss with smooth L1, IoU or GIoU, with or
without self-balance (the paper's Table S4, ``APHeadLoss``), and the cross-entropy Faster
R-CNN with Detectron2's GIoU loss (the authors' faster_rcnn_r50_fpn_giou_100e_coco500.py)."""

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT
from torchvision.ops import box_iou, generalized_box_iou

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage
    from fvcore.nn import smooth_l1_loss
    from runs import batch, tiny_cfg

    from alrp_d2.engine import SelfBalanceCallback
    from alrp_d2.losses import ap_loss
    from alrp_d2.modeling import APHeadLoss, HeadOutputs, SelfBalance

COCO = os.path.join(ROOT, "configs", "COCO-Detection")
AP_GIOU_SB = os.path.join(COCO, "aploss_retinanet_R_50_FPN_500_giou_sb.yaml")
CE_GIOU = os.path.join(COCO, "ce_faster_rcnn_R_50_FPN_giou.yaml")


def outputs(num_pos=5, seed=0, dtype=torch.float64):
    """A batch of 2 images: 200 class-wise logits, ``num_pos`` positives with overlapping,
    disjoint and nested predicted boxes, and their deltas."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.zeros(200, dtype=torch.long)
    targets[torch.randperm(200, generator=g)[:num_pos]] = 1
    xy = torch.rand(num_pos, 2, generator=g, dtype=dtype) * 50
    target = torch.cat([xy, xy + 10 + torch.rand(num_pos, 2, generator=g, dtype=dtype) * 30], 1)
    shift = torch.randn(num_pos, 4, generator=g, dtype=dtype) * 8
    if num_pos:
        shift[0] += 100  # a prediction not touching its target: IoU 0, GIoU < 0
    pred = (target + shift).requires_grad_()
    deltas = torch.randn(num_pos, 4, generator=g, dtype=dtype, requires_grad=True)
    return HeadOutputs(
        logits=logits,
        targets=targets,
        pred_boxes=pred,
        target_boxes=target,
        scores=torch.rand(num_pos, generator=g, dtype=dtype),
        num_images=2,
        pred_deltas=deltas,
        target_deltas=torch.randn(num_pos, 4, generator=g, dtype=dtype),
    )


def expected_box(out, kind, beta=1.0):
    """The ablation code's box losses, from torchvision's pairwise IoU / GIoU: summed over
    the positives, divided by 4 per positive."""
    if kind == "smooth_l1":
        total = smooth_l1_loss(out.pred_deltas, out.target_deltas, beta=beta, reduction="sum")
    elif kind == "iou":
        total = (1 - box_iou(out.pred_boxes, out.target_boxes).diagonal()).sum()
    else:
        total = (1 - generalized_box_iou(out.pred_boxes, out.target_boxes).diagonal()).sum()
    return total / (4 * len(out.pred_boxes))


@pytest.mark.parametrize("kind", ["smooth_l1", "iou", "giou"])
@pytest.mark.parametrize("balance", [False, True], ids=["constant", "self_balance"])
def test_ap_head_loss_box_terms(kind, balance):
    head_loss = APHeadLoss(
        prefix="ap", smooth_l1_beta=1.0, box_loss=kind, self_balance=balance, sb_init=7.0
    )
    out = outputs()
    with EventStorage():
        losses = head_loss(out)
    assert sorted(losses) == ["loss_ap_cls", "loss_box_reg"]
    torch.testing.assert_close(losses["loss_ap_cls"], ap_loss(out.logits, out.targets, 1.0))
    box = expected_box(out, kind)
    torch.testing.assert_close(losses["loss_box_reg"], box * (7.0 if balance else 1.0))
    assert box > 0.1
    # The box loss trains the boxes of its kind only (deltas for smooth L1, boxes else).
    losses["loss_box_reg"].backward()
    trained, untouched = (
        (out.pred_deltas, out.pred_boxes)
        if kind == "smooth_l1"
        else (out.pred_boxes, out.pred_deltas)
    )
    assert trained.grad.abs().sum() > 0 and untouched.grad is None and out.logits.grad is None
    if balance:
        assert head_loss.modules == {"self_balance": head_loss.balance}
        cls, recorded = head_loss.balance.last_losses
        torch.testing.assert_close(recorded, box.detach())
        torch.testing.assert_close(cls, losses["loss_ap_cls"].detach())
    else:
        assert head_loss.balance is None and head_loss.modules == {}


def test_ap_head_loss_without_positives_is_zero_and_connected():
    for kind in ("smooth_l1", "iou", "giou"):
        out = outputs(num_pos=0)
        with EventStorage():
            losses = APHeadLoss(prefix="ap", box_loss=kind, self_balance=True)(out)
        assert losses["loss_box_reg"] == 0 and losses["loss_box_reg"].requires_grad, kind


def test_ap_box_loss_refuses_what_it_does_not_compute():
    with pytest.raises(
        ValueError,
        match=r"MODEL.RETINANET.BBOX_REG_LOSS_TYPE\) must be one of"
        r" \('smooth_l1', 'iou', 'giou'\), got 'diou'",
    ):
        build_model(tiny_cfg(AP_GIOU_SB, **{"MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "diou"}))


def fake_trainer():
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t)
    return SimpleNamespace(strategy=strategy, current_epoch=0, global_rank=0)


@pytest.mark.slow
def test_table_s4_best_config_trains_with_self_balance():
    """AP Loss + GIoU + self-balance: the box loss is 50 x (1 - GIoU) / 4 per positive in
    the first epoch; after it, the weight is (mean L_AP + mean L_GIoU) / mean L_GIoU of its
    iterations, set by the engine's callback as for aLRP Loss, and saved with the model."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(AP_GIOU_SB))
    assert isinstance(model.self_balance, SelfBalance) and float(model.self_balance.weight) == 50.0
    assert "self_balance.weight" in model.state_dict()
    model.train()
    callback, trainer = SelfBalanceCallback(), fake_trainer()
    module = SimpleNamespace(modules=model.modules, log=lambda *args, **kwargs: None)
    seen = []
    with EventStorage() as storage:
        for seed in (0, 1):
            losses = model(batch(seed=seed))
            assert all(torch.isfinite(v) for v in losses.values()), losses
            sum(losses.values()).backward()
            cls, box = model.self_balance.last_losses
            torch.testing.assert_close(losses["loss_box_reg"], 50.0 * box)
            seen.append((float(cls), float(box)))
            callback.on_train_batch_end(trainer, module, None, None, 0)
        assert storage.history("ap/sb_weight").latest() == 50.0
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
    callback.on_train_epoch_end(trainer, module)
    mean_cls, mean_box = (sum(v) / 2 for v in zip(*seen))
    assert float(model.self_balance.weight) == pytest.approx((mean_cls + mean_box) / mean_box)
    model.eval()
    with torch.no_grad():
        assert len(model([{"image": x["image"]} for x in batch()])) == 2


@pytest.mark.slow
def test_ce_giou_faster_rcnn_box_loss():
    """Detectron2's RoI box loss with BBOX_REG_LOSS_TYPE giou and weight 10: 10 x the sum of
    (1 - GIoU) of the positive RoIs' class boxes, divided by every sampled RoI (mmdetection's
    avg_factor), the RPN's L1 loss unchanged; then the model trains a step and infers."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(CE_GIOU))
    predictor = model.roi_heads.box_predictor
    assert predictor.box_reg_loss_type == "giou" and predictor.loss_weight["loss_box_reg"] == 10.0
    assert model.proposal_generator.box_reg_loss_type == "smooth_l1"
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(
        torch.tensor([[10.0, 10, 50, 60], [20, 30, 70, 90], [0, 0, 30, 30], [40, 40, 90, 95]])
    )
    proposals.gt_boxes = Boxes(
        torch.tensor([[12.0, 8, 48, 64], [25, 30, 75, 85], [0, 0, 1, 1], [45, 38, 88, 99]])
    )
    proposals.gt_classes = torch.tensor([0, 2, 3, 1])  # 3 positives, 1 background (class 3)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 4, generator=g)
    deltas = (torch.randn(4, 12, generator=g) * 0.5).requires_grad_()
    with EventStorage():
        losses = predictor.losses((scores, deltas), [proposals])
    fg = torch.tensor([0, 1, 3])
    class_deltas = deltas.view(4, 3, 4)[fg, proposals.gt_classes[fg]]
    boxes = predictor.box2box_transform.apply_deltas(
        class_deltas, proposals.proposal_boxes.tensor[fg]
    )
    giou = generalized_box_iou(boxes, proposals.gt_boxes.tensor[fg]).diagonal()
    torch.testing.assert_close(losses["loss_box_reg"], 10.0 * (1 - giou).sum() / 4)
    model.train()
    with EventStorage():
        losses = model(batch())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert predictor.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert len(model([{"image": x["image"]} for x in batch()])) == 2
