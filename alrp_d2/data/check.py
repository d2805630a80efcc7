"""Scan datasets before a long run: every image read whole, every annotation checked.

    python train_net.py --config-file CONFIG --check-data

lists each problem (missing, truncated or unreadable image; size differing from the
annotation file; box with a non-finite or non-positive size; unknown category) with
its file and dataset, and exits 1 if there is any.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional

from PIL import Image

__all__ = ["check_datasets", "image_problem", "record_problems", "unusable_annotations"]

logger = logging.getLogger("alrp_d2")


def image_problem(record: dict) -> Optional[str]:
    """What is wrong with a record's image file, or None."""
    path = record.get("file_name")
    if not path or not os.path.isfile(path):
        return "image file missing"
    try:
        with Image.open(path) as image:
            image.load()  # decodes all of it: a truncated file fails here
            width, height = image.size
    except Exception as err:
        return f"image unreadable ({type(err).__name__}: {err})"
    expected = (record.get("width"), record.get("height"))
    if None not in expected and tuple(expected) != (width, height):
        return f"image is {width}x{height}, the annotations say {expected[0]}x{expected[1]}"
    return None


def record_problems(record: dict, num_classes: Optional[int]) -> List[str]:
    """What is wrong with a record's annotations (Detectron2's dataset-dict format)."""
    from detectron2.structures import BoxMode

    problems = []
    for i, ann in enumerate(record.get("annotations", [])):
        # COCO's id where the dataset keeps it (alrp_d2.data.register), else the position
        label = f"annotation id {ann['id']}" if "id" in ann else f"annotation {i} of the image"
        box = ann.get("bbox")
        if box is None or len(box) != 4:
            problems.append(f"{label}: no box")
            continue
        x0, y0, x1, y1 = BoxMode.convert(
            list(box), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS
        )
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            problems.append(f"{label}: box {list(box)} is not finite")
        elif x1 <= x0 or y1 <= y0:
            problems.append(f"{label}: box {list(box)} has no area")
        category = ann.get("category_id")
        if num_classes is not None and not (
            isinstance(category, int) and 0 <= category < num_classes
        ):
            problems.append(f"{label}: category {category!r} outside 0..{num_classes - 1}")
    return problems


def unusable_annotations(name: str, records: List[dict], shown: int = 5) -> Optional[str]:
    """One warning naming the objects of dataset ``name`` whose box is unusable (none, no
    area, not finite: Detectron2 drops a box without area silently and clips an infinite
    one to the image), by COCO id and image id; crowd regions, which train nothing, are not
    counted. None when there is none."""
    found = []
    for record in records:
        objects = dict(
            record,
            annotations=[a for a in record.get("annotations", []) if not a.get("iscrowd", 0)],
        )
        for problem in record_problems(objects, None):
            found.append(f"{problem} (image id {record.get('image_id')})")
    if not found:
        return None
    more = f"; and {len(found) - shown} more" if len(found) > shown else ""
    return (
        f"dataset {name!r}: {len(found)} annotations have no usable box, so their objects"
        f" are not learnt: {'; '.join(found[:shown])}{more} (train_net.py --check-data lists"
        " every problem)"
    )


def _num_classes(name: str) -> Optional[int]:
    from detectron2.data import MetadataCatalog

    classes = MetadataCatalog.get(name).get("thing_classes", None)
    return len(classes) if classes else None


def check_datasets(names: Iterable[str], workers: int = 8) -> int:
    """Checks every record of the registered datasets ``names``; logs each problem and
    a summary. Returns 1 if there is any problem (the exit status), else 0."""
    from detectron2.data import DatasetCatalog

    total = 0
    for name in dict.fromkeys(names):  # each dataset once, in order
        try:
            records = DatasetCatalog.get(name)
        except Exception as err:
            logger.error("dataset %r: annotations cannot be loaded: %s", name, err)
            total += 1
            continue
        num_classes = _num_classes(name)
        with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
            images = list(pool.map(image_problem, records))
        found = 0
        for record, problem in zip(records, images):
            for message in ([problem] if problem else []) + record_problems(record, num_classes):
                logger.error("dataset %r, %s: %s", name, record.get("file_name"), message)
                found += 1
        logger.info("dataset %r: %d images checked, %d problems", name, len(records), found)
        total += found
    print(f"{total} problems found" if total else "no problems found")
    return 1 if total else 0
