"""Optimal LRP by LVIS's federated rules (``lrp_from_lvis``): equal to a transcription of
the official LRP-Error code's LVIS evaluation, and each rule checked by a case that fails
without it. Pure numpy and pycocotools (no Detectron2, no lvis package)."""

import contextlib
import copy
import io
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from alrp_d2.evaluation.lrp import lrp_from_coco, lrp_from_lvis

AREAS = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}


def lvis_json(images, gts, categories=None):
    """An LVIS-format ground truth: ``images`` {id: (neg_category_ids,
    not_exhaustive_category_ids)}, ``gts`` dicts with image_id, category_id, bbox (and
    any extra key), ``categories`` {id: frequency} (default: 1 r, 2 c, 3 f)."""
    categories = categories or {1: "r", 2: "c", 3: "f"}
    anns = []
    for i, g in enumerate(gts, 1):
        x, y, w, h = g["bbox"]
        segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        anns.append({"id": i, "area": w * h, "segmentation": segm, **g})
    return {
        "images": [
            {
                "id": i,
                "height": 480,
                "width": 640,
                "neg_category_ids": list(neg),
                "not_exhaustive_category_ids": list(nel),
            }
            for i, (neg, nel) in images.items()
        ],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}", "frequency": f} for c, f in categories.items()],
    }


def load(gt_json, dets):
    """pycocotools objects of a ground-truth dict and detections (on copies)."""
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_json)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets:
            return gt, gt.loadRes(copy.deepcopy(dets))
        empty = COCO()
        empty.dataset = {**copy.deepcopy(gt_json), "annotations": []}
        empty.createIndex()
    return gt, empty


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


# -- a transcription of the official LRP-Error LVIS evaluation --------------------------------
def official_lvis(gt_json, dets, tau=0.5, max_dets=300, area="all"):
    """The LRP-Error repository's LVIS evaluation (its ``lvis-api/lvis/eval.py``: LVIS's
    ``LVISEval`` plus oLRP in ``accumulate``), written out independently for one IoU
    threshold: per class, ``{oLRP, oLRP_loc, oLRP_FP, oLRP_FN, threshold}``.

    Its procedure: the ``max_dets`` best scored detections of each image; of those, the
    ones of a class annotated in the image or in its neg_category_ids; per (image, class),
    detections by score, each matched to the best unmatched ground truth of IoU >= tau,
    ignored ones last; unmatched detections outside the area range or of a not exhaustive
    class ignored, and so are those matched to an ignored ground truth; per class the
    detections of all images (image order) sorted by score with a stable sort, LRP after
    each detection (ignored ones too), the first minimum."""
    lo, hi = AREAS[area]
    images = {im["id"]: im for im in gt_json["images"]}
    by_image = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    kept = []
    for d_list in by_image.values():
        kept += sorted(d_list, key=lambda d: d["score"], reverse=True)[:max_dets]
    annotated = {(g["image_id"], g["category_id"]) for g in gt_json["annotations"]}
    out = {}
    for cat in sorted(c["id"] for c in gt_json["categories"]):
        pooled, num_gt = [], 0  # pooled: (score, IoU or None, ignored)
        for img in sorted(images):
            gts = [
                g for g in gt_json["annotations"] if (g["image_id"], g["category_id"]) == (img, cat)
            ]
            if (img, cat) not in annotated and cat not in images[img]["neg_category_ids"]:
                dts = []
            else:
                dts = [d for d in kept if (d["image_id"], d["category_id"]) == (img, cat)]
            g_ign = [bool(g.get("ignore", 0)) or not lo <= g["area"] <= hi for g in gts]
            num_gt += g_ign.count(False)
            g_order = sorted(range(len(gts)), key=lambda k: g_ign[k])
            dts = sorted(dts, key=lambda d: -d["score"])
            ious = (
                np.asarray(
                    mask_utils.iou(
                        [d["bbox"] for d in dts], [g["bbox"] for g in gts], [0] * len(gts)
                    )
                )
                if dts and gts
                else np.zeros((len(dts), len(gts)))
            )
            taken = set()
            for di, d in enumerate(dts):
                best, best_iou = None, min(tau, 1 - 1e-10)
                for gi in g_order:
                    if gi in taken:
                        continue
                    if best is not None and not g_ign[best] and g_ign[gi]:
                        break
                    if ious[di, gi] >= best_iou:
                        best, best_iou = gi, ious[di, gi]
                if best is None:
                    w, h = d["bbox"][2:]
                    outside = not lo <= w * h <= hi
                    ignored = outside or cat in images[img]["not_exhaustive_category_ids"]
                    pooled.append((d["score"], None, ignored))
                else:
                    taken.add(best)
                    pooled.append((d["score"], best_iou, g_ign[best]))
        if num_gt == 0:
            continue
        pooled = sorted(pooled, key=lambda p: -p[0])
        lrps, n_tp, n_fp, loc = [], 0, 0, 0.0
        for score, iou, ignored in pooled:
            if not ignored:
                if iou is None:
                    n_fp += 1
                else:
                    n_tp, loc = n_tp + 1, loc + 1 - iou
            lrp = (loc / (1 - tau) + n_fp + num_gt - n_tp) / (n_tp + n_fp + num_gt - n_tp)
            lrps.append((lrp, n_tp, n_fp, loc, score))
        if not lrps or lrps[-1][1] == 0:  # no detection, or no true positive
            out[cat] = dict(oLRP=1.0, oLRP_loc=math.nan, oLRP_FP=math.nan, oLRP_FN=1.0)
            out[cat]["threshold"] = math.nan
            continue
        lrp, tp, fp, loc, score = min(lrps, key=lambda r: r[0])  # the first minimum
        out[cat] = {
            "oLRP": lrp,
            "oLRP_loc": loc / tp if tp else math.nan,
            "oLRP_FP": fp / (tp + fp),
            "oLRP_FN": (num_gt - tp) / num_gt,
            "threshold": score,
        }
    return out


