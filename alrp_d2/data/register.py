"""Datasets registered from the command line (``train_net.py --dataset``) or the
environment (``ALRP_DATASETS``): a COCO-format json as Detectron2's
``register_coco_instances`` registers it, an LVIS-format json as its
``register_lvis_instances`` does, keeping each annotation's ``id`` so that a problem can
name it. Which of the two a json is, is decided when the dataset is first loaded
(:func:`alrp_d2.evaluation.lvis_evaluation.is_lvis_json`), not at registration: that reads
the whole file, which $ALRP_DATASETS may list without the run using it."""

from __future__ import annotations

import json
import os
import shlex
from typing import Dict, Iterable, List, Sequence, Tuple

__all__ = [
    "ENV_VAR",
    "datasets_from_env",
    "load_json_dataset",
    "load_lvis_dataset",
    "register_coco_datasets",
    "register_coco_json",
]

ENV_VAR = "ALRP_DATASETS"

Spec = Tuple[str, str, str]  # (name, json file, image root)


def datasets_from_env(environ=os.environ) -> List[Spec]:
    """The ``(name, json, image_root)`` triples of ``$ALRP_DATASETS``: words separated by
    spaces (shell quoting allowed), three per dataset, as after ``--dataset``."""
    try:
        words = shlex.split(environ.get(ENV_VAR, ""))
    except ValueError as err:  # unbalanced quotes
        raise ValueError(f"${ENV_VAR} cannot be split into words: {err}") from None
    if len(words) % 3:
        raise ValueError(
            f"${ENV_VAR} must hold NAME JSON IMAGE_ROOT triples, got {len(words)} words: {words}"
        )
    return [tuple(words[i : i + 3]) for i in range(0, len(words), 3)]


def register_coco_json(name: str, json_file: str, image_root: str, **metadata) -> None:
    """Detectron2's ``register_coco_instances`` whose records keep each annotation's COCO
    ``id`` (``extra_annotation_keys``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    DatasetCatalog.register(
        name, lambda: load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def load_lvis_dataset(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """Detectron2's ``load_lvis_json`` of an LVIS json that is not one of Detectron2's
    built-in LVIS datasets, with the metadata ``register_lvis_instances`` gives those:
    ``evaluator_type`` ``"lvis"``, ``thing_classes`` (each category's first synonym, as
    Detectron2 names LVIS's classes) and ``thing_dataset_id_to_contiguous_id`` (classes
    numbered by sorted category id, as ``load_coco_json`` numbers a COCO json's: LVIS's
    ids 1..K give ``load_lvis_json``'s id minus 1), which Detectron2's ``LVISEvaluator``,
    the LRP evaluators and ``predict`` map back by.

    An image is ``image_root/<split folder>/<file name>``, the last two parts of its
    ``coco_url``, as Detectron2 reads LVIS: ``image_root`` is the folder that holds COCO's
    ``train2017/`` and ``val2017/`` (LVIS images have no ``file_name``). ``ValueError``
    naming an image without ``coco_url`` or an annotation of an unknown category."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.lvis import load_lvis_json

    with open(json_file) as f:
        data = json.load(f)
    no_url = next((im for im in data["images"] if not im.get("coco_url")), None)
    if no_url is not None:
        raise ValueError(
            f"{json_file} is an LVIS json, but image {no_url.get('id')} has no coco_url, from"
            " which Detectron2 takes an LVIS image's path (IMAGE_ROOT/<split folder>/<file>)"
        )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    del data  # the LVIS API reads the file again: not two copies at once
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    # Without a dataset name: load_lvis_json would take LVIS v0.5's or v1's class names by
    # it (and refuse other names). Detectron2 joins the root and the split folder as
    # strings: the root needs its separator.
    records = load_lvis_json(json_file, os.path.join(image_root, ""), extra_annotation_keys=["id"])
    for record in records:
        for ann in record["annotations"]:
            category = ann["category_id"] + 1  # load_lvis_json's minus 1 undone
            if category not in contiguous:
                raise ValueError(
                    f"{json_file}: annotation {ann['id']} (image {record['image_id']}) has"
                    f" category_id {category}, which is not among the json's categories"
                )
            ann["category_id"] = contiguous[category]
    MetadataCatalog.get(dataset_name).set(
        evaluator_type="lvis",
        thing_classes=[(c.get("synonyms") or [c["name"]])[0] for c in categories],
        thing_dataset_id_to_contiguous_id=contiguous,
    )
    return records


def load_json_dataset(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """The records of dataset ``dataset_name``: :func:`load_lvis_dataset` for an LVIS json,
    else Detectron2's ``load_coco_json`` with each annotation's COCO ``id``; its metadata
    completed as Detectron2's registration and loading complete it."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    from ..evaluation.lvis_evaluation import is_lvis_json

    if is_lvis_json(json_file):
        return load_lvis_dataset(json_file, image_root, dataset_name)
    MetadataCatalog.get(dataset_name).set(evaluator_type="coco")
    return load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Registers each ``(name, json, image_root)`` as an instances dataset in COCO's or
    LVIS's format (:func:`load_json_dataset`, decided when loaded: LVIS's ``evaluator_type``
    and class metadata are there from then on); returns the names.

    Raises ``ValueError`` naming the problem: a json file or image folder that does not
    exist, a name given twice or already registered with other files."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    checked = []  # every dataset checked before any is registered
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"a dataset is NAME JSON IMAGE_ROOT, got {list(spec)}")
        name, json_file, image_root = spec
        if not name or name.startswith("-"):
            raise ValueError(f"bad dataset name {name!r} (NAME JSON IMAGE_ROOT)")
        if name in [c[0] for c in checked]:
            raise ValueError(f"dataset {name!r} given twice")
        if not os.path.isfile(json_file):
            raise ValueError(f"dataset {name!r}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise ValueError(f"dataset {name!r}: image folder not found: {image_root}")
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        registered = name in DatasetCatalog.list()
        if registered:
            meta = MetadataCatalog.get(name)
            known = tuple(
                os.path.abspath(p) if isinstance(p, str) else p
                for p in (meta.get("json_file", None), meta.get("image_root", None))
            )
            if known != (json_file, image_root):
                raise ValueError(
                    f"dataset name {name!r} is already registered (a built-in or earlier dataset)"
                    f" with other files ({known[0]}, {known[1]}); choose another name"
                )
        checked.append((name, json_file, image_root, registered))
    for name, json_file, image_root, registered in checked:
        if not registered:
            DatasetCatalog.register(
                name, lambda j=json_file, r=image_root, n=name: load_json_dataset(j, r, n)
            )
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root)
    return [c[0] for c in checked]
