"""Export a trained model for deployment: TorchScript (by tracing or scripting) or ONNX.

    python -m alrp_d2.export --config-file C --weights W --output DIR
        [--format torchscript|onnx] [--export-method tracing|scripting]
        [--sample-image IMAGE] [--device cpu|cuda] [KEY VALUE ...]

What Detectron2's ``tools/deploy/export_model.py`` does, for this project's configs, which
that script cannot read (it knows neither the ``MODEL.ALRP``/``RANK_SORT``/``RANKING_LOSS``
keys nor the models; nor is it installed with Detectron2). The same adapters: an R-CNN
exports ``model.inference(inputs, do_postprocess=False)`` (boxes in the resized image's
frame, masks per box), every other model its ``forward`` (boxes in the input image's frame).
``DIR`` receives ``model.ts`` or ``model.onnx``.

- ``tracing`` (default): records one run on a sample image (``--sample-image``, resized as
  ``DefaultPredictor`` does; by default the first image of ``DATASETS.TEST[0]``). The
  model takes one ``(3, H, W)`` float image, the config's colour format, ``0..255``, and
  returns flat tensors, printed in order (e.g. ``pred_boxes``, ``pred_classes``, ``scores``,
  ``image_size``); ``TracingAdapter(model, inputs, fn).outputs_schema`` turns them back into
  ``Instances``. ONNX needs the ``onnx`` package (``pip install -e ".[export]"``).
- ``scripting``: TorchScript only, no sample image; the model takes a list of
  ``{"image": tensor}`` and returns, per image, the fields of its ``Instances``.

A model with deformable convolutions (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) exports by
TorchScript tracing only. Bad input (missing files, weights of another model, ONNX by
scripting, ``onnx`` missing, a deformable model by scripting or to ONNX) stops before
anything is written, with a message naming the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .cli import UsageError, add_config_file, add_overrides, run_command

__all__ = [
    "FORMATS",
    "METHODS",
    "ONNX_OPSET",
    "ExportError",
    "exported_inference",
    "main",
    "output_names",
    "sample_input",
    "script_model",
    "trace_model",
    "tracing_adapter",
    "write_onnx",
]

FORMATS = ("torchscript", "onnx")
METHODS = ("tracing", "scripting")
# Detectron2's tested ONNX opset (detectron2.export.STABLE_ONNX_OPSET_VERSION) is 11;
# RoIAlign's half-pixel alignment, which Detectron2's R-CNNs use, needs 16.
ONNX_OPSET = 16
# The Instances fields an exported model may return (export_model.py's).
SCRIPTED_FIELDS = (
    "proposal_boxes",
    "objectness_logits",
    "pred_boxes",
    "scores",
    "pred_classes",
    "pred_masks",
    "pred_keypoints",
    "pred_keypoint_heatmaps",
)


class ExportError(UsageError):
    """A problem with the command's input, named for the user (exit status 2)."""


def exported_inference(model: nn.Module):
    """What export_model.py exports of ``model``: for an R-CNN a function of ``(model,
    inputs)`` returning ``[{"instances": ...}]`` before the resize to the input's
    ``height``/``width`` (so masks stay per box); None (the model's ``forward``) otherwise."""
    from detectron2.modeling import GeneralizedRCNN

    if not isinstance(model, GeneralizedRCNN):
        return None

    def inference(model, inputs):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    return inference


def tracing_adapter(model: nn.Module, image: Tensor):
    """Detectron2's ``TracingAdapter`` of the evaluating ``model`` on one ``(3, H, W)``
    image: a module of flat tensors, whose ``outputs_schema`` rebuilds the ``Instances``."""
    from detectron2.export import TracingAdapter

    model.eval()
    return TracingAdapter(model, [{"image": image}], exported_inference(model)).eval()


