"""Dataset mappers: Detectron2's DatasetMapper with this project's augmentation."""

from __future__ import annotations

from detectron2.data import DatasetMapper

from .transforms import build_alrp_augmentation

__all__ = ["build_mapper"]


def build_mapper(cfg, is_train: bool) -> DatasetMapper:
    """Detectron2's mapper; with ``INPUT.ALRP_AUG.ENABLED`` its augmentations are the
    paper's (training) and the paper's test resize (testing)."""
    kwargs = DatasetMapper.from_config(cfg, is_train)
    if cfg.INPUT.ALRP_AUG.ENABLED:
        kwargs["augmentations"] = build_alrp_augmentation(cfg, is_train)
        kwargs["recompute_boxes"] = False
    return DatasetMapper(**kwargs)
