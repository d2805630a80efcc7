"""RankingFoveaBox: its targets, losses (focal, AP, aLRP), gradients and test-time detections
equal the aLRP authors' FoveaBox heads (tests/reference_fovea.py) on fixed head outputs and
ground truths; the fovea by hand; the keys it refuses; exported (TorchScript scripted and
traced, ONNX) it detects as the eager model."""

import math
import os

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, ImageList, Instances
    from detectron2.utils.events import EventStorage
    from reference_fovea import ref_fovea_detections, ref_fovea_losses, ref_targets

    from alrp_d2.config import get_cfg
    from alrp_d2.modeling.foveabox import decode_distances, fovea_targets, location_centres

COCO = os.path.join(ROOT, "configs", "COCO-Detection")
KINDS = {
    "focal": "focal_foveabox_R_50_FPN_500.yaml",
    "ap": "aploss_foveabox_R_50_FPN_500.yaml",
    "alrp": "alrp_foveabox_R_50_FPN_500.yaml",
}
NUM_CLASSES, SIZE = 3, 384
STRIDES = [8, 16, 32, 64, 128]


def model_of(kind, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(COCO, KINDS[kind]))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.RESNETS.DEPTH = 18  # the backbone takes no part in these tests
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    torch.manual_seed(0)
    return build_model(cfg)


def ground_truth():
    """Three images: overlapping objects (the smaller wins), objects on two levels, a thin
    one whose distance to its side is clamped to 1/16 base edge, a long one clamped to 16,
    a small one on P3 only, and an empty image. Sizes all differ (no tie to break)."""
    boxes = [
        torch.tensor(
            [
                [21.3, 30.9, 119.1, 108.5],
                [100.2, 90.7, 261.5, 300.1],
                [300.6, 40.1, 314.2, 54.9],
                [110.4, 101.3, 249.8, 291.1],
                [11.1, 150.2, 13.1, 370.7],
            ]
        ),
        torch.tensor(
            [[3.7, 1.9, 380.2, 377.6], [50.3, 200.8, 90.1, 330.4], [200.3, 1.1, 206.9, 382.4]]
        ),
        torch.zeros(0, 4),
    ]
    classes = [torch.tensor([0, 2, 1, 1, 2]), torch.tensor([1, 0, 2]), torch.zeros(0).long()]
    instances = []
    for b, c in zip(boxes, classes):
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes, inst.gt_classes = Boxes(b), c
        instances.append(inst)
    return boxes, classes, instances


