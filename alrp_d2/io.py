"""Files that are replaced whole or not at all, and weights files read without running code."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile

__all__ = ["UnsafeFileError", "atomic_write", "safe_load"]


class UnsafeFileError(ValueError):
    """A file that could be read only by running code it names (a pickle of other objects
    than tensors, numbers, strings and containers)."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Yields a file in ``path``'s folder; on success it is flushed to disk and renamed
    over ``path``, so that readers see the old file or the new one, never a partial
    one. On an exception it is removed and ``path`` stays as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the run's readers
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def safe_load(file, map_location="cpu"):
    """``torch.load`` of ``file`` (a path or a binary file) that never runs code from it.

    Reads with ``weights_only=True``: tensors, numbers, strings, lists, tuples and dicts
    only, which is all that this project's checkpoints (``.ckpt`` and ``.pth``) and
    Detectron2's hold. A file whose pickle names any other Python object (a function that
    would run, a class that would be built) raises :class:`UnsafeFileError` naming it;
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot lift this (torch obeys the explicit
    argument). Other failures (truncated, not a torch file) raise as ``torch.load`` does.
    """
    import torch  # here: the plot command reads runs without torch

    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        name = getattr(file, "name", file)
        found = re.search(r"GLOBAL (\S+)", str(err))
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
        if found is None and not _torch_archive(file):  # e.g. a text file
            raise pickle.UnpicklingError(
                f"{name} is not a file that torch.save wrote"
                f" ({reason.group(1).strip() if reason else 'unreadable pickle'})"
            ) from None
        # A torch archive the weights-only reader refuses: a named object, or instructions
        # it does not take (pickle protocol 4 and above), which may name objects too.
        what = (
            f"it names the Python object {found.group(1)}"
            if found
            else f"its pickle holds more than weights: {reason.group(1).strip() if reason else err}"
        )
        raise UnsafeFileError(
            f"{name} was refused: reading it {'would' if found else 'could'} run code ({what})."
            " alrp_d2 reads weights and"
            " checkpoints only when they hold nothing but tensors, numbers, strings and"
            " containers. If you trust the file's origin, load it yourself and save its"
            " state_dict: torch.save({'model': state_dict}, 'weights.pth')"
        ) from None


def _torch_archive(file) -> bool:
    """Whether ``file`` is a zip archive, the format ``torch.save`` writes."""
    import zipfile

    try:
        if hasattr(file, "seek"):
            file.seek(0)
        return zipfile.is_zipfile(file)
    except OSError:
        return False
