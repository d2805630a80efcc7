"""LVIS in Detectron2: the synthetic shapes in LVIS's format, the evaluators chosen per
dataset, LVIS AP by the lvis package, optimal LRP by LVIS's rules in the evaluator and its
thresholds table, a validation through the Lightning module."""

import json
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import HAS_DETECTRON2
from runs import TINY, synthetic_lvis_on

pytestmark = pytest.mark.detectron2
pytest.importorskip(
    "lvis", reason="the lvis package is missing (python -m alrp_d2.install_detectron2)"
)

if HAS_DETECTRON2:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.structures import Boxes, Instances

    from alrp_d2.config import get_cfg
    from alrp_d2.data.register import register_coco_json
    from alrp_d2.data.synthetic import CLASSES, generate_split
    from alrp_d2.data.synthetic_lvis import FREQUENCY, generate_lvis_split
    from alrp_d2.engine.module import DetectionModule
    from alrp_d2.evaluation import (
        LRPEvaluator,
        LVISAPEvaluator,
        LVISLRPEvaluator,
        is_lvis_dataset,
        lrp_from_lvis,
    )
    from alrp_d2.evaluation.lvis_evaluation import is_lvis_json
    from alrp_d2.predict import check_lrp_thresholds
    from alrp_d2.run_folder import RunFolder

NAME = "alrp_synthetic_lvis_tiny_val"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The synthetic splits' folder, with the LVIS datasets registered on it."""
    root = str(tmp_path_factory.mktemp("lvis") / "alrp_synthetic")
    with synthetic_lvis_on(root):
        yield root


def read(path):
    with open(path) as f:
        return json.load(f)


def test_synthetic_lvis_json_exercises_every_rule(root):
    coco = read(generate_split(root, "tiny_val"))
    data = read(generate_lvis_split(root, "tiny_val"))
    assert [im["id"] for im in data["images"]] == [im["id"] for im in coco["images"]]
    assert not any("iscrowd" in a for a in data["annotations"])
    seen = dict(negative=0, unknown=0, crowd=0, left_out=0)
    for im in data["images"]:
        shapes = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        kept = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        crowd = {a["category_id"] for a in shapes if a["iscrowd"]}
        present = {a["category_id"] for a in shapes}
        assert im["pos_category_ids"] == sorted({a["category_id"] for a in kept})
        assert not set(im["neg_category_ids"]) & present
        # Not exhaustive: a crowd's class, and a class of two shapes or more, one of which
        # lost its annotation.
        counts = Counter(a["category_id"] for a in shapes if not a["iscrowd"])
        repeated = {c for c, n in counts.items() if n >= 2}
        assert im["not_exhaustive_category_ids"] == sorted(crowd | repeated)
        assert Counter(a["category_id"] for a in kept) == counts - Counter(repeated)
        left_out = repeated
        seen["negative"] += len(im["neg_category_ids"])
        seen["unknown"] += len(CLASSES) - len(present) - len(im["neg_category_ids"])
        seen["crowd"] += len(crowd)
        seen["left_out"] += len(left_out)
    assert all(seen.values()), seen
    cats = data["categories"]
    assert [c["frequency"] for c in cats] == [FREQUENCY[n] for n in CLASSES]
    assert {c["frequency"] for c in cats if c["image_count"]} == {"r", "c", "f"}
    # Detectron2 reads it, the images where the synthetic split put them.
    dicts = DatasetCatalog.get(NAME)
    assert [d["file_name"] for d in dicts] == [
        f"{root}/tiny_val/{im['file_name']}" for im in coco["images"]
    ]
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
    assert dicts[0]["neg_category_ids"] == data["images"][0]["neg_category_ids"]


def stand_in_module(tmp_path, lrp=True):
    """What ``build_evaluator`` reads of the module, without building the model."""
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.LRP_EVALUATOR = lrp
    return SimpleNamespace(
        cfg=cfg, evaluation_tasks=DetectionModule.evaluation_tasks, _lrp_evaluators={}
    )


