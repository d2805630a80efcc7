"""A user's own LVIS-format dataset given by ``--dataset`` / ``$ALRP_DATASETS``: read by
Detectron2's ``load_lvis_json`` (LVIS images have no ``file_name``: their path is
``IMAGE_ROOT/<split folder>/<file>`` from ``coco_url``), with LVIS's ``evaluator_type`` and
the class metadata, so that training, LVIS validation and ``predict`` work on it.

The dataset: the synthetic splits in LVIS's format (``alrp_d2/data/synthetic_lvis.py``)
as LVIS v1 writes its json: images without ``file_name``, a ``coco_url`` of a server, and
category ids 90, 3, 11 and 7 listed out of order."""

import json
import os
import types

import pytest
from conftest import HAS_DETECTRON2
from runs import TINY, python_module, synthetic_lvis_on, train_net

# Slow: train_net.py trainings on an LVIS json (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]
pytest.importorskip(
    "lvis", reason="the lvis package is missing (python -m alrp_d2.install_detectron2)"
)

if HAS_DETECTRON2:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from alrp_d2.data.register import register_coco_datasets
    from alrp_d2.data.synthetic import CLASSES
    from alrp_d2.data.synthetic_lvis import generate_lvis_split
    from alrp_d2.evaluation import is_lvis_dataset

# synthetic category id (1..4: circle, square, triangle, cross) -> the user's id
USER_IDS = {1: 90, 2: 3, 3: 11, 4: 7}
LVIS_KEYS = ("bbox/AP", "bbox/APr", "bbox/APc", "bbox/APf", "lrp/oLRP_r", "lrp/oLRP_f")


def user_lvis(root, split, path, ids=None):
    """The synthetic LVIS json of ``split`` written to ``path`` as LVIS v1 writes one: no
    ``file_name``, ``coco_url`` on a server; category ids mapped by ``ids``."""
    ids = ids or {c: c for c in USER_IDS}
    with open(generate_lvis_split(str(root), split)) as f:
        data = json.load(f)
    for im in data["images"]:
        file_name = im.pop("file_name")
        im["coco_url"] = f"http://images.example.org/{split}/{file_name}"
        for key in ("pos_category_ids", "neg_category_ids", "not_exhaustive_category_ids"):
            im[key] = [ids[c] for c in im[key]]
    for ann in data["annotations"]:
        ann["category_id"] = ids[ann["category_id"]]
    data["categories"] = [dict(c, id=ids[c["id"]]) for c in reversed(data["categories"])]
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The synthetic splits' folder (``tiny_train/``, ``tiny_val/``: the split folders of
    the images' ``coco_url``), with ``alrp_synthetic_lvis_*`` registered on it."""
    root = tmp_path_factory.mktemp("lvis_own") / "alrp_synthetic"
    with synthetic_lvis_on(root):
        yield types.SimpleNamespace(root=str(root))


def without_ids(records):
    return [
        dict(r, annotations=[{k: v for k, v in a.items() if k != "id"} for a in r["annotations"]])
        for r in records
    ]


@pytest.mark.parametrize("slash", ["", "/"])
def test_an_lvis_json_is_registered_as_detectron2_registers_lvis(synthetic, tmp_path, slash):
    path = user_lvis(synthetic.root, "tiny_val", tmp_path / "lvis val.json")
    name = f"own_lvis_val{'_slash' if slash else ''}"
    assert register_coco_datasets([(name, str(path), synthetic.root + slash)]) == [name]
    records = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "lvis" and is_lvis_dataset(name)
    assert meta.thing_classes == list(CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
    assert (meta.json_file, meta.image_root) == (str(path), synthetic.root)
    # As Detectron2 reads the synthetic LVIS split: the same images (under the split folder
    # of coco_url), classes and federated lists; plus each annotation's id.
    builtin = DatasetCatalog.get("alrp_synthetic_lvis_tiny_val")
    assert without_ids(records) == builtin
    assert all(os.path.isfile(r["file_name"]) for r in records)
    assert records[0]["file_name"] == os.path.join(synthetic.root, "tiny_val", "00000.png")
    ann_ids = [a["id"] for r in records for a in r["annotations"]]
    assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))


