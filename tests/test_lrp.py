"""Optimal LRP: worked examples, invariances, edge cases and a brute-force search."""

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
from pycocotools.cocoeval import COCOeval

from alrp_d2.evaluation.lrp import format_summary, lrp_from_coco


def make_coco(images, categories, gts, dets):
    """COCO objects from lists; gts and dets are dicts with image_id, category_id, bbox."""
    gt = COCO()
    anns = []
    for i, g in enumerate(gts, 1):
        w, h = g["bbox"][2], g["bbox"][3]
        anns.append({"id": i, "area": g.get("area", w * h), "iscrowd": g.get("iscrowd", 0), **g})
    gt.dataset = {
        "images": [{"id": i, "width": 640, "height": 480} for i in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets:
            dt = gt.loadRes(copy.deepcopy(dets))
        else:
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
    return gt, dt


def test_worked_example_a():
    gts = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10]},
    ]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 8], "score": 0.7},
    ]
    r = lrp_from_coco(*make_coco([1], [1], gts, dets))
    assert r["oLRP"] == pytest.approx(0.4667, abs=1e-4)
    assert r["oLRP_loc"] == pytest.approx(0.100, abs=1e-6)
    assert r["oLRP_FP"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["oLRP_FN"] == 0
    assert r["per_class"][1]["threshold"] == pytest.approx(0.7)


def test_worked_example_b():
    gts = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.8}]
    r = lrp_from_coco(*make_coco([1], [1], gts, dets))
    assert r["oLRP"] == 1 and r["oLRP_FN"] == 1
    assert math.isnan(r["oLRP_loc"]) and math.isnan(r["oLRP_FP"])
    assert math.isnan(r["per_class"][1]["threshold"])
    # The grid variant counts the false positives of such a class.
    g = lrp_from_coco(*make_coco([1], [1], gts, dets), thresholds="grid")
    assert g["oLRP"] == 1 and g["oLRP_FP"] == 1 and g["oLRP_FN"] == 1


def random_case(seed, n_images=4, n_cats=3, crowd=True):
    rng = random.Random(seed)
    gts, dets = [], []
    for img in range(1, n_images + 1):
        for _ in range(rng.randint(0, 5)):
            x, y = rng.uniform(0, 200), rng.uniform(0, 200)
            w, h = (
                rng.choice([rng.uniform(5, 30), rng.uniform(30, 100), rng.uniform(100, 200)]),
                rng.uniform(5, 150),
            )
            gts.append(
                {
                    "image_id": img,
                    "category_id": rng.randint(1, n_cats),
                    "bbox": [x, y, w, h],
                    "iscrowd": int(crowd and rng.random() < 0.1),
                }
            )
        for _ in range(rng.randint(0, 8)):
            if gts and rng.random() < 0.7:
                g = rng.choice(gts)
                x, y, w, h = g["bbox"]
                box = [
                    x + rng.uniform(-8, 8),
                    y + rng.uniform(-8, 8),
                    w * rng.uniform(0.7, 1.3),
                    h * rng.uniform(0.7, 1.3),
                ]
                cat = g["category_id"] if rng.random() < 0.8 else rng.randint(1, n_cats)
                img_id = g["image_id"]
            else:
                box = [
                    rng.uniform(0, 200),
                    rng.uniform(0, 200),
                    rng.uniform(5, 100),
                    rng.uniform(5, 100),
                ]
                cat, img_id = rng.randint(1, n_cats), img
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": box,
                    "score": round(rng.random(), 1 if rng.random() < 0.3 else 4),
                }
            )
    return list(range(1, n_images + 1)), list(range(1, n_cats + 1)), gts, dets


