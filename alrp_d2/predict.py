"""Detections of a trained model on images: pictures and COCO-format json.

    python -m alrp_d2.predict --config-file C --weights W --input IMAGES... --output DIR

For every input image (files, folders of images, or glob patterns) ``DIR`` receives a
picture of its detections drawn by Detectron2's ``Visualizer`` (``<name>.png``, or
``.jpg`` for a JPEG input; the image's size times ``--scale``) and ``DIR/predictions.json``
lists every kept detection in COCO's results format, ready to score against the dataset's
json (``python -m alrp_d2.evaluation.lrp``, pycocotools):

- ``category_id``: the dataset's id of the class, from the thresholds (those of an
  evaluation on the dataset), else from the datasets named by ``--dataset`` and
  ``DATASETS.TEST``; where none of them maps the classes, an error, unless
  ``--contiguous-ids`` asks for the class index plus 1. The pictures show the dataset's
  class names.
- ``image_id``: the image's id in those datasets (by its path, else by its file name);
  when no input image is one of theirs, the inputs are numbered from 1 in input order
  (inputs of both kinds are refused: their ids would mix).
- ``file_name`` names the image; ``bbox`` is ``[x, y, width, height]``.

Which detections are kept: per class, those scored at least the class's LRP-optimal
threshold, from (first found) ``--lrp-thresholds FILE``; the thresholds saved in the
weights file (``model_best.pth`` holds those of the evaluation that made it the best);
the ``lrp_thresholds.json`` beside the weights; the one that an evaluation of these weights
(``train_net.py --eval-only``) wrote under ``<weights' folder>/eval/<weights' name>/inference/
<dataset>/``; the one that training writes under ``<weights' folder>/inference/<dataset>/``
(that of the config's first test dataset; several others: an error asking to choose). A class
whose optimal LRP keeps no detection (threshold ``null``) shows none. With ``--score-threshold
S``, one threshold for every class; weights without any thresholds need it (nothing is
guessed).

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

from .cli import (
    UsageError,
    add_config_file,
    add_dataset_flag,
    add_overrides,
    load_config,
    run_command,
)
from .run_folder import THRESHOLD_FILES, RunFolder

__all__ = [
    "PredictError",
    "Predictor",
    "find_lrp_thresholds",
    "keep_above_thresholds",
    "load_lrp_thresholds",
    "main",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class PredictError(UsageError):
    """Bad input to ``predict``: its message names the problem (exit status 2)."""


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
    """The ``lrp_thresholds.json`` beside ``weights``, else the one an ``--eval-only`` of
    these weights wrote, else the one their training wrote (in each run folder:
    ``dataset``'s, or the only one); None if there is none. Several and none of
    ``dataset``: :class:`PredictError` naming them."""
    folder = os.path.dirname(os.path.abspath(weights))
    beside = os.path.join(folder, THRESHOLD_FILES["bbox"])
    if os.path.isfile(beside):
        return beside
    training = RunFolder(folder)
    for run in (training.evaluation_of(weights), training):
        if dataset is not None and os.path.isfile(run.lrp_thresholds(dataset)):
            return run.lrp_thresholds(dataset)
        found = run.all_lrp_thresholds()
        if len(found) > 1:
            raise PredictError(
                f"several LRP thresholds files for the weights ({', '.join(found)}):"
                " choose one with --lrp-thresholds, or give --score-threshold"
            )
        if found:
            return found[0]
    return None


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
    warning. Takes ``.pth``/``.pkl`` and this project's Lightning ``.ckpt`` files, and
    refuses a ``.pth`` or ``.ckpt`` that would run code (:mod:`alrp_d2.weights`).

    ``extra``: what the weights file holds beside the weights (e.g. ``lrp_thresholds``)."""

    def __init__(self, cfg, weights: str):
        from detectron2.engine import DefaultPredictor

        from .weights import WeightsError, load_weights

        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""
        cfg.freeze()
        try:
            self._predictor = DefaultPredictor(cfg)  # builds the model; loads nothing
        except ValueError as err:  # a model key refused by name (e.g. MODEL.RANKING_LOSS.NAME)
            raise PredictError(f"the config's model cannot be built: {err}") from None
        self.model = self._predictor.model
        try:
            self.extra = load_weights(
                self.model,
                weights,
                strict=True,
                model_name=f"the config's ({cfg.MODEL.META_ARCHITECTURE})",
            )
        except WeightsError as err:
            raise PredictError(str(err)) from None

    def __call__(self, image_bgr: np.ndarray):
        """The model's ``Instances`` for one BGR image, on the CPU."""
        return self._predictor(image_bgr)["instances"].to("cpu")


def keep_above_thresholds(
    instances, thresholds: Optional[Dict[int, Optional[float]]], default: Optional[float]
):
    """The detections scored at least their class's threshold (``thresholds``: contiguous
    class index -> threshold, None: keep none of the class; classes not in it and every
    class when ``thresholds`` is None: ``default``, None: keep none)."""
    import torch

    scores, classes = instances.scores, instances.pred_classes
    limit = torch.full_like(scores, math.inf if default is None else float(default))
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
    add_config_file(parser, "the config the model was trained with (e.g. OUTPUT_DIR/config.yaml)")
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
        help="one score threshold for every class instead (needed for weights without LRP"
        " thresholds)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size of the pictures relative to the images"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_dataset_flag(
        parser,
        "register a COCO- or LVIS-format dataset the config names (as train_net.py --dataset)",
    )
    parser.add_argument(
        "--contiguous-ids",
        action="store_true",
        help="write the class index plus 1 as category_id where no dataset or thresholds file"
        " maps the classes to the dataset's category ids",
    )
    add_overrides(parser)
    return parser


def _setup_cfg(args):
    """The config as ``train_net.py`` reads it (file, then ``KEY VALUE`` overrides; without
    Lightning), on the device of ``--device``."""
    import torch

    cfg = load_config(args.config_file, args.opts)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError("--device cuda, but no CUDA device is available")
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


class DatasetLink:
    """What the datasets a prediction names (``--dataset``, then ``DATASETS.TEST``) say of
    the model's classes and of the input images: each class's category id and name, and
    each image's id, so that ``predictions.json`` scores against the dataset's json as is.

    A dataset whose metadata lacks the class mapping (a COCO json not read yet) is read;
    one that cannot be read (e.g. a built-in dataset not downloaded on this machine) only
    gives what its metadata holds."""

    def __init__(self, names: Sequence[str], num_classes: int):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        self.num_classes = num_classes
        self.tried: List[str] = []  # why each dataset could not map the classes
        self.ids: Optional[List[int]] = None
        self.names: Optional[List[str]] = None
        self._images: Dict[str, int] = {}  # real path -> image id
        self._by_name: Dict[str, List[int]] = {}  # file name -> image ids
        for name in names:
            if name not in DatasetCatalog.list():  # needed only where nothing else maps the classes
                self.tried.append(
                    f"{name} (not registered: give it with --dataset NAME JSON IMAGE_ROOT)"
                )
                continue
            try:
                dicts = DatasetCatalog.get(name)  # also completes the metadata of a COCO json
            except Exception as err:
                dicts = []
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.tried.append(f"{name} (cannot be read: {reason})")
            for record in dicts:
                if "file_name" in record and "image_id" in record:
                    path = os.path.realpath(record["file_name"])
                    self._images.setdefault(path, record["image_id"])
                    self._by_name.setdefault(os.path.basename(path), []).append(record["image_id"])
            if self.ids is None:
                self._classes_of(name, MetadataCatalog.get(name))

    def _classes_of(self, name: str, meta) -> None:
        mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
        if not mapping:
            if not any(t.startswith(f"{name} ") for t in self.tried):
                self.tried.append(f"{name} (no category ids in its metadata)")
            return
        if len(mapping) != self.num_classes or sorted(mapping.values()) != list(
            range(self.num_classes)
        ):
            self.tried.append(f"{name} ({len(mapping)} classes, the model has {self.num_classes})")
            return
        self.ids = [d for d, _ in sorted(mapping.items(), key=lambda item: item[1])]
        classes = meta.get("thing_classes", None)
        self.names = list(classes) if classes and len(classes) == self.num_classes else None

    def image_ids(self, paths: Sequence[str]) -> List[int]:
        """The dataset's id of each image (by its path, else by a file name that only one
        of the datasets' images has); images of no dataset are numbered from 1 in input
        order. Some images of a dataset and some of none: :class:`PredictError`."""
        found: List[Optional[int]] = []
        for path in paths:
            image_id = self._images.get(os.path.realpath(path))
            if image_id is None:
                same_name = self._by_name.get(os.path.basename(path), [])
                image_id = same_name[0] if len(same_name) == 1 else None
            found.append(image_id)
        missing = [p for p, i in zip(paths, found) if i is None]
        if not missing:
            return [int(i) for i in found]
        if len(missing) == len(paths):
            return list(range(1, len(paths) + 1))
        raise PredictError(
            f"{len(paths) - len(missing)} input images belong to the dataset(s) named, but"
            f" {len(missing)} do not (e.g. {missing[0]}): their image ids would mix the"
            " dataset's with input positions; predict them separately"
        )


def _class_names(table: Optional[Dict[int, Dict]], link: DatasetLink) -> List[str]:
    if table:
        return [str(table[c]["name"]) for c in sorted(table)]
    if link.names:
        return link.names
    return [f"class {i}" for i in (link.ids or range(1, link.num_classes + 1))]


def _category_ids(args, table: Optional[Dict[int, Dict]], link: DatasetLink) -> List[int]:
    """The category id of each class (by class index): the thresholds table's (the dataset
    it was evaluated on), else the datasets', else, with ``--contiguous-ids``, the class
    index plus 1."""
    if table:
        return sorted(table)  # Detectron2 numbers a COCO json's classes by their sorted ids
    if link.ids is not None:
        return link.ids
    if args.contiguous_ids:
        return list(range(1, link.num_classes + 1))
    raise PredictError(
        f"no dataset maps the model's {link.num_classes} classes to the dataset's category ids"
        + (f" (tried: {'; '.join(link.tried)})" if link.tried else " (none named)")
        + ": name the dataset with --dataset NAME JSON IMAGE_ROOT and DATASETS.TEST, give"
        " --lrp-thresholds of its evaluation, or add --contiguous-ids to write the class index"
        " plus 1"
    )


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

    from .data.register import datasets_from_env, register_coco_datasets
    from .data.synthetic import register_synthetic
    from .io import atomic_write

    register_synthetic()
    try:  # as train_net.py: $ALRP_DATASETS, then --dataset
        register_coco_datasets(datasets_from_env() + [tuple(d) for d in args.dataset])
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
    first_of = {}
    for path, out in zip(images, outputs):
        if out in first_of:
            raise PredictError(
                f"two input images have the same name, {first_of[out]} and {path}: their"
                f" pictures would both be {out}; predict them separately"
            )
        first_of[out] = path
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

    from .config import model_num_classes

    num_classes = model_num_classes(cfg)
    table = source = None
    if args.lrp_thresholds is not None:
        if not os.path.isfile(args.lrp_thresholds):
            raise PredictError(f"LRP thresholds file not found: {args.lrp_thresholds}")
        table, source = load_lrp_thresholds(args.lrp_thresholds), args.lrp_thresholds
    predictor = Predictor(cfg, args.weights)
    if table is None and args.score_threshold is None:
        table, source = _saved_thresholds(args, cfg, predictor.extra)
        if table is None:
            raise PredictError(
                f"no LRP thresholds for {args.weights}: neither saved in it nor in a"
                f" {THRESHOLD_FILES['bbox']} beside it or in its run folder (evaluate it with"
                " train_net.py --eval-only and TEST.LRP_EVALUATOR True), give them with"
                " --lrp-thresholds FILE, or choose one threshold with --score-threshold S"
            )
    if table is not None and len(table) != num_classes:
        raise PredictError(
            f"{source} has thresholds of {len(table)} classes, the model has {num_classes}"
        )
    names = list(dict.fromkeys([d[0] for d in args.dataset] + list(cfg.DATASETS.TEST)))
    link = DatasetLink(names, num_classes)
    dataset_ids = _category_ids(args, table, link)
    image_ids = link.image_ids(images)
    thresholds = {i: table[c]["threshold"] for i, c in enumerate(dataset_ids)} if table else None
    default = args.score_threshold
    metadata = Metadata(name="alrp_d2.predict")
    metadata.set(thing_classes=_class_names(table, link))
    Visualizer = _visualizer()

    os.makedirs(args.output, exist_ok=True)
    results = []
    for image_id, path, out in zip(image_ids, images, outputs):
        image = read(path)
        instances = keep_above_thresholds(predictor(image), thresholds, default)
        for row in instances_to_coco_json(instances, image_id):
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
    return run_command(run, argument_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
