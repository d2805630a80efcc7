"""The Rank & Sort detectors: each head's losses equal a direct computation from the same
tensors (spec section 9, the authors' heads), no positives, ignored anchors, the mask loss.

Every COCO config (RS-ATSS, RS-Faster R-CNN, RS-Mask R-CNN included) training a step and
inferring is tests/test_models.py::test_config_trains_one_step_and_infers.
"""

import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.layers import cat
    from detectron2.modeling import build_model
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage
    from runs import batch, dense_predictions, tiny_cfg
    from torchvision.ops import box_iou, generalized_box_iou_loss

    from alrp_d2.losses import rank_sort_loss
    from alrp_d2.modeling import (
        RankSortMaskHead,
        RankSortRetinaNet,
        ScaledBoxRetinaNetHead,
        classwise_targets,
        rank_sort_mask_loss,
    )

COCO = os.path.join(ROOT, "configs", "COCO-Detection")


def rs_atss(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_cfg(os.path.join(COCO, "rs_atss_R_50_FPN_1x.yaml"), **overrides))


def rs_rcnn(name="rs_faster_rcnn_R_50_FPN_1x.yaml"):
    torch.manual_seed(0)
    return build_model(tiny_cfg(os.path.join(COCO, name)))


def expected_terms(logits, targets, pred_boxes, target_boxes, weights):
    """Spec section 9 written out: labels = IoU(prediction, ground truth), the box loss a
    score-weighted GIoU mean whose value is set to L_rank + L_sort."""
    labels = targets.to(torch.float32)
    labels[targets == 1] = box_iou(pred_boxes.detach(), target_boxes).diagonal()
    ranking, sorting = rank_sort_loss(logits, labels)
    giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    box = (weights * giou).sum() / weights.sum()
    return ranking, sorting, box * ((ranking + sorting) / box).detach()


def test_retinanet_losses_equal_a_direct_computation():
    model = rs_atss()
    assert isinstance(model, RankSortRetinaNet)
    inputs = batch()
    with EventStorage() as storage:
        anchors, logits, labels, deltas, boxes = dense_predictions(model, inputs)
        losses = model.losses(anchors, logits, labels, deltas, boxes)
        logged = storage.latest()
    stacked = torch.stack(labels)
    positive = (stacked >= 0) & (stacked < 3)
    assert positive.sum() > 0
    flat_logits = cat(logits, dim=1)
    anchor_boxes = Boxes.cat(anchors).tensor.expand(len(inputs), -1, -1)[positive]
    pred = model.box2box_transform.apply_deltas(cat(deltas, dim=1)[positive], anchor_boxes)
    weights = flat_logits.detach()[positive].sigmoid().amax(-1)
    ranking, sorting, box = expected_terms(
        flat_logits.reshape(-1),
        classwise_targets(stacked, 3).reshape(-1),
        pred,
        torch.stack(boxes)[positive],
        weights,
    )
    assert torch.allclose(losses["loss_rs_rank"], ranking)
    assert torch.allclose(losses["loss_rs_sort"], sorting)
    assert torch.allclose(losses["loss_rs_box"], box)
    # The box loss is scaled to the ranking terms every iteration (no tuned weight).
    assert losses["loss_rs_box"].item() == pytest.approx((ranking + sorting).item(), rel=1e-5)
    assert logged["rs/num_pos"][0] == pytest.approx(positive.sum().item() / len(inputs))
    assert logged["rs/ranked_images"][0] == len(inputs)