def brute_force(gt, dt, tau=0.5, area="all", grid=False, iou_type="bbox"):
    """Per class: for every candidate threshold, pycocotools' own matching of the
    detections scored at least that threshold, then LRP; keep the minimum."""
    ev = COCOeval(gt, dt, iou_type)
    ev.params.iouThrs = np.array([tau])
    area_index = ev.params.areaRngLbl.index(area)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    n_areas, n_imgs = len(ev.params.areaRng), len(ev.params.imgIds)
    out = {}
    for ci, cat in enumerate(ev.params.catIds):
        scores, ious, num_gt = [], [], 0
        for ii in range(n_imgs):
            e = ev.evalImgs[ci * n_areas * n_imgs + area_index * n_imgs + ii]
            if e is None:
                continue
            num_gt += int((~e["gtIgnore"].astype(bool)).sum())
            img = ev.params.imgIds[ii]
            iou_mat = ev.ious[(img, cat)]
            gt_ids = [g["id"] for g in ev._gts[img, cat]]
            for di, d_id in enumerate(e["dtIds"]):
                if e["dtIgnore"][0, di]:
                    continue
                m = int(e["dtMatches"][0, di])
                scores.append(e["dtScores"][di])
                ious.append(iou_mat[di, gt_ids.index(m)] if m else None)
        if num_gt == 0:
            continue
        candidates = (
            [round(t / 100, 2) for t in range(101)]
            if grid
            else [math.inf] + sorted(set(scores), reverse=True)
        )
        best = None
        for s in candidates:
            kept = [(sc, iou) for sc, iou in zip(scores, ious) if sc >= s]
            tp = [iou for _, iou in kept if iou is not None]
            n_fp = len(kept) - len(tp)
            n_fn = num_gt - len(tp)
            value = (sum((1 - i) / (1 - tau) for i in tp) + n_fp + n_fn) / (len(tp) + n_fp + n_fn)
            if best is None or value < best[0] - 1e-12:
                best = (value, len(tp), n_fp, n_fn, sum(1 - i for i in tp), s)
        value, n_tp, n_fp, n_fn, loc, s = best
        out[cat] = {
            "oLRP": value,
            "oLRP_loc": loc / n_tp if n_tp else math.nan,
            "oLRP_FP": n_fp / (n_tp + n_fp) if n_tp + n_fp else math.nan,
            "oLRP_FN": n_fn / num_gt,
            "threshold": s if n_tp + n_fp else math.nan,
        }
    return out


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("seed", range(25))
def test_equals_brute_force_over_thresholds(seed):
    images, cats, gts, dets = random_case(seed)
    gt, dt = make_coco(images, cats, gts, dets)
    for grid in (False, True):
        fast = lrp_from_coco(gt, dt, thresholds="grid" if grid else "exact")
        slow = brute_force(gt, dt, grid=grid)
        assert set(fast["per_class"]) == set(slow)
        for cat, ref in slow.items():
            for key, value in ref.items():
                assert same(fast["per_class"][cat][key], value), (seed, grid, cat, key)
        for area in ("small", "medium", "large"):
            ref = [r["oLRP"] for r in brute_force(gt, dt, area=area, grid=grid).values()]
            expected = float(np.mean(ref)) if ref else math.nan
            assert same(fast[f"oLRP_{area}"], expected), (seed, area)


def test_perfect_detections_give_zero_and_none_give_one():
    images, cats, gts, _ = random_case(3, crowd=False)
    perfect = [
        {
            "image_id": g["image_id"],
            "category_id": g["category_id"],
            "bbox": g["bbox"],
            "score": 0.9,
        }
        for g in gts
    ]
    r = lrp_from_coco(*make_coco(images, cats, gts, perfect))
    assert r["oLRP"] == pytest.approx(0, abs=1e-12) and r["oLRP_FN"] == 0 and r["oLRP_FP"] == 0
    r = lrp_from_coco(*make_coco(images, cats, gts, []))
    assert (
        r["oLRP"] == 1
        and r["oLRP_FN"] == 1
        and math.isnan(r["oLRP_FP"])
        and math.isnan(r["oLRP_loc"])
    )


def test_image_order_does_not_matter():
    images, cats, gts, dets = random_case(8, n_images=6)
    base = lrp_from_coco(*make_coco(images, cats, gts, dets))
    mapping = dict(zip(images, reversed(images)))
    shuffled_g = [{**g, "image_id": mapping[g["image_id"]]} for g in gts]
    shuffled_d = [{**d, "image_id": mapping[d["image_id"]]} for d in reversed(dets)]
    other = lrp_from_coco(*make_coco(images, cats, shuffled_g, shuffled_d))
    for key in (
        "oLRP",
        "oLRP_loc",
        "oLRP_FP",
        "oLRP_FN",
        "oLRP_small",
        "oLRP_medium",
        "oLRP_large",
    ):
        assert same(base[key], other[key]), key


def test_classes_without_ground_truth_are_left_out():
    gts = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [30, 30, 10, 10], "score": 0.9},
    ]
    r = lrp_from_coco(*make_coco([1], [1, 2], gts, dets))
    assert set(r["per_class"]) == {1} and r["oLRP"] == 0


