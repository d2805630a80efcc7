"""Time of lrp_from_coco against pycocotools' COCOeval evaluate() + accumulate()
on synthetic COCO data (default: 5000 images, 100 detections each).

    python benchmarks/lrp_speed.py [--images 5000] [--dets 100] [--classes 80]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from alrp_d2.evaluation.lrp import lrp_from_coco


def synthetic(images: int, dets_per_image: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for img in range(1, images + 1):
        n_gt = int(rng.integers(1, 15))
        xy = rng.uniform(0, 500, (n_gt, 2))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (n_gt, 2)))
        cats = rng.integers(1, classes + 1, n_gt)
        for (x, y), (w, h), c in zip(xy, wh, cats):
            gts.append(
                {
                    "image_id": img,
                    "category_id": int(c),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.02),
                }
            )
        # Detections: jittered copies of the ground truths, the rest scattered.
        src = rng.integers(0, n_gt, dets_per_image)
        near = rng.random(dets_per_image) < 0.4
        jitter = rng.normal(0, 0.15, (dets_per_image, 4))
        for k in range(dets_per_image):
            if near[k]:
                x, y = xy[src[k]]
                w, h = wh[src[k]]
                box = [
                    x + jitter[k, 0] * w,
                    y + jitter[k, 1] * h,
                    w * np.exp(jitter[k, 2]),
                    h * np.exp(jitter[k, 3]),
                ]
                cat = int(cats[src[k]]) if rng.random() < 0.8 else int(rng.integers(1, classes + 1))
                score = float(rng.beta(4, 2))
            else:
                box = [*rng.uniform(0, 500, 2), *np.exp(rng.uniform(np.log(8), np.log(300), 2))]
                cat = int(rng.integers(1, classes + 1))
                score = float(rng.beta(2, 4))
            dets.append(
                {
                    "image_id": img,
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "score": score,
                }
            )
    for i, g in enumerate(gts, 1):
        g["id"] = i
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": str(c)} for c in range(1, classes + 1)],
        "annotations": gts,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
    return gt, dt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    args = parser.parse_args(argv)
    gt, dt = synthetic(args.images, args.dets, args.classes)

    start = time.perf_counter()
    result = lrp_from_coco(gt, dt)
    lrp_time = time.perf_counter() - start

    ev = COCOeval(gt, dt, "bbox")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    coco_time = time.perf_counter() - start

    print(
        f"machine: {platform.machine()}, {args.images} images x {args.dets} detections,"
        f" {args.classes} classes"
    )
    print("| evaluation | time (s) | ratio to COCOeval |")
    print("|---|---|---|")
    print(f"| COCOeval evaluate + accumulate | {coco_time:.2f} | 1.00x |")
    print(f"| lrp_from_coco (exact thresholds) | {lrp_time:.2f} | {lrp_time / coco_time:.2f}x |")
    print(f"oLRP = {result['oLRP']:.4f}")


if __name__ == "__main__":
    main()