@pytest.mark.slow
def test_box_gradient_equals_the_direct_computation():
    model = rs_atss()
    inputs = batch()
    with EventStorage():
        anchors, logits, labels, deltas, boxes = dense_predictions(model, inputs)
        leaves = [d.detach().requires_grad_() for d in deltas]
        model.losses(anchors, logits, labels, leaves, boxes)["loss_rs_box"].backward()
        direct = [d.detach().requires_grad_() for d in deltas]
    stacked = torch.stack(labels)
    positive = (stacked >= 0) & (stacked < 3)
    anchor_boxes = Boxes.cat(anchors).tensor.expand(len(inputs), -1, -1)[positive]
    pred = model.box2box_transform.apply_deltas(cat(direct, dim=1)[positive], anchor_boxes)
    weights = cat(logits, dim=1).detach()[positive].sigmoid().amax(-1)
    _, _, box = expected_terms(
        cat(logits, dim=1).reshape(-1).detach(),
        classwise_targets(stacked, 3).reshape(-1),
        pred,
        torch.stack(boxes)[positive],
        weights,
    )
    box.backward()
    for got, want in zip(leaves, direct):
        assert torch.allclose(got.grad, want.grad, atol=1e-7)


@pytest.mark.slow
def test_ignored_anchors_get_no_gradient():
    model = rs_atss(**{"MODEL.ALRP.ASSIGNER": "iou"})  # IoU 0.4-0.5: ignored
    with EventStorage():
        anchors, logits, labels, deltas, boxes = dense_predictions(model, batch())
        leaves = [x.detach().requires_grad_() for x in logits]
        losses = model.losses(anchors, leaves, labels, deltas, boxes)
    (losses["loss_rs_rank"] + losses["loss_rs_sort"]).backward()
    grad = torch.cat([x.grad for x in leaves], dim=1)
    ignored = torch.stack(labels) == -1
    assert ignored.any()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any()


@pytest.mark.slow
@pytest.mark.parametrize("build", [rs_atss, rs_rcnn], ids=["rs_atss", "rs_faster_rcnn"])
def test_images_without_boxes(build):
    model = build()
    with EventStorage():
        mixed = model(batch(with_boxes=(True, False)))
        assert all(torch.isfinite(v) for v in mixed.values())
        empty = model(batch(with_boxes=(False, False)))
    assert all(torch.isfinite(v) for v in empty.values())
    sum(empty.values()).backward()  # connected graph: no error
    if build is rs_atss:
        assert all(v.item() == 0 for v in empty.values())
        assert model.head.cls_score.weight.grad.abs().sum() == 0


def roi_case(model, seed=0):
    """Proposals of two images labelled as the RoI heads label them (every proposal)."""
    g = torch.Generator().manual_seed(seed)
    proposals = []
    for gt_boxes, gt_classes in (
        (torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]]), torch.tensor([0, 2])),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
    ):
        boxes = torch.rand(12, 2, generator=g) * 60
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(12, 2, generator=g) * 30], 1)
        if len(gt_boxes):
            boxes[:2] = gt_boxes + 2  # two good proposals
        inst = Instances((96, 96), proposal_boxes=Boxes(boxes))
        if len(gt_boxes):
            iou = box_iou(boxes, gt_boxes)
            best, index = iou.max(1)
            inst.gt_boxes = Boxes(gt_boxes[index])
            inst.gt_classes = torch.where(best >= 0.5, gt_classes[index], 3)
        else:
            inst.gt_classes = torch.full((12,), 3)
        proposals.append(inst)
    features = torch.randn(24, model.roi_heads.box_head.output_shape.channels, generator=g)
    return proposals, features


def test_roi_box_losses_equal_a_direct_computation():
    model = rs_rcnn()
    predictor = model.roi_heads.box_predictor
    proposals, features = roi_case(model)
    predictions = predictor(features)
    with EventStorage():
        losses = predictor.losses(predictions, proposals)
    scores = predictions[0][:, :3]
    gt_classes = cat([p.gt_classes for p in proposals])
    positive = gt_classes < 3
    assert positive.sum() >= 2
    pred = cat(predictor.predict_boxes_for_gt_classes(predictions, proposals))[positive]
    gt = cat([p.gt_boxes.tensor for p in proposals if p.has("gt_boxes")])[positive[:12]]
    weights = scores.detach().sigmoid().amax(-1)[positive]
    ranking, sorting, box = expected_terms(
        scores.reshape(-1), classwise_targets(gt_classes, 3).reshape(-1), pred, gt, weights
    )
    assert torch.allclose(losses["loss_roi_rs_rank"], ranking)
    assert torch.allclose(losses["loss_roi_rs_sort"], sorting)
    assert torch.allclose(losses["loss_roi_rs_box"], box)
    # What the mask head needs: each proposal's score weight and the ranking terms' value.
    for image, image_scores in zip(proposals, scores.detach().sigmoid().amax(-1).split(12)):
        assert torch.equal(image.rs_weight, image_scores)
        assert torch.allclose(image.rs_balance, (ranking + sorting).detach().expand(12))