def test_crowd_ground_truth_is_ignored_and_reusable():
    gts = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 100, 100], "iscrowd": 1},
    ]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}] + [
        {"image_id": 1, "category_id": 1, "bbox": [110 + i, 110, 30, 30], "score": 0.5}
        for i in range(3)
    ]
    r = lrp_from_coco(*make_coco([1], [1], gts, dets))
    # The three detections inside the crowd region are neither TP nor FP.
    assert r["oLRP"] == 0 and r["oLRP_FP"] == 0


def test_at_most_max_dets_per_image_and_class():
    gts = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.9 - i / 100}
        for i in range(3)
    ]
    dets.append({"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.1})
    gt, dt = make_coco([1], [1], gts, dets)
    assert lrp_from_coco(gt, dt, max_dets=3)["oLRP"] == 1  # the true positive is the 4th
    assert lrp_from_coco(gt, dt, max_dets=4)["oLRP"] < 1


def test_bad_arguments():
    gt, dt = make_coco([1], [1], [], [])
    with pytest.raises(ValueError, match="iou_type"):
        lrp_from_coco(gt, dt, iou_type="keypoints")
    with pytest.raises(ValueError, match="thresholds"):
        lrp_from_coco(gt, dt, thresholds="fine")
    with pytest.raises(ValueError, match="tau"):
        lrp_from_coco(gt, dt, tau=1.5)


def test_command_line(tmp_path):
    images, cats, gts, dets = random_case(5)
    gt, _ = make_coco(images, cats, gts, dets)
    gt_file, det_file = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_file.write_text(json.dumps(gt.dataset))
    det_file.write_text(json.dumps(dets))
    out = subprocess.run(
        [sys.executable, "-m", "alrp_d2.evaluation.lrp", str(gt_file), str(det_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    expected = format_summary(lrp_from_coco(*make_coco(images, cats, gts, dets)))
    assert out.strip() == expected.strip()
    assert "Optimal LRP" in out and "area= small" in out
    bad = subprocess.run(
        [sys.executable, "-m", "alrp_d2.evaluation.lrp", str(gt_file), str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope.json" in bad.stderr


def official_cut_anywhere(gt, dt, tau=0.5, iou_type="bbox"):
    """The official LRP-Error code's procedure, independently: per class, COCOeval's
    non-ignored detections of every image in image order, sorted by score with a stable
    sort, LRP after every detection (ties split), the minimum."""
    ev = COCOeval(gt, dt, iou_type)
    ev.params.iouThrs = np.array([tau])
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    n_areas, n_imgs = len(ev.params.areaRng), len(ev.params.imgIds)
    out = {}
    for ci, cat in enumerate(ev.params.catIds):
        scores, ious, num_gt = [], [], 0
        for ii in range(n_imgs):  # area "all" is index 0
            e = ev.evalImgs[ci * n_areas * n_imgs + ii]
            if e is None:
                continue
            num_gt += int((~e["gtIgnore"].astype(bool)).sum())
            img = ev.params.imgIds[ii]
            gt_ids = [g["id"] for g in ev._gts[img, cat]]
            for di in range(len(e["dtIds"])):
                if not e["dtIgnore"][0, di]:
                    m = int(e["dtMatches"][0, di])
                    scores.append(e["dtScores"][di])
                    ious.append(ev.ious[(img, cat)][di, gt_ids.index(m)] if m else None)
        if num_gt == 0:
            continue
        order = np.argsort(-np.array(scores), kind="mergesort")
        best = (1.0, 0, 0, num_gt, 0.0)  # nothing kept
        n_tp = n_fp = 0
        loc = 0.0
        for i in order:
            if ious[i] is None:
                n_fp += 1
            else:
                n_tp, loc = n_tp + 1, loc + 1 - ious[i]
            value = (loc / (1 - tau) + n_fp + num_gt - n_tp) / (num_gt + n_fp)
            if value < best[0] - 1e-12:
                best = (value, n_tp, n_fp, num_gt - n_tp, loc)
        value, n_tp, n_fp, n_fn, loc = best
        out[cat] = {
            "oLRP": value,
            "oLRP_loc": loc / n_tp if n_tp else math.nan,
            "oLRP_FP": n_fp / (n_tp + n_fp) if n_tp + n_fp else math.nan,
            "oLRP_FN": n_fn / num_gt,
        }
    return out


def tied(dets, decimals=1):
    return [{**d, "score": round(d["score"], decimals)} for d in dets]


@pytest.mark.parametrize("seed", range(12))
def test_ties_official_equals_the_official_procedure(seed):
    images, cats, gts, dets = random_case(seed, n_images=6)
    for case in (dets, tied(dets)):
        gt, dt = make_coco(images, cats, gts, case)
        fast = lrp_from_coco(gt, dt, ties="official")
        ref = official_cut_anywhere(gt, dt)
        assert set(fast["per_class"]) == set(ref)
        for cat, r in ref.items():
            for key, value in r.items():
                assert same(fast["per_class"][cat][key], value), (seed, cat, key)


def test_ties_threshold_is_the_default_and_agrees_without_ties():
    disagree = 0
    for seed in range(12):
        images, cats, gts, dets = random_case(seed, n_images=6)
        # Distinct scores: both semantics agree exactly.
        distinct = [{**d, "score": 0.5 + i * 1e-4} for i, d in enumerate(dets)]
        gt, dt = make_coco(images, cats, gts, distinct)
        a, b = lrp_from_coco(gt, dt), lrp_from_coco(gt, dt, ties="official")
        for key in ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN"):
            assert same(a[key], b[key]), (seed, key)
        # Tied scores: the default equals the threshold brute force; official is never higher.
        gt, dt = make_coco(images, cats, gts, tied(dets))
        default, official = lrp_from_coco(gt, dt), lrp_from_coco(gt, dt, ties="official")
        explicit = lrp_from_coco(gt, dt, ties="threshold")
        assert all(
            same(default[k], explicit[k]) for k in ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN")
        )
        for cat, ref in brute_force(gt, dt).items():
            assert same(default["per_class"][cat]["oLRP"], ref["oLRP"])
            assert official["per_class"][cat]["oLRP"] <= ref["oLRP"] + 1e-12
        disagree += not same(default["oLRP"], official["oLRP"])
    assert disagree  # the tied cases do tell the two apart
    with pytest.raises(ValueError, match="ties"):
        lrp_from_coco(gt, dt, ties="anywhere")


# -- masks (iou_type="segm") ---------------------------------------------------------------
HEIGHT, WIDTH = 480, 640  # the images of make_coco


def ellipse(cx, cy, rx, ry):
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}  # as Detectron2's results


def uncompressed_rle(mask):
    """COCO's crowd format: run lengths of the column-major mask, zeros first."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": ([0] if flat[0] else []) + runs}


def polygon(rng, cx, cy, r):
    """A star-shaped polygon around (cx, cy), in COCO's format (a list of polygons)."""
    n = rng.randint(3, 9)
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
    points = []
    for a in angles:
        radius = r * rng.uniform(0.5, 1.0)
        points += [
            float(np.clip(cx + radius * math.cos(a), 0, WIDTH - 1)),
            float(np.clip(cy + radius * math.sin(a), 0, HEIGHT - 1)),
        ]
    return [points]


def to_rle(segm):
    """Compressed RLE of any of COCO's segmentation formats."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, HEIGHT, WIDTH))
    return mask_utils.frPyObjects(segm, HEIGHT, WIDTH) if isinstance(segm["counts"], list) else segm


def decode(segm):
    return mask_utils.decode(to_rle(segm)) > 0


def with_box(ann):
    """``ann`` with the area and box of its mask (COCO's ground truth carries both)."""
    r = to_rle(ann["segmentation"])
    return {**ann, "area": float(mask_utils.area(r)), "bbox": mask_utils.toBbox(r).tolist()}


def random_mask_case(seed, n_images=3, n_cats=2, crowd=True):
    """Ground truths as polygons, RLE and (crowd) uncompressed RLE of every size range;
    detections are RLE masks: shifted, grown, shrunk or noisy copies, and stray blobs."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    gts, dets = [], []
    for img in range(1, n_images + 1):
        for _ in range(rng.randint(0, 5)):
            size = rng.choice([rng.uniform(4, 15), rng.uniform(20, 50), rng.uniform(60, 150)])
            cx, cy = rng.uniform(size, WIDTH - size), rng.uniform(size, HEIGHT - size)
            kind = rng.random()
            is_crowd = int(crowd and rng.random() < 0.15)
            if is_crowd:
                segm = uncompressed_rle(ellipse(cx, cy, size * 1.5, size))
            elif kind < 0.5:
                segm = polygon(rng, cx, cy, size)
            else:
                segm = rle(ellipse(cx, cy, size, size * rng.uniform(0.5, 1.5)))
            gts.append(
                with_box(
                    {
                        "image_id": img,
                        "category_id": rng.randint(1, n_cats),
                        "segmentation": segm,
                        "iscrowd": is_crowd,
                    }
                )
            )
        for _ in range(rng.randint(0, 8)):
            if gts and rng.random() < 0.75:
                g = rng.choice(gts)
                mask = decode(g["segmentation"])
                change = rng.random()
                if change < 0.3:
                    mask = np.roll(mask, (rng.randint(-4, 4), rng.randint(-4, 4)), axis=(0, 1))
                elif change < 0.5:
                    mask = mask | np.roll(mask, rng.randint(1, 5), axis=1)
                elif change < 0.7:
                    mask = mask & np.roll(mask, rng.randint(1, 5), axis=0)
                elif change < 0.9:
                    mask = mask ^ (np_rng.random(mask.shape) < 0.002)
                cat = g["category_id"] if rng.random() < 0.8 else rng.randint(1, n_cats)
                img_id = g["image_id"]
            else:
                r = rng.uniform(4, 80)
                cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
                mask = ellipse(cx, cy, r, r * rng.uniform(0.5, 2))
                cat, img_id = rng.randint(1, n_cats), img
            if not mask.any():
                continue
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": cat,
                    "segmentation": rle(mask),
                    "score": round(rng.random(), 1 if rng.random() < 0.3 else 4),
                }
            )
    return list(range(1, n_images + 1)), list(range(1, n_cats + 1)), gts, dets


def make_mask_coco(images, cats, gts, dets):
    """Fresh COCO objects each time: COCOeval turns the ground truths' polygons into RLE
    in place, which would hide a failure to convert them."""
    return make_coco(images, cats, copy.deepcopy(gts), dets)


@pytest.mark.parametrize("seed", range(12))
def test_masks_equal_brute_force_over_thresholds(seed):
    images, cats, gts, dets = random_mask_case(seed)
    for grid in (False, True):
        thresholds = "grid" if grid else "exact"
        gt, dt = make_mask_coco(images, cats, gts, dets)
        fast = lrp_from_coco(gt, dt, "segm", thresholds=thresholds)
        # The ground truths are left as they were (polygons, uncompressed RLE).
        assert [a["segmentation"] for a in gt.dataset["annotations"]] == [
            g["segmentation"] for g in gts
        ]
        slow = brute_force(*make_mask_coco(images, cats, gts, dets), grid=grid, iou_type="segm")
        assert set(fast["per_class"]) == set(slow)
        for cat, ref in slow.items():
            for key, value in ref.items():
                assert same(fast["per_class"][cat][key], value), (seed, grid, cat, key)
        for area in ("small", "medium", "large"):
            ref = brute_force(
                *make_mask_coco(images, cats, gts, dets), area=area, grid=grid, iou_type="segm"
            )
            expected = float(np.mean([r["oLRP"] for r in ref.values()])) if ref else math.nan
            assert same(fast[f"oLRP_{area}"], expected), (seed, grid, area)


def test_mask_cases_cover_what_they_should():
    """The random mask cases exercise every format, crowds, size ranges and matches."""
    cases = [random_mask_case(seed) for seed in range(12)]
    gts = [g for case in cases for g in case[2]]
    assert any(isinstance(g["segmentation"], list) for g in gts)
    assert any(
        isinstance(g["segmentation"], dict) and isinstance(g["segmentation"]["counts"], str)
        for g in gts
    )
    assert any(g["iscrowd"] and isinstance(g["segmentation"]["counts"], list) for g in gts)
    areas = [g["area"] for g in gts if not g["iscrowd"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < a < 96**2 for a in areas)
    tp = fp = 0
    for images, cats, case_gts, dets in cases:
        result = lrp_from_coco(*make_mask_coco(images, cats, case_gts, dets), "segm")
        for r in result["per_class"].values():
            tp += r["oLRP_FN"] < 1
            fp += (r["oLRP_FP"] or 0) > 0
    assert tp and fp


@pytest.mark.parametrize("seed", range(6))
def test_masks_ties_official_equals_the_official_procedure(seed):
    images, cats, gts, dets = random_mask_case(seed)
    for case in (dets, tied(dets)):
        fast = lrp_from_coco(*make_mask_coco(images, cats, gts, case), "segm", ties="official")
        ref = official_cut_anywhere(*make_mask_coco(images, cats, gts, case), iou_type="segm")
        assert set(fast["per_class"]) == set(ref)
        for cat, r in ref.items():
            for key, value in r.items():
                assert same(fast["per_class"][cat][key], value), (seed, cat, key)


def test_perfect_masks_give_zero():
    images, cats, gts, _ = random_mask_case(4, crowd=False)
    assert gts
    perfect = [
        {
            "image_id": g["image_id"],
            "category_id": g["category_id"],
            "segmentation": rle(decode(g["segmentation"])),
            "score": 0.9,
        }
        for g in gts
    ]
    r = lrp_from_coco(*make_mask_coco(images, cats, gts, perfect), "segm")
    assert r["oLRP"] == pytest.approx(0, abs=1e-12) and r["oLRP_FN"] == 0 and r["oLRP_FP"] == 0
    assert r["oLRP_loc"] == pytest.approx(0, abs=1e-12)


def square(x, y, side):
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_perfect_boxes_with_bad_masks():
    """Boxes exactly on the ground truth, masks covering 80% or 40% of it: box oLRP 0,
    mask oLRP worse."""
    gts, dets = [], []
    for i, fraction in enumerate([0.8, 0.8, 0.4]):
        x, y, side = 40 + 150 * i, 50, 100
        part = square(x, y, side)
        part[y + int(side * fraction) :, :] = False
        gts.append(
            with_box(
                {
                    "image_id": 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": rle(square(x, y, side)),
                }
            )
        )
        dets.append(
            {
                "image_id": 1,
                "category_id": 1,
                "bbox": [x, y, side, side],
                "segmentation": rle(part),
                "score": 0.9 - 0.1 * i,
            }
        )
    assert gts[0]["bbox"] == [40, 50, 100, 100] and gts[0]["area"] == 10000
    box = lrp_from_coco(*make_mask_coco([1], [1], gts, dets), "bbox")
    mask = lrp_from_coco(*make_mask_coco([1], [1], gts, dets), "segm")
    assert box["oLRP"] == 0 and box["oLRP_loc"] == 0
    # The two masks of IoU 0.8 are kept (loc 0.2 each), the third (IoU 0.4) is left out.
    assert mask["oLRP"] == pytest.approx((2 * 0.2 / 0.5 + 1) / 3) and mask["oLRP"] > box["oLRP"]
    assert mask["oLRP_loc"] == pytest.approx(0.2) and mask["oLRP_FP"] == 0
    assert mask["oLRP_FN"] == pytest.approx(1 / 3)
    assert mask["per_class"][1]["threshold"] == pytest.approx(0.8)
    # Area ranges go by the ground truths' areas (10000 px: large).
    assert mask["oLRP_large"] == pytest.approx(mask["oLRP"]) and math.isnan(mask["oLRP_medium"])


def test_mask_area_of_results_loaded_without_boxes():
    """An unmatched detection counts in the area range of its own area: loaded without
    ``bbox`` (as Detectron2 loads mask results) that is the mask's area, with ``bbox``
    pycocotools takes the box's."""
    gts = [
        with_box(
            {
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": rle(square(10, 10, 100)),
            }
        )
    ]
    stray = square(300, 200, 100) & ~square(310, 210, 80)  # a frame: 100 x 100 box, 3600 px
    dets = [
        {
            "image_id": 1,
            "category_id": 1,
            "segmentation": rle(square(10, 10, 100)),
            "bbox": [10, 10, 100, 100],
            "score": 0.9,
        },
        {
            "image_id": 1,
            "category_id": 1,
            "segmentation": rle(stray),
            "bbox": [300, 200, 100, 100],
            "score": 0.95,
        },
    ]
    assert dets[1]["bbox"][2] * dets[1]["bbox"][3] > 96**2 > stray.sum()
    with_boxes = lrp_from_coco(*make_mask_coco([1], [1], gts, dets), "segm")
    masks_only = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    without = lrp_from_coco(*make_mask_coco([1], [1], gts, masks_only), "segm")
    assert with_boxes["oLRP"] == without["oLRP"] == pytest.approx(0.5)  # the stray mask is a FP
    assert without["oLRP_large"] == 0  # the stray mask is medium: ignored among the large
    assert with_boxes["oLRP_large"] == pytest.approx(0.5)
