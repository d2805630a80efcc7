"""last.ckpt is replaced atomically: a failed write leaves the previous file intact."""

import os

import pytest
import torch
from conftest import HAS_DETECTRON2

pytestmark = pytest.mark.detectron2  # the engine package imports detectron2

if HAS_DETECTRON2:
    from alrp_d2.engine import AtomicCheckpointIO


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("crash while writing")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="crash while writing"):
        io.save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file left
    io.save_checkpoint({"epoch": 3}, path)
    assert torch.load(path)["epoch"] == 3
