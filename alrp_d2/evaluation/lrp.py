"""Optimal LRP (oLRP) and its components on COCO-format ground truth and detections.

LRP (Oksuz et al., ECCV 2018; TPAMI 2021) of a set of detections thresholded at score
``s``, with TP matched at IoU >= tau::

    LRP(s) = [ sum_TP (1 - IoU) / (1 - tau) + N_FP + N_FN ] / (N_TP + N_FP + N_FN)

Per class, oLRP is the minimum of LRP over every cut of the class's detections pooled
over all images and sorted by score (or over the score grid 0, 0.01, ..., 1 with
``thresholds="grid"``, as in the NeurIPS 2020 experiments).

Tied scores (``ties``): by default (``"threshold"``) a cut never splits detections of
equal score, since a score threshold keeps all of them or none: oLRP is then the best
LRP that a per-class score threshold achieves, and the reported threshold reproduces it.
``ties="official"`` follows the official LRP-Error code, which cuts its score-sorted
list anywhere, ties included, ordered among equal scores by image (ascending image id)
and, within an image, by the detections' order in the results: use it to reproduce
published figures.  Without tied scores the two agree exactly; with ties "official" can
only be lower (it may keep part of a tie), and its threshold may not reproduce it.  At the
optimum the components are ``loc = sum(1 - IoU) / N_TP``, ``FP = N_FP / (N_TP + N_FP)``,
``FN = N_FN / N_GT`` and the threshold is the score at the cut.

Matching follows COCO's evaluation exactly: detections in score order, at most
``max_dets`` per image and class, each taking the best unmatched ground truth with
IoU >= tau, preferring ground truths that are not ignored; crowd ground truths are
ignored and matchable many times (IoU over the detection's area); ground truths
outside an area range are ignored for that range, and so are unmatched detections
outside it.  Masks (``iou_type="segm"``) are compared as RLE, polygons and
uncompressed RLE converted at the image's size as COCOeval does; the area ranges use the
annotations' ``area`` (a mask's own area for results loaded without ``bbox``, as
Detectron2 loads them for mask AP).  The matching is vectorised over all (image, class)
pairs: one step per detection rank instead of a Python loop per detection and ground truth.

LVIS (``lrp_from_lvis``) evaluates a federated dataset: each class only on the images
whose labels say something about it, as the LVIS API's ``LVISEval`` does for AP (and the
LVIS variant of the official LRP-Error code for oLRP).  With ``P(i)`` the classes annotated
in image ``i``, ``N(i)`` its ``neg_category_ids`` (verified absent) and ``E(i)`` its
``not_exhaustive_category_ids``:

* the ``max_dets`` (300) best scored detections of each image, all classes together, are
  kept (LVIS's ``LVISResults``), and none is capped per class;
* a detection of class ``c`` in image ``i`` counts only if ``c`` is in ``P(i)`` or
  ``N(i)``: elsewhere nobody knows whether ``c`` is there, so it is dropped;
* an unmatched detection of ``c`` in image ``i`` with ``c`` in ``E(i)`` is ignored, not a
  false positive (some instances of ``c`` there lack annotations); a matched one stays a
  true positive;
* no crowd regions (LVIS has none): every ground truth matches once at plain IoU; one
  whose ``ignore`` flag is set is ignored as COCO ignores crowds;
* besides the means over all classes, ``oLRP_r``, ``oLRP_c`` and ``oLRP_f`` average oLRP
  over the rare, common and frequent classes (each category's ``frequency``).

Command line: ``python -m alrp_d2.evaluation.lrp GT.json DETS.json`` (``--lvis`` for an
LVIS ground truth).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np

from ..cli import UsageError, run_command

AREA_RANGES = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}
GRID = np.round(np.arange(0, 101) / 100, 2)
TIES = ("threshold", "official")
FREQUENCIES = ("r", "c", "f")  # LVIS's rare, common and frequent classes
CHUNK = 4096  # (image, class) pairs matched at once; bounds the padded arrays


def _box_iou_padded(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes, ``dt`` (C, D, 4) with ``gt`` (C, G, 4); a crowd ground truth
    is scored by intersection over the detection's area, as COCO does."""
    dx1, dy1 = dt[..., 0][:, :, None], dt[..., 1][:, :, None]
    dx2, dy2 = dx1 + dt[..., 2][:, :, None], dy1 + dt[..., 3][:, :, None]
    gx1, gy1 = gt[..., 0][:, None, :], gt[..., 1][:, None, :]
    gx2, gy2 = gx1 + gt[..., 2][:, None, :], gy1 + gt[..., 3][:, None, :]
    iw = np.clip(np.minimum(dx2, gx2) - np.maximum(dx1, gx1), 0, None)
    ih = np.clip(np.minimum(dy2, gy2) - np.maximum(dy1, gy1), 0, None)
    inter = iw * ih
    d_area = (dt[..., 2] * dt[..., 3])[:, :, None]
    g_area = (gt[..., 2] * gt[..., 3])[:, None, :]
    union = np.where(crowd[:, None, :], d_area, d_area + g_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _segm_iou(dt_anns, gt_anns, crowd) -> np.ndarray:
    """Mask IoU of annotations with compressed RLE segmentations (``crowd``, per ground
    truth: intersection over the detection's area)."""
    from pycocotools import mask as mask_utils

    d = [a["segmentation"] for a in dt_anns]
    g = [a["segmentation"] for a in gt_anns]
    return np.asarray(mask_utils.iou(d, g, [int(c) for c in crowd])).reshape(len(d), len(g))


class _Groups:
    """Detections and ground truths grouped by (image, class), under ``rules``.

    ``"coco"``: at most ``max_dets`` detections per (image, class), crowd ground truths.
    ``"lvis"``: at most ``max_dets`` per image, all classes together; only the detections
    of the pairs that the image's annotations or ``neg_category_ids`` verify; each pair's
    ``not_exhaustive`` flag (module docstring)."""

    def __init__(
        self,
        coco_gt,
        coco_dt,
        iou_type: str,
        max_dets: int,
        cat_ids: List[int],
        img_ids,
        rules: str = "coco",
    ):
        img_ids = sorted(coco_gt.getImgIds() if img_ids is None else img_ids)
        cat_set = set(cat_ids)
        gts: Dict[tuple, list] = {}
        dts: Dict[tuple, list] = {}
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids, catIds=cat_ids)):
            gts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
        img_set = set(img_ids)
        # LVIS caps an image's detections before it looks at their classes.
        detections = coco_dt.loadAnns(
            coco_dt.getAnnIds(imgIds=img_ids, catIds=cat_ids if rules == "coco" else [])
        )
        not_exhaustive: Dict[int, set] = {}
        if rules == "lvis":
            negative, not_exhaustive = _federated_lists(coco_gt, img_ids)
            detections = _best_per_image(detections, max_dets)
        detections = [
            a for a in detections if a["image_id"] in img_set and a["category_id"] in cat_set
        ]
        if rules == "lvis":
            # A class is evaluated on an image only where its presence is known.
            detections = [
                a
                for a in detections
                if (a["image_id"], a["category_id"]) in gts
                or a["category_id"] in negative[a["image_id"]]
            ]
        for ann in detections:
            dts.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
        # COCO's order: pairs by class then image; detections by descending score.
        keys = sorted(set(gts) | set(dts), key=lambda k: (k[1], k[0]))
        self.keys = keys
        self.gt = [gts.get(k, []) for k in keys]
        self.dt = []
        for k in keys:
            d = dts.get(k, [])
            order = np.argsort([-a["score"] for a in d], kind="mergesort")
            self.dt.append([d[i] for i in order[: max_dets if rules == "coco" else None]])
        self.not_exhaustive = np.array(
            [c in not_exhaustive.get(i, ()) for i, c in keys], dtype=bool
        ).reshape(len(keys))
        if iou_type == "segm":
            # Polygons and uncompressed RLE to compressed RLE, as COCOeval does (on copies).
            self.gt = [[_with_rle(coco_gt, coco_gt, a) for a in g] for g in self.gt]
            self.dt = [[_with_rle(coco_dt, coco_gt, a) for a in d] for d in self.dt]
        self.iou_type = iou_type
        self.rules = rules


