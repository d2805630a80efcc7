"""Data: the paper's augmentation and mappers (Detectron2)."""

from .mapper import BoxAwareDatasetMapper, build_mapper
from .transforms import (
    CentreFilteredCropTransform,
    Expand,
    ExpandTransform,
    MinIoURandomCrop,
    PhotometricDistortion,
    build_alrp_augmentation,
)

__all__ = [
    "BoxAwareDatasetMapper",
    "CentreFilteredCropTransform",
    "Expand",
    "ExpandTransform",
    "MinIoURandomCrop",
    "PhotometricDistortion",
    "build_alrp_augmentation",
    "build_mapper",
]
