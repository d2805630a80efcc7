"""Ranking-based losses in pure PyTorch (no Detectron2 import here)."""

from .alrp import ALRPLoss, APLoss, NDCGLoss, alrp_loss, ap_loss, ndcg_loss
from .localisation import bounded, giou_loss, localisation_error, matched_box_iou
from .rank_sort import RankSortLoss, rank_sort_loss
from .ranking import PositiveStats, RankingUpdate, ranking_loss, smoothed_step

__all__ = [
    "ALRPLoss",
    "APLoss",
    "NDCGLoss",
    "PositiveStats",
    "RankSortLoss",
    "RankingUpdate",
    "alrp_loss",
    "bounded",
    "ap_loss",
    "giou_loss",
    "localisation_error",
    "matched_box_iou",
    "ndcg_loss",
    "rank_sort_loss",
    "ranking_loss",
    "smoothed_step",
]
