"""Detectron2's end-to-end model checks (upstream tests/modeling/test_model_e2e.py, written
anew for this project's models) on every COCO config: images without annotations in
training and inference, a batch of one empty and one annotated image, infinite or NaN
features and predictions at inference (dense heads, RPN and RoI heads), diverged (NaN)
weights, and autocast's dtypes (CUDA where present; CPU bfloat16 on a small model).

Models are the configs' networks at small inputs (tests/test_models.py ``tiny_cfg``). The
fast lane (``-m "not slow"``) takes one config per detector and loss, ``FAST``: every other
config (other backbones and sizes, the baselines, loss variants, a config added later) only
the full run."""

import copy
import glob
import itertools
import os
from contextlib import contextmanager

import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import ROOT

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.modeling import GeneralizedRCNN, build_model
    from detectron2.structures import BitMasks, Boxes, ImageList, Instances
    from detectron2.utils.events import EventStorage
    from runs import tiny_cfg

COCO = sorted(glob.glob(os.path.join(ROOT, "configs", "COCO-Detection", "*.yaml")))
# The fast lane's: a dense detector and an R-CNN (the full run takes every config: every
# head, assigner, test-time rule and ranking loss).
FAST = ("alrp_atss_R_50_FPN_500", "alrp_faster_rcnn_R_50_FPN")


def params(paths):
    names = [os.path.basename(p)[:-5] for p in paths]
    return [
        pytest.param(p, id=n, marks=[] if n in FAST else [pytest.mark.slow])
        for p, n in zip(paths, names)
    ]


EVERY = params(COCO)
SIZES = [(48, 64), (48, 63)]  # an odd width: the batch is padded


def model_of(path, **overrides):
    torch.manual_seed(43)
    return build_model(tiny_cfg(path, **overrides))


@pytest.fixture(scope="module", params=EVERY)
def built(request):
    """A COCO config's model as ``model_of`` builds it, and the random state it leaves,
    once per config: pytest runs the tests config by config (by this fixture's parameter),
    each on a copy (``model_copy``)."""
    model = model_of(request.param)
    return model, torch.get_rng_state()


def model_copy(built):
    """A copy of the built model, the random state as after its building."""
    model, state = built
    torch.set_rng_state(state)
    return copy.deepcopy(model)


def empty_instances(h, w):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(0, dtype=torch.int64)
    inst.gt_masks = BitMasks(torch.zeros(0, h, w, dtype=torch.bool))
    return inst


def annotated_instances(h, w):
    """Three objects: two of ordinary size and, as upstream's, one under a pixel wide."""
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(
        torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 70.0, 60.0], [0.2, 0.3, 0.9, 0.8]])
    )
    inst.gt_classes = torch.tensor([0, 2, 1])
    g = torch.Generator().manual_seed(0)
    inst.gt_masks = BitMasks(torch.rand(3, h, w, generator=g) > 0.5)
    return inst


def images(sizes, instances=None):
    g = torch.Generator().manual_seed(1)
    out = [{"image": torch.rand(3, h, w, generator=g) * 255} for h, w in sizes]
    for x, inst in zip(out, instances or []):
        x["instances"] = inst
    return out


def train_step(model, inputs):
    """One training forward and backward: the losses, all finite."""
    model.train()
    with EventStorage():
        losses = model(inputs)
        assert losses and all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
    return losses


def test_empty_data(built):
    model = model_copy(built)
    model.eval()
    with torch.no_grad():
        outputs = model(images(SIZES))
    assert [o["instances"].image_size for o in outputs] == SIZES
    train_step(model, images(SIZES, [empty_instances(*s) for s in SIZES]))


def test_half_empty_batch(built):
    model = model_copy(built)
    train_step(model, images(SIZES, [empty_instances(*SIZES[0]), annotated_instances(*SIZES[1])]))
    # The annotated image trains the boxes: some gradient reaches every box regressor.
    if isinstance(model, GeneralizedRCNN):
        box = model.roi_heads.box_predictor
        stages = box if isinstance(box, torch.nn.ModuleList) else [box]  # a cascade's stages
        regressors = [model.proposal_generator.rpn_head.anchor_deltas]
        regressors += [stage.bbox_pred for stage in stages]
    else:
        regressors = [model.head.bbox_pred]
    for layer in regressors:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def inf_tensor(*shape):
    return torch.full(shape, float("inf"))


def nan_tensor(*shape):
    return torch.full(shape, float("nan"))


