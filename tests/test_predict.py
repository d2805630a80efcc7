"""``python -m alrp_d2.predict`` on a model trained by train_net.py (the tiny config):
pictures, COCO-format json, the run's LRP-optimal thresholds, and bad input.

The tiny training is conftest.py's ``trained_run``.
"""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from runs import ROOT, VAL, python_module

pytestmark = pytest.mark.detectron2


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory):
    """Three validation images under names of no dataset (image ids 1, 2, 3: their order),
    the third as a JPEG."""
    folder = tmp_path_factory.mktemp("inputs")
    val = run.data / "alrp_synthetic" / "tiny_val"
    paths = [folder / "street.png", folder / "yard.png", folder / "zoo.jpg"]
    shutil.copy(val / "00000.png", paths[0])
    shutil.copy(val / "00001.png", paths[1])
    Image.open(val / "00002.png").convert("RGB").save(paths[2], quality=95)
    return paths


def predict_cfg(run, weights):
    from alrp_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(run.out / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def bgr(path):
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1])


@pytest.fixture(scope="module")
def model_outputs(run, inputs):
    """Detectron2's own DefaultPredictor on the final weights: per input, (contiguous
    class, score, XYWH box) of every detection."""
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(predict_cfg(run, run.out / "model_final.pth"))
    outputs = []
    for path in inputs:
        instances = predictor(bgr(path))["instances"].to("cpu")
        boxes = instances.pred_boxes.tensor.numpy().astype(float)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        outputs.append(
            [
                (int(c), float(s), [float(v) for v in b])
                for c, s, b in zip(instances.pred_classes.tolist(), instances.scores.tolist(), xywh)
            ]
        )
    assert sum(len(o) for o in outputs) > 0, "the model detects nothing: no test of the thresholds"
    return outputs


def expected_rows(outputs, inputs, keep):
    """The rows of predictions.json: ``keep(dataset category id, score)`` decides."""
    rows = []
    for image_id, (dets, path) in enumerate(zip(outputs, inputs), start=1):
        for cls, score, box in dets:
            if keep(cls + 1, score):  # the synthetic categories are 1..4
                rows.append(
                    {
                        "image_id": image_id,
                        "category_id": cls + 1,
                        "score": score,
                        "bbox": box,
                        "file_name": path.name,
                    }
                )
    return rows


def by_threshold(table):
    def keep(category, score):
        t = table[str(category)]["threshold"]
        return t is not None and score >= t

    return keep


