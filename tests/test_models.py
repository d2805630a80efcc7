"""Detectron2 models trained by aLRP and Rank & Sort: every config trains a step and infers
(CPU, tiny)."""

import glob
import math
import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT, batch, dense_predictions, tiny_cfg

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.layers import cat
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes
    from detectron2.utils.events import EventStorage

    from alrp_d2.config import get_cfg
    from alrp_d2.losses import alrp_loss, localisation_error
    from alrp_d2.modeling import ALRPRetinaNet, atss_match, classwise_targets

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
MODEL_CONFIGS = [c for c in CONFIGS if os.sep + "COCO-Detection" + os.sep in c]


def branch_parameters(model):
    """(classification, box) output layers of the model's heads."""
    if hasattr(model, "head"):
        return [(model.head.cls_score.weight, model.head.bbox_pred.weight)]
    rpn = model.proposal_generator.rpn_head
    box = model.roi_heads.box_predictor
    stages = box if isinstance(box, torch.nn.ModuleList) else [box]  # a cascade: every stage
    pairs = [(rpn.objectness_logits.weight, rpn.anchor_deltas.weight)]
    pairs += [(stage.cls_score.weight, stage.bbox_pred.weight) for stage in stages]
    if getattr(model.roi_heads, "mask_on", False):
        mask = model.roi_heads.mask_head.predictor.weight
        pairs.append((mask, mask))
    return pairs


# Every config under configs/ builds: tests/test_golden_steps.py builds each (as tiny_cfg
# here) and trains it a step; test_config_trains_one_step_and_infers every COCO config.
def test_there_are_the_coco_configs():
    assert len(MODEL_CONFIGS) >= 15


# The fast lane trains a step of an R-CNN and of RS-ATSS here; tests/test_golden_steps.py
# trains the quickstart RetinaNets, FCOS and FoveaBox there, tests/test_rank_sort_cascade.py
# the cascade. The full run takes every config.
FAST_STEPS = ("rs_atss_R_50_FPN_1x", "alrp_faster_rcnn_R_50_FPN")
STEP_CONFIGS = [
    pytest.param(
        c,
        id=os.path.basename(c),
        marks=[] if os.path.basename(c)[:-5] in FAST_STEPS else [pytest.mark.slow],
    )
    for c in MODEL_CONFIGS
]


@pytest.mark.parametrize("path", STEP_CONFIGS)
def test_config_trains_one_step_and_infers(path):
    torch.manual_seed(0)
    cfg = tiny_cfg(path)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for cls_param, box_param in branch_parameters(model):
        assert cls_param.grad is not None and cls_param.grad.abs().sum() > 0
        assert box_param.grad is not None and box_param.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in batch()])
    assert len(outputs) == 2 and all("instances" in o for o in outputs)
    for o in outputs:
        inst = o["instances"]
        assert inst.pred_boxes.tensor.shape[1] == 4 and len(inst.scores) == len(inst.pred_classes)


def alrp_config():
    return tiny_cfg(
        os.path.join(ROOT, "configs", "COCO-Detection", "alrp_retinanet_R_50_FPN_500_giou.yaml")
    )


def test_retinanet_loss_equals_direct_alrp_call():
    torch.manual_seed(0)
    model = build_model(alrp_config())
    assert isinstance(model, ALRPRetinaNet)
    inputs = batch()
    with EventStorage():
        anchors, logits, labels, deltas, boxes = dense_predictions(model, inputs)
        losses = model.losses(anchors, logits, labels, deltas, boxes)
    stacked = torch.stack(labels)
    positive = (stacked >= 0) & (stacked < 3)
    flat_targets = classwise_targets(stacked, 3).reshape(-1)
    anchor_boxes = Boxes.cat(anchors).tensor.expand(len(inputs), -1, -1)[positive]
    pred = model.box2box_transform.apply_deltas(cat(deltas, dim=1)[positive], anchor_boxes)
    errors = localisation_error(pred, torch.stack(boxes)[positive], "giou", 0.5)
    cls, loc = alrp_loss(cat(logits, dim=1).reshape(-1), flat_targets, errors)
    assert torch.allclose(losses["loss_alrp_cls"], cls)
    assert torch.allclose(losses["loss_alrp_loc"], loc * 50.0)
    # One row per anchor-class pair; ignored anchors are -1 on every class.
    assert (flat_targets == 1).sum() == positive.sum()
    assert torch.equal((classwise_targets(stacked, 3) == -1).all(-1), stacked == -1)


@pytest.mark.slow
def test_ignored_anchors_get_no_gradient():
    torch.manual_seed(0)
    model = build_model(alrp_config())
    with EventStorage():
        anchors, logits, labels, deltas, boxes = dense_predictions(model, batch())
        leaves = [x.detach().requires_grad_() for x in logits]
        losses = model.losses(anchors, leaves, labels, deltas, boxes)
    losses["loss_alrp_cls"].backward()
    grad = torch.cat([x.grad for x in leaves], dim=1)
    ignored = torch.stack(labels) == -1
    assert ignored.any()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any()


