"""Detections of a trained model on images: pictures and COCO-format json.

    python -m alrp_d2.predict --config-file C --weights W --input IMAGES... --output DIR

For every input image (files, folders of images, or glob patterns) ``DIR`` receives a
picture of its detections drawn by Detectron2's ``Visualizer`` (``<name>.png``, or
``.jpg`` for a JPEG input) and ``DIR/predictions.json`` lists every kept detection in
COCO's results format (``image_id`` counts the inputs from 1, ``file_name`` names the
image, ``bbox`` is ``[x, y, width, height]``, ``category_id`` the dataset's id when the
thresholds file gives it).

Which detections are kept: per class, those scored at least the class's LRP-optimal
threshold (``--lrp-thresholds``, the ``lrp_thresholds.json`` that training writes under
``OUTPUT_DIR/inference/<dataset>/``; by default the one beside the weights or in their
folder's ``inference/*/``, when there is exactly one). A class whose optimal LRP keeps no
detection (threshold ``null``) shows none. Without a thresholds file, or with
``--score-threshold`` given, one threshold for every class.

Nothing is written over an existing file without ``--overwrite``; bad input (a missing or
unreadable image, a weights file of another model, a malformed thresholds file) stops
before anything is written, with a message naming the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Predictor", "find_lrp_thresholds", "load_lrp_thresholds", "main"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class PredictError(Exception):
    """Bad input to the command line: its message names the problem."""


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image paths from files, folders (their images, sorted) and glob patterns."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise PredictError(f"no images in folder {item}")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item) and glob.glob(item):
            paths += sorted(glob.glob(item))
        else:
            raise PredictError(f"input image not found: {item}")
    return paths


def find_lrp_thresholds(weights: str) -> Optional[str]:
    """The ``lrp_thresholds.json`` beside ``weights``, or the only one under their folder's
    ``inference/*/``; None if there is none (or several of the latter)."""
    folder = os.path.dirname(os.path.abspath(weights))
    beside = os.path.join(folder, "lrp_thresholds.json")
    if os.path.isfile(beside):
        return beside
    found = glob.glob(os.path.join(folder, "inference", "*", "lrp_thresholds.json"))
    return found[0] if len(found) == 1 else None


def load_lrp_thresholds(path: str) -> Dict[int, Dict]:
    """``{dataset category id: {"name", "threshold", ...}}`` from an ``lrp_thresholds.json``
    (:class:`alrp_d2.evaluation.LRPEvaluator`); ``threshold`` is None where the optimum
    keeps no detection."""
    try:
        with open(path) as f:
            table = json.load(f)
        out = {int(k): dict(v) for k, v in table.items()}
        for cid, row in out.items():
            t = row["threshold"]
            if t is not None and not isinstance(t, (int, float)):
                raise ValueError(f"class {cid}: threshold {t!r} is not a number")
    except OSError as err:
        raise PredictError(f"cannot read the LRP thresholds {path}: {err.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PredictError(f"{path} is not an lrp_thresholds.json (per class id: name, threshold): {err}") from None
    return out


class Predictor:
    """Detectron2's ``DefaultPredictor`` (resize, colour format, inference) with weights
    loaded strictly: a file of another model (missing parameters, other shapes) raises
    :class:`PredictError` instead of a warning. Takes ``.pth``/``.pkl`` and this project's
    Lightning ``.ckpt`` files."""

    def __init__(self, cfg, weights: str):
        from detectron2.engine import DefaultPredictor

        from .engine.checkpoint import WeightsCheckpointer

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""
        cfg.freeze()
        self._predictor = DefaultPredictor(cfg)  # builds the model; loads nothing
        self.model = self._predictor.model
        checkpointer = WeightsCheckpointer(self.model)
        try:
            checkpoint = checkpointer._load_file(weights)
        except Exception as err:
            raise PredictError(f"cannot read the weights {weights}: {err}") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise PredictError(f"{weights} holds no model weights")
        incompatible = checkpointer._load_model(checkpoint)
        problems = list(incompatible.missing_keys) + [k for k, *_ in incompatible.incorrect_shapes]
        if problems:
            raise PredictError(f"{weights} holds the weights of another model than the config's"
                               f" ({cfg.MODEL.META_ARCHITECTURE}): {len(problems)} parameters missing or of"
                               f" another shape, e.g. {', '.join(problems[:3])}")

    def __call__(self, image_bgr: np.ndarray):
        """The model's ``Instances`` for one BGR image, on the CPU."""
        return self._predictor(image_bgr)["instances"].to("cpu")


def keep_above_thresholds(instances, thresholds: Optional[Dict[int, Optional[float]]], default: float):
    """The detections scored at least their class's threshold (``thresholds``: contiguous
    class index -> threshold, None: keep none of the class; classes not in it and every
    class when ``thresholds`` is None: ``default``)."""
    import torch

    scores, classes = instances.scores, instances.pred_classes
    limit = torch.full_like(scores, float(default))
    if thresholds is not None:
        for index, t in thresholds.items():
            limit[classes == index] = math.inf if t is None else float(t)
    return instances[scores >= limit]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alrp_d2.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the config the model was trained with")
    parser.add_argument("--weights", required=True, help="model_final.pth, model_best.pth or a .ckpt")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or glob patterns")
    parser.add_argument("--output", required=True, help="folder for the pictures and predictions.json")
    parser.add_argument("--lrp-thresholds", default=None,
                        help="per-class LRP-optimal thresholds (default: the lrp_thresholds.json of the weights' run)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="one score threshold for every class instead (default 0.5 without thresholds file)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the pictures relative to the images")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset the config names (as train_net.py --dataset)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def _setup_cfg(args):
    import torch

    from .config import get_cfg

    if not os.path.isfile(args.config_file):
        raise PredictError(f"config file not found: {args.config_file}")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except Exception as err:
        raise PredictError(f"bad config: {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError("--device cuda, but no CUDA device is available")
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


def _class_names(cfg, table: Optional[Dict[int, Dict]], num_classes: int) -> List[str]:
    if table:
        return [table[c]["name"] for c in sorted(table)]
    from detectron2.data import MetadataCatalog

    for name in cfg.DATASETS.TEST:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return [f"class {i}" for i in range(num_classes)]


def run(args) -> int:
    from detectron2.data.detection_utils import read_image
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.utils.visualizer import Visualizer

    from .data.register import register_coco_datasets
    from .data.synthetic import register_synthetic

    register_synthetic()
    try:
        register_coco_datasets(args.dataset)
    except ValueError as err:
        raise PredictError(str(err)) from None
    if args.scale <= 0:
        raise PredictError(f"--scale must be positive, got {args.scale}")
    cfg = _setup_cfg(args)
    if not os.path.isfile(args.weights):
        raise PredictError(f"weights file not found: {args.weights}")
    images = expand_inputs(args.input)
    # Read every image before writing anything.
    arrays = []
    for path in images:
        try:
            arrays.append(read_image(path, format="BGR"))
        except Exception as err:
            raise PredictError(f"cannot read image {path}: {err}") from None
    outputs = []
    for path in images:
        stem, ext = os.path.splitext(os.path.basename(path))
        outputs.append(os.path.join(args.output, stem + (".jpg" if ext.lower() in (".jpg", ".jpeg") else ".png")))
    if len(set(outputs)) < len(outputs):
        raise PredictError("two input images have the same name; their pictures would overwrite each other")
    json_path = os.path.join(args.output, "predictions.json")
    existing = [p for p in outputs + [json_path] if os.path.exists(p)]
    if existing and not args.overwrite:
        raise PredictError(f"{len(existing)} output files exist already (e.g. {existing[0]}); add --overwrite")

    lrp_path = args.lrp_thresholds
    if lrp_path is None and args.score_threshold is None:
        lrp_path = find_lrp_thresholds(args.weights)
    elif lrp_path is not None and not os.path.isfile(lrp_path):
        raise PredictError(f"LRP thresholds file not found: {lrp_path}")
    table = load_lrp_thresholds(lrp_path) if lrp_path and args.score_threshold is None else None
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE \
        else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    # Detectron2 numbers a COCO json's classes by their sorted ids.
    dataset_ids = sorted(table) if table else list(range(1, num_classes + 1))
    if table and len(table) != num_classes:
        raise PredictError(f"{lrp_path} has {len(table)} classes, the model {num_classes}")
    thresholds = {i: table[c]["threshold"] for i, c in enumerate(dataset_ids)} if table else None
    default = 0.5 if args.score_threshold is None else args.score_threshold
    predictor = Predictor(cfg, args.weights)
    metadata = MetadataCatalog.get("__alrp_d2_predict")
    metadata.set(thing_classes=_class_names(cfg, table, num_classes))

    os.makedirs(args.output, exist_ok=True)
    results = []
    for index, (path, image, out) in enumerate(zip(images, arrays, outputs), start=1):
        instances = keep_above_thresholds(predictor(image), thresholds, default)
        for row in instances_to_coco_json(instances, index):
            row["category_id"] = dataset_ids[row["category_id"]]
            row["file_name"] = os.path.basename(path)
            results.append(row)
        visual = Visualizer(image[:, :, ::-1], metadata, scale=args.scale)
        visual.draw_instance_predictions(instances).save(out)
        print(f"{path}: {len(instances)} detections -> {out}")
    with open(json_path, "w") as f:
        json.dump(results, f)
    how = f"LRP-optimal thresholds of {lrp_path}" if thresholds is not None else f"score threshold {default}"
    print(f"{len(results)} detections in {len(images)} images ({how}) -> {json_path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        return run(args)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
