"""Evaluation: optimal LRP (pure numpy + pycocotools) and its Detectron2 evaluator."""

from .lrp import format_summary, lrp_from_coco

__all__ = ["format_summary", "lrp_from_coco", "LRPEvaluator"]


def __getattr__(name):
    # The evaluator needs detectron2; import it only when asked for.
    if name == "LRPEvaluator":
        from .lrp_evaluator import LRPEvaluator

        return LRPEvaluator
    raise AttributeError(name)