@pytest.mark.slow
def test_images_without_boxes():
    torch.manual_seed(0)
    model = build_model(alrp_config())
    with EventStorage():
        mixed = model(batch(with_boxes=(True, False)))
        assert all(torch.isfinite(v) for v in mixed.values())
        empty = model(batch(with_boxes=(False, False)))
    assert empty["loss_alrp_cls"].item() == 0 and empty["loss_alrp_loc"].item() == 0
    sum(empty.values()).backward()  # connected graph: no error, zero gradients
    assert model.head.cls_score.weight.grad is not None
    assert model.head.cls_score.weight.grad.abs().sum() == 0


def test_self_balance_weight_is_a_saved_buffer_and_logged():
    model = build_model(alrp_config())
    state = model.state_dict()
    assert state["self_balance.weight"].item() == 50.0
    model.self_balance.set_weight(12.5)
    assert model.state_dict()["self_balance.weight"].item() == 12.5
    with EventStorage() as storage:
        model(batch())
        history = storage.histories()
    for key in ("alrp/num_pos", "alrp/num_relevant_neg", "alrp/cls", "alrp/loc", "alrp/sb_weight"):
        assert key in history, key
    assert history["alrp/sb_weight"].latest() == 12.5
    cls, loc = model.self_balance.last_losses
    assert cls.item() == pytest.approx(history["alrp/cls"].latest())


def test_atss_on_hand_made_anchors():
    # Level 0: 4x4 anchors of size 8 on a stride-8 grid; level 1: 2x2 anchors of size 16.
    def grid(stride, size, n):
        c = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        return Boxes(
            torch.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], -1).reshape(
                -1, 4
            )
        )

    levels = [grid(8, 8, 4), grid(16, 16, 2)]
    gt = Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    matched, labels = atss_match(levels, gt, topk=2)
    # Candidates: two of the four 8-px anchors nearest the centre (IoU 1/4 each), the
    # 16-px anchor on the ground truth (IoU 1) and its neighbour (IoU 0). Threshold:
    # mean 0.375 + unbiased std 0.433 = 0.808, so only the 16-px anchor (index 16) is positive.
    assert torch.nonzero(labels).flatten().tolist() == [16]
    assert matched[16] == 0
    # No ground truth: everything negative.
    _, none = atss_match(levels, Boxes(torch.zeros(0, 4)), topk=2)
    assert none.sum() == 0


def test_atss_assigns_each_anchor_to_its_best_ground_truth():
    anchors = [
        Boxes(
            torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [50.0, 50.0, 60.0, 60.0]])
        )
    ]
    gts = Boxes(torch.tensor([[0.0, 0.0, 12.0, 12.0], [4.0, 4.0, 15.0, 15.0]]))
    matched, labels = atss_match(anchors, gts, topk=3)
    assert labels.tolist() == [1, 1, 0]
    assert matched.tolist()[:2] == [0, 1]


