"""LRPEvaluator inside Detectron2: box and mask figures as lrp_from_coco, thresholds files."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import HAS_DETECTRON2
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation.testing import flatten_results_dict
    from detectron2.structures import Boxes, BoxMode, Instances

    from alrp_d2.evaluation import LRPEvaluator
    from alrp_d2.evaluation.lrp import lrp_from_coco

GT = {  # image_id -> [(x, y, w, h, class)]
    1: [(0, 0, 40, 40, 0), (100, 100, 50, 50, 1)],
    2: [(10, 10, 200, 150, 0)],
    3: [],
}
DETS = {  # image_id -> [(x, y, w, h, class, score)]
    1: [(0, 0, 40, 36, 0, 0.9), (300, 300, 20, 20, 0, 0.8), (100, 100, 50, 45, 1, 0.7)],
    2: [(12, 10, 200, 150, 0, 0.6), (0, 0, 10, 10, 1, 0.95)],
    3: [(5, 5, 30, 30, 1, 0.5)],
}


@pytest.fixture(scope="module")
def dataset_name():
    name = "alrp_test_lrp_evaluator"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name,
            lambda: [
                {
                    "file_name": f"{i}.jpg",
                    "image_id": i,
                    "height": 400,
                    "width": 400,
                    "annotations": [
                        {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}
                        for x, y, w, h, c in boxes
                    ],
                }
                for i, boxes in GT.items()
            ],
        )
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    return name


def outputs_for(image_id):
    dets = DETS[image_id]
    inst = Instances((400, 400))
    inst.pred_boxes = Boxes(
        torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _, _ in dets], dtype=torch.float32)
    )
    inst.scores = torch.tensor([d[5] for d in dets])
    inst.pred_classes = torch.tensor([d[4] for d in dets])
    return {"instances": inst}


def test_evaluator_reports_lrp_in_percent(dataset_name, tmp_path):
    evaluator = LRPEvaluator(dataset_name, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    for image_id in GT:
        evaluator.process([{"image_id": image_id}], [outputs_for(image_id)])
    results = evaluator.evaluate()
    assert list(results) == ["lrp"]  # no masks: boxes only
    assert not (tmp_path / "lrp_thresholds_segm.json").exists()
    lrp = results["lrp"]
    assert set(lrp) == {
        "oLRP",
        "oLRP_loc",
        "oLRP_FP",
        "oLRP_FN",
        "oLRP_small",
        "oLRP_medium",
        "oLRP_large",
    }
    # Same figures as the functional API on the converted json.
    coco_gt = evaluator._coco_api
    dets = [
        {"image_id": i, "category_id": coco_gt.getCatIds()[c], "bbox": [x, y, w, h], "score": s}
        for i, ds in DETS.items()
        for x, y, w, h, c, s in ds
    ]
    direct = lrp_from_coco(coco_gt, coco_gt.loadRes(dets))
    assert lrp["oLRP"] == pytest.approx(100 * direct["oLRP"], rel=1e-6)
    assert lrp["oLRP_FN"] == pytest.approx(100 * direct["oLRP_FN"], rel=1e-6)
    thresholds = json.loads((tmp_path / "lrp_thresholds.json").read_text())
    assert {v["name"] for v in thresholds.values()} == {"a", "b"}
    assert all(v["threshold"] is None or 0 <= v["threshold"] <= 1 for v in thresholds.values())


# -- masks ----------------------------------------------------------------------------------
SIZE = 200  # square images
KEYS = ("oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "oLRP_small", "oLRP_medium", "oLRP_large")


def rect(x, y, w, h):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y : y + h, x : x + w] = True
    return mask


def rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


CROWD = rect(120, 0, 80, 60)
MASK_GT = {  # image_id -> [(segmentation, class, iscrowd)]
    1: [
        (rect_polygon(10, 10, 50, 50), 0, 0),
        (rect_polygon(100, 100, 60, 40), 1, 0),
        (rle(CROWD), 0, 1),
    ],
    2: [(rect_polygon(20, 20, 160, 150), 0, 0), (rect_polygon(5, 180, 12, 12), 1, 0)],
    3: [],
}
MASK_DETS = {  # image_id -> [(mask, class, score)]; each mask's box is that of its mask
    1: [
        (rect(10, 10, 50, 40), 0, 0.9),  # IoU 0.8 with the square
        (rect(130, 10, 30, 30), 0, 0.8),  # inside the crowd region: ignored
        (rect(100, 100, 60, 40), 1, 0.7),
        # A frame of the same box, scored higher: mask IoU 2/3, it takes the ground truth.
        (rect(100, 100, 60, 40) & ~rect(110, 110, 40, 20), 1, 0.75),
    ],
    2: [(rect(20, 20, 160, 150) & ~rect(20, 20, 160, 20), 0, 0.6), (rect(0, 0, 12, 12), 1, 0.95)],
    # A frame: a large box (100 x 100) round a medium mask, unmatched.
    3: [(rect(50, 50, 100, 100) & ~rect(55, 55, 90, 90), 0, 0.97)],
}


@pytest.fixture(scope="module")
def mask_dataset_name():
    name = "alrp_test_lrp_evaluator_masks"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name,
            lambda: [
                {
                    "file_name": f"{i}.jpg",
                    "image_id": i,
                    "height": SIZE,
                    "width": SIZE,
                    "annotations": [
                        {
                            "bbox": _box(segm),
                            "bbox_mode": BoxMode.XYWH_ABS,
                            "category_id": c,
                            "segmentation": segm,
                            "iscrowd": crowd,
                        }
                        for segm, c, crowd in anns
                    ],
                }
                for i, anns in MASK_GT.items()
            ],
        )
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    return name


def _box(segm):
    if isinstance(segm, list):
        segm = mask_utils.merge(mask_utils.frPyObjects(segm, SIZE, SIZE))
    return mask_utils.toBbox(segm).tolist()


def mask_outputs_for(image_id, with_masks=True):
    dets = MASK_DETS[image_id]
    inst = Instances((SIZE, SIZE))
    boxes = [_box(rle(m)) for m, _, _ in dets]
    inst.pred_boxes = Boxes(
        torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32).reshape(
            -1, 4
        )
    )
    inst.scores = torch.tensor([d[2] for d in dets])
    inst.pred_classes = torch.tensor([d[1] for d in dets])
    if with_masks:
        inst.pred_masks = torch.from_numpy(np.stack([m for m, _, _ in dets]))
    return {"instances": inst}


def run_evaluator(evaluator, with_masks=True):
    evaluator.reset()
    for image_id in MASK_GT:
        evaluator.process([{"image_id": image_id}], [mask_outputs_for(image_id, with_masks)])
    return evaluator.evaluate()


def direct(coco_gt, iou_type, keep_boxes=False):
    """``lrp_from_coco`` on the detections written out by hand."""
    cats = coco_gt.getCatIds()
    dets = []
    for image_id, ds in MASK_DETS.items():
        for mask, c, score in ds:
            segm = rle(mask)
            d = {"image_id": image_id, "category_id": cats[c], "score": score, "segmentation": segm}
            if iou_type == "bbox" or keep_boxes:
                d["bbox"] = mask_utils.toBbox(segm).tolist()
            dets.append(d)
    return lrp_from_coco(coco_gt, coco_gt.loadRes(dets), iou_type)


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-9)


def test_evaluator_reports_box_and_mask_lrp(mask_dataset_name, tmp_path):
    evaluator = LRPEvaluator(mask_dataset_name, output_dir=str(tmp_path), distributed=False)
    results = run_evaluator(evaluator)
    assert list(results) == ["lrp", "lrp_segm"]
    coco_gt = evaluator._coco_api
    # The ground truths are polygons (and a crowd RLE), left as they were.
    assert isinstance(coco_gt.loadAnns(coco_gt.getAnnIds())[0]["segmentation"], list)
    box, mask = direct(coco_gt, "bbox"), direct(coco_gt, "segm")
    for key in KEYS:
        assert same(results["lrp"][key], 100 * box[key]), key
        assert same(results["lrp_segm"][key], 100 * mask[key]), key
    # Mask detections are loaded without their boxes: the unmatched frame of image 3 is
    # medium (its mask), not large (its box), which changes oLRP_large.
    with_boxes = direct(coco_gt, "segm", keep_boxes=True)
    assert not same(mask["oLRP_large"], with_boxes["oLRP_large"])
    assert results["lrp_segm"]["oLRP"] > results["lrp"]["oLRP"]  # the masks are the worse
    flat = flatten_results_dict(results)
    assert {"lrp/oLRP", "lrp_segm/oLRP", "lrp_segm/oLRP_FN", "lrp_segm/oLRP_large"} <= set(flat)
    for name, result in (("lrp_thresholds.json", box), ("lrp_thresholds_segm.json", mask)):
        table = json.loads((tmp_path / name).read_text())
        assert {v["name"] for v in table.values()} == {"a", "b"}
        for cid, r in result["per_class"].items():
            for key, value in r.items():
                written = table[str(cid)][key]
                assert (written is None and math.isnan(value)) or written == pytest.approx(value), (
                    name,
                    key,
                )


def test_evaluator_tasks(mask_dataset_name, tmp_path):
    boxes_only = LRPEvaluator(
        mask_dataset_name, output_dir=str(tmp_path / "b"), distributed=False, tasks=("bbox",)
    )
    results = run_evaluator(boxes_only)
    assert list(results) == ["lrp"]
    assert not (tmp_path / "b" / "lrp_thresholds_segm.json").exists()
    masks_only = LRPEvaluator(
        mask_dataset_name, output_dir=str(tmp_path / "m"), distributed=False, tasks=["segm"]
    )
    results = run_evaluator(masks_only)
    assert list(results) == ["lrp_segm"]
    assert (tmp_path / "m" / "lrp_thresholds_segm.json").exists()
    assert not (tmp_path / "m" / "lrp_thresholds.json").exists()
    # Predictions without masks: boxes only by default; asking for masks is an error.
    default = LRPEvaluator(mask_dataset_name, output_dir=str(tmp_path), distributed=False)
    assert list(run_evaluator(default, with_masks=False)) == ["lrp"]
    with pytest.raises(ValueError, match="no mask"):
        run_evaluator(masks_only, with_masks=False)
    with pytest.raises(ValueError, match="tasks"):
        LRPEvaluator(mask_dataset_name, output_dir=str(tmp_path), tasks=("bbox", "keypoints"))


def test_evaluator_without_detections(mask_dataset_name, tmp_path):
    evaluator = LRPEvaluator(
        mask_dataset_name, output_dir=str(tmp_path), distributed=False, tasks=("bbox", "segm")
    )
    evaluator.reset()
    for image_id in MASK_GT:
        inst = Instances(
            (SIZE, SIZE),
            pred_boxes=Boxes(torch.zeros(0, 4)),
            scores=torch.zeros(0),
            pred_classes=torch.zeros(0, dtype=torch.long),
            pred_masks=torch.zeros(0, SIZE, SIZE, dtype=torch.bool),
        )
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["lrp"]["oLRP"] == results["lrp_segm"]["oLRP"] == 100


@pytest.mark.parametrize("mask_on", [False, True])
def test_build_evaluator_tasks(mask_dataset_name, tmp_path, mask_on):
    from alrp_d2.config import get_cfg
    from alrp_d2.engine.module import DetectionModule

    cfg = get_cfg()
    cfg.MODEL.MASK_ON = mask_on
    cfg.OUTPUT_DIR = str(tmp_path)
    expected = ("bbox", "segm") if mask_on else ("bbox",)
    assert DetectionModule.evaluation_tasks(cfg) == expected
    # build_evaluator without building the model: it reads only ``cfg``.
    module = SimpleNamespace(
        cfg=cfg, evaluation_tasks=DetectionModule.evaluation_tasks, _lrp_evaluators={}
    )
    evaluators = DetectionModule.build_evaluator(module, mask_dataset_name)
    coco, lrp = evaluators._evaluators
    assert isinstance(lrp, LRPEvaluator) and coco._tasks == lrp._tasks == expected
    assert module._lrp_evaluators == {mask_dataset_name: lrp}  # its thresholds go to model_best
    results = run_evaluator(evaluators)
    flat = flatten_results_dict(results)
    assert {"bbox/AP", "lrp/oLRP"} <= set(flat)
    assert ({"segm/AP", "lrp_segm/oLRP"} <= set(flat)) == mask_on
    assert ("segm" in results) == ("lrp_segm" in results) == mask_on
