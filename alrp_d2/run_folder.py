"""The layout of a run's folder (``OUTPUT_DIR``): the one place that names its files, for
every part that writes or reads them (training, evaluation, ``model_best.pth``, resume,
``predict``)::

    OUTPUT_DIR/
      config.yaml                 the run's full config
      log.txt                     Detectron2's and this project's log lines
      last.ckpt, last.prev.ckpt   the whole training state, and the one it replaced
      checkpoints/epochNNN.ckpt   every SOLVER.CHECKPOINT_PERIOD epochs
      model_final.pth             the trained model
      model_best.pth              the model of the best evaluation, with its LRP thresholds
      final_metrics.json          the last evaluation's metrics
      inference/<dataset>/        the evaluators' files of each test dataset, among them
                                  lrp_thresholds.json (boxes), lrp_thresholds_segm.json (masks)
      eval/<weights' name>/       a run folder of its own for --eval-only of those weights

Only paths here: no I/O, no torch, so that every command can import it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import List

__all__ = ["RunFolder", "THRESHOLD_FILES"]

# The LRP evaluator's optimal score thresholds per class, by COCO task.
THRESHOLD_FILES = {"bbox": "lrp_thresholds.json", "segm": "lrp_thresholds_segm.json"}


@dataclass(frozen=True)
class RunFolder:
    """Paths of the run in ``root`` (``cfg.OUTPUT_DIR``)."""

    root: str

    CONFIG = "config.yaml"
    LOG = "log.txt"
    LAST = "last.ckpt"
    PREVIOUS = "last.prev.ckpt"
    NUMBERED_DIR = "checkpoints"
    FINAL_MODEL = "model_final"  # Detectron2's checkpointer adds ".pth"
    BEST_MODEL = "model_best"
    FINAL_METRICS = "final_metrics.json"
    INFERENCE_DIR = "inference"
    EVAL_DIR = "eval"

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def config(self) -> str:
        return self.path(self.CONFIG)

    @property
    def last(self) -> str:
        return self.path(self.LAST)

    @property
    def previous(self) -> str:
        return self.path(self.PREVIOUS)

    def numbered_checkpoint(self, epochs: int) -> str:
        return os.path.join(self.root, self.NUMBERED_DIR, f"epoch{epochs:03d}.ckpt")

    def checkpoints(self) -> List[str]:
        """Every training checkpoint present (``last``, ``previous``, the numbered ones,
        Lightning's SLURM ``hpc_ckpt_*.ckpt``), any order."""
        names = [self.last, self.previous]
        names += glob.glob(os.path.join(self.root, self.NUMBERED_DIR, "*.ckpt"))
        names += glob.glob(os.path.join(self.root, "hpc_ckpt_*.ckpt"))
        return [p for p in names if os.path.isfile(p)]

    @property
    def final_model(self) -> str:
        return self.path(self.FINAL_MODEL + ".pth")

    @property
    def best_model(self) -> str:
        return self.path(self.BEST_MODEL + ".pth")

    @property
    def final_metrics(self) -> str:
        return self.path(self.FINAL_METRICS)

    def inference(self, dataset: str) -> str:
        """The evaluators' folder of ``dataset``."""
        return os.path.join(self.root, self.INFERENCE_DIR, dataset)

    def lrp_thresholds(self, dataset: str, task: str = "bbox") -> str:
        return os.path.join(self.inference(dataset), THRESHOLD_FILES[task])

    def all_lrp_thresholds(self, task: str = "bbox") -> List[str]:
        """The box (or mask) thresholds files of every dataset evaluated, sorted."""
        return sorted(
            glob.glob(os.path.join(self.root, self.INFERENCE_DIR, "*", THRESHOLD_FILES[task]))
        )

    def evaluation_of(self, weights: str) -> "RunFolder":
        """The folder ``--eval-only`` of ``weights`` writes (config, metrics, evaluator
        files, logs): ``eval/<the weights' file name without extension>/``, never over
        the records of the training."""
        name = os.path.splitext(os.path.basename(weights.rstrip("/")))[0] or "weights"
        return RunFolder(os.path.join(self.root, self.EVAL_DIR, name))
