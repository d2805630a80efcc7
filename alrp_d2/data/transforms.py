"""The paper's SSD-style training augmentation as Detectron2 Augmentations.

Photometric distortion, expansion onto a canvas filled with the mean pixel (ratio 1 to
4), a random crop whose IoU with the ground truths reaches a sampled minimum (0.1 to
0.9, crop sides at least 0.3 of the image), a resize to a fixed size and a horizontal
flip, in that order (``build_alrp_augmentation``).
"""

from __future__ import annotations

import random
from typing import List, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from detectron2.data import transforms as T
from detectron2.data.transforms import ColorTransform
from fvcore.transforms.transform import CropTransform, NoOpTransform, PadTransform

__all__ = [
    "CentreFilteredCropTransform",
    "Expand",
    "ExpandTransform",
    "MinIoURandomCrop",
    "PhotometricDistortion",
    "build_alrp_augmentation",
]


class PhotometricDistortion(T.Augmentation):
    """SSD's photometric distortion: each with probability 1/2, brightness (+-32),
    contrast (x0.5-1.5, before or after the rest), saturation (x0.5-1.5), hue (+-18
    degrees) and a permutation of the channels."""

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range=(0.5, 1.5),
        saturation_range=(0.5, 1.5),
        hue_delta: float = 18,
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        ops = []
        if random.random() < 0.5:
            delta = random.uniform(-self.brightness_delta, self.brightness_delta)
            ops.append(lambda x: x + delta)
        contrast = random.uniform(*self.contrast_range) if random.random() < 0.5 else None
        contrast_first = random.random() < 0.5
        if contrast is not None and contrast_first:
            ops.append(lambda x: x * contrast)
        saturation = random.uniform(*self.saturation_range) if random.random() < 0.5 else None
        hue = (
            random.uniform(-self.hue_delta, self.hue_delta) / 360 if random.random() < 0.5 else None
        )
        if saturation is not None or hue is not None:
            ops.append(lambda x: _saturation_hue(x, saturation, hue))
        if contrast is not None and not contrast_first:
            ops.append(lambda x: x * contrast)
        if random.random() < 0.5:
            order = np.random.permutation(3)
            ops.append(lambda x: x[..., order])
        if not ops:
            return NoOpTransform()

        def distort(img):
            dtype = img.dtype
            x = img.astype(np.float32)
            for op in ops:
                x = op(x)
            return np.clip(x, 0, 255).astype(dtype) if dtype == np.uint8 else x.astype(dtype)

        return ColorTransform(distort)


def _saturation_hue(x: np.ndarray, saturation, hue) -> np.ndarray:
    """Saturation and hue in HSV space (the channel order does not matter for either)."""
    t = torch.from_numpy(np.clip(x, 0, 255)).permute(2, 0, 1) / 255.0
    if saturation is not None:
        t = TF.adjust_saturation(t, saturation)
    if hue is not None:
        t = TF.adjust_hue(t, hue)
    return (t * 255.0).permute(1, 2, 0).numpy()