def feature_shapes(model, size):
    """Per backbone feature the ``(1, C, H, W)`` of an image of ``size``."""
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, *size))
    return {k: tuple(v.shape) for k, v in features.items()}


@pytest.mark.parametrize("tensor", [inf_tensor, nan_tensor], ids=["inf", "nan"])
def test_inference_on_inf_nan_detects_nothing_finite(built, tensor):
    """Infinite or NaN features and predictions at inference: no finite detection and no
    error. A dense head keeps every score (threshold -1) of predictions all inf or NaN (the
    authors' test-time path clips its boxes before NMS); an R-CNN's RPN proposes only
    finite boxes and its RoI heads detect nothing on a proposal of such features."""
    model = model_copy(built).eval()
    size = (64, 64)
    shapes = feature_shapes(model, size)
    images_ = ImageList(tensor(1, 3, *size), [(62, 62)])
    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):
            features = {k: tensor(*s) for k, s in shapes.items()}
            proposal = Instances((62, 62))
            proposal.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
            proposal.objectness_logits = torch.tensor([1.0])
            proposals, _ = model.proposal_generator(images_, features)
            assert torch.isfinite(proposals[0].proposal_boxes.tensor).all()
            detections, _ = model.roi_heads(images_, features, [proposal])
            assert len(detections[0]) == 0
        else:
            model.test_score_thresh = -1.0
            features = [tensor(*shapes[f]) for f in model.head_in_features]
            predictions = [[tensor(*x.shape) for x in level] for level in model.head(features)]
            detections = model.forward_inference(images_, features, predictions)
            boxes = detections[0].pred_boxes.tensor
            assert torch.isfinite(boxes).all(dim=1).sum() == 0, boxes


def test_diverged_weights_detect_nothing(built):
    """A model whose weights went NaN (a diverged run) is evaluated: no detection, no error."""
    model = model_copy(built).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        outputs = model(images(SIZES))
    assert [len(o["instances"]) for o in outputs] == [0, 0]


@contextmanager
def dtype_hook(module, inputs, outputs):
    """Records the dtypes of every tensor ``module`` takes and returns."""

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (list, tuple)):
            return list(itertools.chain(*[tensors(t) for t in x]))
        if isinstance(x, dict):
            return tensors(list(x.values()))
        return []

    def hook(module, args, output):
        inputs.update(t.dtype for t in tensors(args))
        outputs.update(t.dtype for t in tensors(output))

    with module.register_forward_hook(hook):
        yield


AUTOCAST = [
    pytest.param(p.values[0], "cuda", torch.float16, id=f"cuda-{p.id}", marks=p.marks)
    for p in EVERY
]
AUTOCAST.append(
    pytest.param(
        os.path.join(ROOT, "configs", "quickstart", "alrp_retinanet_synthetic.yaml"),
        "cpu",
        torch.bfloat16,
        id="cpu-alrp_retinanet_synthetic",
    )
)


@pytest.mark.parametrize("path,device,dtype", AUTOCAST)
def test_autocast(path, device, dtype):
    """Under autocast the backbone takes float32 images and returns ``dtype`` features, the
    head computes in ``dtype``, boxes come out float32 (Detectron2's Boxes) and scores in
    the dtype of what makes them: ``dtype`` for sigmoids, float32 for the cross-entropy
    R-CNN's softmax."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    model = model_of(
        path,
        **{
            "MODEL.DEVICE": device,
            "MODEL.RETINANET.SCORE_THRESH_TEST": 0.0,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        },
    ).eval()
    rcnn = isinstance(model, GeneralizedRCNN)
    head = model.roi_heads.box_predictor if rcnn else model.head
    seen = {name: (set(), set()) for name in ("backbone", "head")}
    inputs = [{"image": torch.rand(3, 100, 100) * 255}]
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=dtype),
        dtype_hook(model.backbone, *seen["backbone"]),
        dtype_hook(head, *seen["head"]),
    ):
        if rcnn:
            out = model.inference(inputs, do_postprocess=False)[0]
        else:
            out = model(inputs)[0]["instances"]
    assert seen["backbone"] == ({torch.float32}, {dtype})
    assert seen["head"] == ({dtype}, {dtype})
    assert len(out) > 0
    assert out.pred_boxes.tensor.dtype == torch.float32
    softmax = rcnn and not model.roi_heads.box_predictor.use_sigmoid_ce
    assert out.scores.dtype == (torch.float32 if softmax else dtype)
    if out.has("pred_masks"):
        assert out.pred_masks.dtype == dtype
