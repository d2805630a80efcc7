"""COCO-format datasets registered from the command line (``train_net.py --dataset``)
or the environment (``ALRP_DATASETS``), with Detectron2's ``register_coco_instances``."""

from __future__ import annotations

import os
import shlex
from typing import Iterable, List, Sequence, Tuple

__all__ = ["ENV_VAR", "datasets_from_env", "register_coco_datasets"]

ENV_VAR = "ALRP_DATASETS"

Spec = Tuple[str, str, str]  # (name, json file, image root)


def datasets_from_env(environ=os.environ) -> List[Spec]:
    """The ``(name, json, image_root)`` triples of ``$ALRP_DATASETS``: words separated by
    spaces (shell quoting allowed), three per dataset, as after ``--dataset``."""
    words = shlex.split(environ.get(ENV_VAR, ""))
    if len(words) % 3:
        raise ValueError(f"${ENV_VAR} must hold NAME JSON IMAGE_ROOT triples, got {len(words)} words: {words}")
    return [tuple(words[i:i + 3]) for i in range(0, len(words), 3)]


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Registers each ``(name, json, image_root)`` as a COCO-format instances dataset
    (Detectron2's ``register_coco_instances``); returns the names.

    Raises ``ValueError`` naming the problem: a json file or image folder that does not
    exist, a name given twice or already registered with other files."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"a dataset is NAME JSON IMAGE_ROOT, got {list(spec)}")
        name, json_file, image_root = spec
        if name in names:
            raise ValueError(f"dataset {name!r} given twice")
        if not os.path.isfile(json_file):
            raise ValueError(f"dataset {name!r}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise ValueError(f"dataset {name!r}: image folder not found: {image_root}")
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) != (json_file, image_root):
                raise ValueError(f"dataset name {name!r} is already registered (a built-in or earlier dataset);"
                                 " choose another name")
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names
