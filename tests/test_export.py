"""Every model exports as Detectron2's do (alrp_d2.export, export_model.py's adapters):
TorchScript by tracing and by scripting, ONNX by tracing (with the optional ``onnx`` and
``onnxruntime``), each saved and loaded back, whose detections (boxes, scores, classes)
on validation images equal the eager model's.

The quickstart models are the tiny training's (conftest.py ``trained_run``: the aLRP
quickstart's network, smaller): its weights in the aLRP model as trained, in Rank & Sort's
RS-ATSS head (learned box scales, the authors' top-anchor candidates), in Detectron2's
focal-loss RetinaNet and, where the shapes allow, in the FCOS twin (its head's output
layers random). Tracing runs on a smaller image than those compared on, as upstream's
tests do: a trace must serve other sizes. The R-CNNs are their configs' heads on a small
backbone (ResNet-18, group norm: random weights whose scores are not all ties).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import HAS_DETECTRON2
from PIL import Image
from runs import ROOT

pytestmark = [
    pytest.mark.detectron2,
    # The tracer's and the ONNX exporter's notes on every data-dependent shape.
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.onnx"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx"),
]

if HAS_DETECTRON2:
    from detectron2.modeling import build_model
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    from alrp_d2 import export
    from alrp_d2.config import get_cfg

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
ONNX_MISSING = 'onnx or onnxruntime is missing (pip install -e ".[export]")'
COCO = os.path.join(ROOT, "configs", "COCO-Detection")


def load_matching(model, state):
    """Copies into ``model`` every tensor of ``state`` of the same name and shape; returns
    the names of ``model``'s state that kept their own values."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def quickstart(run, variant):
    cfg = get_cfg()
    cfg.merge_from_file(str(run.out / "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if variant == "rank_sort":
        cfg.MODEL.META_ARCHITECTURE = "RankSortRetinaNet"
        cfg.MODEL.RANK_SORT.LEARNED_BOX_SCALES = True
        cfg.MODEL.ALRP.TEST_CANDIDATES = "anchors"
    elif variant == "focal":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    elif variant == "fcos":
        cfg.MODEL.META_ARCHITECTURE = "RankingFCOS"
        cfg.MODEL.RANKING_LOSS.NAME = "ALRPHeadLoss"
    torch.manual_seed(0)
    model = build_model(cfg)
    state = torch.load(run.out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    kept = load_matching(model, state)
    assert not [k for k in kept if k.startswith("backbone.")], kept
    if variant == "rank_sort":
        assert kept == ["head.box_scales"]
        with torch.no_grad():
            model.head.box_scales.copy_(torch.linspace(0.8, 1.2, len(model.head.box_scales)))
    if variant == "fcos":
        # Its box distances are the (rectified) outputs of an untrained layer: the trained
        # backbone's features could give every box a side of 0, and nothing to compare.
        # Two strides from each side at the start, whatever the features.
        with torch.no_grad():
            model.head.bbox_pred.bias.fill_(2.0)
    return model.eval()


def rcnn(name):
    from runs import tiny_cfg

    cfg = tiny_cfg(
        os.path.join(COCO, name),
        **{
            "MODEL.RESNETS.DEPTH": 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
            "MODEL.RESNETS.NORM": "GN",
            "MODEL.FPN.NORM": "GN",
            "MODEL.FPN.OUT_CHANNELS": 64,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
            "TEST.DETECTIONS_PER_IMAGE": 20,
        },
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


MODELS = ["alrp", "rank_sort", "focal", "fcos", "faster_rcnn", "mask_rcnn", "ce_faster_rcnn"]
# Round trips left to the slow lane (each 5-15 s): the R-CNN with masks, Detectron2's own
# models (the focal RetinaNet, the cross-entropy R-CNN), the aLRP quickstart (the command's
# tests below trace it to TorchScript and ONNX; scripting RS-ATSS compiles its inference
# code) and FCOS by ONNX (traced in the fast lane, which exports the R-CNN and RS-ATSS).
SLOW = {
    "traced": {"alrp", "focal", "mask_rcnn", "ce_faster_rcnn"},
    "scripted": {"alrp", "focal", "mask_rcnn", "ce_faster_rcnn"},
    "onnx": {"alrp", "focal", "fcos", "mask_rcnn", "ce_faster_rcnn"},
}


def params(method):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW[method] else []) for n in MODELS]


@pytest.fixture(scope="module")
def models(trained_run):
    cache = {}

    def get(name):
        if name not in cache:
            if name == "faster_rcnn":
                cache[name] = rcnn("alrp_faster_rcnn_R_50_FPN.yaml")
            elif name == "mask_rcnn":
                cache[name] = rcnn("rs_mask_rcnn_R_50_FPN_1x.yaml")
            elif name == "ce_faster_rcnn":
                cache[name] = rcnn("ce_faster_rcnn_R_50_FPN.yaml")
            else:
                cache[name] = quickstart(trained_run, name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def images(trained_run):
    """Three validation images (BGR, ``(3, H, W)`` float) and a smaller one to trace on."""
    val = trained_run.data / "alrp_synthetic" / "tiny_val"
    full = [
        torch.as_tensor(
            np.asarray(Image.open(val / f"0000{i}.png").convert("RGB"))[:, :, ::-1]
            .astype("float32")
            .transpose(2, 0, 1)
        )
        for i in range(3)
    ]
    small = torch.nn.functional.interpolate(full[0][None], size=(96, 112), mode="bilinear")[0]
    return full, small


def eager_detections(model, image):
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


def as_detections(instances, image):
    """What a user gets from an exported model's raw output: resized to the input image, as
    export_model.py --run-eval does."""
    return detector_postprocess(instances, image.shape[1], image.shape[2])


def assert_same(exported, eager, rtol=1.3e-6, atol=1e-5):
    """The same detections (class, score and box within the tolerances), in the same order
    but among equal scores: detections of one score come in any order (a barely trained
    model ties many; the exported model's kernels, or torch's on another number of threads,
    order them otherwise)."""
    assert len(eager) > 0, "nothing detected: no comparison"
    assert len(exported) == len(eager)
    torch.testing.assert_close(exported.scores, eager.scores, rtol=rtol, atol=atol)
    unmatched = list(range(len(exported)))
    for i in range(len(eager)):
        close = [
            j
            for j in unmatched
            if exported.pred_classes[j] == eager.pred_classes[i]
            and torch.allclose(exported.scores[j], eager.scores[i], rtol=rtol, atol=atol)
            and torch.allclose(
                exported.pred_boxes.tensor[j], eager.pred_boxes.tensor[i], rtol=rtol, atol=atol
            )
        ]
        assert close, (
            f"eager detection {i} (class {int(eager.pred_classes[i])}, score "
            f"{float(eager.scores[i]):.6g}, box {eager.pred_boxes.tensor[i].tolist()}) "
            "has no exported match"
        )
        unmatched.remove(close[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", params("traced"))
def test_traced_torchscript_detects_as_the_eager_model(name, models, images, tmp_path):
    model = models(name)
    full, small = images
    adapter, traced = export.trace_model(model, small)
    torch.jit.save(traced, tmp_path / "model.ts")
    loaded = torch.jit.load(tmp_path / "model.ts")
    for image in full:
        with torch.no_grad():
            out = adapter.outputs_schema(loaded(image))[0]["instances"]
        assert_same(as_detections(out, image), eager_detections(model, image))


@pytest.mark.parametrize("name", params("scripted"))
def test_scripted_torchscript_detects_as_the_eager_model(name, models, images, tmp_path):
    model = models(name)
    full, _ = images
    torch.jit.save(export.script_model(model), tmp_path / "model.ts")
    loaded = torch.jit.load(tmp_path / "model.ts")
    for image in full:
        with torch.no_grad():
            fields = loaded([{"image": image}])[0]
        size = tuple(image.shape[1:])
        out = Instances(
            size,
            pred_boxes=Boxes(fields["pred_boxes"]),
            scores=fields["scores"],
            pred_classes=fields["pred_classes"],
        )
        assert_same(as_detections(out, image), eager_detections(model, image))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason=ONNX_MISSING)
@pytest.mark.parametrize("name", params("onnx"))
def test_onnx_detects_as_the_eager_model(name, models, images, tmp_path):
    import onnxruntime

    model = models(name)
    full, small = images
    adapter = export.tracing_adapter(model, small)
    names = export.write_onnx(model, small, str(tmp_path / "model.onnx"))
    assert names[-1] == "image_size" and {"pred_boxes", "scores", "pred_classes"} <= set(names)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == names
    with torch.no_grad():
        adapter(small)  # its outputs' schema
    for image in full:
        outputs = session.run(None, {"image": image.numpy()})
        out = adapter.outputs_schema([torch.from_numpy(o) for o in outputs])[0]["instances"]
        # ONNX Runtime's kernels round differently from torch's: boxes within 1e-3 pixel.
        assert_same(as_detections(out, image), eager_detections(model, image), rtol=1e-4, atol=1e-3)


def dcn():
    """The aLRP DCN config's detector (modulated deformable convolutions in res3-res5) on a
    ResNet-50 of group norm (the X-101's 64 groups cost the test time, not coverage)."""
    from runs import tiny_cfg

    cfg = tiny_cfg(
        os.path.join(COCO, "alrp_atss_X_101_64x4d_FPN_DCN_800.yaml"),
        narrow=False,  # group norm's 32 groups
        **{
            # Half the widths (a quarter of the FPN's), each a multiple of the 32 groups.
            "MODEL.RESNETS.NUM_GROUPS": 1,
            "MODEL.RESNETS.WIDTH_PER_GROUP": 32,
            "MODEL.RESNETS.STEM_OUT_CHANNELS": 32,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 128,
            "MODEL.RESNETS.NORM": "GN",
            "MODEL.FPN.NORM": "GN",
            "MODEL.FPN.OUT_CHANNELS": 64,
            "MODEL.RETINANET.NUM_CONVS": 1,
            "MODEL.RETINANET.SCORE_THRESH_TEST": 0.0,
            "TEST.DETECTIONS_PER_IMAGE": 20,
        },
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.slow  # torchvision's deformable convolution on the CPU: a minute
def test_deformable_convolutions_trace(images, tmp_path):
    from detectron2.layers import ModulatedDeformConv

    _, model = dcn()
    assert any(isinstance(m, ModulatedDeformConv) for m in model.modules())
    full, small = images
    adapter, traced = export.trace_model(model, small)
    torch.jit.save(traced, tmp_path / "model.ts")
    loaded = torch.jit.load(tmp_path / "model.ts")
    for image in full[:2]:
        with torch.no_grad():
            out = adapter.outputs_schema(loaded(image))[0]["instances"]
        assert_same(as_detections(out, image), eager_detections(model, image))


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        ["--export-method", "scripting"],
        pytest.param(
            ["--format", "onnx"], marks=pytest.mark.skipif(not HAS_ONNX, reason=ONNX_MISSING)
        ),
    ],
    ids=["scripting", "onnx"],
)
def test_command_refuses_deformable_convolutions_but_by_tracing(how, tmp_path, capsys):
    cfg, model = dcn()
    (tmp_path / "config.yaml").write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, tmp_path / "dcn.pth")
    out = tmp_path / "out"
    code = export.main(
        [
            "--config-file",
            str(tmp_path / "config.yaml"),
            "--weights",
            str(tmp_path / "dcn.pth"),
            "--output",
            str(out),
        ]
        + how
    )
    assert code == 2
    assert "deformable convolutions" in capsys.readouterr().err
    assert not out.exists()


# -- the command: python -m alrp_d2.export ---------------------------------------------------


def test_command_traces_the_trained_run(trained_run, models, images, tmp_path, capsys):
    """The tiny training's weights and config, traced by the command on a validation image:
    the saved model detects as the eager aLRP model on the others; the outputs are named."""
    val = trained_run.data / "alrp_synthetic" / "tiny_val"
    args = [
        "--config-file",
        trained_run.out / "config.yaml",
        "--output",
        tmp_path,
        "--weights",
        trained_run.out / "model_final.pth",
        "--sample-image",
        val / "00003.png",
    ]
    assert export.main([str(a) for a in args]) == 0
    assert "returns pred_boxes, pred_classes, scores, image_size" in capsys.readouterr().out
    loaded = torch.jit.load(tmp_path / "model.ts")
    model = models("alrp")
    full, _ = images
    adapter = export.tracing_adapter(model, full[0])
    with torch.no_grad():
        adapter(full[0])  # its outputs' schema
        for image in full:
            out = adapter.outputs_schema(loaded(image))[0]["instances"]
            assert_same(as_detections(out, image), eager_detections(model, image))
    # An existing model is kept without --overwrite.
    assert export.main([str(a) for a in args]) == 2
    assert "exists already; add --overwrite" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_ONNX, reason=ONNX_MISSING)
def test_command_exports_onnx_on_the_first_test_image(trained_run, models, images, tmp_path):
    """``python -m alrp_d2.export`` without --sample-image traces on DATASETS.TEST[0]'s first
    image (a process of its own: the datasets' root is registered once per process); ONNX
    Runtime runs the file by its outputs' names, detecting as the eager model."""
    import onnxruntime
    from runs import python_module

    done = python_module(
        "alrp_d2.export",
        "--config-file",
        trained_run.out / "config.yaml",
        "--weights",
        trained_run.out / "model_final.pth",
        "--output",
        tmp_path,
        "--format",
        "onnx",
        env_root=trained_run.data,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "returns pred_boxes, pred_classes, scores, image_size" in done.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    model = models("alrp")
    full, _ = images
    for image in full:
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()], session.run(None, {"image": image.numpy()})
            )
        )
        out = Instances(
            tuple(outputs["image_size"].tolist()),
            pred_boxes=Boxes(torch.from_numpy(outputs["pred_boxes"])),
            scores=torch.from_numpy(outputs["scores"]),
            pred_classes=torch.from_numpy(outputs["pred_classes"]),
        )
        assert_same(as_detections(out, image), eager_detections(model, image), rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def command_args(trained_run):
    return [
        "--config-file",
        str(trained_run.out / "config.yaml"),
        "--weights",
        str(trained_run.out / "model_final.pth"),
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--format", "onnx", "--export-method", "scripting"],
            "scripting exports TorchScript only",
        ),
        (["--weights", "missing.pth"], "weights file not found: missing.pth"),
        (["--sample-image", "missing.png"], "sample image not found: missing.png"),
        (["--export-method", "scripting", "MODEL.ALRP.NOT_A_KEY", "1"], "MODEL.ALRP.NOT_A_KEY"),
    ],
    ids=["onnx_by_scripting", "weights", "sample_image", "config_key"],
)
def test_command_refuses_bad_input_and_writes_nothing(
    extra, message, command_args, tmp_path, capsys
):
    out = tmp_path / "out"
    assert export.main(command_args + ["--output", str(out)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_command_without_onnx_names_the_extra(command_args, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnx" else real(name, *a),
    )
    assert export.main(command_args + ["--output", str(tmp_path / "out"), "--format", "onnx"]) == 2
    assert 'pip install -e ".[export]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