def test_evaluators_chosen_by_dataset(root, tmp_path):
    module = stand_in_module(tmp_path)
    ap, lrp = DetectionModule.build_evaluator(module, NAME)._evaluators
    assert type(ap) is LVISAPEvaluator and type(lrp) is LVISLRPEvaluator
    assert module._lrp_evaluators == {NAME: lrp}
    # The same images as COCO: COCO's evaluators.
    coco_name = "alrp_test_lvis_coco_twin"
    if coco_name not in DatasetCatalog.list():
        register_coco_json(coco_name, generate_split(root, "tiny_val"), f"{root}/tiny_val")
    ap, lrp = DetectionModule.build_evaluator(module, coco_name)._evaluators
    assert type(ap) is COCOEvaluator and type(lrp) is LRPEvaluator
    # Registered as COCO (as --dataset registers), but the file is LVIS's: LVIS's.
    disguised = "alrp_test_lvis_registered_as_coco"
    MetadataCatalog.get(disguised).set(
        json_file=generate_lvis_split(root, "tiny_val"), evaluator_type="coco"
    )
    assert is_lvis_dataset(disguised) and not is_lvis_dataset(coco_name)
    (ap,) = DetectionModule.build_evaluator(
        stand_in_module(tmp_path, lrp=False), disguised
    )._evaluators
    assert type(ap) is LVISAPEvaluator


def test_a_json_half_lvis_is_refused(root, tmp_path):
    data = read(generate_lvis_split(root, "tiny_val"))
    del data["images"][3]["neg_category_ids"]
    path = tmp_path / "half.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"15 of 16 images carry LVIS's federated lists.*image 4"):
        is_lvis_json(str(path))


def outputs(record, extra=()):
    """The image's ground truth as detections (class index = category id - 1), scored 0.9,
    then ``extra`` (x, y, w, h, class index, score)."""
    rows = [(*a["bbox"], a["category_id"], 0.9) for a in record["annotations"]] + list(extra)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows]).reshape(-1, 4)
    inst = Instances((record["height"], record["width"]))
    inst.pred_boxes = Boxes(boxes.float())
    inst.pred_classes = torch.tensor([r[4] for r in rows], dtype=torch.long)
    inst.scores = torch.tensor([r[5] for r in rows], dtype=torch.float32)
    return {"instances": inst}


def evaluate(evaluator, extras=None):
    evaluator.reset()
    for record in DatasetCatalog.get(NAME):
        extra = (extras or {}).get(record["image_id"], ())
        evaluator.process([{"image_id": record["image_id"]}], [outputs(record, extra)])
    return evaluator.evaluate()


def federated_extras():
    """Per image, a high-scored detection far from any object, of a class the image's labels
    say nothing about (not evaluated) and of a class not exhaustively annotated (ignored)."""
    extras = {}
    for record in DatasetCatalog.get(NAME):
        # The records' classes are indices (category id - 1), the lists category ids.
        annotated = {a["category_id"] + 1 for a in record["annotations"]}
        known = annotated | set(record["neg_category_ids"])
        unknown = [c for c in range(1, len(CLASSES) + 1) if c not in known]
        partial = [c for c in record["not_exhaustive_category_ids"] if c in annotated]
        for c, score in ((unknown[:1], 0.95), (partial[:1], 0.97)):
            for category in c:
                extras.setdefault(record["image_id"], []).append(
                    (90, 90, 30, 30, category - 1, score)
                )
    assert sum(len(e) for e in extras.values()) >= 4
    return extras


def negative_extra():
    """A high-scored detection of a class verified absent in its image: a false positive."""
    for record in DatasetCatalog.get(NAME):
        if record["neg_category_ids"]:
            c = record["neg_category_ids"][0] - 1
            return {record["image_id"]: [(90, 90, 30, 30, c, 0.99)]}
    raise AssertionError("no image with neg_category_ids")


def test_lvis_ap_by_the_lvis_package(root, tmp_path):
    evaluator = LVISAPEvaluator(NAME, distributed=False, output_dir=str(tmp_path))
    perfect = evaluate(evaluator, federated_extras())["bbox"]
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert perfect[key] == pytest.approx(100), key
    assert not hasattr(np, "float")  # the alias for lvis 0.5.3 is gone again
    wrong = evaluate(evaluator, negative_extra())["bbox"]
    assert wrong["AP"] < 100
    results = read(tmp_path / "lvis_instances_results.json")
    assert {r["category_id"] for r in results} == {1, 2, 3, 4}  # class index + 1


