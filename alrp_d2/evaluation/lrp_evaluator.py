"""Optimal LRP as a Detectron2 DatasetEvaluator."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
from collections import OrderedDict

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..run_folder import THRESHOLD_FILES
from .lrp import (
    check_lvis_ground_truth,
    empty_results,
    format_summary,
    lrp_from_coco,
    lrp_from_lvis,
)

__all__ = ["LRPEvaluator", "LVISLRPEvaluator"]

TASKS = ("bbox", "segm")
PER_CLASS = ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "threshold")  # a thresholds table's row
RESULT_KEYS = {"bbox": "lrp", "segm": "lrp_segm"}  # the results' key of each task


class LRPEvaluator(COCOEvaluator):
    """Optimal LRP of box and mask detections, reported in percent under ``"lrp"``
    (boxes) and ``"lrp_segm"`` (masks).

    It reads the dataset and collects predictions exactly as Detectron2's
    ``COCOEvaluator`` (any dataset that one accepts works here: COCO json files or
    datasets converted from Detectron2's format), gathers them across ranks and,
    on the main process, prints COCO-style summary lines and writes the per-class
    optimal score thresholds to ``output_dir/lrp_thresholds.json`` (boxes) and
    ``output_dir/lrp_thresholds_segm.json`` (masks). ``tasks``, as Detectron2's:
    ``"bbox"`` and/or ``"segm"``, by default ``"bbox"`` plus ``"segm"`` when the
    predictions have masks (``pred_masks``). As for mask AP, mask detections are loaded
    without their boxes, so that the area ranges use the masks' areas. ``thresholds`` and
    ``ties`` are those of :func:`alrp_d2.evaluation.lrp.lrp_from_coco`.

    After :meth:`evaluate`, ``threshold_tables`` holds each task's table (the content of its
    thresholds file) on the main process: what ``model_best.pth`` keeps of the evaluation
    that chose it. A table has a row for every category of the dataset, in id order, so that
    ``predict`` maps class indices to category ids; a class without ground truth in the
    dataset has no figures and a ``null`` threshold.
    """

    _lrp = staticmethod(lrp_from_coco)  # the rules: COCO's

    def __init__(
        self,
        dataset_name,
        output_dir=None,
        distributed=True,
        *,
        tasks=None,
        tau: float = 0.5,
        max_dets: int = 100,
        thresholds: str = "exact",
        ties: str = "threshold",
    ):
        if tasks is not None:
            tasks = tuple(tasks)
            unknown = [t for t in tasks if t not in TASKS]
            if unknown or not tasks:
                raise ValueError(f"LRPEvaluator tasks must be among {TASKS}, got {tasks}")
        super().__init__(dataset_name, tasks=tasks, distributed=distributed, output_dir=output_dir)
        self._tau, self._max_dets, self._thresholds, self._ties = tau, max_dets, thresholds, ties
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        self._dataset_ids = {v: k for k, v in mapping.items()} if mapping else None
        self._logger = logging.getLogger(__name__)
        self.threshold_tables = {}

    def _tasks_from_predictions(self, predictions):
        """``bbox``, plus ``segm`` when the detections have masks (keypoints: no LRP)."""
        return [t for t in super()._tasks_from_predictions(predictions) if t in TASKS]

    def evaluate(self, img_ids=None):
        self.threshold_tables = {}
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not self._do_evaluation:
            self._logger.warning(
                "[LRPEvaluator] The dataset has no annotations to evaluate against."
            )
            return {}
        detections = list(itertools.chain(*[p.get("instances", []) for p in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(detections)
        results = OrderedDict()
        for task in sorted(set(tasks), key=TASKS.index):
            result = self._evaluate_task(task, detections, img_ids)
            results[RESULT_KEYS[task]] = {
                key: 100.0 * value for key, value in result.items() if key != "per_class"
            }
        return results

    def _dataset_category_id(self, class_index: int) -> int:
        """The dataset's category id of a class index, by the metadata's
        ``thing_dataset_id_to_contiguous_id`` (as Detectron2's ``COCOEvaluator``)."""
        return self._dataset_ids[class_index] if self._dataset_ids else class_index

    def _evaluate_task(self, task, detections, img_ids):
        """``lrp_from_coco`` of one task on copies of the detections (``loadRes`` edits
        what it loads)."""
        if task == "segm":
            missing = sum("segmentation" not in d for d in detections)
            if missing:
                raise ValueError(
                    f"[LRPEvaluator] task 'segm' but {missing} of {len(detections)} "
                    "detections have no mask (pred_masks)"
                )
            # As Detectron2 for mask AP: without the box, loadRes takes the mask's area.
            detections = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        else:
            detections = [dict(d) for d in detections]
        for d in detections:
            d["category_id"] = self._dataset_category_id(d["category_id"])
        coco_gt = self._coco_api
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(detections) if detections else empty_results(coco_gt)
        result = self._lrp(
            coco_gt,
            coco_dt,
            task,
            self._tau,
            self._max_dets,
            self._thresholds,
            img_ids,
            ties=self._ties,
        )
        self._logger.info(
            "Optimal LRP of %s (thresholds: %s):\n%s",
            task,
            self._thresholds,
            format_summary(result, self._tau, self._max_dets),
        )
        table = self._threshold_table(result)
        self.threshold_tables[task] = table
        if self._output_dir:
            self._write_thresholds(table, THRESHOLD_FILES[task])
        return result

    def _threshold_table(self, result) -> dict:
        """``{category id: {name, threshold, ...}}``: a ``lrp_thresholds.json``'s content,
        every category of the dataset (LVIS's validation set lacks some of its classes)."""
        cats = self._coco_api.loadCats(sorted(self._coco_api.getCatIds()))
        absent = dict.fromkeys(PER_CLASS, float("nan"))
        return {
            str(c["id"]): {
                "name": c.get("name", str(c["id"])),
                **{
                    k: (None if math.isnan(v) else v)
                    for k, v in result["per_class"].get(c["id"], absent).items()
                },
            }
            for c in cats
        }

    def _write_thresholds(self, table, file_name):
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, file_name)
        with PathManager.open(path, "w") as f:
            json.dump(table, f, indent=2)
        self._logger.info("Per-class oLRP thresholds written to %s", path)


