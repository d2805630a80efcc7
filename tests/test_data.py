"""The paper's augmentation as Detectron2 Augmentations, and the synthetic dataset."""

import json
import random

import numpy as np
import pytest
from conftest import HAS_DETECTRON2

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.data import transforms as T

    from alrp_d2.config import get_cfg
    from alrp_d2.data import (
        Expand,
        MinIoURandomCrop,
        PhotometricDistortion,
        build_alrp_augmentation,
        build_mapper,
    )
    from alrp_d2.data.synthetic import CLASSES, generate_split


def test_expand_moves_boxes_with_the_image_and_fills_the_mean():
    random.seed(0)
    image = np.full((20, 30, 3), 200, np.uint8)
    boxes = np.array([[5.0, 4.0, 15.0, 12.0]])
    aug = T.AugInput(image, boxes=boxes)
    transform = T.AugmentationList([Expand(mean=[10, 20, 30], ratio_range=(2, 3), prob=1.0)])(aug)
    h, w = aug.image.shape[:2]
    assert 40 <= h <= 60 and 60 <= w <= 90
    x0, y0 = transform.transforms[0].x0, transform.transforms[0].y0
    assert np.allclose(aug.boxes, boxes + [x0, y0, x0, y0])
    assert (aug.image[y0 : y0 + 20, x0 : x0 + 30] == 200).all()
    corner = aug.image[0, 0] if (x0, y0) != (0, 0) else aug.image[-1, -1]
    assert corner.tolist() == [10, 20, 30]


def test_min_iou_crop_keeps_iou_and_drops_boxes_whose_centre_is_outside(monkeypatch):
    # Sample the 0.3 mode only (the others are "no crop" and "any crop").
    monkeypatch.setattr(random, "choice", lambda modes: 0.3)
    cropped = 0
    for seed in range(40):
        random.seed(seed)
        image = np.zeros((100, 100, 3), np.uint8)
        boxes = np.array([[20.0, 20.0, 60.0, 60.0], [45.0, 40.0, 85.0, 80.0]])
        transform = MinIoURandomCrop(min_ious=(0.3,), min_crop_size=0.3).get_transform(image, boxes)
        if isinstance(transform, T.NoOpTransform):
            continue
        cropped += 1
        x0, y0, w, h = transform.x0, transform.y0, transform.w, transform.h
        inter = np.clip(
            np.minimum(boxes[:, 2], x0 + w) - np.maximum(boxes[:, 0], x0), 0, None
        ) * np.clip(np.minimum(boxes[:, 3], y0 + h) - np.maximum(boxes[:, 1], y0), 0, None)
        union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + w * h - inter
        assert (inter / union).min() >= 0.3 - 0.05  # integer crop edges shave a little
        out = transform.apply_box(boxes)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (cx > x0) & (cx < x0 + w) & (cy > y0) & (cy < y0 + h)
        assert inside.any() and (out[~inside] == 0).all()
        assert np.allclose(out[inside], boxes[inside] - [x0, y0, x0, y0])
    assert cropped > 5


def test_photometric_distortion_keeps_shape_and_dtype():
    random.seed(1)
    np.random.seed(1)
    image = (np.random.rand(16, 16, 3) * 255).astype(np.uint8)
    changed = 0
    for _ in range(10):
        out = PhotometricDistortion().get_transform(image).apply_image(image)
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += int(not np.array_equal(out, image))
    assert changed > 0


def test_training_pipeline_gives_fixed_size_images(tmp_path):
    cfg = get_cfg()
    cfg.INPUT.ALRP_AUG.ENABLED = True
    cfg.INPUT.ALRP_AUG.SIZE = (64, 64)
    augs = build_alrp_augmentation(cfg, True)
    assert [type(a).__name__ for a in augs] == [
        "PhotometricDistortion",
        "Expand",
        "MinIoURandomCrop",
        "Resize",
        "RandomFlip",
    ]
    generate_split(str(tmp_path), "tiny_train")
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(
        str(tmp_path / "annotations" / "tiny_train.json"), str(tmp_path / "tiny_train")
    )
    mapper = build_mapper(cfg, True)
    for d in dicts[:8]:
        out = mapper(d)
        assert tuple(out["image"].shape[1:]) == (64, 64)
        if len(out["instances"]):
            assert out["instances"].gt_boxes.area().min() > 0
    test_augs = build_alrp_augmentation(cfg, False)
    assert isinstance(test_augs[0], T.ResizeShortestEdge)


@pytest.mark.slow
def test_synthetic_dataset_is_deterministic_with_crowds_and_empty_images(tmp_path):
    a = json.loads(open(generate_split(str(tmp_path / "a"), "val")).read())
    b = json.loads(open(generate_split(str(tmp_path / "b"), "val")).read())
    assert a == b
    assert [c["name"] for c in a["categories"]] == CLASSES
    annotated = {ann["image_id"] for ann in a["annotations"]}
    assert len(annotated) < len(a["images"])  # some images are empty
    assert any(ann["iscrowd"] for ann in a["annotations"])
    assert (tmp_path / "a" / "val" / "00000.png").read_bytes() == (
        tmp_path / "b" / "val" / "00000.png"
    ).read_bytes()


def test_centre_filtered_crop_empties_boxes_whose_centre_is_outside():
    from alrp_d2.data import CentreFilteredCropTransform

    crop = CentreFilteredCropTransform(0, 0, 50, 50, orig_w=100, orig_h=100)
    out = crop.apply_box(np.array([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 90.0, 90.0]]))
    assert out[0].tolist() == [10.0, 10.0, 30.0, 30.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0]