def test_lvis_category_ids_out_of_order_are_numbered_as_coco_numbers_them(synthetic, tmp_path):
    path = user_lvis(synthetic.root, "tiny_val", tmp_path / "lvis.json", USER_IDS)
    register_coco_datasets([("own_lvis_user_ids", str(path), synthetic.root)])
    records = DatasetCatalog.get("own_lvis_user_ids")
    meta = MetadataCatalog.get("own_lvis_user_ids")
    # sorted ids 3, 7, 11, 90: square, cross, triangle, circle
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2, 90: 3}
    assert meta.thing_classes == ["square", "cross", "triangle", "circle"]
    builtin = DatasetCatalog.get("alrp_synthetic_lvis_tiny_val")
    index = meta.thing_dataset_id_to_contiguous_id
    for record, expected in zip(records, builtin):
        got = [a["category_id"] for a in record["annotations"]]
        assert got == [index[USER_IDS[a["category_id"] + 1]] for a in expected["annotations"]]
        # The federated lists stay in the json's ids, as load_lvis_json keeps them.
        assert record["neg_category_ids"] == [USER_IDS[c] for c in expected["neg_category_ids"]]


def test_a_coco_json_stays_coco(synthetic, tmp_path):
    from alrp_d2.data.synthetic import generate_split

    coco = generate_split(synthetic.root, "tiny_val")
    register_coco_datasets([("own_coco_twin", coco, os.path.join(synthetic.root, "tiny_val"))])
    DatasetCatalog.get("own_coco_twin")
    assert MetadataCatalog.get("own_coco_twin").evaluator_type == "coco"
    assert not is_lvis_dataset("own_coco_twin")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][2].pop("coco_url"), "image 3 has no coco_url"),
        (
            lambda d: d["annotations"][0].update(category_id=5),
            r"annotation 1 \(image \d+\) has category_id 5, which is not among",
        ),
    ],
    ids=["no coco_url", "unknown category"],
)
def test_a_broken_lvis_json_is_refused_by_name(synthetic, tmp_path, edit, message):
    path = user_lvis(synthetic.root, "tiny_val", tmp_path / "lvis.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    name = f"own_lvis_broken_{tmp_path.name}"
    register_coco_datasets([(name, str(path), synthetic.root)])
    with pytest.raises(ValueError, match=message):
        DatasetCatalog.get(name)


@pytest.mark.slow
def test_train_validate_and_predict_on_an_lvis_json(synthetic, tmp_path):
    """``train_net.py --dataset`` on LVIS jsons (1 epoch, LVIS validation at the end), then
    ``predict --dataset``: the LVIS figures, the user's category ids and image ids."""
    train = user_lvis(synthetic.root, "tiny_train", tmp_path / "train.json", USER_IDS)
    val = user_lvis(synthetic.root, "tiny_val", tmp_path / "val.json", USER_IDS)
    datasets = ["--dataset", "lv_train", train, synthetic.root]
    datasets += ["--dataset", "lv_val", val, synthetic.root]
    out = tmp_path / "run"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
        *datasets,
        "DATASETS.TRAIN",
        '("lv_train",)',
        "DATASETS.TEST",
        '("lv_val",)',
        "SOLVER.MAX_EPOCHS",
        1,
        "TEST.EVAL_PERIOD",
        1,
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        0.0,
        "OUTPUT_DIR",
        out,
        env_root=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loaded 32 images in the LVIS format" in (out / "log.txt").read_text()
    final = json.loads((out / "final_metrics.json").read_text())
    assert all(key in final for key in LVIS_KEYS), sorted(final)
    thresholds = json.loads((out / "inference" / "lv_val" / "lrp_thresholds.json").read_text())
    assert sorted(map(int, thresholds)) == [3, 7, 11, 90]
    assert thresholds["90"]["name"] == "circle" and thresholds["7"]["name"] == "cross"

    output = tmp_path / "predictions"
    done = python_module(
        "alrp_d2.predict",
        "--config-file",
        out / "config.yaml",
        "--weights",
        out / "model_final.pth",
        "--input",
        os.path.join(synthetic.root, "tiny_val"),
        "--output",
        output,
        "--device",
        "cpu",
        "--score-threshold",
        0.0,
        "--dataset",
        "lv_val",
        val,
        synthetic.root,
        "DATASETS.TEST",
        '("lv_val",)',
        env_root=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((output / "predictions.json").read_text())
    data = json.loads(val.read_text())
    ids = {im["coco_url"].rsplit("/", 1)[1]: im["id"] for im in data["images"]}
    # The dataset's ids (an untrained model's detections: not every class among them), not
    # the class index plus 1 (1 to 4).
    categories = {r["category_id"] for r in rows}
    assert rows and categories <= {3, 7, 11, 90} and categories - {3}
    assert all(r["image_id"] == ids[r["file_name"]] for r in rows)