def _best_per_image(detections: list, max_dets: int) -> list:
    """The ``max_dets`` best scored detections of each image, all classes together, in
    their order (of equal scores, the first ones), as LVIS's ``LVISResults`` keeps them."""
    by_image: Dict[int, list] = {}
    for ann in detections:
        by_image.setdefault(ann["image_id"], []).append(ann)
    dropped = set()
    for anns in by_image.values():
        if len(anns) > max_dets:
            order = np.argsort([-a["score"] for a in anns], kind="stable")
            dropped.update(id(anns[i]) for i in order[max_dets:])
    return [a for a in detections if id(a) not in dropped]


def _federated_lists(coco_gt, img_ids) -> tuple:
    """``({image: neg_category_ids}, {image: not_exhaustive_category_ids})`` as sets;
    ``ValueError`` naming the first images that lack either list (not an LVIS json)."""
    keys = ("neg_category_ids", "not_exhaustive_category_ids")
    images = coco_gt.loadImgs(img_ids)
    missing = [(im["id"], k) for im in images for k in keys if not isinstance(im.get(k), list)]
    if missing:
        shown = ", ".join(f"image {i} has no list {k!r}" for i, k in missing[:3])
        raise ValueError(
            f"the ground truth is not in LVIS format: {shown}"
            f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}; LVIS's"
            f" federated evaluation needs {keys[0]} and {keys[1]} on every image"
        )
    return (
        {im["id"]: set(im[keys[0]]) for im in images},
        {im["id"]: set(im[keys[1]]) for im in images},
    )


