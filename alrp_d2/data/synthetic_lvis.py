"""The synthetic shapes (:mod:`alrp_d2.data.synthetic`) in LVIS's format: a federated
dataset, small and deterministic, for the LVIS paths without downloading LVIS.

The images of a synthetic split, annotated as LVIS annotates COCO's images:

- ``annotations``: the shapes, each with its box as a polygon (``segmentation``: LVIS's
  annotations are polygons and Detectron2's ``load_lvis_json`` requires one), no crowd;
- ``not_exhaustive_category_ids``: the class of a crowd region (its small shapes have no
  annotation, as LVIS's unannotated instances) and each class with two or more shapes in
  the image, of which the last shape's annotation is left out;
- ``neg_category_ids``: each class that is nowhere in the image, drawn with probability
  1/2 (verified absent: its detections are false positives there); the other absent
  classes are unknown, and LVIS does not evaluate their detections on that image;
- ``pos_category_ids``: the classes annotated in the image;
- categories: ``frequency`` fixed per class by :data:`FREQUENCY` (four classes in hundreds
  of images cannot span LVIS's rare and common groups, fewer than 10 and 100 training
  images), ``image_count`` and ``instance_count`` counted in the split.

Written to ``<root>/annotations/lvis_<split>.json`` beside the synthetic json; the images
stay under ``<root>/<split>/``. Each image's ``coco_url`` ends with ``<split>/<file name>``,
the part Detectron2's ``load_lvis_json`` reads. Registered as ``alrp_synthetic_lvis_<split>``
with ``evaluator_type: "lvis"``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List

import numpy as np

from ..io import atomic_write
from .synthetic import CLASSES, SPLITS, VERSION, generate_split, synthetic_root

__all__ = ["FREQUENCY", "generate_lvis_split", "lvis_from_coco", "register_synthetic_lvis"]

FREQUENCY = {"circle": "f", "square": "f", "triangle": "c", "cross": "r"}
LVIS_VERSION = 2  # bump when the conversion changes: files of another version are rewritten


def lvis_from_coco(coco: Dict, split: str, seed: int) -> Dict:
    """The LVIS-format json of a synthetic split's COCO json ``coco`` (module docstring);
    the drawings from ``seed``."""
    rng = np.random.default_rng([seed, 19])
    by_image: Dict[int, List[Dict]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    all_classes = [c["id"] for c in coco["categories"]]
    images, annotations = [], []
    for im in coco["images"]:
        anns = by_image[im["id"]]
        crowd = {a["category_id"] for a in anns if a["iscrowd"]}
        shapes = [a for a in anns if not a["iscrowd"]]
        counts = Counter(a["category_id"] for a in shapes)
        repeated = {cid for cid, n in counts.items() if n >= 2}
        not_exhaustive = crowd | repeated
        left_out = {max(a["id"] for a in shapes if a["category_id"] == c) for c in repeated}
        kept = [a for a in shapes if a["id"] not in left_out]
        present = set(counts) | crowd
        absent = [cid for cid in all_classes if cid not in present]
        negative = [cid for cid in absent if rng.random() < 0.5]
        for a in kept:
            x, y, w, h = a["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": im["id"],
                    "category_id": a["category_id"],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
        images.append(
            {
                "id": im["id"],
                "coco_url": f"{split}/{im['file_name']}",
                "file_name": im["file_name"],
                "height": im["height"],
                "width": im["width"],
                "pos_category_ids": sorted({a["category_id"] for a in kept}),
                "neg_category_ids": negative,
                "not_exhaustive_category_ids": sorted(not_exhaustive),
            }
        )
    image_count = Counter()
    for im in images:
        image_count.update(im["pos_category_ids"])
    instance_count = Counter(a["category_id"] for a in annotations)
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": [c["name"]],
            "def": f"a {c['name']} drawn on a textured background",
            "frequency": FREQUENCY[c["name"]],
            "image_count": image_count[c["id"]],
            "instance_count": instance_count[c["id"]],
        }
        for c in coco["categories"]
    ]
    return {
        "info": {
            "description": "alrp_d2 synthetic shapes, LVIS format",
            "version": LVIS_VERSION,
            "synthetic_version": VERSION,
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def generate_lvis_split(root: str, split: str) -> str:
    """Writes ``root/annotations/lvis_<split>.json`` (and the synthetic split it is made
    of) if not there yet, atomically; returns its path."""
    coco_path = generate_split(root, split)
    path = os.path.join(root, "annotations", f"lvis_{split}.json")
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f).get("info", {})
        if info.get("version") == LVIS_VERSION and info.get("synthetic_version") == VERSION:
            return path
    with open(coco_path) as f:
        coco = json.load(f)
    data = lvis_from_coco(coco, split, SPLITS[split][1])
    with atomic_write(path) as f:
        json.dump(data, f)
    return path


def register_synthetic_lvis(root: str | None = None) -> None:
    """Registers ``alrp_synthetic_lvis_<split>`` for every synthetic split (written on
    first use), read by Detectron2's ``load_lvis_json`` (needs the lvis package)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.lvis import load_lvis_json

    root = root or synthetic_root()
    for split in SPLITS:
        name = f"alrp_synthetic_lvis_{split}"
        if name in DatasetCatalog.list():
            continue
        json_path = os.path.join(root, "annotations", f"lvis_{split}.json")

        def load(split=split):
            # Without a dataset name: Detectron2 would look for LVIS's own class names.
            return load_lvis_json(generate_lvis_split(root, split), root + os.sep)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_path,
            image_root=root + os.sep,
            evaluator_type="lvis",
            thing_classes=list(CLASSES),
        )