def test_unknown_config_key_fails_with_its_name(tmp_path):
    cfg = get_cfg()
    with pytest.raises((KeyError, AssertionError), match="MODEL.ALRP.NOT_A_KEY"):
        cfg.merge_from_list(["MODEL.ALRP.NOT_A_KEY", 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  ALRP:\n    DELTAA: 0.5\n")
    with pytest.raises(KeyError, match="MODEL.ALRP.DELTAA"):
        get_cfg().merge_from_file(str(bad))


@pytest.mark.slow
def test_bad_assigner_and_loc_error_fail_clearly():
    with pytest.raises(ValueError, match="ASSIGNER"):
        build_model(
            tiny_cfg(
                CONFIGS[0],
                **{"MODEL.META_ARCHITECTURE": "ALRPRetinaNet", "MODEL.ALRP.ASSIGNER": "nope"},
            )
        )
    model = build_model(alrp_config().clone())
    model.head_loss.loc_error = "l1"
    with EventStorage(), pytest.raises(ValueError, match="localisation error"):
        model(batch())


GENERIC = {  # the names of before -> (the one class of their family, the loss they fix)
    "ALRPRetinaNet": ("MODEL.META_ARCHITECTURE", "RankingRetinaNet", "ALRPHeadLoss"),
    "APLossRetinaNet": ("MODEL.META_ARCHITECTURE", "RankingRetinaNet", "APHeadLoss"),
    "RankSortRetinaNet": ("MODEL.META_ARCHITECTURE", "RankingRetinaNet", "RankSortHeadLoss"),
    "ALRPROIHeads": ("MODEL.ROI_HEADS.NAME", "RankingROIHeads", "ALRPHeadLoss"),
    "RankSortROIHeads": ("MODEL.ROI_HEADS.NAME", "RankingROIHeads", "RankSortHeadLoss"),
}


def _config_of(alias):
    names = {
        "ALRPRetinaNet": "alrp_atss_R_50_FPN_500.yaml",
        "APLossRetinaNet": "aploss_retinanet_R_50_FPN_500.yaml",
        "RankSortRetinaNet": "rs_atss_R_50_FPN_1x.yaml",
        "ALRPROIHeads": "alrp_faster_rcnn_R_50_FPN.yaml",
        "RankSortROIHeads": "rs_faster_rcnn_R_50_FPN_1x.yaml",
    }
    return os.path.join(ROOT, "configs", "COCO-Detection", names[alias])


def _step(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    torch.manual_seed(1)
    with EventStorage():
        losses = model(batch())
    return model, {k: float(v) for k, v in losses.items()}


@pytest.mark.parametrize(
    "alias",
    [a if a == "ALRPRetinaNet" else pytest.param(a, marks=pytest.mark.slow) for a in GENERIC],
)
def test_the_generic_class_with_a_loss_by_config_is_the_alias(alias):
    """RankingRetinaNet / RankingROIHeads + MODEL.RANKING_LOSS.NAME train as the names of
    before, which stay registered; the RPN follows MODEL.PROPOSAL_GENERATOR.NAME."""
    key, generic, loss = GENERIC[alias]
    by_alias = tiny_cfg(_config_of(alias))
    by_config = tiny_cfg(_config_of(alias), **{key: generic, "MODEL.RANKING_LOSS.NAME": loss})
    if key == "MODEL.ROI_HEADS.NAME":
        by_config.MODEL.PROPOSAL_GENERATOR.NAME = "RankingRPN"
    model_a, losses_a = _step(by_alias)
    model_b, losses_b = _step(by_config)
    assert type(model_a).__name__ != type(model_b).__name__ or key != "MODEL.META_ARCHITECTURE"
    assert losses_a == losses_b
    assert model_a.state_dict().keys() == model_b.state_dict().keys()


@pytest.mark.slow
def test_the_loss_choice_is_checked_by_name():
    path = _config_of("ALRPRetinaNet")
    with pytest.raises(
        ValueError, match="MODEL.RANKING_LOSS.NAME 'RankSortHeadLoss' contradicts ALRPRetinaNet"
    ):
        build_model(tiny_cfg(path, **{"MODEL.RANKING_LOSS.NAME": "RankSortHeadLoss"}))
    with pytest.raises(ValueError, match="RankingRetinaNet needs MODEL.RANKING_LOSS.NAME, one of"):
        build_model(tiny_cfg(path, **{"MODEL.META_ARCHITECTURE": "RankingRetinaNet"}))
    with pytest.raises(ValueError, match="must be one of .*got 'focal'"):
        build_model(
            tiny_cfg(
                path,
                **{
                    "MODEL.META_ARCHITECTURE": "RankingRetinaNet",
                    "MODEL.RANKING_LOSS.NAME": "focal",
                },
            )
        )
    rcnn = _config_of("ALRPROIHeads")
    with pytest.raises(ValueError, match="AP Loss trains dense .* not the rpn head"):
        build_model(
            tiny_cfg(
                rcnn,
                **{
                    "MODEL.PROPOSAL_GENERATOR.NAME": "RankingRPN",
                    "MODEL.RANKING_LOSS.NAME": "APHeadLoss",
                    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
                },
            )
        )


@pytest.mark.slow
def test_the_readmes_new_loss_trains_a_detector():
    """The README's "add a loss" example, as written there, trains RankingRetinaNet."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("*A loss*") : text.index("*A detector*")]
    code = section[section.index("```python") + len("```python") : section.index("```\n\nthen")]
    from alrp_d2.modeling import HEAD_LOSS_REGISTRY

    if "NDCGHeadLoss" not in HEAD_LOSS_REGISTRY:
        exec(compile(code, "README.md", "exec"), {})
    cfg = tiny_cfg(
        os.path.join(ROOT, "configs", "quickstart", "alrp_retinanet_synthetic.yaml"),
        **{
            "MODEL.META_ARCHITECTURE": "RankingRetinaNet",
            "MODEL.RANKING_LOSS.NAME": "NDCGHeadLoss",
        },
    )
    model, losses = _step(cfg)
    assert sorted(losses) == ["loss_ndcg_box", "loss_ndcg_cls"]
    assert all(math.isfinite(v) for v in losses.values())


def test_the_ranking_scope_key_and_its_alias():
    from alrp_d2.modeling.head_losses import configured_scope

    path = _config_of("RankSortRetinaNet")
    assert configured_scope(tiny_cfg(path)) == "process"
    for key in ("MODEL.RANKING_LOSS.RANKING_SCOPE", "MODEL.ALRP.RANKING_SCOPE"):
        assert build_model(tiny_cfg(path, **{key: "global"})).head_loss.ranking_scope == "global"
    with pytest.raises(
        ValueError, match="MODEL.RANKING_LOSS.RANKING_SCOPE 'process' and its alias"
    ):
        configured_scope(
            tiny_cfg(
                path,
                **{
                    "MODEL.RANKING_LOSS.RANKING_SCOPE": "process",
                    "MODEL.ALRP.RANKING_SCOPE": "global",
                },
            )
        )