def random_lvis_case(seed, n_images=6, n_cats=4, crowded=False):
    """Objects of mixed sizes, detections near them (some of another class) and anywhere,
    each image's neg and not exhaustive lists drawn; ``crowded``: over 300 per image."""
    rng = random.Random(seed)
    images, gts, dets = {}, [], []
    for img in range(1, n_images + 1):
        present = set()
        for _ in range(rng.randint(0, 5)):
            c = rng.randint(1, n_cats)
            present.add(c)
            w = rng.choice([rng.uniform(5, 30), rng.uniform(30, 120)])
            box = [rng.uniform(0, 300), rng.uniform(0, 300), w, rng.uniform(5, 120)]
            extra = {"ignore": 1} if rng.random() < 0.1 else {}
            gts.append({"image_id": img, "category_id": c, "bbox": box, **extra})
            for _ in range(rng.randint(0, 3)):
                x, y, w, h = box
                near = [
                    x + rng.gauss(0, w / 5),
                    y + rng.gauss(0, h / 5),
                    w * rng.uniform(0.7, 1.3),
                    h * rng.uniform(0.7, 1.3),
                ]
                dc = c if rng.random() < 0.8 else rng.randint(1, n_cats)
                dets.append(det(img, dc, near, rng.random()))
        for _ in range(rng.randint(300, 320) if crowded else rng.randint(0, 4)):
            box = [
                rng.uniform(0, 300),
                rng.uniform(0, 300),
                rng.uniform(5, 100),
                rng.uniform(5, 100),
            ]
            dets.append(det(img, rng.randint(1, n_cats), box, rng.random()))
        absent = [c for c in range(1, n_cats + 1) if c not in present]
        images[img] = (
            [c for c in absent if rng.random() < 0.5],
            [c for c in present if rng.random() < 0.4],
        )
    categories = {c: "rcf"[c % 3] for c in range(1, n_cats + 1)}
    return lvis_json(images, gts, categories), dets


def tied(dets):
    return [{**d, "score": round(d["score"], 1)} for d in dets]


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(16))
def test_official_ties_equal_the_official_lvis_procedure(seed):
    gt_json, dets = random_lvis_case(seed, crowded=seed % 8 == 7)
    for case in (dets, tied(dets)):
        ours = lrp_from_lvis(*load(gt_json, case), ties="official")
        ref = official_lvis(gt_json, case)
        assert set(ours["per_class"]) == set(ref), seed
        for cat, r in ref.items():
            for key, value in r.items():
                assert same(ours["per_class"][cat][key], value), (seed, cat, key)
        for key in ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN"):
            values = [r[key] for r in ref.values() if not math.isnan(r[key])]
            assert same(ours[key], float(np.mean(values)) if values else math.nan), (seed, key)
        for area in ("small", "medium", "large"):
            values = [r["oLRP"] for r in official_lvis(gt_json, case, area=area).values()]
            assert same(ours[f"oLRP_{area}"], float(np.mean(values)) if values else math.nan)
        freq = {c["id"]: c["frequency"] for c in gt_json["categories"]}
        for group in "rcf":
            values = [r["oLRP"] for c, r in ref.items() if freq[c] == group]
            assert same(ours[f"oLRP_{group}"], float(np.mean(values)) if values else math.nan)