def trace_model(model: nn.Module, image: Tensor):
    """``(adapter, traced)``: ``model`` traced by TorchScript on ``image``."""
    adapter = tracing_adapter(model, image)
    with torch.no_grad():
        return adapter, torch.jit.trace(adapter, (image,))


def output_names(schema) -> List[str]:
    """The names of a traced model's flat outputs, in order (for one image: its fields by
    name, then ``image_size``)."""
    from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema

    def names(node, name):
        if isinstance(node, DictSchema):
            inner = [n for key, child in zip(node.keys, node.schemas) for n in names(child, key)]
            return inner + (["image_size"] if isinstance(node, InstancesSchema) else [])
        if isinstance(node, ListSchema):
            return [n for child in node.schemas for n in names(child, name)]
        return [name]

    found = names(schema, "output")
    if len(set(found)) < len(found):  # several images: number them
        return [f"output{i}" for i in range(len(found))]
    return found


def write_onnx(model: nn.Module, image: Tensor, f) -> List[str]:
    """``model`` traced on ``image`` into ONNX (file or path ``f``): input ``image`` of any
    height and width; returns the outputs' names."""
    adapter = tracing_adapter(model, image)
    with torch.no_grad():
        adapter(image)  # fills outputs_schema
        names = output_names(adapter.outputs_schema)
        # The TorchScript-based exporter, deliberately (its deprecation note silenced): the
        # dynamo exporter, torch's default, cannot follow Detectron2's data-dependent shapes
        # (score thresholds, NMS).
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "You are using the legacy TorchScript-based ONNX", DeprecationWarning
            )
            torch.onnx.export(
                adapter,
                (image,),
                f,
                opset_version=ONNX_OPSET,
                dynamo=False,
                input_names=["image"],
                output_names=names,
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
    model.eval()  # the exporter restores the adapter's mode into the model
    return names


def script_model(model: nn.Module):
    """``model`` scripted by TorchScript (Detectron2's ``scripting_with_instances``) behind
    export_model.py's adapter: takes a list of ``{"image": tensor}``, returns per image the
    fields of its ``Instances`` before any resize."""
    from detectron2.export import scripting_with_instances
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.structures import Boxes

    fields = {name: Tensor for name in SCRIPTED_FIELDS}
    fields["proposal_boxes"] = fields["pred_boxes"] = Boxes
    model.eval()

    # Returns dicts, not Instances: a scripted Instances class cannot be loaded back
    # (pytorch/pytorch#46944).
    if isinstance(model, GeneralizedRCNN):

        class ScriptableAdapter(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
                instances = self.model.inference(inputs, do_postprocess=False)
                return [i.get_fields() for i in instances]

    else:

        class ScriptableAdapter(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, inputs: Tuple[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
                instances = self.model(inputs)
                return [i.get_fields() for i in instances]

    return scripting_with_instances(ScriptableAdapter().eval(), fields)


def _deformable(model: nn.Module) -> bool:
    from detectron2.layers import DeformConv, ModulatedDeformConv

    return any(isinstance(m, (DeformConv, ModulatedDeformConv)) for m in model.modules())


def sample_input(cfg, path: str) -> Tensor:
    """The image at ``path`` as the model sees it from ``DefaultPredictor``: the config's
    colour format, resized by ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``, ``(3, H, W)`` float."""
    import detectron2.data.transforms as T
    from detectron2.data.detection_utils import read_image

    try:
        original = read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as err:
        raise ExportError(f"cannot read image {path}: {err}") from None
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(original).apply_image(original)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def _first_test_image(cfg) -> str:
    from detectron2.data import DatasetCatalog

    from .data.register import datasets_from_env, register_coco_datasets
    from .data.synthetic import register_synthetic

    register_synthetic()
    try:
        register_coco_datasets(datasets_from_env())
    except ValueError as err:
        raise ExportError(str(err)) from None
    if not cfg.DATASETS.TEST:
        raise ExportError(
            "tracing needs a sample image: give --sample-image (the config has no"
            " DATASETS.TEST to take one from)"
        )
    name = cfg.DATASETS.TEST[0]
    try:
        records = DatasetCatalog.get(name)
    except Exception as err:
        raise ExportError(
            f"tracing needs a sample image: give --sample-image (the test dataset"
            f" {name} cannot be read: {err})"
        ) from None
    if not records:
        raise ExportError(f"tracing needs a sample image: give --sample-image ({name} is empty)")
    return records[0]["file_name"]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alrp_d2.export", description=__doc__.split("\n")[0]
    )
    add_config_file(parser, "the model's config (e.g. OUTPUT_DIR/config.yaml)")
    parser.add_argument(
        "--weights",
        default=None,
        help="trained weights (.pth, .pkl, .ckpt; default: MODEL.WEIGHTS)",
    )
    parser.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--export-method", choices=METHODS, default="tracing")
    parser.add_argument(
        "--sample-image",
        default=None,
        help="image to trace on (default: the first of DATASETS.TEST[0])",
    )
    parser.add_argument("--device", default="cpu", help="device the model runs on when exported")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    add_overrides(parser)
    return parser


def run(args) -> int:
    from .io import atomic_write
    from .predict import Predictor, _setup_cfg

    if args.export_method == "scripting" and args.format != "torchscript":
        raise ExportError(
            f"scripting exports TorchScript only: use --export-method tracing for {args.format}"
        )
    if args.format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ExportError(
            'ONNX export needs the onnx package: pip install -e ".[export]" (or pip install onnx)'
        )
    if args.sample_image is not None and not os.path.isfile(args.sample_image):
        raise ExportError(f"sample image not found: {args.sample_image}")
    cfg = _setup_cfg(args)
    weights = args.weights or cfg.MODEL.WEIGHTS
    if not weights:
        raise ExportError("no weights to export: give --weights (or MODEL.WEIGHTS)")
    if not os.path.isfile(weights):
        raise ExportError(f"weights file not found: {weights}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ExportError(f"--output {args.output} is a file, not a folder")
    path = os.path.join(args.output, "model.onnx" if args.format == "onnx" else "model.ts")
    if os.path.exists(path) and not args.overwrite:
        raise ExportError(f"{path} exists already; add --overwrite to replace it")
    model = Predictor(cfg, weights).model
    model.eval()
    if (args.export_method, args.format) != ("tracing", "torchscript") and _deformable(model):
        raise ExportError(
            "the model has deformable convolutions (MODEL.RESNETS.DEFORM_ON_PER_STAGE): they"
            " export by TorchScript tracing only (TorchScript cannot script them, and torch's"
            " ONNX exporter has no operator for torchvision's deform_conv2d); use"
            " --export-method tracing --format torchscript"
        )
    image = None
    if args.export_method == "tracing":
        image = sample_input(cfg, args.sample_image or _first_test_image(cfg))

    # Written whole or not at all: an export that fails leaves no partial model.
    if args.export_method == "scripting":
        scripted = script_model(model)
        with atomic_write(path, "wb") as f:
            torch.jit.save(scripted, f)
        print(
            f"{type(model).__name__} scripted -> {path}: takes [{{'image': (3, H, W)"
            " tensor}, ...], returns per image the fields of its Instances"
        )
        return 0
    image = image.to(cfg.MODEL.DEVICE)
    if args.format == "onnx":
        with atomic_write(path, "wb") as f:
            names = write_onnx(model, image, f)
    else:
        adapter, traced = trace_model(model, image)
        with atomic_write(path, "wb") as f:
            torch.jit.save(traced, f)
        names = output_names(adapter.outputs_schema)
    print(
        f"{type(model).__name__} traced on a {tuple(image.shape)} image -> {path}: takes one"
        f" (3, H, W) {cfg.INPUT.FORMAT} image, returns {', '.join(names)}"
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, argument_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