def assert_same_rows(actual, expected):
    def key(r):
        return (
            r["image_id"],
            r["category_id"],
            round(r["score"], 7),
            [round(v, 3) for v in r["bbox"]],
        )

    actual, expected = sorted(actual, key=key), sorted(expected, key=key)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a["image_id"], a["category_id"], a["file_name"]) == (
            e["image_id"],
            e["category_id"],
            e["file_name"],
        )
        assert a["score"] == pytest.approx(e["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(e["bbox"], abs=1e-3)


def predict(argv):
    """``alrp_d2.predict.main(argv)`` in this process: (exit status, stdout, stderr)."""
    from alrp_d2.predict import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def base_args(run, inputs, output, weights=None):
    return [
        "--config-file",
        run.out / "config.yaml",
        "--weights",
        weights or run.out / "model_final.pth",
        "--input",
        *inputs,
        "--output",
        output,
        "--device",
        "cpu",
    ]


def read_predictions(folder):
    with open(folder / "predictions.json") as f:
        return json.load(f)


def run_thresholds(run):
    with open(run.out / "inference" / VAL / "lrp_thresholds.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def crafted(run, model_outputs, tmp_path_factory):
    """An lrp_thresholds.json that splits the model's own detections: class 1 keeps none
    (null), the others keep those scored at least their median."""
    table = run_thresholds(run)
    for cid in table:
        scores = sorted(s for dets in model_outputs for c, s, _ in dets if c + 1 == int(cid))
        table[cid]["threshold"] = (
            None if cid == "1" else (scores[len(scores) // 2] if scores else 0.0)
        )
    path = tmp_path_factory.mktemp("crafted") / "thresholds.json"
    path.write_text(json.dumps(table))
    return path, table


# -- what a user gets -------------------------------------------------------------------


def test_command_line_pictures_and_coco_json_with_the_runs_thresholds(
    run, inputs, model_outputs, tmp_path
):
    """The real command, its thresholds found beside the weights (inference/<dataset>/)."""
    output = tmp_path / "pictures"
    done = python_module(
        "alrp_d2.predict", *base_args(run, inputs, output), env_root=run.data, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    thresholds_file = run.out / "inference" / VAL / "lrp_thresholds.json"
    assert f"LRP-optimal thresholds of {thresholds_file}" in done.stdout
    assert sorted(p.name for p in output.iterdir()) == [
        "predictions.json",
        "street.png",
        "yard.png",
        "zoo.jpg",
    ]
    for path in inputs:
        picture = output / path.name
        assert picture.stat().st_size > 0
        with Image.open(picture) as im:
            assert im.format == ("JPEG" if path.suffix == ".jpg" else "PNG")
            assert im.size == Image.open(path).size == (128, 128)
            im.verify()
    rows = read_predictions(output)
    assert isinstance(rows, list)
    for row in rows:  # COCO's results format
        assert set(row) == {"image_id", "category_id", "bbox", "score", "file_name"}
        assert row["image_id"] in (1, 2, 3) and row["file_name"] == inputs[row["image_id"] - 1].name
        assert row["category_id"] in (1, 2, 3, 4)
        assert len(row["bbox"]) == 4 and row["bbox"][2] >= 0 and row["bbox"][3] >= 0
        assert 0 <= row["score"] <= 1
    assert_same_rows(rows, expected_rows(model_outputs, inputs, by_threshold(run_thresholds(run))))


def test_lrp_thresholds_keep_exactly_the_detections_above_them(
    run, inputs, model_outputs, crafted, tmp_path
):
    path, table = crafted
    code, out, err = predict(base_args(run, inputs, tmp_path / "p") + ["--lrp-thresholds", path])
    assert code == 0, err
    assert f"LRP-optimal thresholds of {path}" in out
    rows = read_predictions(tmp_path / "p")
    total = sum(len(d) for d in model_outputs)
    assert 0 < len(rows) < total
    assert not any(r["category_id"] == 1 for r in rows)  # threshold null: none of the class
    assert_same_rows(rows, expected_rows(model_outputs, inputs, by_threshold(table)))
    # The detections are drawn: a picture with some differs from its image.
    for image_id, path_in in enumerate(inputs, start=1):
        if any(r["image_id"] == image_id for r in rows):
            drawn = np.asarray(Image.open(tmp_path / "p" / path_in.name).convert("RGB")).astype(int)
            assert (
                np.abs(drawn - np.asarray(Image.open(path_in).convert("RGB")).astype(int)).max()
                > 60
            )


def test_score_threshold_for_every_class(run, inputs, model_outputs, tmp_path):
    scores = sorted(s for dets in model_outputs for _, s, _ in dets)
    limit = scores[len(scores) // 3]
    code, out, err = predict(base_args(run, inputs, tmp_path / "p") + ["--score-threshold", limit])
    assert code == 0, err
    assert f"score threshold {limit}" in out
    rows = read_predictions(tmp_path / "p")
    assert_same_rows(rows, expected_rows(model_outputs, inputs, lambda c, s: s >= limit))
    assert 0 < len(rows) < len(scores)


def test_thresholds_file_beside_the_weights_is_the_default(
    run, inputs, model_outputs, crafted, tmp_path
):
    weights = tmp_path / "model" / "model.pth"
    weights.parent.mkdir()
    shutil.copy(run.out / "model_final.pth", weights)
    shutil.copy(crafted[0], weights.parent / "lrp_thresholds.json")
    code, out, err = predict(base_args(run, inputs, tmp_path / "p", weights))
    assert code == 0, err
    assert f"LRP-optimal thresholds of {weights.parent / 'lrp_thresholds.json'}" in out
    assert_same_rows(
        read_predictions(tmp_path / "p"),
        expected_rows(model_outputs, inputs, by_threshold(crafted[1])),
    )
    # Without any thresholds: refused (nothing guessed), nothing written, until the user
    # chooses one score threshold.
    os.remove(weights.parent / "lrp_thresholds.json")
    code, out, err = predict(base_args(run, inputs, tmp_path / "q", weights))
    assert code == 2 and f"no LRP thresholds for {weights}" in err and "--score-threshold" in err
    assert not (tmp_path / "q").exists()
    code, out, err = predict(
        base_args(run, inputs, tmp_path / "q", weights) + ["--score-threshold", "0.5"]
    )
    assert code == 0, err
    assert "score threshold 0.5" in out
    assert read_predictions(tmp_path / "q") == []  # a barely trained model scores about 0.01


def test_several_thresholds_files_of_the_run(run, inputs, model_outputs, crafted, tmp_path):
    """inference/<the config's test dataset>/ first; several others: the user chooses."""
    weights = tmp_path / "model_final.pth"
    shutil.copy(run.out / "model_final.pth", weights)
    for name in ("other_a", VAL):
        (tmp_path / "inference" / name).mkdir(parents=True)
    shutil.copy(crafted[0], tmp_path / "inference" / VAL / "lrp_thresholds.json")
    shutil.copy(
        run.out / "inference" / VAL / "lrp_thresholds.json", tmp_path / "inference" / "other_a"
    )
    code, out, err = predict(base_args(run, inputs, tmp_path / "p", weights))
    assert code == 0, err
    assert_same_rows(
        read_predictions(tmp_path / "p"),
        expected_rows(model_outputs, inputs, by_threshold(crafted[1])),
    )
    shutil.move(tmp_path / "inference" / VAL, tmp_path / "inference" / "other_b")
    code, out, err = predict(base_args(run, inputs, tmp_path / "q", weights))
    assert code == 2 and "several LRP thresholds files" in err and "--lrp-thresholds" in err
    assert not (tmp_path / "q").exists()


def test_lightning_checkpoint_as_weights(run, inputs, model_outputs, tmp_path):
    code, out, err = predict(base_args(run, inputs, tmp_path / "p", run.out / "last.ckpt"))
    assert code == 0, err
    assert f"LRP-optimal thresholds of {run.out / 'inference' / VAL / 'lrp_thresholds.json'}" in out
    assert_same_rows(
        read_predictions(tmp_path / "p"),
        expected_rows(model_outputs, inputs, by_threshold(run_thresholds(run))),
    )


def test_model_best_brings_the_thresholds_of_its_own_evaluation(
    run, inputs, model_outputs, crafted, tmp_path
):
    best = torch.load(run.out / "model_best.pth", map_location="cpu", weights_only=False)
    assert best["lrp_thresholds"] == {VAL: run_thresholds(run)}
    best["lrp_thresholds"] = {VAL: crafted[1]}  # as if another evaluation had made it the best
    weights = tmp_path / "model_best.pth"
    torch.save(best, weights)
    shutil.copy(
        run.out / "inference" / VAL / "lrp_thresholds.json", tmp_path / "lrp_thresholds.json"
    )  # not used
    code, out, err = predict(base_args(run, inputs, tmp_path / "p", weights))
    assert code == 0, err
    assert f"LRP-optimal thresholds of {weights} (its evaluation on {VAL})" in out
    assert_same_rows(
        read_predictions(tmp_path / "p"),
        expected_rows(model_outputs, inputs, by_threshold(crafted[1])),
    )


def test_scale_resizes_the_pictures(run, inputs, tmp_path):
    code, _, err = predict(
        base_args(run, inputs[:1], tmp_path / "p") + ["--scale", 2, "--score-threshold", 0]
    )
    assert code == 0, err
    assert Image.open(tmp_path / "p" / "street.png").size == (256, 256)


def test_output_is_kept_without_overwrite_and_replaced_with_it(
    run, inputs, model_outputs, tmp_path
):
    output = tmp_path / "p"
    code, _, err = predict(base_args(run, inputs, output))
    assert code == 0, err
    (output / "notes.txt").write_text("mine")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir()}
    code, _, err = predict(base_args(run, inputs, output) + ["--score-threshold", 0])
    assert code == 2
    assert "output files exist already" in err and "--overwrite" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir()} == before
    code, _, err = predict(base_args(run, inputs, output) + ["--score-threshold", 0, "--overwrite"])
    assert code == 0, err
    assert_same_rows(
        read_predictions(output), expected_rows(model_outputs, inputs, lambda c, s: True)
    )
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir()}
    assert after["notes.txt"] == before["notes.txt"]
    for name in ("street.png", "yard.png", "zoo.jpg", "predictions.json"):
        assert after[name] != before[name], name


def test_without_opencv_exit_2_before_writing(run, inputs, tmp_path, monkeypatch):
    """Detectron2's Visualizer imports OpenCV (a dependency of the project): a machine
    without it gets the package's name, before anything is written."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "cv2" else real(n, *a)
    )
    code, _, err = predict(base_args(run, inputs, tmp_path / "p"))
    assert code == 2
    assert "needs OpenCV, which is not installed: pip install opencv-python-headless" in err
    assert not (tmp_path / "p").exists()


# -- bad input: exit status 2, a message naming the problem, nothing written -----------------


@pytest.fixture(scope="module")
def bad_files(run, tmp_path_factory):
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg

    folder = tmp_path_factory.mktemp("bad")
    files = {}
    (folder / "garbage.png").write_bytes(b"this is not a PNG file\n" * 10)
    png = (run.data / "alrp_synthetic" / "tiny_val" / "00003.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    files["garbage"], files["truncated"] = folder / "garbage.png", folder / "truncated.png"
    # The focal-loss quickstart's model (Detectron2's RetinaNet, another network).
    cfg = get_cfg()
    cfg.merge_from_file(
        os.path.join(ROOT, "configs", "quickstart", "focal_retinanet_synthetic.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    torch.save({"model": build_model(cfg).state_dict()}, folder / "focal.pth")
    files["focal"] = folder / "focal.pth"
    weights = torch.load(run.out / "model_final.pth", map_location="cpu", weights_only=False)
    shapes = dict(weights, model=dict(weights["model"]))
    shapes["model"]["head.cls_score.weight"] = torch.zeros(5 * 2, 32, 3, 3)  # 5 classes, not 4
    shapes["model"]["head.cls_score.bias"] = torch.zeros(5 * 2)
    torch.save(shapes, folder / "five_classes.pth")
    files["shapes"] = folder / "five_classes.pth"
    extra = dict(weights, model=dict(weights["model"], **{"mask_head.weight": torch.zeros(3)}))
    torch.save(extra, folder / "extra.pth")
    files["extra"] = folder / "extra.pth"
    (folder / "text.pth").write_text("not a checkpoint")
    files["text"] = folder / "text.pth"
    table = run_thresholds(run)
    bad_tables = {
        "not_json": "{not json",
        "list": json.dumps([0.1, 0.2]),
        "no_threshold": json.dumps({k: {"name": v["name"]} for k, v in table.items()}),
        "string_threshold": json.dumps({k: dict(v, threshold="high") for k, v in table.items()}),
        "three_classes": json.dumps({k: v for k, v in table.items() if k != "4"}),
    }
    for name, text in bad_tables.items():
        (folder / f"{name}.json").write_text(text)
        files[name] = folder / f"{name}.json"
    return files


BAD = [
    (
        "missing image",
        lambda f, i: {"input": [i[0], "no/such/image.png"]},
        "input image not found: no/such/image.png",
    ),
    ("not an image", lambda f, i: {"input": [i[0], f["garbage"]]}, "cannot read image {garbage}"),
    ("truncated image", lambda f, i: {"input": [f["truncated"]]}, "cannot read image {truncated}"),
    ("another network", lambda f, i: {"weights": f["focal"]}, "holds the weights of another model"),
    (
        "other shapes",
        lambda f, i: {"weights": f["shapes"]},
        "head.cls_score.weight (shape (10, 32, 3, 3) in the file",
    ),
    (
        "unknown parameters",
        lambda f, i: {"weights": f["extra"]},
        "mask_head.weight (not in the model)",
    ),
    ("not a checkpoint", lambda f, i: {"weights": f["text"]}, "cannot read the weights {text}"),
    (
        "missing weights",
        lambda f, i: {"weights": "no/such/model.pth"},
        "weights file not found: no/such/model.pth",
    ),
    (
        "missing thresholds",
        lambda f, i: {"extra": ["--lrp-thresholds", "no/such.json"]},
        "LRP thresholds file not found: no/such.json",
    ),
    (
        "thresholds not json",
        lambda f, i: {"extra": ["--lrp-thresholds", f["not_json"]]},
        "not valid json",
    ),
    (
        "thresholds a list",
        lambda f, i: {"extra": ["--lrp-thresholds", f["list"]]},
        "expected an object of classes",
    ),
    (
        "no threshold",
        lambda f, i: {"extra": ["--lrp-thresholds", f["no_threshold"]]},
        "class 1: no 'threshold'",
    ),
    (
        "threshold a string",
        lambda f, i: {"extra": ["--lrp-thresholds", f["string_threshold"]]},
        "threshold 'high' is not a number",
    ),
    (
        "other classes",
        lambda f, i: {"extra": ["--lrp-thresholds", f["three_classes"]]},
        "has thresholds of 3 classes, the model has 4",
    ),
    (
        "missing config",
        lambda f, i: {"config": "no/such.yaml"},
        "config file not found: no/such.yaml",
    ),
    (
        "both thresholds",
        lambda f, i: {"extra": ["--lrp-thresholds", f["list"], "--score-threshold", "0.1"]},
        "not allowed with argument",
    ),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(
    run, inputs, bad_files, tmp_path, case, change, message
):
    c = change(bad_files, inputs)
    output = tmp_path / "p"
    argv = [
        "--config-file",
        c.get("config", run.out / "config.yaml"),
        "--weights",
        c.get("weights", run.out / "model_final.pth"),
        "--input",
        *c.get("input", inputs),
        "--output",
        output,
        "--device",
        "cpu",
        *c.get("extra", []),
    ]
    code, out, err = predict(argv)
    assert code == 2
    assert message.format(**bad_files) in err, err
    assert not output.exists()