def head_outputs(seed=3, num_images=3):
    g = torch.Generator().manual_seed(seed)
    sizes = [SIZE // s for s in STRIDES]
    cls_out = [
        (torch.randn(num_images, NUM_CLASSES, n, n, generator=g) * 2 - 3).double().requires_grad_()
        for n in sizes
    ]
    box_out = [
        (torch.randn(num_images, 4, n, n, generator=g) * 0.5 + 1).double().requires_grad_()
        for n in sizes
    ]
    features = [torch.zeros(num_images, 1, n, n) for n in sizes]
    return cls_out, box_out, features


def level_major(per_image, sizes):
    """(N, R, ...) rows in (image, level, location) order to (level, image, location)."""
    out, start = [], 0
    for h, w in sizes:
        out.append(per_image[:, start : start + h * w].reshape(-1, *per_image.shape[2:]))
        start += h * w
    return torch.cat(out)


def test_targets_equal_the_authors():
    model = model_of("alrp")
    boxes, classes, instances = ground_truth()
    sizes = [(SIZE // s, SIZE // s) for s in STRIDES]
    centres = location_centres(sizes, model.strides, torch.float32, torch.device("cpu"))
    labels, distances = model.label_locations(sizes, centres, instances)
    ours_labels = level_major(torch.stack(labels), sizes)
    ours_log = level_major(torch.stack(distances), sizes).log()
    ref_labels, ref_log = ref_targets(
        boxes,
        classes,
        sizes,
        STRIDES,
        model.base_edges,
        model.scale_ranges,
        model.sigma,
        NUM_CLASSES,
    )
    assert torch.equal(ours_labels, ref_labels)
    positive = ref_labels < NUM_CLASSES
    torch.testing.assert_close(ours_log[positive], ref_log[positive], rtol=0, atol=1e-6)
    # The cases are there: positives on every level, both clamps.
    per_level = [int(p.sum()) for p in positive.split([3 * h * w for h, w in sizes])]
    assert all(per_level), per_level
    assert (ref_log[positive] == math.log(1 / 16)).any()
    assert (ref_log[positive] == math.log(16)).any()


def test_the_fovea_by_hand():
    # One 8-stride level of 8 x 8 cells (centres at 4, 12, ..., 60), base edge 16.
    sizes, strides = [(8, 8)], [8]
    centres = location_centres(sizes, strides, torch.float32, torch.device("cpu"))

    def targets(boxes, sigma=0.5, ranges=((1, 64),)):
        return fovea_targets(
            torch.tensor(boxes),
            torch.arange(len(boxes)),
            centres,
            sizes,
            strides,
            [16.0],
            ranges,
            sigma,
            5,
        )

    # A 32 x 16 box at (8, 16): sigma 0.5 keeps x in [16, 32], y in [20, 28]: the cells of
    # centres x 20, 28 (columns 2, 3) and y 20, 28 (rows 2, 3).
    labels, distances = targets([[8.0, 16.0, 40.0, 32.0]])
    grid = labels.reshape(8, 8)
    assert (grid != 5).nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    # Row 2, column 3: centre (28, 20): distances (20, 4, 12, 12) / 16.
    assert distances.reshape(8, 8, 4)[2, 3].tolist() == [20 / 16, 4 / 16, 12 / 16, 12 / 16]
    assert (distances[labels == 5] == 1).all()
    # A smaller box inside it takes the cells they share (label 1 over label 0).
    labels, _ = targets([[8.0, 16.0, 40.0, 32.0], [20.0, 16.0, 36.0, 32.0]])
    assert labels.reshape(8, 8)[2:4, 2:4].tolist() == [[0, 1], [0, 1]]
    # Outside the scale range: no positive; sqrt(area) 22.6 here.
    labels, _ = targets([[8.0, 16.0, 40.0, 32.0]], ranges=((30, 64),))
    assert (labels == 5).all()
    # No ground truth.
    labels, distances = fovea_targets(
        torch.zeros(0, 4),
        torch.zeros(0).long(),
        centres,
        sizes,
        strides,
        [16.0],
        ((1, 64),),
        0.5,
        5,
    )
    assert (labels == 5).all() and (distances == 1).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_losses_and_gradients_equal_the_authors_head(kind):
    model = model_of(kind)
    model.train()
    boxes, classes, instances = ground_truth()
    cls_out, box_out, features = head_outputs()
    with EventStorage():
        losses = model.forward_training(None, features, [cls_out, box_out], instances)
    ref, _ = ref_fovea_losses(
        kind,
        cls_out,
        box_out,
        boxes,
        classes,
        STRIDES,
        model.base_edges,
        model.scale_ranges,
        model.sigma,
    )
    names = {
        "focal": {"cls": "loss_focal_cls", "box": "loss_box_reg"},
        "ap": {"cls": "loss_ap_cls", "box": "loss_box_reg"},
        "alrp": {"cls": "loss_alrp_cls", "loc": "loss_alrp_loc"},
    }[kind]
    assert sorted(losses) == sorted(names.values())
    for term, name in names.items():
        assert losses[name].item() == pytest.approx(ref[term].item(), rel=1e-5), term
        for params in (cls_out, box_out):
            got = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
            want = torch.autograd.grad(ref[term], params, retain_graph=True, allow_unused=True)
            for x, y in zip(got, want):
                if y is None or not y.abs().max() > 0:
                    assert x is None or not x.abs().max() > 0, term
                    continue
                assert (x - y).abs().max().item() <= 1e-5 * y.abs().max().item(), term


def test_detections_equal_the_authors():
    model = model_of("alrp").eval()
    assert model.test_candidates == "anchors"
    cls_out, box_out, features = head_outputs(seed=5, num_images=2)
    cls_out, box_out = [c.detach().float() for c in cls_out], [b.detach().float() for b in box_out]
    image_sizes = [(380, 370), (300, 384)]
    images = ImageList(torch.zeros(2, 3, SIZE, SIZE), image_sizes)
    with torch.no_grad():
        results = model.forward_inference(images, features, [cls_out, box_out])
        for index, result in enumerate(results):
            boxes, scores, classes = ref_fovea_detections(
                cls_out, box_out, index, image_sizes[index], STRIDES, model.base_edges
            )
            assert len(result) == 100 == len(scores)  # more than 100 after NMS: the cap acted
            assert torch.equal(result.pred_classes, classes)
            torch.testing.assert_close(result.scores, scores, rtol=0, atol=0)
            torch.testing.assert_close(result.pred_boxes.tensor, boxes)


def test_test_candidates_pairs_and_anchors():
    # One level of 6 locations, 3 classes; the authors keep the top 3 locations by their
    # best class, then their classes above 0.05; Detectron2 the top 3 pairs above 0.05.
    model = model_of("alrp").eval()
    scores = torch.tensor(
        [
            [0.90, 0.80, 0.01],
            [0.04, 0.03, 0.02],
            [0.30, 0.00, 0.00],
            [0.06, 0.07, 0.08],
            [0.00, 0.00, 0.01],
            [0.00, 0.50, 0.00],
        ]
    )
    centres = location_centres([(2, 3)], [8], torch.float32, torch.device("cpu"))[0]
    deltas = torch.zeros(6, 4)
    model.test_topk_candidates = 3
    out = model._decode_level(centres, 16.0, scores, deltas, (100, 100))
    assert sorted(out.scores.tolist()) == pytest.approx([0.3, 0.5, 0.8, 0.9])
    # Location 5 (centre (20, 12)) of base edge 16, distances 1: clipped to the image.
    assert out.pred_boxes.tensor[out.scores == 0.5].tolist() == [[4.0, 0.0, 36.0, 28.0]]
    model.test_candidates = "pairs"
    out = model._decode_level(centres, 16.0, scores, deltas, (100, 100))
    assert sorted(out.scores.tolist()) == pytest.approx([0.5, 0.8, 0.9])


@pytest.mark.parametrize(
    "loss", ["ALRPHeadLoss", "APHeadLoss", "FocalHeadLoss", "RankSortHeadLoss"]
)
def test_every_head_loss_trains_it_by_config(loss):
    """The loss is the config's: each of the registry's dense-head losses trains both
    branches of the quickstart twin's network."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from runs import batch, tiny_cfg

    cfg = tiny_cfg(
        os.path.join(ROOT, "configs", "quickstart", "alrp_fovea_synthetic.yaml"),
        **{"MODEL.RANKING_LOSS.NAME": loss},
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage():
        losses = model(batch())
    prefix = {
        "ALRPHeadLoss": "loss_alrp_",
        "APHeadLoss": "loss_ap_",
        "FocalHeadLoss": "loss_focal_",
        "RankSortHeadLoss": "loss_rs_",
    }[loss]
    assert any(k.startswith(prefix) for k in losses), sorted(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for layer in (model.head.cls_score, model.head.bbox_pred):
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_far_predictions_decode_finite_with_finite_gradients():
    deltas = torch.tensor(
        [[1000.0, 0.0, 1000.0, 0.0], [0.0, -1000.0, 0.5, 2.0]], requires_grad=True
    )
    boxes = decode_distances(
        torch.tensor([[4.0, 4.0], [12.0, 4.0]]), torch.tensor([16.0, 16.0]), deltas
    )
    assert torch.isfinite(boxes).all()
    assert boxes[0, 2].item() == pytest.approx(4 + 16 * 1e6, rel=1e-6)  # held at 1e6 edges
    boxes.sum().backward()
    assert torch.isfinite(deltas.grad).all() and deltas.grad[0, 0] == 0


def test_focal_loss_of_images_without_objects():
    """The focal loss is divided by the positives plus the images: finite without objects."""
    model = model_of("focal")
    model.train()
    cls_out, box_out, features = head_outputs(num_images=2)
    empty = [
        Instances((SIZE, SIZE), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0).long())
        for _ in range(2)
    ]
    with EventStorage():
        losses = model.forward_training(None, features, [cls_out, box_out], empty)
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1) for c in cls_out])
    p = logits.sigmoid()
    expected = (-(1 - 0.4) * p**1.5 * torch.log1p(-p)).sum() / 2
    assert losses["loss_focal_cls"].item() == pytest.approx(expected.item(), rel=1e-9)
    assert losses["loss_box_reg"].item() == 0


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "MODEL.FOVEABOX.BASE_EDGES",
            "(16, 32, 64, 128)",
            "BASE_EDGES .4 values. and SCALE_RANGES .5. need one entry per level",
        ),
        ("MODEL.FOVEABOX.BASE_EDGES", "(16, 32, 0, 128, 256)", "BASE_EDGES must be positive"),
        (
            "MODEL.FOVEABOX.SCALE_RANGES",
            "((1, 64), (32, 128), (256, 64), (128, 512), (256, 2048))",
            "SCALE_RANGES must be .lower, upper. pairs",
        ),
        ("MODEL.FOVEABOX.SIGMA", "0.0", "SIGMA must be in"),
        ("MODEL.FOVEABOX.SIGMA", "1.5", "SIGMA must be in"),
        ("MODEL.ALRP.TEST_CANDIDATES", "all", "TEST_CANDIDATES must be"),
        ("MODEL.ALRP.ASSIGNER", "atss", "not MODEL.ALRP.ASSIGNER 'atss'"),
        ("MODEL.RANK_SORT.LEARNED_BOX_SCALES", "True", "LEARNED_BOX_SCALES is RetinaNet's"),
        ("MODEL.RETINANET.NUM_CONVS", "0", "NUM_CONVS must be at least 1"),
        ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou", "BBOX_REG_LOSS_TYPE must be 'smooth_l1'"),
        ("MODEL.RANKING_LOSS.RANKING_SCOPE", "global", "FocalHeadLoss ranks nothing"),
        ("MODEL.RANKING_LOSS.NAME", "", "RankingFoveaBox needs MODEL.RANKING_LOSS.NAME"),
    ],
    ids=lambda x: x if isinstance(x, str) and x.startswith("MODEL") else None,
)
def test_bad_keys_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=message):
        model_of("focal", **{key: value})


def test_focal_head_loss_trains_dense_heads_only():
    from alrp_d2.modeling import FocalHeadLoss

    with pytest.raises(ValueError, match="FocalHeadLoss trains dense .* not the rpn head"):
        FocalHeadLoss.config_kwargs(get_cfg(), "rpn")


@pytest.mark.slow
@pytest.mark.parametrize("candidates", ["anchors", "pairs"])
def test_scripted_model_detects_as_the_eager_model(candidates):
    from typing import Dict, List, Tuple

    from detectron2.export import scripting_with_instances
    from torch import Tensor, nn

    model = model_of(
        "alrp",
        **{
            "MODEL.ALRP.TEST_CANDIDATES": candidates,
            "MODEL.RETINANET.SCORE_THRESH_TEST": "0.0",
            "TEST.DETECTIONS_PER_IMAGE": "30",
        },
    ).eval()

    class Adapter(nn.Module):  # dicts out: a scripted Instances cannot be returned
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
            return [i.get_fields() for i in self.model(inputs)]

    scripted = scripting_with_instances(
        Adapter().eval(), {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
    )
    image = torch.rand(3, 96, 112, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        fields = scripted([{"image": image}])[0]
        eager = model([{"image": image}])[0]["instances"]
    assert len(eager) == 30
    assert torch.equal(fields["pred_classes"], eager.pred_classes)
    torch.testing.assert_close(fields["scores"], eager.scores)
    torch.testing.assert_close(fields["pred_boxes"], eager.pred_boxes.tensor)


def small_model(candidates):
    return model_of(
        "alrp",
        **{
            "MODEL.ALRP.TEST_CANDIDATES": candidates,
            "MODEL.RETINANET.SCORE_THRESH_TEST": "0.0",
            "MODEL.RETINANET.TOPK_CANDIDATES_TEST": "100",
            "TEST.DETECTIONS_PER_IMAGE": "30",
        },
    ).eval()


def assert_detects_as(instances, eager, image, rtol=1.3e-6, atol=1e-5):
    from detectron2.modeling.postprocessing import detector_postprocess

    out = detector_postprocess(instances, image.shape[1], image.shape[2])
    assert len(eager) == 30 and len(out) == len(eager)
    assert torch.equal(out.pred_classes, eager.pred_classes)
    torch.testing.assert_close(out.scores, eager.scores, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.pred_boxes.tensor, eager.pred_boxes.tensor, rtol=rtol, atol=atol)


def images_to_export():
    """A small image to trace on and larger ones to compare on: a trace must serve other
    sizes (the locations of each level and how many of them are candidates)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(3, 64, 80, generator=g) * 255,
        [torch.rand(3, h, w, generator=g) * 255 for h, w in ((128, 160), (96, 112))],
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("candidates", ["anchors", "pairs"])
def test_traced_model_detects_as_the_eager_model(candidates, tmp_path):
    from alrp_d2 import export

    model = small_model(candidates)
    small, images = images_to_export()
    adapter, traced = export.trace_model(model, small)
    torch.jit.save(traced, tmp_path / "model.ts")
    loaded = torch.jit.load(tmp_path / "model.ts")
    for image in images:
        with torch.no_grad():
            out = adapter.outputs_schema(loaded(image))[0]["instances"]
            eager = model([{"image": image}])[0]["instances"]
        assert_detects_as(out, eager, image)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:torch.onnx")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx")
def test_onnx_detects_as_the_eager_model(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason='pip install -e ".[export]"')
    pytest.importorskip("onnx", reason='pip install -e ".[export]"')
    from alrp_d2 import export

    model = small_model("anchors")
    small, images = images_to_export()
    adapter = export.tracing_adapter(model, small)
    export.write_onnx(model, small, str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    with torch.no_grad():
        adapter(small)  # its outputs' schema
        for image in images:
            outputs = [torch.from_numpy(o) for o in session.run(None, {"image": image.numpy()})]
            out = adapter.outputs_schema(outputs)[0]["instances"]
            eager = model([{"image": image}])[0]["instances"]
            # ONNX Runtime's kernels round differently from torch's: within 1e-3 pixel
            assert_detects_as(out, eager, image, rtol=1e-4, atol=1e-3)
