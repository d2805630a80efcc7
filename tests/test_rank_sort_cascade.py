"""RS-Cascade R-CNN (RankSortCascadeROIHeads) trains and tests as the Rank & Sort authors'
RankBasedCascadeRoIHead: each stage's proposals (the previous stage's boxes of the RPN's
proposals, empty ones too, plus the ground truths), their labels by the stage's IoU, the
stages' loss weights, whole gradients into the features, test-time scores from the mean
logits; the keys the heads would ignore are refused; the RPN ignores the anchors crossing the
image (``allowed_border=0``) and matches the others only.

Every config training a step and inferring is tests/test_models.py.
"""

import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.modeling import build_model
    from detectron2.modeling.roi_heads import CascadeROIHeads
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
    from detectron2.structures import Boxes, Instances, pairwise_iou
    from detectron2.utils.events import EventStorage
    from runs import batch, tiny_cfg

    from alrp_d2.modeling import RankingFastRCNNOutputLayers, RankSortCascadeROIHeads

CONFIG = os.path.join(ROOT, "configs", "COCO-Detection", "rs_cascade_rcnn_R_50_FPN_1x.yaml")


def cascade(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(CONFIG, **overrides))
    assert isinstance(model.roi_heads, RankSortCascadeROIHeads)
    return model


def recorded_training_step(model):
    """One training step; per stage the proposals it trained on and its predictions."""
    stages = []
    run_stage = model.roi_heads._run_stage

    def recording(features, proposals, stage):
        predictions = run_stage(features, proposals, stage)
        stages.append((proposals, predictions))
        return predictions

    model.roi_heads._run_stage = recording
    model.train()
    inputs = batch()
    with EventStorage():
        losses = model(inputs)
    return inputs, stages, losses


def test_every_stage_trains_on_the_refined_rpn_proposals_and_the_ground_truths():
    model = cascade()
    heads = model.roi_heads
    inputs, stages, _ = recorded_training_step(model)
    assert len(stages) == 3
    targets = [x["instances"] for x in inputs]
    for stage, (proposals, predictions) in enumerate(stages):
        if stage > 0:
            previous, previous_predictions = stages[stage - 1]
            boxes = heads.box_predictor[stage - 1].predict_boxes(previous_predictions, previous)
        for image, (gts, props) in enumerate(zip(targets, proposals)):
            num_gt = len(gts)
            # the ground truths last, themselves
            assert torch.equal(props.proposal_boxes.tensor[-num_gt:], gts.gt_boxes.tensor)
            if stage > 0:
                # the previous stage's boxes of the RPN's proposals, clipped, none dropped
                expected = Boxes(boxes[image][: len(boxes[image]) - num_gt].detach().clone())
                expected.clip(props.image_size)
                assert len(props) == len(previous[image])
                assert torch.equal(props.proposal_boxes.tensor[:-num_gt], expected.tensor)
            # labels by this stage's IoU threshold: no ignored band, no low-quality match
            iou = pairwise_iou(gts.gt_boxes, props.proposal_boxes)
            best, index = iou.max(dim=0)
            positive = best >= heads.proposal_matchers[stage].thresholds[1]
            expected_classes = torch.where(positive, gts.gt_classes[index], heads.num_classes)
            assert torch.equal(props.gt_classes, expected_classes), stage
    thresholds = [m.thresholds[1] for m in heads.proposal_matchers]
    assert thresholds == pytest.approx([0.5, 0.6, 0.7])
    weights = [p.box2box_transform.weights for p in heads.box_predictor]
    assert weights == [(10.0, 10.0, 5.0, 5.0)] * 3
    assert all(isinstance(p, RankingFastRCNNOutputLayers) for p in heads.box_predictor)
    assert all(p.bbox_pred.out_features == 4 for p in heads.box_predictor)  # class-agnostic


def test_an_empty_regressed_box_stays_a_proposal():
    model = cascade()
    boxes = [torch.tensor([[5.0, 5.0, 5.0, 30.0], [-20.0, -20.0, -10.0, -10.0], [1, 2, 30, 40.0]])]
    model.train()
    proposals = model.roi_heads._create_proposals_from_boxes(boxes, [(96, 96)])
    assert len(proposals[0]) == 3  # Detectron2's drops the two empty ones in training
    assert proposals[0].proposal_boxes.tensor[1].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
def test_stage_losses_are_weighted_by_the_stage_loss_weights():
    _, _, ones = recorded_training_step(cascade())
    _, _, weighted = recorded_training_step(
        cascade(**{"MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS": (1.0, 0.5, 0.25)})
    )
    assert sorted(ones) == sorted(weighted)
    stage_names = [k for k in ones if "_stage" in k]
    assert len(stage_names) == 9  # rank, sort, box per stage
    for name in stage_names:
        weight = {"0": 1.0, "1": 0.5, "2": 0.25}[name[-1]]
        assert weighted[name].item() == pytest.approx(weight * ones[name].item(), rel=1e-6), name
    for name in set(ones) - set(stage_names):  # the RPN's
        assert weighted[name].item() == pytest.approx(ones[name].item(), rel=1e-6)


