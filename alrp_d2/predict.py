"""Detections of a trained model on images: pictures and COCO-format json.

    python -m alrp_d2.predict --config-file C --weights W --input IMAGES... --output DIR

For every input image (files, folders of images, or glob patterns) ``DIR`` receives a
picture of its detections drawn by Detectron2's ``Visualizer`` (``<name>.png``, or
``.jpg`` for a JPEG input; the image's size times ``--scale``) and ``DIR/predictions.json``
lists every kept detection in COCO's results format (``image_id`` counts the inputs from
1, ``file_name`` names the image, ``bbox`` is ``[x, y, width, height]``, ``category_id``
the dataset's id when the thresholds or the test dataset's metadata give it, else the class
index plus 1).

Which detections are kept: per class, those scored at least the class's LRP-optimal
threshold, from (first found) ``--lrp-thresholds FILE``; the thresholds saved in the
weights file (``model_best.pth`` holds those of the evaluation that made it the best);
the ``lrp_thresholds.json`` beside the weights; the one that training writes under
``<weights' folder>/inference/<dataset>/`` (that of the config's first test dataset; several
others: an error asking to choose). A class whose optimal LRP keeps no detection (threshold
``null``) shows none. With ``--score-threshold S``, or without any thresholds, one threshold for
every class (default 0.5).

Nothing is written over an existing file without ``--overwrite``; bad input (a missing or
unreadable image, a weights file of another model, a malformed thresholds file) stops
before anything is written, with a message naming the problem (exit status 2). Config
overrides (``KEY VALUE``) come last, after an option that takes one value (e.g.
``--output DIR MODEL.DEVICE cpu``), since ``--input`` takes every word that follows it.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "PredictError",
    "Predictor",
    "find_lrp_thresholds",
    "keep_above_thresholds",
    "load_lrp_thresholds",
    "main",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
THRESHOLDS_FILE = "lrp_thresholds.json"


class PredictError(Exception):
    """Bad input to the command line: its message names the problem."""


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image paths from files, folders (their images, sorted) and glob patterns."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                p
                for p in glob.glob(os.path.join(item, "*"))
                if p.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise PredictError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item) and any(os.path.isfile(p) for p in glob.glob(item)):
            paths += sorted(p for p in glob.glob(item) if os.path.isfile(p))
        else:
            raise PredictError(f"input image not found: {item}")
    return paths


def find_lrp_thresholds(weights: str, dataset: Optional[str] = None) -> Optional[str]:
    """The ``lrp_thresholds.json`` beside ``weights``, else the one training wrote under
    their folder's ``inference/<dataset>/`` (``dataset``'s, or the only one); None if
    there is none. Several and none of ``dataset``: :class:`PredictError` naming them."""
    folder = os.path.dirname(os.path.abspath(weights))
    beside = os.path.join(folder, THRESHOLDS_FILE)
    if os.path.isfile(beside):
        return beside
    if dataset is not None:
        own = os.path.join(folder, "inference", dataset, THRESHOLDS_FILE)
        if os.path.isfile(own):
            return own
    found = sorted(glob.glob(os.path.join(folder, "inference", "*", THRESHOLDS_FILE)))
    if len(found) > 1:
        raise PredictError(
            f"several LRP thresholds files beside the weights ({', '.join(found)}):"
            " choose one with --lrp-thresholds, or give --score-threshold"
        )
    return found[0] if found else None


def check_lrp_thresholds(table, source: str) -> Dict[int, Dict]:
    """``table`` (an ``lrp_thresholds.json``'s content) as ``{category id: row}``, each row
    with a ``name`` and a ``threshold`` (a number, or None); :class:`PredictError` naming
    ``source`` and the problem otherwise."""
    try:
        if not isinstance(table, dict) or not table:
            raise ValueError(
                f"expected an object of classes, got {type(table).__name__}"
                f"{' (empty)' if isinstance(table, dict) else ''}"
            )
        out = {}
        for key, row in table.items():
            try:
                cid = int(key)
            except ValueError:
                raise ValueError(f"class id {key!r} is not an integer") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"class {key}: expected an object with name and threshold, got {row!r}"
                )
            for field in ("name", "threshold"):
                if field not in row:
                    raise ValueError(f"class {key}: no {field!r}")
            t = row["threshold"]
            if t is not None and (
                isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t)
            ):
                raise ValueError(f"class {key}: threshold {t!r} is not a number")
            out[cid] = dict(row)
    except ValueError as err:
        raise PredictError(
            f"{source} is not an lrp_thresholds.json (per class id: name, threshold): {err}"
        ) from None
    return out


def load_lrp_thresholds(path: str) -> Dict[int, Dict]:
    """``{dataset category id: {"name", "threshold", ...}}`` from an ``lrp_thresholds.json``
    (:class:`alrp_d2.evaluation.LRPEvaluator`); ``threshold`` is None where the optimum
    keeps no detection."""
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as err:
        raise PredictError(
            f"cannot read the LRP thresholds {path}: {err.strerror or err}"
        ) from None
    except ValueError as err:  # not json, not UTF-8
        raise PredictError(
            f"{path} is not an lrp_thresholds.json (not valid json: {err})"
        ) from None
    return check_lrp_thresholds(table, path)


class Predictor:
    """Detectron2's ``DefaultPredictor`` (resize, colour format, inference) with weights
    loaded strictly: a file of another model (parameters missing, of another shape, or
    unknown to the config's model) raises :class:`PredictError` instead of Detectron2's
    warning. Takes ``.pth``/``.pkl`` and this project's Lightning ``.ckpt`` files.

    ``extra``: what the weights file holds beside the weights (e.g. ``lrp_thresholds``)."""

    def __init__(self, cfg, weights: str):
        from detectron2.engine import DefaultPredictor

        from .engine.checkpoint import WeightsCheckpointer

        class StrictCheckpointer(WeightsCheckpointer):
            incompatible = None

            def _load_model(self, checkpoint):
                if not isinstance(checkpoint.get("model"), dict):
                    raise ValueError("it holds no model weights")
                self.incompatible = super()._load_model(checkpoint)
                return self.incompatible

            def _log_incompatible_keys(self, incompatible):
                pass  # an error below, not a warning

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""
        cfg.freeze()
        self._predictor = DefaultPredictor(cfg)  # builds the model; loads nothing
        self.model = self._predictor.model
        checkpointer = StrictCheckpointer(self.model)
        try:
            self.extra = checkpointer.load(weights)
        except Exception as err:
            raise PredictError(f"cannot read the weights {weights}: {err}") from None
        bad = checkpointer.incompatible
        problems = (
            [f"{k} (missing)" for k in bad.missing_keys]
            + [
                f"{k} (shape {tuple(c)} in the file, {tuple(m)} in the model)"
                for k, c, m in bad.incorrect_shapes
            ]
            + [f"{k} (not in the model)" for k in bad.unexpected_keys]
        )
        if problems:
            raise PredictError(
                f"{weights} holds the weights of another model than the config's"
                f" ({cfg.MODEL.META_ARCHITECTURE}): {len(bad.missing_keys)} parameters missing,"
                f" {len(bad.incorrect_shapes)} of another shape,"
                f" {len(bad.unexpected_keys)} unknown;"
                f" e.g. {', '.join(problems[:3])}"
            )

    def __call__(self, image_bgr: np.ndarray):
        """The model's ``Instances`` for one BGR image, on the CPU."""
        return self._predictor(image_bgr)["instances"].to("cpu")


def keep_above_thresholds(
    instances, thresholds: Optional[Dict[int, Optional[float]]], default: float
):
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


def _visualizer():
    """Detectron2's ``Visualizer`` (its module imports OpenCV, a dependency of this project;
    :func:`run` checks it is there before anything is written)."""
    from detectron2.utils.visualizer import Visualizer

    return Visualizer


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alrp_d2.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config-file",
        required=True,
        help="the config the model was trained with (e.g. OUTPUT_DIR/config.yaml)",
    )
    parser.add_argument(
        "--weights", required=True, help="model_final.pth, model_best.pth or a .ckpt"
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="images, folders or glob patterns"
    )
    parser.add_argument(
        "--output", required=True, help="folder for the pictures and predictions.json"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--lrp-thresholds",
        default=None,
        help="per-class LRP-optimal thresholds (default: those of the weights' run, if any)",
    )
    which.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="one score threshold for every class instead (default 0.5 without LRP thresholds)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size of the pictures relative to the images"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset the config names (as train_net.py --dataset)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (last)")
    return parser


def _setup_cfg(args):
    """``train_net.py``'s config reading (file, then ``KEY VALUE`` overrides), on the
    device of ``--device``."""
    import torch

    from .engine.launch import UsageError, setup_cfg

    try:
        cfg = setup_cfg(args)
    except UsageError as err:
        raise PredictError(str(err)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError("--device cuda, but no CUDA device is available")
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


def _num_classes(cfg) -> int:
    return (
        cfg.MODEL.RETINANET.NUM_CLASSES
        if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
        else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    )


def _class_names(cfg, table: Optional[Dict[int, Dict]], num_classes: int) -> List[str]:
    if table:
        return [str(table[c]["name"]) for c in sorted(table)]
    from detectron2.data import MetadataCatalog

    from .data.synthetic import CLASSES

    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes", None) or (
            CLASSES if meta.get("synthetic_split", None) else None
        )
        if classes and len(classes) == num_classes:
            return list(classes)
    return [f"class {i + 1}" for i in range(num_classes)]


def _dataset_ids(cfg, num_classes: int) -> List[int]:
    """The dataset's category id of each class: from the config's test dataset's metadata
    when known there (Detectron2's built-in COCO), else the class index plus 1."""
    from detectron2.data import MetadataCatalog

    for name in cfg.DATASETS.TEST:
        mapping = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id", None)
        if (
            mapping
            and len(mapping) == num_classes
            and sorted(mapping.values()) == list(range(num_classes))
        ):
            return [d for d, _ in sorted(mapping.items(), key=lambda item: item[1])]
    return list(range(1, num_classes + 1))


def _saved_thresholds(args, cfg, extra) -> Tuple[Optional[Dict[int, Dict]], Optional[str]]:
    """The thresholds of the weights' run and where they come from (None, None if none):
    those saved in the weights file (``extra``), else the files beside it."""
    saved = extra.get("lrp_thresholds") if isinstance(extra, dict) else None
    if isinstance(saved, dict) and saved:
        dataset = next((d for d in cfg.DATASETS.TEST if d in saved), None) or sorted(saved)[0]
        source = f"{args.weights} (its evaluation on {dataset})"
        return check_lrp_thresholds(saved[dataset], source), source
    path = find_lrp_thresholds(args.weights, cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    return (load_lrp_thresholds(path), path) if path else (None, None)


def _save_picture(vis_image, path: str) -> None:
    from .io import atomic_write

    fmt = "jpeg" if path.lower().endswith((".jpg", ".jpeg")) else "png"
    with atomic_write(path, "wb") as f:
        vis_image.fig.savefig(f, format=fmt)


def run(args) -> int:
    from detectron2.data.catalog import Metadata
    from detectron2.data.detection_utils import read_image
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    from .data.register import register_coco_datasets
    from .data.synthetic import register_synthetic
    from .io import atomic_write

    register_synthetic()
    try:
        register_coco_datasets(args.dataset)
    except ValueError as err:
        raise PredictError(str(err)) from None
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise PredictError(f"--scale must be a positive number, got {args.scale}")
    if args.score_threshold is not None and not math.isfinite(args.score_threshold):
        raise PredictError(f"--score-threshold must be a number, got {args.score_threshold}")
    cfg = _setup_cfg(args)
    if importlib.util.find_spec("cv2") is None:
        raise PredictError(
            "drawing the detections needs OpenCV, which is not installed:"
            " pip install opencv-python-headless"
        )
    if not os.path.isfile(args.weights):
        raise PredictError(f"weights file not found: {args.weights}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise PredictError(f"--output {args.output} is a file, not a folder")
    images = expand_inputs(args.input)
    outputs = []
    for path in images:
        stem, ext = os.path.splitext(os.path.basename(path))
        outputs.append(
            os.path.join(
                args.output, stem + (".jpg" if ext.lower() in (".jpg", ".jpeg") else ".png")
            )
        )
    if len(set(outputs)) < len(outputs):
        raise PredictError(
            "two input images have the same name; their pictures would overwrite each other"
        )
    json_path = os.path.join(args.output, "predictions.json")
    existing = [p for p in outputs + [json_path] if os.path.exists(p)]
    if existing and not args.overwrite:
        raise PredictError(
            f"{len(existing)} output files exist already (e.g. {existing[0]}); add --overwrite"
            " to replace them"
        )

    def read(path):
        try:
            return read_image(path, format="BGR")
        except Exception as err:
            raise PredictError(f"cannot read image {path}: {err}") from None

    for path in images:  # every image readable before anything is written (read again below)
        read(path)

    num_classes = _num_classes(cfg)
    table = source = None
    if args.lrp_thresholds is not None:
        if not os.path.isfile(args.lrp_thresholds):
            raise PredictError(f"LRP thresholds file not found: {args.lrp_thresholds}")
        table, source = load_lrp_thresholds(args.lrp_thresholds), args.lrp_thresholds
    predictor = Predictor(cfg, args.weights)
    if table is None and args.score_threshold is None:
        table, source = _saved_thresholds(args, cfg, predictor.extra)
    if table is not None and len(table) != num_classes:
        raise PredictError(
            f"{source} has thresholds of {len(table)} classes, the model has {num_classes}"
        )
    # Detectron2 numbers a COCO json's classes by their sorted ids.
    dataset_ids = sorted(table) if table else _dataset_ids(cfg, num_classes)
    thresholds = {i: table[c]["threshold"] for i, c in enumerate(dataset_ids)} if table else None
    default = 0.5 if args.score_threshold is None else args.score_threshold
    metadata = Metadata(name="alrp_d2.predict")
    metadata.set(thing_classes=_class_names(cfg, table, num_classes))
    Visualizer = _visualizer()

    os.makedirs(args.output, exist_ok=True)
    results = []
    for index, (path, out) in enumerate(zip(images, outputs), start=1):
        image = read(path)
        instances = keep_above_thresholds(predictor(image), thresholds, default)
        for row in instances_to_coco_json(instances, index):
            row["category_id"] = dataset_ids[row["category_id"]]
            row["file_name"] = os.path.basename(path)
            results.append(row)
        visual = Visualizer(image[:, :, ::-1], metadata, scale=args.scale)
        _save_picture(visual.draw_instance_predictions(instances), out)
        print(f"{path}: {len(instances)} detections -> {out}")
    with atomic_write(json_path) as f:
        json.dump(results, f)
    how = (
        f"LRP-optimal thresholds of {source}"
        if thresholds is not None
        else f"score threshold {default}"
    )
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
