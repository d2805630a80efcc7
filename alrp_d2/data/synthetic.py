"""A synthetic detection dataset for the quickstart: no download, deterministic.

Shapes of four classes (circle, square, triangle, cross) in random colours and sizes
on textured backgrounds; some images hold a crowd region (a cluster of small shapes
annotated by one ``iscrowd`` box) and some are empty. Written once as PNG files and
COCO json under ``$DETECTRON2_DATASETS/alrp_synthetic`` (default ``./datasets``) and
registered in Detectron2's DatasetCatalog and MetadataCatalog in COCO form as
``alrp_synthetic_train`` and ``alrp_synthetic_val`` (and ``alrp_synthetic_tiny_train``
and ``alrp_synthetic_tiny_val`` for smoke tests), and in LVIS's format as
``alrp_synthetic_lvis_<split>`` (:mod:`alrp_d2.data.synthetic_lvis`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write

__all__ = ["CLASSES", "SPLITS", "generate_split", "register_synthetic", "synthetic_root"]

CLASSES = ["circle", "square", "triangle", "cross"]
# split: (number of images, seed); the tiny splits serve tests and smoke runs.
SPLITS = {"train": (800, 0), "val": (150, 1), "tiny_train": (32, 2), "tiny_val": (16, 3)}
IMAGE_SIZE = 128
VERSION = 1  # bump when the generator changes: files of another version are regenerated


def synthetic_root() -> str:
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "alrp_synthetic")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour gradient, stripes or checks, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, 3)
    tilt = rng.uniform(-60, 60, (2, 3))
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    kind = rng.integers(3)
    period = rng.uniform(6, 20)
    if kind == 1:
        img += (
            20
            * np.sin(2 * np.pi * (x * np.cos(period) + y * np.sin(period)) * size / period)[
                ..., None
            ]
        )
    elif kind == 2:
        img += 15 * (((x * size // period) + (y * size // period)) % 2)[..., None]
    img += rng.normal(0, 8, img.shape)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, box, colour) -> None:
    x0, y0, x1, y1 = box
    if cls == 0:
        draw.ellipse(box, fill=colour)
    elif cls == 1:
        draw.rectangle(box, fill=colour)
    elif cls == 2:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        w, h = x1 - x0, y1 - y0
        draw.rectangle([x0 + w * 0.35, y0, x1 - w * 0.35, y1], fill=colour)
        draw.rectangle([x0, y0 + h * 0.35, x1, y1 - h * 0.35], fill=colour)


def _overlaps(box, boxes, limit=0.2) -> bool:
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if (
            iw > 0
            and ih > 0
            and iw * ih
            > limit * min((box[2] - box[0]) * (box[3] - box[1]), (b[2] - b[0]) * (b[3] - b[1]))
        ):
            return True
    return False


def _make_image(rng: np.random.Generator, size: int):
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    annotations: List[Dict] = []
    boxes: List[List[float]] = []
    if rng.random() < 0.1:  # an empty image
        return canvas, annotations
    if rng.random() < 0.15:  # a crowd: small shapes of one class, one iscrowd box
        cls = int(rng.integers(len(CLASSES)))
        cx, cy = rng.uniform(20, size - 20, 2)
        crowd = []
        for _ in range(int(rng.integers(5, 10))):
            s = rng.uniform(4, 7)
            x, y = cx + rng.uniform(-14, 14), cy + rng.uniform(-14, 14)
            crowd.append([x - s, y - s, x + s, y + s])
            _draw_shape(draw, cls, crowd[-1], tuple(int(c) for c in rng.integers(0, 256, 3)))
        c = np.array(crowd)
        box = [
            float(max(c[:, 0].min(), 0)),
            float(max(c[:, 1].min(), 0)),
            float(min(c[:, 2].max(), size)),
            float(min(c[:, 3].max(), size)),
        ]
        boxes.append(box)
        annotations.append({"bbox": box, "category": cls, "iscrowd": 1})
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            s = rng.uniform(14, 44)
            x0, y0 = rng.uniform(0, size - s, 2)
            box = [float(x0), float(y0), float(x0 + s), float(y0 + s * rng.uniform(0.8, 1.25))]
            box[3] = min(box[3], float(size))
            if not _overlaps(box, boxes):
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(draw, cls, box, colour)
        boxes.append(box)
        annotations.append({"bbox": box, "category": cls, "iscrowd": 0})
    return canvas, annotations


def generate_split(root: str, split: str) -> str:
    """Writes ``root/<split>/*.png`` and ``root/annotations/<split>.json`` if they are
    not there yet (atomically: concurrent processes may call this) and returns the json path."""
    json_path = os.path.join(root, "annotations", f"{split}.json")
    if os.path.exists(json_path):
        with open(json_path) as f:
            if json.load(f).get("info", {}).get("version") == VERSION:
                return json_path
    count, seed = SPLITS[split]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
    images, annotations = [], []
    for i in range(count):
        img, anns = _make_image(rng, IMAGE_SIZE)
        name = f"{i:05d}.png"
        img.save(os.path.join(tmp_dir, name))
        images.append({"id": i + 1, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for a in anns:
            x0, y0, x1, y1 = a["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": a["category"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": a["iscrowd"],
                }
            )
    image_dir = os.path.join(root, split)
    if os.path.isdir(image_dir):
        shutil.rmtree(image_dir, ignore_errors=True)
    try:
        os.replace(tmp_dir, image_dir)
    except OSError:  # another process got there first with the same content
        shutil.rmtree(tmp_dir, ignore_errors=True)
    data = {
        "info": {"description": "alrp_d2 synthetic shapes", "version": VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
    }
    with atomic_write(json_path) as f:
        json.dump(data, f)
    return json_path


def register_synthetic(root: str | None = None) -> None:
    """Registers ``alrp_synthetic_<split>`` for every split (generated on first use), and
    the same images in LVIS's format as ``alrp_synthetic_lvis_<split>``
    (:mod:`alrp_d2.data.synthetic_lvis`)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = root or synthetic_root()
    for split in SPLITS:
        name = f"alrp_synthetic_{split}"
        if name in DatasetCatalog.list():
            continue
        json_path = os.path.join(root, "annotations", f"{split}.json")
        image_dir = os.path.join(root, split)

        def load(split=split, json_path=json_path, image_dir=image_dir, name=name):
            generate_split(root, split)
            return load_coco_json(json_path, image_dir, name, extra_annotation_keys=["id"])

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_path,
            image_root=image_dir,
            evaluator_type="coco",
            synthetic_root=root,
            synthetic_split=split,
        )
    from .synthetic_lvis import register_synthetic_lvis  # it imports this module

    register_synthetic_lvis(root)
