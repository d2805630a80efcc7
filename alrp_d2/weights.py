"""Model weights into a Detectron2 model, from any file a user may be given, without
running code from it.

Formats (``MODEL.WEIGHTS``, ``train_net.py --eval-only``, ``alrp_d2.predict --weights``):

- ``.pth`` (``model_final.pth``, ``model_best.pth``, Detectron2's and torchvision's
  weights) and this project's Lightning checkpoints ``.ckpt``: read with
  :func:`alrp_d2.io.safe_load`, so a file that would run code is refused
  (:class:`~alrp_d2.io.UnsafeFileError`) before anything of it is used; safe to load from
  any source;
- ``.pkl`` (Detectron2's model zoo, its converted ImageNet backbones): a pickle by
  design, read by Detectron2 as it always is; load these only from sources you trust.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from detectron2.checkpoint import DetectionCheckpointer

from .io import UnsafeFileError, safe_load

__all__ = ["UnsafeFileError", "WeightsCheckpointer", "WeightsError", "load_weights"]

LIGHTNING_MODEL_PREFIX = "model."  # alrp_d2.engine.DetectionModule holds the model as .model


class WeightsError(ValueError):
    """Weights that cannot be used for a model: unreadable, refused, or another model's."""


class WeightsCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer that reads ``.pth`` and ``.ckpt`` files without running
    code (module docstring) and takes the model weights of this project's Lightning
    checkpoints, so that ``last.ckpt`` or ``checkpoints/epochNNN.ckpt`` serve as
    ``model_final.pth`` does."""

    def _load_file(self, filename):
        if not filename.endswith(".ckpt"):
            return super()._load_file(filename)  # .pkl: Detectron2's; others: _torch_load
        checkpoint = safe_load(self.path_manager.get_local_path(filename))
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ValueError(f"{filename} is not a Lightning checkpoint (no 'state_dict')")
        n = len(LIGHTNING_MODEL_PREFIX)
        weights = {
            k[n:]: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(LIGHTNING_MODEL_PREFIX)
        }
        return {"model": weights, "matching_heuristics": False}

    def _torch_load(self, f):
        # Detectron2's reader of every format but .pkl and .pyth (fvcore's plain torch.load).
        return safe_load(self.path_manager.get_local_path(f))


def load_weights(model, path: str, strict: bool, model_name: str = "the model") -> Dict[str, Any]:
    """Loads the weights file ``path`` into ``model``; returns what the file holds beside
    the weights (e.g. ``lrp_thresholds`` of ``model_best.pth``).

    ``strict``: the file must hold exactly ``model``'s parameters with their shapes
    (what evaluation and prediction need); otherwise, as Detectron2, parameters missing
    from the file keep their initialisation and a warning lists them (an ImageNet
    backbone to train from). Raises :class:`WeightsError` naming the problem: a file that
    cannot be read, one that would run code, or (``strict``) another model's weights."""

    class Checkpointer(WeightsCheckpointer):
        incompatible: Optional[Any] = None

        def _load_model(self, checkpoint):
            if not isinstance(checkpoint.get("model"), dict):
                raise ValueError("it holds no model weights")
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

        def _log_incompatible_keys(self, incompatible):
            if not strict:
                super()._log_incompatible_keys(incompatible)

    checkpointer = Checkpointer(model)
    try:
        extra = checkpointer.load(path)
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None
    except Exception as err:
        raise WeightsError(f"cannot read the weights {path}: {err}") from None
    bad = checkpointer.incompatible
    if strict and bad is not None:
        problems = (
            [f"{k} (missing)" for k in bad.missing_keys]
            + [
                f"{k} (shape {tuple(c)} in the file, {tuple(m)} in the model)"
                for k, c, m in bad.incorrect_shapes
            ]
            + [f"{k} (not in the model)" for k in bad.unexpected_keys]
        )
        if problems:
            raise WeightsError(
                f"{path} holds the weights of another model than {model_name}:"
                f" {len(bad.missing_keys)} parameters missing,"
                f" {len(bad.incorrect_shapes)} of another shape,"
                f" {len(bad.unexpected_keys)} unknown; e.g. {', '.join(problems[:3])}"
            )
    return extra
