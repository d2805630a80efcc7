"""What the tests share: the project's paths, the tiny config, ``train_net.py`` as a user
runs it, the tiny training that several test modules read (``trained_run`` in
conftest.py), and the small model configs and inputs of the model tests (``tiny_cfg``,
``batch``)."""

import contextlib
import os
import types

import warm_start
from warm_start import ROOT

TINY = os.path.join(ROOT, "tests", "configs", "tiny_synthetic.yaml")
VAL = "alrp_synthetic_tiny_val"
EPOCH = 4  # iterations per epoch of the tiny config (32 images, batch 8)
# Two epochs, one evaluation (at the end: inference/<VAL>/lrp_thresholds.json and
# model_best.pth), an iteration line every 3 iterations, a learning rate still warming up
# (so that each line's lr is its own). A barely trained model scores every anchor about
# 0.01: SCORE_THRESH_TEST 0 keeps its 20 best detections per image.
# The batch and learning rate are asked for 2 processes (SOLVER.REFERENCE_WORLD_SIZE): one
# process trains 8 images at 0.002 with a warm-up of 8 iterations.
TRAINING = [
    "SOLVER.IMS_PER_BATCH",
    16,
    "SOLVER.REFERENCE_WORLD_SIZE",
    2,
    "SOLVER.MAX_EPOCHS",
    2,
    "TEST.EVAL_PERIOD",
    2,
    "SOLVER.LOG_PERIOD",
    3,
    "SOLVER.BASE_LR",
    0.004,
    "SOLVER.WARMUP_ITERS",
    4,
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    0.0,
    "TEST.DETECTIONS_PER_IMAGE",
    20,
]


def train_net(*args, env_root, timeout=300, fresh=False):
    """``python train_net.py ARGS`` in the repository root, its datasets under
    ``env_root``; the finished process (``returncode``, ``stdout``, ``stderr``). Started
    warm (tests/warm_start.py) unless ``fresh``."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(env_root), PYTHONWARNINGS="ignore")
    script = os.path.join(ROOT, "train_net.py")
    return warm_start.run([script, *args], cwd=ROOT, env=env, timeout=timeout, fresh=fresh)


def python_module(module, *args, env_root=None, timeout=300, cwd=ROOT):
    """``python -m MODULE ARGS`` in ``cwd`` (the repository root), as :func:`train_net`."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if env_root is not None:
        env["DETECTRON2_DATASETS"] = str(env_root)
    return warm_start.run(["-m", module, *args], cwd=cwd, env=env, timeout=timeout)


def tiny_training(base):
    """``train_net.py --logger csv`` of the tiny config (``TRAINING``) into ``base/out``,
    its data in ``base/data``: a namespace of its folders and console output."""
    from alrp_d2.data.synthetic import generate_split

    for split in ("tiny_train", "tiny_val"):
        generate_split(os.path.join(base / "data", "alrp_synthetic"), split)
    out = base / "out"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
        *TRAINING,
        "OUTPUT_DIR",
        out,
        env_root=base / "data",
        fresh=True,  # the one training of the suite that imports everything as a user's does
    )
    return types.SimpleNamespace(
        base=base, data=base / "data", out=out, done=done, console=done.stdout + done.stderr
    )