@pytest.mark.slow
def test_stage_gradients_reach_the_features_whole():
    model = cascade()
    heads = model.roi_heads.train()
    channels = model.backbone.output_shape()["p2"].channels
    features = {
        f: torch.randn(1, channels, 96 // s, 96 // s, requires_grad=True)
        for f, s in zip(("p2", "p3", "p4", "p5"), (4, 8, 16, 32))
    }
    proposal = Instances((96, 96), proposal_boxes=Boxes(torch.tensor([[8.0, 8.0, 60.0, 70.0]])))
    ordered = [features[f] for f in heads.box_in_features]
    for stage in range(3):
        ours = torch.autograd.grad(
            heads._run_stage(ordered, [proposal], stage)[0].sum(), ordered, allow_unused=True
        )
        pooled = heads.box_pooler(ordered, [proposal.proposal_boxes])
        direct = heads.box_predictor[stage](heads.box_head[stage](pooled))[0].sum()
        want = torch.autograd.grad(direct, ordered, allow_unused=True)
        detectron2s = torch.autograd.grad(
            CascadeROIHeads._run_stage(heads, ordered, [proposal], stage)[0].sum(),
            ordered,
            allow_unused=True,
        )
        for got, expected, scaled in zip(ours, want, detectron2s):
            if expected is None:
                continue
            assert torch.allclose(got, expected)
            assert torch.allclose(scaled, expected / 3)  # what Detectron2's cascade does


@pytest.mark.slow
def test_test_scores_are_the_sigmoid_of_the_stages_mean_logits():
    model = cascade(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    heads = model.roi_heads.eval()
    g = torch.Generator().manual_seed(1)
    channels = model.backbone.output_shape()["p2"].channels
    features = {
        f: torch.randn(1, channels, 96 // s, 96 // s, generator=g)
        for f, s in zip(("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64))
    }
    xy = torch.rand(12, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(12, 2, generator=g) * 40], 1)
    proposal = Instances((96, 96), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(12))
    with torch.no_grad():
        detections, _ = heads(None, features, [proposal])
        # the authors' simple_test written out with the heads' layers
        ordered = [features[f] for f in heads.box_in_features]
        rois, logits = Boxes(boxes.clone()), []
        for stage in range(3):
            pooled = heads.box_pooler(ordered, [rois])
            scores, deltas = heads.box_predictor[stage](heads.box_head[stage](pooled))
            logits.append(scores)
            decoded = heads.box_predictor[stage].box2box_transform.apply_deltas(deltas, rois.tensor)
            if stage < 2:
                rois = Boxes(decoded)
                rois.clip((96, 96))
        probs = (sum(logits) / 3).sigmoid()
        expected, _ = fast_rcnn_inference(
            [decoded], [probs], [(96, 96)], 0.0, 0.5, heads.box_predictor[0].test_topk_per_image
        )
    assert len(detections[0]) > 0
    assert torch.allclose(detections[0].scores, expected[0].scores)
    assert torch.equal(detections[0].pred_classes, expected[0].pred_classes)
    assert torch.allclose(detections[0].pred_boxes.tensor, expected[0].pred_boxes.tensor)
    # Detectron2's mean of the stages' probabilities would give other scores
    assert not torch.allclose(sum(s.sigmoid() for s in logits) / 3, probs)


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 256),
        ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.5),
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou"),
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0),
        ("MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 1.0),
        ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True),
        ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False),
        ("MODEL.MASK_ON", True),
        ("MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS", (1.0, 1.0)),
        ("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ((10.0, 10.0, 5.0, 5.0),)),
        ("MODEL.ROI_HEADS.IOU_THRESHOLDS", (0.4, 0.5)),
        ("MODEL.ROI_HEADS.IOU_THRESHOLDS", (0.6,)),
    ],
)
@pytest.mark.slow
def test_keys_the_cascade_would_ignore_are_refused_by_name(key, value):
    cfg = tiny_cfg(CONFIG)
    cfg.merge_from_list([key, value])
    if key == "MODEL.ROI_HEADS.IOU_THRESHOLDS" and len(value) == 2:
        cfg.MODEL.ROI_HEADS.IOU_LABELS = [0, -1, 1]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(cfg)


@pytest.mark.slow
def test_rpn_ignores_anchors_crossing_the_image_and_matches_the_others_only():
    model = cascade()
    rpn = model.proposal_generator
    assert rpn.anchor_boundary_thresh == 0
    gt = Instances((100, 100), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0]])))
    anchors = Boxes(
        torch.tensor(
            [
                [-2.0, -2.0, 40.0, 40.0],  # the ground truth's best (IoU 0.907), outside by 2 px
                [0.0, 0.0, 40.0, 60.0],  # inside, IoU 0.667: the best inside
                [50.0, 50.0, 90.0, 90.0],  # inside, IoU 0
                [60.0, 60.0, 101.0, 99.0],  # outside on the right
            ]
        )
    )
    labels, matched = rpn.label_and_sample_anchors([anchors], [gt])
    # the authors': anchors outside take no part; the best inside anchor is a low-quality
    # match (0.667 >= 0.3); Detectron2's legacy rule would leave it ignored (0.3 < IoU < 0.7)
    assert labels[0].tolist() == [-1, 1, 0, -1]
    assert torch.equal(matched[0][1], gt.gt_boxes.tensor[0])
    rpn.anchor_boundary_thresh = -1
    labels, _ = rpn.label_and_sample_anchors([anchors], [gt])
    assert labels[0].tolist() == [1, -1, 0, 0]
    rpn.anchor_boundary_thresh = 2  # anchors within 2 px of the image count as inside
    labels, _ = rpn.label_and_sample_anchors([anchors], [gt])
    assert labels[0].tolist() == [1, -1, 0, 0]
    empty = Instances((100, 100), gt_boxes=Boxes(torch.zeros(0, 4)))
    rpn.anchor_boundary_thresh = 0
    labels, _ = rpn.label_and_sample_anchors([anchors], [empty])
    assert labels[0].tolist() == [-1, 0, 0, -1]
