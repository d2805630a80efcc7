"""The private parts of Lightning and Detectron2 the project relies on are still there.

A release that renames one of them breaks the engine or a model silently or with an
obscure AttributeError deep in a run; these tests fail first, naming the attribute, the
project's module that uses it and the versions the project is tested with.
"""

import inspect

import pytest

LIGHTNING_RANGE = ">=2.6,<2.7"  # pyproject.toml's pin


def missing(owner, name, where, framework, version):
    return (
        f"{framework} {version}: {owner} has no {name!r}, which {where} relies on; this"
        f" project is tested with pytorch-lightning{LIGHTNING_RANGE} and Detectron2's"
        " pinned commit (alrp_d2/install_detectron2.py)"
    )


def test_lightning_version_is_the_tested_range():
    import pytorch_lightning as pl
    from packaging.specifiers import SpecifierSet

    assert pl.__version__ in SpecifierSet(LIGHTNING_RANGE), (
        f"pytorch-lightning {pl.__version__} is outside the tested range {LIGHTNING_RANGE}"
    )
    with open(__file__.replace("tests/test_framework_private_api.py", "pyproject.toml")) as f:
        assert f'"pytorch-lightning{LIGHTNING_RANGE}"' in f.read()


def test_lightning_trainer_internals():
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    version = pl.__version__
    # alrp_d2/engine/signals.py: stop all ranks at one step boundary after a signal.
    connector = getattr(trainer, "_signal_connector", None)
    assert connector is not None, missing(
        "Trainer", "_signal_connector", "alrp_d2/engine/signals.py", "pytorch-lightning", version
    )
    assert hasattr(connector, "received_sigterm"), missing(
        "Trainer._signal_connector",
        "received_sigterm",
        "alrp_d2/engine/signals.py",
        "pytorch-lightning",
        version,
    )
    # alrp_d2/engine/checkpoint.py: the whole training state, written by our own writer.
    checkpoints = getattr(trainer, "_checkpoint_connector", None)
    assert checkpoints is not None and hasattr(checkpoints, "dump_checkpoint"), missing(
        "Trainer",
        "_checkpoint_connector.dump_checkpoint",
        "alrp_d2/engine/checkpoint.py",
        "pytorch-lightning",
        version,
    )
    assert "weights_only" in inspect.signature(checkpoints.dump_checkpoint).parameters