def _frequencies(coco_gt, cat_ids) -> Dict[int, str]:
    """Each category's LVIS ``frequency`` (r, c or f); ``ValueError`` naming those without."""
    cats = coco_gt.loadCats(cat_ids)
    bad = [c for c in cats if c.get("frequency") not in FREQUENCIES]
    if bad:
        shown = ", ".join(f"{c['id']} ({c.get('name')!r}: {c.get('frequency')!r})" for c in bad[:3])
        raise ValueError(
            f"the ground truth is not in LVIS format: categories {shown}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} have no frequency"
            " 'r', 'c' or 'f' (LVIS's rare, common and frequent groups)"
        )
    return {c["id"]: c["frequency"] for c in cats}


def _with_rle(coco, fallback, ann):
    """``ann`` if its segmentation is compressed RLE, else a copy with it converted
    (polygons, uncompressed RLE) at the image's size in ``coco``, else ``fallback``."""
    segm = ann["segmentation"]
    if isinstance(segm, dict) and not isinstance(segm["counts"], list):
        return ann
    source = coco if ann["image_id"] in getattr(coco, "imgs", {}) else fallback
    return {**ann, "segmentation": source.annToRLE(ann)}


def _match_chunk(dt_lists, gt_lists, iou_type, tau, area_ranges, rules="coco", not_exhaustive=None):
    """COCO's greedy matching for a chunk of (image, class) pairs, every area range.

    ``rules="lvis"``: no crowd (an annotation's ``ignore`` flag ignores it instead), and
    the unmatched detections of the pairs flagged in ``not_exhaustive`` are ignored.

    Returns per area range: detection scores, ignore flags, matched IoU (NaN if
    unmatched), the pair index of each detection, and the number of non-ignored
    ground truths per pair."""
    c = len(dt_lists)
    d_max = max(1, max(len(d) for d in dt_lists))
    g_max = max(1, max(len(g) for g in gt_lists))
    d_valid = np.zeros((c, d_max), bool)
    g_valid = np.zeros((c, g_max), bool)
    score = np.zeros((c, d_max))
    d_area = np.zeros((c, d_max))
    g_area = np.zeros((c, g_max))
    crowd = np.zeros((c, g_max), bool)  # matchable many times, IoU over the detection
    flagged = np.zeros((c, g_max), bool)  # ignored whatever its area
    if iou_type == "bbox":
        d_box = np.zeros((c, d_max, 4))
        g_box = np.zeros((c, g_max, 4))
    iou = np.full((c, d_max, g_max), -1.0)
    for i, (dl, gl) in enumerate(zip(dt_lists, gt_lists)):
        nd, ng = len(dl), len(gl)
        d_valid[i, :nd] = True
        g_valid[i, :ng] = True
        if nd:
            score[i, :nd] = [a["score"] for a in dl]
            d_area[i, :nd] = [a["area"] for a in dl]
        if ng:
            g_area[i, :ng] = [a["area"] for a in gl]
            if rules == "coco":
                crowd[i, :ng] = flagged[i, :ng] = [bool(a.get("iscrowd", 0)) for a in gl]
            else:
                flagged[i, :ng] = [bool(a.get("ignore", 0)) for a in gl]
        if iou_type == "bbox":
            if nd:
                d_box[i, :nd] = [a["bbox"] for a in dl]
            if ng:
                g_box[i, :ng] = [a["bbox"] for a in gl]
        elif nd and ng:
            iou[i, :nd, :ng] = _segm_iou(dl, gl, crowd[i, :ng])
    if iou_type == "bbox":
        iou = np.where(
            d_valid[:, :, None] & g_valid[:, None, :], _box_iou_padded(d_box, g_box, crowd), -1.0
        )

    threshold = min(tau, 1 - 1e-10)
    rows = np.arange(c)
    reversed_g = np.arange(g_max)[::-1]
    results = {}
    for name, (lo, hi) in area_ranges.items():
        g_ignore = flagged | (g_area < lo) | (g_area > hi)
        taken = np.zeros((c, g_max), bool)
        matched_iou = np.full((c, d_max), np.nan)
        matched_ignored = np.zeros((c, d_max), bool)
        for r in range(d_max):
            row_iou = iou[:, r, :]
            available = g_valid & (~taken | crowd)
            best = np.full(c, -1)
            best_iou = np.full(c, -1.0)
            # First the ground truths that count, then the ignored ones (COCO's order).
            for pool in (available & ~g_ignore, available & g_ignore):
                cand = np.where(pool & (row_iou >= threshold), row_iou, -np.inf)
                # COCO keeps the last of equal IoUs: argmax over the reversed order.
                last = g_max - 1 - np.argmax(cand[:, reversed_g], axis=1)
                found = (best < 0) & np.isfinite(cand[rows, last]) & d_valid[:, r]
                best = np.where(found, last, best)
                best_iou = np.where(found, cand[rows, last], best_iou)
            hit = best >= 0
            taken[rows[hit], best[hit]] = True
            matched_iou[hit, r] = best_iou[hit]
            matched_ignored[hit, r] = g_ignore[rows[hit], best[hit]]
        unmatched = np.isnan(matched_iou)
        outside = (d_area < lo) | (d_area > hi)
        if not_exhaustive is not None:
            outside = outside | np.asarray(not_exhaustive, bool)[:, None]
        d_ignore = matched_ignored | (unmatched & outside) | ~d_valid
        results[name] = {
            "score": score,
            "ignore": d_ignore,
            "iou": matched_iou,
            "num_gt": (g_valid & ~g_ignore).sum(1),
        }
    return results


def _optimal_lrp(scores, ious, num_gt, tau, thresholds, ties="threshold", tie_order=None):
    """oLRP and its components for one class from its pooled detections; ``tie_order``
    ranks equal scores for ``ties="official"``."""
    nan = float("nan")
    if num_gt == 0:
        return None
    if ties == "official" and tie_order is not None:
        order = np.lexsort((tie_order, -scores))
    else:
        order = np.argsort(-scores, kind="mergesort")
    scores, ious = scores[order], ious[order]
    tp = ~np.isnan(ious)
    cum_tp = np.concatenate([[0], np.cumsum(tp)])
    cum_loc = np.concatenate([[0.0], np.cumsum(np.where(tp, 1 - np.nan_to_num(ious), 0.0))])
    k = np.arange(len(scores) + 1)
    if thresholds == "exact" and ties == "official":
        cut_k = k  # the official code's cut after every detection, ties split
        cut_threshold = np.concatenate([[nan], scores])
    elif thresholds == "exact":
        # A cut keeps every detection scored at least the threshold: never split ties.
        cuts = (
            np.concatenate([[True], np.append(scores[1:] < scores[:-1], True)])
            if len(scores)
            else np.array([True])
        )
        cut_k = k[cuts]
        cut_threshold = np.concatenate([[nan], scores])[cuts]
    else:
        cut_k = np.searchsorted(-scores, -GRID, side="right")  # detections with score >= s
        cut_threshold = GRID.astype(float)
    n_tp, n_det, loc = cum_tp[cut_k], cut_k, cum_loc[cut_k]
    n_fp = n_det - n_tp
    n_fn = num_gt - n_tp
    lrp = (loc / (1 - tau) + n_fp + n_fn) / (n_tp + n_fp + n_fn)
    # The first minimum: with exact cuts the fewest detections (no detection at all
    # when nothing beats LRP = 1); on the grid the lowest threshold, as the grid code.
    best = int(np.argmin(lrp))
    tp_b, fp_b = int(n_tp[best]), int(n_fp[best])
    return {
        "oLRP": float(lrp[best]),
        "oLRP_loc": float(loc[best] / tp_b) if tp_b else nan,
        "oLRP_FP": float(fp_b / (tp_b + fp_b)) if tp_b + fp_b else nan,
        "oLRP_FN": float(n_fn[best] / num_gt),
        "threshold": float(cut_threshold[best]) if tp_b + fp_b else nan,
    }


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def lrp_from_coco(
    coco_gt,
    coco_dt,
    iou_type: str = "bbox",
    tau: float = 0.5,
    max_dets: int = 100,
    thresholds: str = "exact",
    img_ids: Optional[List[int]] = None,
    ties: str = "threshold",
) -> Dict[str, object]:
    """oLRP of ``coco_dt`` against ``coco_gt`` (pycocotools ``COCO`` objects).

    Returns fractions (0 best, 1 worst): ``oLRP``, ``oLRP_loc``, ``oLRP_FP``,
    ``oLRP_FN`` (means over classes, NaN left out), ``oLRP_small``,
    ``oLRP_medium``, ``oLRP_large`` and ``per_class`` ``{category_id: {oLRP,
    oLRP_loc, oLRP_FP, oLRP_FN, threshold}}``; NaN where a figure is undefined.
    Classes without ground truth are left out of everything.  ``img_ids``
    restricts the evaluation to those images (default: all).

    ``ties``: ``"threshold"`` (default) never cuts between detections of equal score,
    so each class's oLRP is reached by keeping the detections scored at least its
    ``threshold``; ``"official"`` cuts anywhere, ties included, in the official
    LRP-Error code's order (image id, then the detection's order in ``coco_dt``), to
    reproduce published figures (module docstring). The grid thresholds ignore ``ties``.
    """
    _check_arguments(iou_type, tau, max_dets, thresholds, ties)
    return _lrp(coco_gt, coco_dt, iou_type, tau, int(max_dets), thresholds, img_ids, ties, "coco")


def lrp_from_lvis(
    lvis_gt,
    lvis_dt,
    iou_type: str = "bbox",
    tau: float = 0.5,
    max_dets: int = 300,
    thresholds: str = "exact",
    img_ids: Optional[List[int]] = None,
    ties: str = "threshold",
) -> Dict[str, object]:
    """oLRP of ``lvis_dt`` against an LVIS-format ground truth ``lvis_gt`` (pycocotools
    ``COCO`` objects of an LVIS json and of its results), by LVIS's federated rules
    (module docstring): ``max_dets`` per image (LVIS's 300), detections only on the images
    that annotate or exclude their class, unmatched detections of not exhaustively
    annotated classes ignored, no crowd.

    Returns what :func:`lrp_from_coco` returns plus ``oLRP_r``, ``oLRP_c`` and ``oLRP_f``,
    the mean oLRP of the rare, common and frequent classes that have ground truth (NaN
    for a group without any). ``ValueError`` naming the problem when ``lvis_gt`` lacks
    LVIS's fields: each image's ``neg_category_ids`` and ``not_exhaustive_category_ids``,
    each category's ``frequency``.
    """
    _check_arguments(iou_type, tau, max_dets, thresholds, ties)
    frequency = _frequencies(lvis_gt, sorted(lvis_gt.getCatIds()))
    out = _lrp(lvis_gt, lvis_dt, iou_type, tau, int(max_dets), thresholds, img_ids, ties, "lvis")
    per_class = out.pop("per_class")
    for group in FREQUENCIES:
        out[f"oLRP_{group}"] = _nanmean(
            [r["oLRP"] for c, r in per_class.items() if frequency[c] == group]
        )
    out["per_class"] = per_class
    return out


def check_lvis_ground_truth(lvis_gt) -> None:
    """``ValueError`` naming what ``lvis_gt`` (a ``COCO`` object of a json) lacks of LVIS's
    fields: each image's federated lists, each category's frequency."""
    _federated_lists(lvis_gt, lvis_gt.getImgIds())
    _frequencies(lvis_gt, lvis_gt.getCatIds())


def _check_arguments(iou_type, tau, max_dets, thresholds, ties) -> None:
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if thresholds not in ("exact", "grid"):
        raise ValueError(f"thresholds must be 'exact' or 'grid', got {thresholds!r}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(map(repr, TIES))}, got {ties!r}")
    if not 0 < tau < 1:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    if int(max_dets) < 1:
        raise ValueError(f"max_dets must be at least 1, got {max_dets}")


def _lrp(coco_gt, coco_dt, iou_type, tau, max_dets, thresholds, img_ids, ties, rules):
    """The figures of :func:`lrp_from_coco` under ``rules`` (``"coco"`` or ``"lvis"``)."""
    cat_ids = sorted(coco_gt.getCatIds())
    groups = _Groups(coco_gt, coco_dt, iou_type, max_dets, cat_ids, img_ids, rules)
    pooled = {
        name: {"score": [], "iou": [], "cat": [], "tie": [], "gt": np.zeros(len(cat_ids), int)}
        for name in AREA_RANGES
    }
    image_rank = {img: i for i, img in enumerate(sorted({k[0] for k in groups.keys}))}
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    # Chunks of pairs of similar size keep the padding small.
    sizes = np.array([len(d) * 1000 + len(g) for d, g in zip(groups.dt, groups.gt)])
    by_size = np.argsort(sizes, kind="stable")
    for start in range(0, len(by_size), CHUNK):
        members = by_size[start : start + CHUNK]
        res = _match_chunk(
            [groups.dt[i] for i in members],
            [groups.gt[i] for i in members],
            iou_type,
            tau,
            AREA_RANGES,
            rules,
            groups.not_exhaustive[members],
        )
        cats = np.array([cat_index[groups.keys[i][1]] for i in members])
        # Order of equal scores in the official code: image, then rank within the image
        # (a pair never holds more than max_dets detections, under either rules).
        tie = (
            np.array([image_rank[groups.keys[i][0]] for i in members])[:, None] * (max_dets + 1)
            + np.arange(res["all"]["score"].shape[1])[None, :]
        )
        for name, r in res.items():
            keep = ~r["ignore"]
            pooled[name]["tie"].append(tie[keep])
            pooled[name]["score"].append(r["score"][keep])
            pooled[name]["iou"].append(r["iou"][keep])
            pooled[name]["cat"].append(np.broadcast_to(cats[:, None], keep.shape)[keep])
            np.add.at(pooled[name]["gt"], cats, r["num_gt"])

    out: Dict[str, object] = {}
    per_area = {}
    for name, p in pooled.items():
        score = np.concatenate(p["score"]) if p["score"] else np.zeros(0)
        iou = np.concatenate(p["iou"]) if p["iou"] else np.zeros(0)
        cat = np.concatenate(p["cat"]) if p["cat"] else np.zeros(0, int)
        tie = np.concatenate(p["tie"]) if p["tie"] else np.zeros(0, int)
        # Group by class (the order among equal scores is given by ``tie``).
        order = np.argsort(cat, kind="stable")
        score, iou, cat, tie = score[order], iou[order], cat[order], tie[order]
        bounds = np.searchsorted(cat, np.arange(len(cat_ids) + 1))
        per_area[name] = {}
        for ci, c in enumerate(cat_ids):
            sl = slice(bounds[ci], bounds[ci + 1])
            r = _optimal_lrp(score[sl], iou[sl], int(p["gt"][ci]), tau, thresholds, ties, tie[sl])
            if r is not None:
                per_area[name][c] = r
    all_classes = per_area["all"]
    for key in ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN"):
        out[key] = _nanmean([r[key] for r in all_classes.values()])
    for name in ("small", "medium", "large"):
        out[f"oLRP_{name}"] = _nanmean([r["oLRP"] for r in per_area[name].values()])
    out["per_class"] = all_classes
    return out


SUMMARY_ROWS = [
    ("oLRP", "Optimal LRP", "all"),
    ("oLRP_loc", "Optimal LRP Loc", "all"),
    ("oLRP_FP", "Optimal LRP FP", "all"),
    ("oLRP_FN", "Optimal LRP FN", "all"),
    ("oLRP_small", "Optimal LRP", "small"),
    ("oLRP_medium", "Optimal LRP", "medium"),
    ("oLRP_large", "Optimal LRP", "large"),
    # LVIS's frequency groups, in the results of lrp_from_lvis only
    ("oLRP_r", "Optimal LRP rare", "all"),
    ("oLRP_c", "Optimal LRP common", "all"),
    ("oLRP_f", "Optimal LRP freq", "all"),
]


def format_summary(result: Dict[str, object], tau: float = 0.5, max_dets: int = 100) -> str:
    """Summary lines in the style of COCOeval.summarize(), one per figure of ``result``."""
    lines = []
    for key, title, area in SUMMARY_ROWS:
        if key not in result:
            continue
        lines.append(
            f" {title:<18} @[ IoU={tau:<4} | area={area:>6} | maxDets={max_dets:>3} ]"
            f" = {result[key]:0.3f}"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alrp_d2.evaluation.lrp",
        description="Optimal LRP of COCO-format detections against COCO (or LVIS) ground truth.",
    )
    parser.add_argument("gt", help="COCO ground-truth json (LVIS json with --lvis)")
    parser.add_argument("dets", help="COCO results json (a list of detections)")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument(
        "--max-dets",
        type=int,
        default=None,
        help="detections kept per image and class (default 100); with --lvis per image"
        " (default 300)",
    )
    parser.add_argument("--thresholds", default="exact", choices=["exact", "grid"])
    parser.add_argument(
        "--ties",
        default="threshold",
        choices=list(TIES),
        help="threshold: never split equal scores (default); official: the official"
        " LRP-Error code's cut anywhere, in image order",
    )
    parser.add_argument(
        "--lvis",
        action="store_true",
        help="the ground truth is LVIS: its federated rules (neg_category_ids,"
        " not_exhaustive_category_ids, 300 detections per image) and oLRP of the rare,"
        " common and frequent classes",
    )
    parser.add_argument("--per-class", action="store_true", help="also print each class's figures")
    return run_command(_run, parser.parse_args(argv))