def test_cases_cover_the_rules():
    """The random cases above exercise every rule: detections dropped for an unverified
    class, counted on a negative one, ignored for a not exhaustive one, images over 300."""
    seen = dict(unverified=0, negative=0, not_exhaustive=0, crowded=0, ignore_flag=0)
    for seed in range(16):
        gt_json, dets = random_lvis_case(seed, crowded=seed % 8 == 7)
        images = {im["id"]: im for im in gt_json["images"]}
        annotated = {(g["image_id"], g["category_id"]) for g in gt_json["annotations"]}
        for d in dets:
            pair, im = (d["image_id"], d["category_id"]), images[d["image_id"]]
            seen["unverified"] += pair not in annotated and pair[1] not in im["neg_category_ids"]
            seen["negative"] += pair[1] in im["neg_category_ids"]
            seen["not_exhaustive"] += pair[1] in im["not_exhaustive_category_ids"]
        per_image = {}
        for d in dets:
            per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        seen["crowded"] += max(per_image.values()) > 300
        seen["ignore_flag"] += sum(g.get("ignore", 0) for g in gt_json["annotations"])
    assert all(seen.values()), seen


def test_threshold_ties_agree_with_official_without_ties():
    for seed in range(8):
        gt_json, dets = random_lvis_case(seed)
        distinct = [{**d, "score": 0.3 + i * 1e-4} for i, d in enumerate(dets)]
        a = lrp_from_lvis(*load(gt_json, distinct))
        b = lrp_from_lvis(*load(gt_json, distinct), ties="official")
        for key in ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "oLRP_r", "oLRP_c", "oLRP_f"):
            assert same(a[key], b[key]), (seed, key)


# -- each federated rule, by a case that fails without it -------------------------------------
BOX = (10, 10, 40, 40)


def per_class(gt_json, dets, cat=1, **kwargs):
    return lrp_from_lvis(*load(gt_json, dets), **kwargs)["per_class"][cat]


def test_a_class_unverified_in_an_image_is_not_evaluated_there():
    gts = [{"image_id": 1, "category_id": 1, "bbox": BOX}]
    dets = [det(1, 1, BOX, 0.9), det(2, 1, (100, 100, 30, 30), 0.95)]  # image 2: unknown
    unknown = per_class(lvis_json({1: ([], []), 2: ([], [])}, gts), dets)
    assert unknown["oLRP"] == 0 and unknown["oLRP_FP"] == 0 and unknown["threshold"] == 0.9
    # Verified absent in image 2 (neg_category_ids): the detection is a false positive.
    negative = per_class(lvis_json({1: ([], []), 2: ([1], [])}, gts), dets)
    assert negative["oLRP"] == 0.5 and negative["oLRP_FP"] == 0.5
    assert negative["threshold"] == 0.9
    # COCO's rules count it everywhere.
    assert lrp_from_coco(*load(lvis_json({1: ([], []), 2: ([], [])}, gts), dets))["oLRP"] == 0.5


def test_unmatched_detections_of_a_not_exhaustive_class_are_ignored():
    gts = [{"image_id": 1, "category_id": 1, "bbox": BOX}]
    dets = [det(1, 1, (200, 200, 30, 30), 0.9), det(1, 1, BOX, 0.8)]
    exhaustive = per_class(lvis_json({1: ([], [])}, gts), dets)
    assert exhaustive["oLRP"] == 0.5 and exhaustive["oLRP_FP"] == 0.5
    partial = per_class(lvis_json({1: ([], [1])}, gts), dets)
    # The matched one stays a true positive (no false negative), the other one is ignored.
    assert partial["oLRP"] == 0 and partial["oLRP_FP"] == 0 and partial["oLRP_FN"] == 0
    # Only the class listed: another class's unmatched detection is still a false positive.
    other = lvis_json({1: ([], [2])}, gts + [{"image_id": 1, "category_id": 2, "bbox": BOX}])
    two = lrp_from_lvis(*load(other, dets + [det(1, 2, BOX, 0.7)]))["per_class"]
    assert two[1]["oLRP_FP"] == 0.5 and two[2]["oLRP_FP"] == 0


def test_at_most_300_detections_per_image_over_all_classes_none_per_class():
    gts = [{"image_id": 1, "category_id": 1, "bbox": BOX}]
    images = {1: ([2], [])}  # class 2 verified absent: its detections are false positives
    # 149 false positives of class 1 above its one true positive: 150 of one class in one
    # image, all kept (COCO's rules keep 100 per image and class).
    fps = [det(1, 1, (300, 10 + i, 20, 20), 0.9 - i * 1e-3) for i in range(149)]
    many = per_class(lvis_json(images, gts), fps + [det(1, 1, BOX, 0.1)])
    assert many["oLRP_FN"] == 0 and many["oLRP"] == pytest.approx(149 / 150)
    coco = lrp_from_coco(*load(lvis_json(images, gts), fps + [det(1, 1, BOX, 0.1)]))
    assert coco["per_class"][1]["oLRP_FN"] == 1
    # 300 detections of class 2 above the true positive: it is the 301st of its image.
    others = [det(1, 2, (300, 10 + i, 20, 20), 0.9 - i * 1e-3) for i in range(300)]
    capped = per_class(lvis_json(images, gts), others + [det(1, 1, BOX, 0.1)])
    assert capped["oLRP"] == 1 and capped["oLRP_FN"] == 1
    uncapped = per_class(lvis_json(images, gts), others + [det(1, 1, BOX, 0.1)], max_dets=301)
    assert uncapped["oLRP"] == 0