class LVISLRPEvaluator(LRPEvaluator):
    """Optimal LRP of an LVIS dataset by LVIS's federated rules
    (:func:`alrp_d2.evaluation.lrp.lrp_from_lvis`): 300 detections per image, each class
    evaluated only on the images that annotate it or list it in ``neg_category_ids``, the
    unmatched detections of a class in ``not_exhaustive_category_ids`` ignored. Reported
    as :class:`LRPEvaluator` reports COCO's, plus ``oLRP_r``, ``oLRP_c`` and ``oLRP_f``
    (rare, common, frequent classes), with the same thresholds files.

    Class indices map to category ids as Detectron2's ``LVISEvaluator`` maps them: by the
    metadata's ``thing_dataset_id_to_contiguous_id`` when it has one, else index plus 1
    (``load_lvis_json`` numbers LVIS's classes by category id minus 1). A dataset whose
    json lacks LVIS's fields is refused here, naming what is missing.
    """

    _lrp = staticmethod(lrp_from_lvis)

    def __init__(self, dataset_name, *args, max_dets: int = 300, **kwargs):
        # LRPEvaluator's arguments; LVIS keeps 300 detections per image by default.
        super().__init__(dataset_name, *args, max_dets=max_dets, **kwargs)
        if self._do_evaluation:
            try:
                check_lvis_ground_truth(self._coco_api)
            except ValueError as err:
                raise ValueError(
                    f"[LVISLRPEvaluator] dataset {dataset_name!r} ({self._metadata.json_file}):"
                    f" {err}"
                ) from None

    def _dataset_category_id(self, class_index: int) -> int:
        return self._dataset_ids[class_index] if self._dataset_ids else class_index + 1
