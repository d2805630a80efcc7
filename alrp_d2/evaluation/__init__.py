"""Evaluation: optimal LRP (pure numpy + pycocotools) of COCO and LVIS datasets, and its
Detectron2 evaluators."""

import importlib

__all__ = [
    "format_summary",
    "is_lvis_dataset",
    "lrp_from_coco",
    "lrp_from_lvis",
    "LRPEvaluator",
    "LVISAPEvaluator",
    "LVISLRPEvaluator",
]

_HOMES = {
    "format_summary": ".lrp",
    "is_lvis_dataset": ".lvis_evaluation",
    "lrp_from_coco": ".lrp",
    "lrp_from_lvis": ".lrp",
    "LRPEvaluator": ".lrp_evaluator",
    "LVISAPEvaluator": ".lvis_evaluation",
    "LVISLRPEvaluator": ".lrp_evaluator",
}


def __getattr__(name):
    # Imported when asked for: the evaluator needs detectron2, and `python -m
    # alrp_d2.evaluation.lrp` must not find its module imported already (runpy's warning).
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
