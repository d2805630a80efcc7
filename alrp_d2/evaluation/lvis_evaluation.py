"""LVIS datasets: which datasets are LVIS, and Detectron2's ``LVISEvaluator`` runnable here.

A dataset is evaluated as LVIS (Detectron2's ``LVISEvaluator`` for AP, this project's
``LVISLRPEvaluator`` for optimal LRP) when its metadata says ``evaluator_type: "lvis"``
(Detectron2's built-in ``lvis_v1_*`` and ``lvis_v0.5_*``, anything registered by
``register_lvis_instances``) or when its ``json_file`` is an LVIS json: one whose images
carry LVIS's federated lists, ``neg_category_ids`` and ``not_exhaustive_category_ids``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator

from ..install_detectron2 import LVIS_INSTALL

__all__ = ["LVISAPEvaluator", "is_lvis_dataset", "is_lvis_json"]

_FEDERATED_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")
_JSON_VERDICTS: Dict[Tuple[str, int, int], bool] = {}  # (real path, size, mtime) -> LVIS?


def is_lvis_json(path: str) -> bool:
    """Whether the json file ``path`` is in LVIS format: its images carry both federated
    lists. Read once per file version (the verdict is kept by path, size and mtime);
    ``ValueError`` for a file that some images mark as LVIS and others not."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _JSON_VERDICTS:
        with open(real) as f:
            data = json.load(f)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list) or not images:
            verdict = False
        else:
            marked = [all(k in im for k in _FEDERATED_KEYS) for im in images]
            verdict = all(marked)
            if verdict != any(marked):
                example = images[marked.index(False)].get("id")
                raise ValueError(
                    f"{path}: {sum(marked)} of {len(images)} images carry LVIS's federated"
                    f" lists ({', '.join(_FEDERATED_KEYS)}), the others not (e.g. image"
                    f" {example}): neither a COCO nor an LVIS json"
                )
        _JSON_VERDICTS[key] = verdict
    return _JSON_VERDICTS[key]


def is_lvis_dataset(dataset_name: str) -> bool:
    """Whether ``dataset_name`` is evaluated by LVIS's rules: its metadata's
    ``evaluator_type`` is ``"lvis"``, or its ``json_file`` is an LVIS json (a dataset
    registered as COCO, e.g. by ``--dataset``, whose file is LVIS's). A ``json_file``
    that is not on this machine leaves the decision to ``evaluator_type``."""
    meta = MetadataCatalog.get(dataset_name)
    if meta.get("evaluator_type", None) == "lvis":
        return True
    json_file = meta.get("json_file", None)
    return bool(json_file) and os.path.isfile(json_file) and is_lvis_json(json_file)


def require_lvis_package(what: str) -> None:
    """``ImportError`` saying how to install the ``lvis`` package when it is missing."""
    try:
        import lvis  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{what} needs the LVIS API (the lvis package, {err}): install it with"
            f" {LVIS_INSTALL}, or run python -m alrp_d2.install_detectron2"
        ) from None


@contextlib.contextmanager
def numpy_float_alias():
    """``np.float`` while the block runs: lvis 0.5.3, PyPI's latest, still calls it in
    ``LVISEval.accumulate``, and numpy 1.24 removed it (the lvis repository fixed this
    after its last release). Only where numpy lacks it; removed again afterwards."""
    if hasattr(np, "float"):  # numpy < 1.24
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


class LVISAPEvaluator(LVISEvaluator):
    """Detectron2's ``LVISEvaluator`` (LVIS AP by the LVIS API: ``AP``, ``AP50``, ``AP75``,
    ``APs/m/l``, ``APr/c/f``, 300 detections per image) that runs with numpy >= 1.24 and
    says how to install the lvis package when it is missing."""

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, **kwargs):
        require_lvis_package(f"the LVIS evaluation of {dataset_name!r}")
        super().__init__(
            dataset_name, tasks=tasks, distributed=distributed, output_dir=output_dir, **kwargs
        )

    def evaluate(self):
        with numpy_float_alias():
            return super().evaluate()