class ExpandTransform(PadTransform):
    """Pads with one value per channel (the mean pixel) instead of one scalar."""

    def apply_image(self, img):
        h, w = img.shape[:2]
        out_shape = (h + self.y0 + self.y1, w + self.x0 + self.x1) + img.shape[2:]
        fill = np.asarray(self.pad_value, dtype=np.float64)
        canvas = np.empty(out_shape, dtype=img.dtype)
        canvas[...] = fill.astype(img.dtype) if img.ndim == 3 else fill.mean().astype(img.dtype)
        canvas[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = img
        return canvas


class Expand(T.Augmentation):
    """With probability ``prob``, place the image at a random position of a canvas
    ``ratio`` times larger (``ratio`` uniform in ``ratio_range``) filled with ``mean``."""

    def __init__(self, mean: Sequence[float], ratio_range=(1.0, 4.0), prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        low, high = self.ratio_range
        if high <= 1 or random.random() >= self.prob:
            return NoOpTransform()
        h, w = image.shape[:2]
        ratio = random.uniform(low, high)
        new_h, new_w = int(h * ratio), int(w * ratio)
        left, top = random.randint(0, new_w - w), random.randint(0, new_h - h)
        return ExpandTransform(
            left, top, new_w - w - left, new_h - h - top, w, h, pad_value=tuple(self.mean)
        )


class CentreFilteredCropTransform(CropTransform):
    """A crop that, like SSD's, drops every box whose centre falls outside it (it
    becomes an empty box, which Detectron2's mapper filters out)."""

    def apply_box(self, box):
        box = np.asarray(box, dtype=np.float32).reshape(-1, 4)
        cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
        inside = (cx > self.x0) & (cy > self.y0) & (cx < self.x0 + self.w) & (cy < self.y0 + self.h)
        out = super().apply_box(box)
        out[~inside] = 0
        return out


class MinIoURandomCrop(T.Augmentation):
    """SSD's crop: sample a minimum IoU from ``(1 [no crop], *min_ious, 0)``, then up to
    50 crops with sides in ``[min_crop_size, 1]`` of the image and aspect ratio in
    ``[0.5, 2]``; accept the first whose IoU with every ground truth reaches the
    minimum and that holds at least one box centre."""

    def __init__(
        self, min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size: float = 0.3, max_trials: int = 50
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image, boxes):
        h, w = image.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        modes = (1, *self.min_ious, 0)
        for _ in range(100):
            mode = random.choice(modes)
            if mode == 1 or len(boxes) == 0:
                return NoOpTransform()
            for _ in range(self.max_trials):
                new_w = random.uniform(self.min_crop_size * w, w)
                new_h = random.uniform(self.min_crop_size * h, h)
                if not 0.5 <= new_h / new_w <= 2:
                    continue
                left, top = random.uniform(0, w - new_w), random.uniform(0, h - new_h)
                patch = np.array([left, top, left + new_w, top + new_h])
                if _iou_with_patch(boxes, patch).min() < mode:
                    continue
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                x0, y0 = int(patch[0]), int(patch[1])
                cw, ch = int(patch[2]) - x0, int(patch[3]) - y0
                if cw < 1 or ch < 1:
                    continue
                inside = (cx > x0) & (cy > y0) & (cx < x0 + cw) & (cy < y0 + ch)
                if not inside.any():
                    continue
                return CentreFilteredCropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)
        return NoOpTransform()


def _iou_with_patch(boxes: np.ndarray, patch: np.ndarray) -> np.ndarray:
    lt = np.maximum(boxes[:, :2], patch[:2])
    rb = np.minimum(boxes[:, 2:], patch[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area_b = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    area_p = (patch[2:] - patch[:2]).prod()
    return inter / np.maximum(area_b + area_p - inter, 1e-12)


def build_alrp_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Training: the paper's pipeline (``INPUT.ALRP_AUG``). Testing: resize keeping
    the aspect ratio to ``INPUT.MIN_SIZE_TEST`` x ``INPUT.MAX_SIZE_TEST`` (833x500 or
    1333x800 in the paper's configs)."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    aug = cfg.INPUT.ALRP_AUG
    ops: List[T.Augmentation] = []
    if aug.PHOTOMETRIC:
        ops.append(PhotometricDistortion())
    mean = list(cfg.MODEL.PIXEL_MEAN)  # in the input's channel order, as the model sees it
    ops.append(Expand(mean, tuple(aug.EXPAND_RATIO)))
    ops.append(MinIoURandomCrop(tuple(aug.MIN_IOUS), aug.MIN_CROP_SIZE))
    ops.append(T.Resize(tuple(aug.SIZE)))
    if aug.FLIP:
        ops.append(T.RandomFlip(horizontal=True))
    return ops
