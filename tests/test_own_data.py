"""A user's own COCO-format dataset from training to predictions (issue 22).

The dataset: the tiny synthetic splits as JPEGs in subfolders, category ids 3, 7, 11 and 90
listed out of order, image ids from 100000 in steps of 13, images without annotations and
crowd regions (the synthetic data has both), one box of negative width. Trained with
``--dataset``, evaluated with ``--eval-only``, predicted with ``alrp_d2.predict``, and
``predict``'s json scored by the LRP command to the evaluator's figure.
"""

import hashlib
import json
import os
import re
import types

import pytest
import torch
from PIL import Image
from runs import TINY, TRAINING, python_module, train_net

# Slow: train_net.py trainings on a user's dataset (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]

# synthetic category id (1..4: circle, square, triangle, cross) -> the user's id
USER_IDS = {1: 90, 2: 3, 3: 11, 4: 7}
BROKEN_ANNOTATION = 777  # its box has a negative width
# Long enough (20 s) for LRP-optimal thresholds that keep detections of 3 classes.
LEARN = ["SOLVER.MAX_EPOCHS", 12, "TEST.EVAL_PERIOD", 12, "SOLVER.BASE_LR", 0.004]


def folder_state(folder, skip=()):
    state = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), folder) not in skip]
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


def user_split(synthetic, split, root, first_id):
    """``split`` of the synthetic data as the user's: JPEGs under ``root/images/<split>/sub``,
    the json in ``root/annotations``; returns the json's path."""
    with open(synthetic / "annotations" / f"tiny_{split}.json") as f:
        coco = json.load(f)
    new_image_id = {im["id"]: first_id + 13 * i for i, im in enumerate(coco["images"])}
    (root / "images" / split / "sub").mkdir(parents=True)
    for im in coco["images"]:
        name = os.path.splitext(os.path.basename(im["file_name"]))[0] + ".jpg"
        source = synthetic / f"tiny_{split}" / os.path.basename(im["file_name"])
        Image.open(source).convert("RGB").save(root / "images" / split / "sub" / name, quality=95)
        im["file_name"], im["id"] = f"{split}/sub/{name}", new_image_id[im["id"]]
    for i, ann in enumerate(coco["annotations"]):
        ann["id"] = 5000 + i
        ann["image_id"] = new_image_id[ann["image_id"]]
        ann["category_id"] = USER_IDS[ann["category_id"]]
    if split == "train":
        first = coco["annotations"][0]
        broken = dict(first, id=BROKEN_ANNOTATION, bbox=[40.0, 40.0, -12.0, 20.0], iscrowd=0)
        coco["annotations"].append(broken)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    coco["categories"] = [
        {"id": USER_IDS[c], "name": names[c]}
        for c in (1, 4, 2, 3)  # 90, 7, 3, 11
    ]
    path = root / "annotations" / f"{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The user's dataset, trained on by ``train_net.py --dataset`` (two epochs, evaluated
    at the end); a namespace of its files, the run's folder and console."""
    from alrp_d2.data.synthetic import generate_split

    base = tmp_path_factory.mktemp("own")
    synthetic = base / "synthetic"
    for split in ("tiny_train", "tiny_val"):
        generate_split(str(synthetic), split)
    root = base / "my data"
    train_json = user_split(synthetic, "train", root, 200000)
    val_json = user_split(synthetic, "val", root, 100000)
    images = root / "images"
    datasets = [
        "--dataset",
        "my_train",
        train_json,
        images,
        "--dataset",
        "my_val",
        val_json,
        images,
    ]
    out = base / "run"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
        *datasets,
        *TRAINING,
        *LEARN,
        "DATASETS.TRAIN",
        '("my_train",)',
        "DATASETS.TEST",
        '("my_val",)',
        "OUTPUT_DIR",
        out,
        env_root=base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return types.SimpleNamespace(
        base=base,
        root=root,
        images=images,
        train_json=train_json,
        val_json=val_json,
        out=out,
        datasets=datasets,
        console=done.stdout + done.stderr,
    )


def test_training_names_what_it_drops_and_logs_the_datasets(own):
    log = (own.out / "log.txt").read_text()
    for text in (own.console, log):
        assert (
            f"annotation id {BROKEN_ANNOTATION}: box [40.0, 40.0, -12.0, 20.0] has no area" in text
        )
        assert "1 annotations have no usable box" in text
    # Detectron2's dataset summary, before anything else of the run, in log.txt too
    assert re.search(r"Loaded \d+ images in COCO format from .*train\.json", log)
    assert "Distribution of instances among all 4 categories" in log
    assert log.index("Loaded") < log.index("Full config saved")
    thresholds = json.loads((own.out / "inference" / "my_val" / "lrp_thresholds.json").read_text())
    assert sorted(map(int, thresholds)) == [3, 7, 11, 90]
    assert thresholds["90"]["name"] == "circle" and thresholds["7"]["name"] == "cross"


