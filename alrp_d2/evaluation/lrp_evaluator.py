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

from .lrp import empty_results, format_summary, lrp_from_coco

__all__ = ["LRPEvaluator"]

_REPORTED = ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "oLRP_small", "oLRP_medium", "oLRP_large")


class LRPEvaluator(COCOEvaluator):
    """Optimal LRP of box detections, reported under ``"lrp"`` in percent.

    It reads the dataset and collects predictions exactly as Detectron2's
    ``COCOEvaluator`` (any dataset that one accepts works here: COCO json files or
    datasets converted from Detectron2's format), gathers them across ranks and,
    on the main process, prints COCO-style summary lines and writes the per-class
    optimal score thresholds to ``output_dir/lrp_thresholds.json``. ``thresholds`` and
    ``ties`` are those of :func:`alrp_d2.evaluation.lrp.lrp_from_coco`.
    """

    def __init__(self, dataset_name, output_dir=None, distributed=True, *,
                 tau: float = 0.5, max_dets: int = 100, thresholds: str = "exact", ties: str = "threshold"):
        super().__init__(dataset_name, tasks=("bbox",), distributed=distributed, output_dir=output_dir)
        self._tau, self._max_dets, self._thresholds, self._ties = tau, max_dets, thresholds, ties
        self._logger = logging.getLogger(__name__)

    def evaluate(self, img_ids=None):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not self._do_evaluation:
            self._logger.warning("[LRPEvaluator] The dataset has no annotations to evaluate against.")
            return {}
        detections = list(itertools.chain(*[p.get("instances", []) for p in predictions]))
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping:
            reverse = {v: k for k, v in mapping.items()}
            detections = [{**d, "category_id": reverse[d["category_id"]]} for d in detections]
        coco_gt = self._coco_api
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(detections) if detections else empty_results(coco_gt)
        result = lrp_from_coco(coco_gt, coco_dt, "bbox", self._tau, self._max_dets, self._thresholds, img_ids,
                               ties=self._ties)
        self._logger.info("Optimal LRP (thresholds: %s):\n%s", self._thresholds,
                          format_summary(result, self._tau, self._max_dets))
        if self._output_dir:
            self._write_thresholds(result)
        return OrderedDict(lrp={key: 100.0 * result[key] for key in _REPORTED})

    def _write_thresholds(self, result):
        names = {c["id"]: c["name"] for c in self._coco_api.loadCats(self._coco_api.getCatIds())}
        table = {
            str(cid): {"name": names.get(cid, str(cid)),
                       **{k: (None if math.isnan(v) else v) for k, v in r.items()}}
            for cid, r in result["per_class"].items()
        }
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, "lrp_thresholds.json")
        with PathManager.open(path, "w") as f:
            json.dump(table, f, indent=2)
        self._logger.info("Per-class oLRP thresholds written to %s", path)