# (module, class, name, kind, the project's module that relies on it); kind "method": an
# attribute of the class; "attribute": set on instances by the class's methods.
DETECTRON2_PRIVATE = [
    (
        "detectron2.evaluation",
        "COCOEvaluator",
        "_tasks_from_predictions",
        "method",
        "alrp_d2/evaluation/lrp_evaluator.py",
    ),
    *[
        (
            "detectron2.evaluation",
            "COCOEvaluator",
            name,
            "attribute",
            "alrp_d2/evaluation/lrp_evaluator.py",
        )
        for name in (
            "_coco_api",
            "_distributed",
            "_do_evaluation",
            "_metadata",
            "_output_dir",
            "_predictions",
            "_tasks",
            "_logger",
        )
    ],
    (
        "detectron2.modeling.meta_arch.dense_detector",
        "DenseDetector",
        "_transpose_dense_predictions",
        "method",
        "alrp_d2/modeling",
    ),
    (
        "detectron2.modeling.meta_arch.dense_detector",
        "DenseDetector",
        "_decode_per_level_predictions",
        "method",
        "alrp_d2/modeling/retinanet.py",
    ),
    (
        "detectron2.modeling.meta_arch.dense_detector",
        "DenseDetector",
        "_decode_multi_level_predictions",
        "method",
        "alrp_d2/modeling/retinanet.py",
    ),
    (
        "detectron2.modeling.meta_arch.retinanet",
        "RetinaNetHead",
        "_num_features",
        "attribute",
        "alrp_d2/modeling/retinanet.py",
    ),
    (
        "detectron2.modeling.meta_arch.fcos",
        "FCOSHead",
        "_num_features",
        "attribute",
        "alrp_d2/modeling/fcos.py",
    ),
    (
        "detectron2.modeling.proposal_generator.rpn",
        "RPN",
        "_decode_proposals",
        "method",
        "alrp_d2/modeling/rcnn.py",
    ),
    (
        "detectron2.modeling.proposal_generator.rpn",
        "RPN",
        "_subsample_labels",
        "method",
        "alrp_d2/modeling/rcnn.py",
    ),
    (
        "detectron2.modeling.roi_heads.roi_heads",
        "ROIHeads",
        "_sample_proposals",
        "method",
        "alrp_d2/modeling/rcnn.py",
    ),
    (
        "detectron2.modeling.roi_heads.roi_heads",
        "StandardROIHeads",
        "_init_box_head",
        "method",
        "alrp_d2/modeling/rcnn.py",
    ),
    (
        "detectron2.modeling.roi_heads.cascade_rcnn",
        "CascadeROIHeads",
        "_init_box_head",
        "method",
        "alrp_d2/modeling/cascade.py",
    ),
    (
        "detectron2.modeling.roi_heads.cascade_rcnn",
        "CascadeROIHeads",
        "_forward_box",
        "method",
        "alrp_d2/modeling/cascade.py",
    ),
    (
        "detectron2.modeling.roi_heads.cascade_rcnn",
        "CascadeROIHeads",
        "_run_stage",
        "method",
        "alrp_d2/modeling/cascade.py",
    ),
    (
        "detectron2.modeling.roi_heads.cascade_rcnn",
        "CascadeROIHeads",
        "_match_and_label_boxes",
        "method",
        "alrp_d2/modeling/cascade.py",
    ),
    (
        "detectron2.modeling.roi_heads.cascade_rcnn",
        "CascadeROIHeads",
        "_create_proposals_from_boxes",
        "method",
        "alrp_d2/modeling/cascade.py",
    ),
    (
        "detectron2.checkpoint",
        "DetectionCheckpointer",
        "_load_file",
        "method",
        "alrp_d2/weights.py",
    ),
    (
        "detectron2.checkpoint",
        "DetectionCheckpointer",
        "_torch_load",
        "method",
        "alrp_d2/weights.py",
    ),
    (
        "detectron2.checkpoint",
        "DetectionCheckpointer",
        "_load_model",
        "method",
        "alrp_d2/weights.py",
    ),
    (
        "detectron2.checkpoint",
        "DetectionCheckpointer",
        "_log_incompatible_keys",
        "method",
        "alrp_d2/weights.py",
    ),
]


@pytest.mark.detectron2
@pytest.mark.parametrize(
    "module,cls,name,kind,where",
    DETECTRON2_PRIVATE,
    ids=[f"{c}.{n}" for _, c, n, _, _ in DETECTRON2_PRIVATE],
)
def test_detectron2_private_api(module, cls, name, kind, where):
    import importlib

    import detectron2

    owner = getattr(importlib.import_module(module), cls)
    message = missing(cls, name, where, "detectron2", detectron2.__version__)
    if kind == "method":
        assert callable(getattr(owner, name, None)), message
    else:
        assert f"self.{name} =" in inspect.getsource(owner), message


def test_every_private_name_the_project_uses_is_listed():
    """A new use of a Detectron2 private name gets its line in DETECTRON2_PRIVATE."""
    pytest.importorskip("detectron2")
    import os
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alrp_d2")
    listed = {name for _, _, name, _, _ in DETECTRON2_PRIVATE}
    import detectron2.checkpoint
    import detectron2.evaluation
    import detectron2.modeling

    known = set()
    for base in (
        detectron2.evaluation.COCOEvaluator,
        detectron2.checkpoint.DetectionCheckpointer,
        detectron2.modeling.meta_arch.dense_detector.DenseDetector,
        detectron2.modeling.meta_arch.retinanet.RetinaNetHead,
        detectron2.modeling.meta_arch.fcos.FCOSHead,
        detectron2.modeling.proposal_generator.rpn.RPN,
        detectron2.modeling.roi_heads.roi_heads.StandardROIHeads,
        detectron2.modeling.roi_heads.cascade_rcnn.CascadeROIHeads,
    ):
        for klass in inspect.getmro(base):
            if not klass.__module__.startswith(("detectron2", "fvcore")):
                continue
            known |= {n for n in vars(klass) if re.fullmatch(r"_[a-z]\w*", n)}
            try:
                known |= set(re.findall(r"self\.(_[a-z]\w*)\s*=", inspect.getsource(klass)))
            except (OSError, TypeError):
                pass
    used = set()
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith(".py"):
                used |= set(re.findall(r"\.(_[a-z]\w*)\b", open(os.path.join(folder, file)).read()))
    unlisted = sorted((used & known) - listed)
    assert not unlisted, f"Detectron2 private names used but not checked: {unlisted}"