def test_no_crowd_and_the_ignore_flag():
    gts = [
        {"image_id": 1, "category_id": 1, "bbox": BOX},
        {"image_id": 1, "category_id": 1, "bbox": (100, 100, 50, 50), "iscrowd": 1},
    ]
    dets = [det(1, 1, BOX, 0.9), det(1, 1, (110, 110, 20, 20), 0.8)]  # the second: in it
    # LVIS has no crowd: the region is an object, missed (IoU 0.16), the detection a FP.
    lvis = per_class(lvis_json({1: ([], [])}, gts), dets)
    assert lvis["oLRP_FN"] == 0.5 and lvis["oLRP_FP"] == 0
    assert lrp_from_coco(*load(lvis_json({1: ([], [])}, gts), dets))["oLRP"] == 0
    # An annotation flagged ``ignore`` is left out (not missed), and so is what matches it.
    flagged = lvis_json({1: ([], [])}, [gts[0], {**gts[1], "iscrowd": 0, "ignore": 1}])
    ignored = per_class(flagged, dets[:1])
    assert ignored["oLRP"] == 0 and ignored["oLRP_FN"] == 0
    matched = per_class(flagged, [det(1, 1, gts[1]["bbox"], 0.95), dets[0]])
    assert matched["oLRP"] == 0 and matched["oLRP_FP"] == 0 and matched["threshold"] == 0.9


def test_frequency_groups():
    gts = [{"image_id": 1, "category_id": c, "bbox": (60 * c, 10, 40, 40)} for c in (1, 2, 3, 4)]
    dets = [det(1, 1, (60, 10, 40, 40), 0.9), det(1, 3, (180, 10, 40, 40), 0.9)]
    categories = {1: "r", 2: "r", 3: "f", 4: "c"}
    r = lrp_from_lvis(*load(lvis_json({1: ([], [])}, gts, categories), dets))
    assert r["oLRP_r"] == 0.5 and r["oLRP_f"] == 0 and r["oLRP_c"] == 1
    assert r["oLRP"] == 0.5
    # A group without ground truth: NaN (the official code reports -1).
    r = lrp_from_lvis(*load(lvis_json({1: ([], [])}, gts[:1], categories), dets))
    assert r["oLRP_r"] == 0 and math.isnan(r["oLRP_c"]) and math.isnan(r["oLRP_f"])


def test_not_lvis_ground_truth_is_refused_by_name():
    gt_json = lvis_json(
        {1: ([], []), 7: ([], [])}, [{"image_id": 1, "category_id": 1, "bbox": BOX}]
    )
    del gt_json["images"][1]["not_exhaustive_category_ids"]
    with pytest.raises(ValueError, match="image 7 has no list 'not_exhaustive_category_ids'"):
        lrp_from_lvis(*load(gt_json, [det(1, 1, BOX, 0.5)]))
    gt_json = lvis_json({1: ([], [])}, [], {1: "r", 2: "sometimes"})
    with pytest.raises(ValueError, match=r"categories 2 \('c2': 'sometimes'\)"):
        lrp_from_lvis(*load(gt_json, []))


def test_command_line(tmp_path):
    gts = [{"image_id": 1, "category_id": c, "bbox": (60 * c, 10, 40, 40)} for c in (1, 2, 3)]
    dets = [det(1, 1, (60, 10, 40, 40), 0.9), det(2, 2, (0, 0, 9, 9), 0.8)]
    gt_json = lvis_json({1: ([], []), 2: ([], [])}, gts)
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    command = [sys.executable, "-m", "alrp_d2.evaluation.lrp", "--lvis"]
    done = subprocess.run(
        [*command, tmp_path / "gt.json", tmp_path / "dets.json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = lrp_from_lvis(*load(gt_json, dets))
    assert (
        f"Optimal LRP rare   @[ IoU=0.5  | area=   all | maxDets=300 ] = {expected['oLRP_r']:.3f}"
        in done.stdout
    )
    del gt_json["images"][0]["neg_category_ids"]
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    bad = subprocess.run(
        [*command, tmp_path / "gt.json", tmp_path / "dets.json"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "gt.json: the ground truth is not in LVIS format" in bad.stderr