@contextlib.contextmanager
def synthetic_lvis_on(root):
    """The synthetic LVIS splits (``alrp_synthetic_lvis_*``) registered on ``root`` and
    written there, in place of a registration by an earlier test of the process (under
    ``datasets/``, where train_net, predict or export registered them), which is restored
    after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from alrp_d2.data.synthetic_lvis import register_synthetic_lvis

    def unregister():
        names = [n for n in DatasetCatalog.list() if n.startswith("alrp_synthetic_lvis_")]
        registered = {n: (DatasetCatalog[n], MetadataCatalog.get(n).as_dict()) for n in names}
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        return registered

    earlier = unregister()
    register_synthetic_lvis(str(root))
    DatasetCatalog.get("alrp_synthetic_lvis_tiny_val")  # writes the files
    try:
        yield
    finally:
        unregister()
        for name, (load, metadata) in earlier.items():
            DatasetCatalog.register(name, load)
            metadata.pop("name")
            MetadataCatalog.get(name).set(**metadata)


def tiny_cfg(path, narrow=True, **overrides):
    """The config at ``path`` for a model test on the CPU: no pretrained weights, BatchNorm
    on batch statistics, 3 classes, few proposals, small test images, and (``narrow``) a
    ResNet-50/101's channels a quarter of the config's (its blocks, groups, deformable
    convolutions and heads as configured); ``overrides`` as ``KEY=value`` pairs."""
    from alrp_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    # No pretrained weights here: batch statistics keep a random backbone's activations
    # (and so the initial box deltas) in a sane range.
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 128
    # Inference as training: few proposals; and few detections, each of which a Mask
    # R-CNN's mask head computes and pastes (5.3 s of a float32 inference at 100 per image).
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    if not narrow:
        return cfg
    resnet = cfg.MODEL.RESNETS
    if resnet.DEPTH >= 50:  # Detectron2 fixes R18/R34's widths
        # The X101-DCN RS-Mask R-CNN+'s float32 step took 12.4 s at full width on 2 cores
        # (mostly the deformable convolutions' backward and initialising 138M weights),
        # 3.9 s at a quarter.
        resnet.STEM_OUT_CHANNELS //= 4
        resnet.RES2_OUT_CHANNELS //= 4
        resnet.WIDTH_PER_GROUP = max(1, resnet.WIDTH_PER_GROUP // 4)
    # The FPN and the RoI heads at a quarter too, where at a width of the papers (256,
    # 1024; a small config's, as the quickstart's, kept: GroupNorm's 32 groups): a float64
    # RS Mask R-CNN's step took 4.0 s, inference of 20 detections 1.0 s, then 0.4 s and
    # 0.2 s (on a core).
    for node, key in (
        (cfg.MODEL.FPN, "OUT_CHANNELS"),
        (cfg.MODEL.ROI_BOX_HEAD, "FC_DIM"),
        (cfg.MODEL.ROI_BOX_HEAD, "CONV_DIM"),
        (cfg.MODEL.ROI_MASK_HEAD, "CONV_DIM"),
    ):
        if node[key] >= 256:
            node[key] //= 4
    return cfg


def batch(with_boxes=(True, True), size=96, seed=0):
    """Detectron2 training inputs of random square images, each with two boxes (classes 0
    and 2, an ellipse mask in each) or none (``with_boxes``)."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for has_boxes in with_boxes:
        image = torch.randint(0, 255, (3, size, size), generator=g).float()
        inst = Instances((size, size))
        if has_boxes:
            inst.gt_boxes = Boxes(
                torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]])
            )
            inst.gt_classes = torch.tensor([0, 2])
        else:
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_classes = torch.zeros(0, dtype=torch.int64)
        # An ellipse inside each box (Mask R-CNN's targets; the other models ignore them).
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        masks = []
        for x0, y0, x1, y1 in inst.gt_boxes.tensor.tolist():
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
        inst.gt_masks = BitMasks(
            torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
        )
        out.append({"image": image, "instances": inst, "height": size, "width": size})
    return out


def dense_predictions(model, inputs):
    """A dense detector's anchors, logits, anchor labels, deltas and box targets for
    ``inputs`` (training inputs)."""
    images = model.preprocess_image(inputs)
    features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
    predictions = model.head(features)
    pred_logits, pred_deltas = model._transpose_dense_predictions(
        predictions, [model.num_classes, 4]
    )
    anchors = model.anchor_generator(features)
    gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"] for x in inputs])
    return anchors, pred_logits, gt_labels, pred_deltas, gt_boxes


def lightning_trainer(root, **kwargs):
    """A bare Lightning ``Trainer`` on the CPU (no logger, checkpoint, progress bar or
    summary) under ``root``, for checks of the installed Lightning's behaviour."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )
