"""Detectron2 keys the Lightning engine does not honour: a run that sets one is refused,
naming it, rather than trained as if it were not there.

A key counts as set when it differs from Detectron2's default. Keys that only matter in
some settings (Detectron2's training resize beside the paper's augmentation, iteration
schedules beside epochs) are refused only there.
"""

from __future__ import annotations

from functools import reduce
from operator import getitem
from typing import List

from detectron2.config import get_cfg as detectron2_defaults

from .data import TRAINING_SAMPLERS

__all__ = ["unhonoured_keys"]

_NO_TTA = "test-time augmentation is not run by this engine"
_NO_PROPOSAL_FILES = "precomputed proposals are not loaded by this engine"
# key: why it has no effect here
_NEVER = {
    "TEST.AUG.ENABLED": _NO_TTA,
    "TEST.AUG.MIN_SIZES": _NO_TTA,
    "TEST.AUG.MAX_SIZE": _NO_TTA,
    "TEST.AUG.FLIP": _NO_TTA,
    "TEST.PRECISE_BN.ENABLED": "precise BatchNorm statistics are not computed by this engine",
    "TEST.PRECISE_BN.NUM_ITER": "precise BatchNorm statistics are not computed by this engine",
    "TEST.EXPECTED_RESULTS": "results are not compared with expected values by this engine",
    "TEST.KEYPOINT_OKS_SIGMAS": "keypoints are not evaluated by this engine",
    "DATASETS.PROPOSAL_FILES_TRAIN": _NO_PROPOSAL_FILES,
    "DATASETS.PROPOSAL_FILES_TEST": _NO_PROPOSAL_FILES,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN": _NO_PROPOSAL_FILES,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST": _NO_PROPOSAL_FILES,
}
_EPOCHS = "training counts epochs (SOLVER.MAX_EPOCHS > 0)"
_BY_EPOCHS = {
    "SOLVER.MAX_ITER": f"{_EPOCHS}: set SOLVER.MAX_EPOCHS",
    "SOLVER.STEPS": f"{_EPOCHS}: set SOLVER.STEPS_EPOCHS",
}
_ALRP_AUG = "INPUT.ALRP_AUG.ENABLED replaces Detectron2's training resize, crop and flip"
_BY_ALRP_AUG = {
    key: _ALRP_AUG
    for key in (
        "INPUT.MIN_SIZE_TRAIN",
        "INPUT.MIN_SIZE_TRAIN_SAMPLING",
        "INPUT.MAX_SIZE_TRAIN",
        "INPUT.RANDOM_FLIP",
        "INPUT.CROP.ENABLED",
        "INPUT.CROP.TYPE",
        "INPUT.CROP.SIZE",
    )
}


def _value(cfg, key: str):
    return reduce(getitem, key.split("."), cfg)


def _normalised(value):
    return [_normalised(v) for v in value] if isinstance(value, (list, tuple)) else value


def unhonoured_keys(cfg) -> List[str]:
    """``KEY (value): why`` for each Detectron2 key of ``cfg`` that is set and that the
    engine would not honour; empty when there is none."""
    refused = dict(_NEVER)
    if cfg.SOLVER.MAX_EPOCHS > 0:
        refused.update(_BY_EPOCHS)
    if cfg.INPUT.ALRP_AUG.ENABLED:
        refused.update(_BY_ALRP_AUG)
    defaults = detectron2_defaults()
    found = [
        f"{key} ({_value(cfg, key)!r}): {why}"
        for key, why in refused.items()
        if _normalised(_value(cfg, key)) != _normalised(_value(defaults, key))
    ]
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler not in TRAINING_SAMPLERS:
        found.append(
            f"DATALOADER.SAMPLER_TRAIN ({sampler!r}): this engine implements"
            f" {' and '.join(TRAINING_SAMPLERS)} only"
        )
    return found