def _run(args) -> int:
    try:
        coco_gt, coco_dt = _read_coco_pair(args.gt, args.dets)
    except ValueError as err:
        raise UsageError(str(err)) from None
    evaluate = lrp_from_lvis if args.lvis else lrp_from_coco
    max_dets = args.max_dets if args.max_dets is not None else (300 if args.lvis else 100)
    try:
        _check_arguments(args.iou_type, args.tau, max_dets, args.thresholds, args.ties)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        result = evaluate(
            coco_gt, coco_dt, args.iou_type, args.tau, max_dets, args.thresholds, ties=args.ties
        )
    except ValueError as err:  # the ground truth lacks LVIS's fields
        raise UsageError(f"{args.gt}: {err}") from None
    print(format_summary(result, args.tau, max_dets))
    if args.per_class:
        names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
        for cid, r in result["per_class"].items():
            print(
                f"  {names.get(cid, cid)!s:<20} oLRP={r['oLRP']:.3f} loc={r['oLRP_loc']:.3f} "
                f"FP={r['oLRP_FP']:.3f} FN={r['oLRP_FN']:.3f} threshold={r['threshold']:.3f}"
            )
    return 0


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    except ValueError as err:  # not json, not UTF-8
        raise ValueError(f"the {what} {path} is not valid json: {err}") from None


def _read_coco_pair(gt_path: str, dets_path: str):
    """The ground truth and the detections as pycocotools objects; ``ValueError`` naming
    the file and the problem: unreadable, not json, not COCO, or detections of other
    images or classes (ids absent from the ground truth, or, where a detection names its
    image file as ``alrp_d2.predict`` writes it, an id whose image is another file)."""
    from pycocotools.coco import COCO

    gt = _read_json(gt_path, "ground-truth json")
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
        raise ValueError(
            f"the ground-truth json {gt_path} is not in COCO format (no 'images' list)"
        )
    dets = _read_json(dets_path, "results file")
    if not isinstance(dets, list):
        raise ValueError(f"the results file {dets_path} must hold a json list of detections")
    coco_gt = COCO()
    coco_gt.dataset = gt
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"the ground-truth json {gt_path} is not in COCO format ({err!r})"
        ) from None
    images = {im["id"]: im for im in gt["images"]}
    categories = set(coco_gt.getCatIds())
    for i, det in enumerate(dets):
        if not isinstance(det, dict) or "image_id" not in det or "category_id" not in det:
            raise ValueError(f"{dets_path}: detection {i} has no image_id or category_id")
        if not all(isinstance(det[k], (int, str)) for k in ("image_id", "category_id")):
            raise ValueError(
                f"{dets_path}: detection {i}'s image_id and category_id must be"
                f" numbers, got {det['image_id']!r} and {det['category_id']!r}"
            )
    unknown_images = sorted({d["image_id"] for d in dets} - set(images), key=str)
    unknown_classes = sorted({d["category_id"] for d in dets} - categories, key=str)
    problems = []
    if unknown_images:
        problems.append(
            f"image_id {', '.join(map(str, unknown_images[:5]))}"
            f"{' ...' if len(unknown_images) > 5 else ''} not among its images"
            f" (e.g. {', '.join(map(str, list(images)[:3]))})"
        )
    if unknown_classes:
        problems.append(
            f"category_id {', '.join(map(str, unknown_classes[:5]))} not among its"
            f" categories ({', '.join(map(str, sorted(categories)))})"
        )
    for det in dets:
        image = images.get(det["image_id"])
        named = det.get("file_name")
        if (
            image is not None
            and named
            and os.path.basename(str(image.get("file_name", ""))) != named
        ):
            problems.append(
                f"image_id {det['image_id']} is {image.get('file_name')} in the ground"
                f" truth, but the detections were made on {named}"
            )
            break
    if problems:
        raise ValueError(
            f"the detections of {dets_path} do not belong to {gt_path}: " + "; ".join(problems)
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets) if dets else empty_results(coco_gt)
    except (KeyError, ValueError, AssertionError, TypeError, IndexError) as err:
        raise ValueError(f"{dets_path}: not COCO results ({err!r})") from None
    return coco_gt, coco_dt


def empty_results(coco_gt):
    """A COCO object with no detections (pycocotools' loadRes rejects an empty list)."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset.get("categories", []),
        "annotations": [],
    }
    empty.createIndex()
    return empty


if __name__ == "__main__":
    sys.exit(main())