def test_lvis_lrp_evaluator(root, tmp_path):
    evaluator = LVISLRPEvaluator(NAME, distributed=False, output_dir=str(tmp_path))
    result = evaluate(evaluator, federated_extras())["lrp"]
    assert set(result) >= {"oLRP", "oLRP_FP", "oLRP_r", "oLRP_c", "oLRP_f"}
    assert result["oLRP_FP"] == 0 and result["oLRP_FN"] == 0 and result["oLRP"] < 1e-3
    wrong = evaluate(evaluator, negative_extra())["lrp"]
    assert wrong["oLRP_FP"] > 0
    # The figures of lrp_from_lvis on the json, the category ids the class index plus 1.
    coco_gt = evaluator._coco_api
    dets, extras = [], negative_extra()
    for record in DatasetCatalog.get(NAME):
        inst = outputs(record, extras.get(record["image_id"], ()))["instances"]
        dets += instances_to_coco_json(inst, record["image_id"])
    for d in dets:
        d["category_id"] += 1
    direct = lrp_from_lvis(coco_gt, coco_gt.loadRes(dets))
    for key, value in wrong.items():
        expected = 100 * direct[key]
        assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(
            expected, rel=1e-9
        ), key
    table = read(tmp_path / "lrp_thresholds.json")
    assert [(k, v["name"]) for k, v in table.items()] == [
        (str(i + 1), n) for i, n in enumerate(CLASSES)
    ]
    assert check_lrp_thresholds(table, "table").keys() == {1, 2, 3, 4}


def small_lvis_dataset(tmp_path, name, categories, **image_fields):
    """An LVIS dataset of one image and one object of class 1, with ``categories``."""
    image = {"id": 1, "height": 100, "width": 100, "coco_url": "val/1.png", **image_fields}
    data = {
        "images": [image],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 40, 40],
                "area": 1600,
                "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
            }
        ],
        "categories": categories,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    MetadataCatalog.get(name).set(
        json_file=str(path), evaluator_type="lvis", thing_classes=[c["name"] for c in categories]
    )
    return name


def test_thresholds_table_has_every_class_and_predict_reads_it(tmp_path):
    cats = [{"id": i, "name": n, "frequency": "r"} for i, n in ((1, "a"), (2, "b"), (3, "c"))]
    name = small_lvis_dataset(
        tmp_path,
        "alrp_test_lvis_missing_class",
        cats,
        neg_category_ids=[2],
        not_exhaustive_category_ids=[],
    )
    evaluator = LVISLRPEvaluator(name, distributed=False, output_dir=str(tmp_path))
    evaluator.reset()
    inst = Instances(
        (100, 100),
        pred_boxes=Boxes(torch.tensor([[10.0, 10, 50, 50]])),
        scores=torch.tensor([0.8]),
        pred_classes=torch.tensor([0]),
    )
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    assert evaluator.evaluate()["lrp"]["oLRP"] == 0
    table = read(tmp_path / "lrp_thresholds.json")
    assert list(table) == ["1", "2", "3"]  # classes 2 and 3 have no ground truth here
    assert table["1"]["threshold"] == pytest.approx(0.8)
    assert table["3"] == {
        "name": "c",
        "oLRP": None,
        "oLRP_loc": None,
        "oLRP_FP": None,
        "oLRP_FN": None,
        "threshold": None,
    }
    assert len(check_lrp_thresholds(table, "table")) == 3  # predict: one row per class


def test_a_dataset_without_lvis_fields_is_refused_by_name(tmp_path):
    cats = [{"id": 1, "name": "a", "frequency": "r"}]
    name = small_lvis_dataset(tmp_path, "alrp_test_lvis_no_lists", cats, neg_category_ids=[])
    with pytest.raises(
        ValueError,
        match="alrp_test_lvis_no_lists.*image 1 has no list 'not_exhaustive_category_ids'",
    ):
        LVISLRPEvaluator(name, distributed=False)


def test_validation_through_the_module(root, tmp_path):
    """The tiny model, untrained, validated on the LVIS twin of its validation split:
    LVIS AP and optimal LRP logged, the thresholds table written and kept for
    model_best.pth."""
    import pytorch_lightning as pl
    from detectron2.data import build_detection_test_loader

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.merge_from_list(
        [
            "DATASETS.TEST",
            (NAME,),
            "OUTPUT_DIR",
            str(tmp_path),
            "MODEL.DEVICE",
            "cpu",
            "MODEL.RETINANET.SCORE_THRESH_TEST",
            0.0,
            "TEST.DETECTIONS_PER_IMAGE",
            20,
        ]
    )
    module = DetectionModule(cfg)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=[build_detection_test_loader(cfg, NAME)], verbose=False)
    metrics = module.last_metrics
    assert {"bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "lrp/oLRP", "lrp/oLRP_r"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("bbox/AP", "lrp/oLRP", "lrp/oLRP_f"))
    table = read(RunFolder(str(tmp_path)).lrp_thresholds(NAME))
    assert list(table) == ["1", "2", "3", "4"]
    assert module.last_lrp_thresholds == {NAME: table}
    assert (tmp_path / "inference" / NAME / "lvis_instances_results.json").is_file()
