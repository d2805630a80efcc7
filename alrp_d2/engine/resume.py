"""Which checkpoint a ``--resume`` continues from, and whether it may.

- The newest readable checkpoint of ``OUTPUT_DIR`` (``last.ckpt``, ``last.prev.ckpt``,
  ``checkpoints/*.ckpt``; newest by modification time): one that cannot be read is
  named in a warning and the next one is tried.
- The resumed run must train what the checkpointed one trained: a config that differs
  in a key that changes training, or another number of processes, is refused with the
  list of differences. Keys that change only evaluation, logging or speed may differ.
- A run without ``--resume`` never writes into a folder that holds another run's
  checkpoints.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from detectron2.config import CfgNode

from ..io import UnsafeFileError, safe_load
from ..run_folder import RunFolder

__all__ = ["RESUMABLE_CHANGES", "config_differences", "find_resume_checkpoint"]

logger = logging.getLogger("alrp_d2")

# Keys a resumed run may change: the length of training (the learning-rate steps are
# in SOLVER.STEPS_EPOCHS), evaluation, checkpointing, logging, loading speed, and where
# things are; besides, every key under TEST and every key ending in "_TEST" (Detectron2's
# naming of test-time settings).
RESUMABLE_CHANGES = frozenset(
    {
        "SOLVER.MAX_EPOCHS",
        "DATALOADER.NUM_WORKERS",
        "SOLVER.CHECKPOINT_PERIOD",
        "SOLVER.CHECKPOINT_ITERS",
        "OUTPUT_DIR",
        "MODEL.WEIGHTS",
        "MODEL.DEVICE",
        "DATASETS.TEST",
        "VIS_PERIOD",
        "SOLVER.LOG_PERIOD",
    }
)


def _resumable_change(key: str) -> bool:
    return key in RESUMABLE_CHANGES or key.startswith("TEST.") or key.endswith("_TEST")


def _read(path: str) -> Dict[str, Any]:
    checkpoint = safe_load(path)
    missing = [
        k for k in ("state_dict", "loops", "optimizer_states", "alrp_d2") if k not in checkpoint
    ]
    if missing:
        raise ValueError(
            f"not a complete training checkpoint of this project (no {', '.join(missing)})"
        )
    return checkpoint


def find_resume_checkpoint(output_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(path, what the run saved about itself)`` of the newest readable checkpoint,
    or None when there is none. Raises ``FileNotFoundError`` when checkpoints exist but
    none can be read, :class:`~alrp_d2.io.UnsafeFileError` for one that would run code."""
    candidates = sorted(RunFolder(output_dir).checkpoints(), key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:
            checkpoint = _read(path)
        except UnsafeFileError:
            raise  # not damaged but dangerous: the user must know, not resume from an older one
        except Exception as err:  # truncated, corrupt, foreign: try the previous one
            logger.warning(
                "Cannot resume from %s (%s: %s); trying the previous checkpoint",
                path,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            continue
        return path, checkpoint["alrp_d2"]
    if candidates:
        raise FileNotFoundError(
            f"no readable checkpoint in {output_dir} (tried {', '.join(candidates)})"
        )
    return None


def _flatten(node: CfgNode, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = _plain(value)
    return flat


def _plain(value):
    # YAML gives lists where a config file's defaults hold tuples: compare them as equal.
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


# A run checkpointed before the engine batched by aspect ratio and honoured
# DATALOADER.SAMPLER_TRAIN has no DATALOADER.REPEAT_ROUNDING: it batched its shard in order
# and sampled every image once, whatever those two keys said.
_BEFORE_SAMPLERS = "DATALOADER.REPEAT_ROUNDING"
_IGNORED_BEFORE_SAMPLERS = {
    "DATALOADER.ASPECT_RATIO_GROUPING",
    "DATALOADER.SAMPLER_TRAIN",
    "DATALOADER.REPEAT_THRESHOLD",
    "DATALOADER.REPEAT_SQRT",
}


def config_differences(saved_yaml: str, cfg: CfgNode) -> List[str]:
    """``KEY: saved -> now`` for each training-affecting key whose value changed (for a run
    checkpointed by an older version, also what its keys meant then and mean now)."""
    saved = _flatten(CfgNode.load_cfg(saved_yaml))
    now = _flatten(cfg)
    older = _BEFORE_SAMPLERS not in saved
    changed = []
    for key in sorted(set(saved) & set(now)):
        if _resumable_change(key) or (older and key in _IGNORED_BEFORE_SAMPLERS):
            continue
        if saved[key] != now[key]:
            changed.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    if older:
        # What it did, whatever its keys said; other batches now would train some of its
        # epoch's images twice and others never.
        why = "(checkpointed by a version that ignored it)"
        if now.get("DATALOADER.ASPECT_RATIO_GROUPING"):
            changed.append(f"DATALOADER.ASPECT_RATIO_GROUPING: no grouping {why} -> True")
        if now.get("DATALOADER.SAMPLER_TRAIN", "TrainingSampler") != "TrainingSampler":
            changed.append(
                f"DATALOADER.SAMPLER_TRAIN: every image once {why}"
                f" -> {now['DATALOADER.SAMPLER_TRAIN']!r}"
            )
    return changed
