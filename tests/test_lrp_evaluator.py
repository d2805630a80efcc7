"""LRPEvaluator inside Detectron2: same figures as lrp_from_coco, thresholds file."""

import json

import pytest
import torch

from conftest import HAS_DETECTRON2

pytestmark = pytest.mark.detectron2

if HAS_DETECTRON2:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode, Boxes, Instances

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
        DatasetCatalog.register(name, lambda: [
            {"file_name": f"{i}.jpg", "image_id": i, "height": 400, "width": 400,
             "annotations": [{"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}
                             for x, y, w, h, c in boxes]}
            for i, boxes in GT.items()])
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    return name


def outputs_for(image_id):
    dets = DETS[image_id]
    inst = Instances((400, 400))
    inst.pred_boxes = Boxes(torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _, _ in dets], dtype=torch.float32))
    inst.scores = torch.tensor([d[5] for d in dets])
    inst.pred_classes = torch.tensor([d[4] for d in dets])
    return {"instances": inst}


def test_evaluator_reports_lrp_in_percent(dataset_name, tmp_path):
    evaluator = LRPEvaluator(dataset_name, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    for image_id in GT:
        evaluator.process([{"image_id": image_id}], [outputs_for(image_id)])
    results = evaluator.evaluate()
    lrp = results["lrp"]
    assert set(lrp) == {"oLRP", "oLRP_loc", "oLRP_FP", "oLRP_FN", "oLRP_small", "oLRP_medium", "oLRP_large"}
    # Same figures as the functional API on the converted json.
    coco_gt = evaluator._coco_api
    dets = [{"image_id": i, "category_id": coco_gt.getCatIds()[c], "bbox": [x, y, w, h], "score": s}
            for i, ds in DETS.items() for x, y, w, h, c, s in ds]
    direct = lrp_from_coco(coco_gt, coco_gt.loadRes(dets))
    assert lrp["oLRP"] == pytest.approx(100 * direct["oLRP"], rel=1e-6)
    assert lrp["oLRP_FN"] == pytest.approx(100 * direct["oLRP_FN"], rel=1e-6)
    thresholds = json.loads((tmp_path / "lrp_thresholds.json").read_text())
    assert {v["name"] for v in thresholds.values()} == {"a", "b"}
    assert all(v["threshold"] is None or 0 <= v["threshold"] <= 1 for v in thresholds.values())