def test_rpn_losses_are_weighted_by_the_rpn_weight():
    model = rs_rcnn()
    rpn = model.proposal_generator
    assert rpn.head_loss.weight == pytest.approx(0.2)
    inputs = batch()
    with EventStorage():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        feats = [features[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(feats)
        logits, deltas = rpn.rpn_head(feats)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [
            x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in deltas
        ]
        gt_labels, gt_boxes = rpn.label_and_sample_anchors(
            anchors, [x["instances"] for x in inputs]
        )
        losses = rpn.losses(anchors, logits, gt_labels, deltas, gt_boxes)
    labels = torch.stack(gt_labels)
    positive = labels == 1
    assert (labels == -1).any() and positive.any()  # every anchor, none sampled away
    proposals = cat(rpn._decode_proposals(anchors, deltas), dim=1)[positive]
    flat = cat(logits, dim=1)
    ranking, sorting, box = expected_terms(
        flat.reshape(-1),
        labels.reshape(-1),
        proposals,
        torch.stack(gt_boxes)[positive],
        flat.detach()[positive].sigmoid(),
    )
    assert torch.allclose(losses["loss_rpn_rs_rank"], 0.2 * ranking)
    assert torch.allclose(losses["loss_rpn_rs_sort"], 0.2 * sorting)
    assert torch.allclose(losses["loss_rpn_rs_box"], 0.2 * box)


def test_mask_loss_is_the_weighted_dice_scaled_to_the_ranking_terms():
    g = torch.Generator().manual_seed(3)
    images = []
    for n in (3, 2):
        boxes = (
            torch.tensor([[4.0, 4.0, 40.0, 44.0]]).repeat(n, 1) + torch.rand(n, 4, generator=g) * 4
        )
        masks = torch.rand(n, 48, 48, generator=g) > 0.5
        inst = Instances(
            (48, 48),
            proposal_boxes=Boxes(boxes),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.randint(0, 3, (n,), generator=g),
            gt_masks=BitMasks(masks),
        )
        inst.rs_weight = torch.rand(n, generator=g)
        inst.rs_balance = torch.full((n,), 0.7)
        images.append(inst)
    logits = torch.randn(5, 3, 14, 14, generator=g, requires_grad=True)
    loss = rank_sort_mask_loss(logits, images)
    assert loss.item() == pytest.approx(0.7, rel=1e-6)

    classes = cat([i.gt_classes for i in images])
    target = (
        cat([i.gt_masks.crop_and_resize(i.proposal_boxes.tensor, 14) for i in images])
        .float()
        .flatten(1)
    )
    direct_logits = logits.detach().clone().requires_grad_()
    p = direct_logits[torch.arange(5), classes].sigmoid().flatten(1)
    dice = 2 * (p * target).sum(1) / ((p**2).sum(1) + (target**2).sum(1) + 1e-5)
    w = cat([i.rs_weight for i in images])
    direct = (w * (1 - dice)).sum() / w.sum()
    (direct * (0.7 / direct).detach()).backward()
    loss.backward()
    assert torch.allclose(logits.grad, direct_logits.grad, atol=1e-7)
    assert (logits.grad[torch.arange(5), classes] != 0).any()
    others = torch.ones(5, 3, dtype=torch.bool)
    others[torch.arange(5), classes] = False
    assert (logits.grad[others] == 0).all()  # only each proposal's own class mask


def test_mask_head_without_rank_sort_roi_heads_fails_clearly():
    inst = Instances(
        (48, 48),
        proposal_boxes=Boxes(torch.tensor([[1.0, 1.0, 20.0, 20.0]])),
        gt_classes=torch.tensor([0]),
        gt_masks=BitMasks(torch.ones(1, 48, 48, dtype=torch.bool)),
    )
    with pytest.raises(ValueError, match="RankSortROIHeads"):
        rank_sort_mask_loss(torch.randn(1, 3, 14, 14), [inst])


def test_mask_rcnn_trains_its_mask_head():
    model = rs_rcnn("rs_mask_rcnn_R_50_FPN_1x.yaml")
    assert isinstance(model.roi_heads.mask_head, RankSortMaskHead)
    with EventStorage():
        losses = model(batch())
    assert {"loss_mask", "loss_roi_rs_rank", "loss_roi_rs_sort", "loss_roi_rs_box"} <= set(losses)
    # Scaled to the box head's ranking terms.
    rank_sort = (losses["loss_roi_rs_rank"] + losses["loss_roi_rs_sort"]).item()
    assert losses["loss_mask"].item() == pytest.approx(rank_sort, rel=1e-5)


@pytest.mark.slow
def test_rs_atss_head_has_a_learnable_box_scale_per_level():
    model = rs_atss()
    head = model.head
    assert isinstance(head, ScaledBoxRetinaNetHead)
    assert torch.equal(head.box_scales.detach(), torch.ones(5))  # Scale(1.0) on P3-P7
    assert "head.box_scales" in model.state_dict()
    channels = model.backbone.output_shape()["p3"].channels
    features = [torch.randn(1, channels, 8 // 2**i + 1, 8 // 2**i + 1) for i in range(5)]
    _, unscaled = RetinaNetHead.forward(head, features)
    with torch.no_grad():
        head.box_scales[2] = 2.0
    _, scaled = head(features)
    assert torch.allclose(scaled[2], 2 * unscaled[2]) and torch.equal(scaled[0], unscaled[0])
    with EventStorage():
        losses = model(batch())
    losses["loss_rs_box"].backward()
    assert head.box_scales.grad is not None and head.box_scales.grad.abs().sum() > 0
    plain = rs_atss(**{"MODEL.RANK_SORT.LEARNED_BOX_SCALES": False})
    assert type(plain.head) is RetinaNetHead


def test_mask_head_trains_on_at_most_max_masks_positives():
    model = rs_rcnn("rs_mask_rcnn_R_50_FPN_1x.yaml")
    head = model.roi_heads.mask_head
    assert head.max_masks == 200
    head.max_masks = 3
    g = torch.Generator().manual_seed(0)
    images = [
        Instances(
            (48, 48),
            proposal_boxes=Boxes(torch.rand(n, 4, generator=g)),
            index=torch.arange(n) + 100 * i,
        )
        for i, n in enumerate((4, 0, 3))
    ]
    x = torch.arange(7.0)[:, None]  # row r: proposal r of the images in order
    kept_x, kept = head._subsample(x, images)
    assert len(kept_x) == 3 and sum(len(i) for i in kept) == 3
    rows = [int(r) for r in kept_x[:, 0]]
    expected = [[r for r in rows if r < 4], [], [r - 4 for r in rows if r >= 4]]
    assert [i.index.tolist() for i in kept] == [
        [100 * k + r for r in e] for k, e in enumerate(expected)
    ]
    head.max_masks = 0
    assert head._subsample(x, images)[0] is x
    with EventStorage():  # a training step still works with the cap
        head.max_masks = 1
        losses = model(batch())
    assert torch.isfinite(losses["loss_mask"])
