"""Evaluation: optimal LRP (pure numpy + pycocotools) and its Detectron2 evaluator."""

import importlib

__all__ = ["format_summary", "lrp_from_coco", "LRPEvaluator"]

_HOMES = {"format_summary": ".lrp", "lrp_from_coco": ".lrp", "LRPEvaluator": ".lrp_evaluator"}


def __getattr__(name):
    # Imported when asked for: the evaluator needs detectron2, and `python -m
    # alrp_d2.evaluation.lrp` must not find its module imported already (runpy's warning).
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
