"""Dataset mappers: Detectron2's DatasetMapper with this project's augmentation."""

from __future__ import annotations

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .transforms import build_alrp_augmentation

__all__ = ["BoxAwareDatasetMapper", "build_mapper"]


class _AugmentationsWithBoxes(T.AugmentationList):
    """Detectron2's DatasetMapper hands augmentations the image alone; this list also
    hands them the ground-truth boxes of the image being mapped (for the IoU crop)."""

    boxes = None

    def __call__(self, aug_input):
        aug_input.boxes = self.boxes
        return super().__call__(aug_input)


class BoxAwareDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper whose augmentations also see the (non-crowd) boxes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.augmentations = _AugmentationsWithBoxes(self.augmentations.augs)

    def __call__(self, dataset_dict):
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in dataset_dict.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
        self.augmentations.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return super().__call__(dataset_dict)


def build_mapper(cfg, is_train: bool) -> DatasetMapper:
    """Detectron2's mapper; with ``INPUT.ALRP_AUG.ENABLED`` its augmentations are the
    paper's (training, with the boxes they need) and the paper's test resize (testing)."""
    kwargs = DatasetMapper.from_config(cfg, is_train)
    if not cfg.INPUT.ALRP_AUG.ENABLED:
        return DatasetMapper(**kwargs)
    kwargs["augmentations"] = build_alrp_augmentation(cfg, is_train)
    kwargs["recompute_boxes"] = False
    return BoxAwareDatasetMapper(**kwargs) if is_train else DatasetMapper(**kwargs)