def lrp_command_olrp(gt, dets):
    done = python_module("alrp_d2.evaluation.lrp", gt, dets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RuntimeWarning" not in done.stderr, done.stderr  # runpy's, of a module imported twice
    line = next(x for x in done.stdout.splitlines() if "Optimal LRP " in x and "area=   all" in x)
    return float(line.rsplit("=", 1)[1])


@pytest.mark.parametrize("thresholds", ["run", "score 0"])
def test_predict_writes_the_datasets_ids_and_scores_to_the_evaluators_olrp(
    own, thresholds, tmp_path
):
    val_images = own.images / "val" / "sub"
    output = tmp_path / "predictions"
    which = [] if thresholds == "run" else ["--score-threshold", 0.0]
    done = python_module(
        "alrp_d2.predict",
        "--config-file",
        own.out / "config.yaml",
        "--weights",
        own.out / "model_final.pth",
        "--input",
        val_images,
        "--output",
        output,
        "--device",
        "cpu",
        *which,
        "--dataset",
        "my_val",
        own.val_json,
        own.images,
        "DATASETS.TEST",
        '("my_val",)',
        env_root=own.base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((output / "predictions.json").read_text())
    coco = json.loads(own.val_json.read_text())
    ids = {os.path.basename(im["file_name"]): im["id"] for im in coco["images"]}
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 11, 90}
    for row in rows:
        assert row["image_id"] == ids[row["file_name"]]
    final = json.loads((own.out / "final_metrics.json").read_text())
    evaluator = final["lrp/oLRP"] / 100
    assert evaluator < 1  # some class keeps detections: the comparison means something
    # The command prints 3 decimals; the function it runs, every one.
    assert lrp_command_olrp(own.val_json, output / "predictions.json") == pytest.approx(
        evaluator, abs=5e-4
    )
    from pycocotools.coco import COCO

    from alrp_d2.evaluation.lrp import lrp_from_coco

    gt = COCO(str(own.val_json))
    assert lrp_from_coco(gt, gt.loadRes(rows))["oLRP"] == pytest.approx(evaluator, rel=1e-9)


def test_predict_without_a_dataset_or_thresholds_asks_how_to_number_the_classes(own, tmp_path):
    weights = tmp_path / "weights" / "model.pth"  # no thresholds beside these weights
    weights.parent.mkdir()
    weights.write_bytes((own.out / "model_final.pth").read_bytes())
    image = next((own.images / "val" / "sub").iterdir())
    common = [
        "--config-file",
        own.out / "config.yaml",
        "--weights",
        weights,
        "--input",
        image,
        "--device",
        "cpu",
    ]
    done = python_module(
        "alrp_d2.predict",
        *common,
        "--output",
        tmp_path / "a",
        "DATASETS.TEST",
        "()",
        env_root=own.base,
    )
    assert done.returncode == 2 and "no LRP thresholds for" in done.stderr  # nothing guessed
    done = python_module(
        "alrp_d2.predict",
        *common,
        "--output",
        tmp_path / "a",
        "--score-threshold",
        0.0,
        "DATASETS.TEST",
        "()",
        env_root=own.base,
    )
    assert done.returncode == 2 and "no dataset maps the model's 4 classes" in done.stderr
    assert not (tmp_path / "a").exists()
    done = python_module(
        "alrp_d2.predict",
        *common,
        "--output",
        tmp_path / "b",
        "--contiguous-ids",
        "--score-threshold",
        0.0,
        "DATASETS.TEST",
        "()",
        env_root=own.base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert {r["image_id"] for r in rows} == {1} and {r["category_id"] for r in rows} <= {1, 2, 3, 4}


def test_predict_needs_no_registered_dataset_when_the_thresholds_map_the_classes(own, tmp_path):
    """The run's config names my_val, not registered in this process: the thresholds of
    the run's evaluation give the category ids (the inputs then count from 1)."""
    image = next((own.images / "val" / "sub").iterdir())
    done = python_module(
        "alrp_d2.predict",
        "--config-file",
        own.out / "config.yaml",
        "--weights",
        own.out / "model_final.pth",
        "--input",
        image,
        "--output",
        tmp_path / "p",
        "--device",
        "cpu",
        env_root=own.base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert {r["category_id"] for r in rows} <= {3, 7, 11, 90} and {r["image_id"] for r in rows} <= {
        1
    }


def test_lrp_command_refuses_detections_of_other_images(own, tmp_path):
    coco = json.loads(own.val_json.read_text())
    first, second = coco["images"][:2]
    det = {"image_id": first["id"], "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.9}
    cases = {
        "positions": ([dict(det, image_id=1)], "image_id 1 not among its images"),
        "class index": ([dict(det, category_id=1)], "category_id 1 not among its categories"),
        "a list as id": ([dict(det, image_id=[first["id"]])], "image_id and category_id must be"),
        "other file": (
            [dict(det, file_name=os.path.basename(second["file_name"]))],
            f"image_id {first['id']} is {first['file_name']}",
        ),
    }
    for name, (dets, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dets))
        done = python_module("alrp_d2.evaluation.lrp", own.val_json, path)
        assert done.returncode == 2 and message in done.stderr, (name, done.stderr)
    bad = tmp_path / "corrupt.json"
    bad.write_text("[{")
    done = python_module("alrp_d2.evaluation.lrp", own.val_json, bad)
    assert done.returncode == 2 and f"the results file {bad} is not valid json" in done.stderr
    done = python_module("alrp_d2.evaluation.lrp", bad, own.val_json)
    assert done.returncode == 2 and f"the ground-truth json {bad} is not valid json" in done.stderr


def test_eval_only_writes_a_folder_of_its_own(own):
    before = folder_state(own.out)
    done = train_net(
        "--config-file",
        TINY,
        *own.datasets,
        "--eval-only",
        "MODEL.WEIGHTS",
        own.out / "model_final.pth",
        *TRAINING,
        *LEARN,
        "DATASETS.TRAIN",
        '("my_train",)',
        "DATASETS.TEST",
        '("my_val",)',
        "OUTPUT_DIR",
        own.out,
        env_root=own.base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert folder_state(own.out, skip=("eval",)) == before  # the training's records as they were
    evaluated = own.out / "eval" / "model_final"
    again = json.loads((evaluated / "final_metrics.json").read_text())
    trained = json.loads((own.out / "final_metrics.json").read_text())
    assert again["lrp/oLRP"] == pytest.approx(trained["lrp/oLRP"], abs=1e-6)
    assert (evaluated / "inference" / "my_val" / "lrp_thresholds.json").is_file()
    assert not (own.out / "csv" / "version_1").exists()


def test_eval_only_refuses_another_models_weights_and_writes_nothing(own, tmp_path):
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(
        os.path.join(
            os.path.dirname(TINY),
            os.pardir,
            os.pardir,
            "configs",
            "quickstart",
            "focal_retinanet_synthetic.yaml",
        )
    )
    cfg.MODEL.DEVICE = "cpu"
    other = tmp_path / "focal.pth"
    torch.save({"model": build_model(cfg).state_dict()}, other)
    before = folder_state(own.out)
    done = train_net(
        "--config-file",
        TINY,
        *own.datasets,
        "--eval-only",
        "MODEL.WEIGHTS",
        other,
        "DATASETS.TEST",
        '("my_val",)',
        "OUTPUT_DIR",
        own.out,
        env_root=own.base,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "holds the weights of another model than the config's ALRPRetinaNet" in done.stderr
    assert folder_state(own.out) == before


def test_a_class_count_other_than_the_datasets_stops_before_training(own, tmp_path):
    out = tmp_path / "out"
    for key in ("MODEL.RETINANET.NUM_CLASSES",):
        done = train_net(
            "--config-file",
            TINY,
            "--accelerator",
            "cpu",
            *own.datasets,
            "DATASETS.TRAIN",
            '("my_train",)',
            "DATASETS.TEST",
            "()",
            key,
            3,
            "OUTPUT_DIR",
            out,
            env_root=own.base,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"{key} is 3, but the training dataset 'my_train' has 4 classes" in done.stderr
        assert not out.exists()


def test_resume_into_a_folder_without_checkpoints_says_so(own, tmp_path):
    out = tmp_path / "mistyped"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--resume",
        *own.datasets,
        "DATASETS.TRAIN",
        '("my_train",)',
        "DATASETS.TEST",
        "()",
        "SOLVER.MAX_EPOCHS",
        1,
        "OUTPUT_DIR",
        out,
        env_root=own.base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--resume: OUTPUT_DIR {out} does not exist; starting a new training" in done.stdout


def test_a_refused_loss_choice_exits_2_with_its_name(own, tmp_path):
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "MODEL.META_ARCHITECTURE",
        "RankingRetinaNet",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        tmp_path / "out",
        env_root=own.base,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "RankingRetinaNet needs MODEL.RANKING_LOSS.NAME" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_flags_after_the_overrides_are_named(own):
    done = train_net("--config-file", TINY, "SOLVER.MAX_EPOCHS", 1, "--resume", env_root=own.base)
    assert done.returncode == 2
    assert "--resume comes after the KEY VALUE overrides: flags go first" in done.stderr
