"""COCO-format datasets registered from the command line (``train_net.py --dataset``)
or the environment (``ALRP_DATASETS``), as Detectron2's ``register_coco_instances`` does,
keeping each annotation's COCO ``id`` so that a problem can name it."""

from __future__ import annotations

import os
import shlex
from typing import Iterable, List, Sequence, Tuple

__all__ = ["ENV_VAR", "datasets_from_env", "register_coco_datasets", "register_coco_json"]

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


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Registers each ``(name, json, image_root)`` as a COCO-format instances dataset
    (:func:`register_coco_json`); returns the names.

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
            register_coco_json(name, json_file, image_root)
    return [c[0] for c in checked]
