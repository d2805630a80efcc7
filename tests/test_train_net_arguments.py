"""train_net.py's usage errors in this process (the fast lane's check of the command line;
tests/test_engine.py runs them as a user does, in a process of their own): exit status 2,
one ``error:`` line naming the problem, nothing written."""

import logging

import pytest
from runs import TINY

pytestmark = pytest.mark.detectron2


@pytest.fixture
def train_net_main(tmp_path, monkeypatch):
    """``alrp_d2.engine.launch.main`` with its datasets under ``tmp_path``; the console
    handlers it adds to the loggers are taken off again afterwards."""
    from alrp_d2.engine.launch import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    loggers = [logging.getLogger(name) for name in ("alrp_d2", "detectron2")]
    before = [list(logger.handlers) for logger in loggers]
    yield main
    for logger, handlers in zip(loggers, before):
        logger.handlers[:] = handlers


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config-file", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
        (["--config-file", TINY, "MODEL.ALRP.NOT_A_KEY", "1"], "MODEL.ALRP.NOT_A_KEY"),
        (["--config-file", TINY, "SOLVER.MAX_EPOCHS"], "KEY VALUE pairs"),
        (["--config-file", TINY, "TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED (True)"),
        (
            ["--config-file", TINY, "DATALOADER.SAMPLER_TRAIN", "WeightedTrainingSampler"],
            "DATALOADER.SAMPLER_TRAIN ('WeightedTrainingSampler')",
        ),
        (
            ["--config-file", TINY, "SOLVER.CLIP_GRADIENTS.ENABLED", "True"]
            + ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"],
            "CLIP_TYPE must be one of value, norm, full_model",
        ),
        (
            ["--config-file", TINY, "SOLVER.REFERENCE_WORLD_SIZE", "3"],
            "SOLVER.IMS_PER_BATCH (8) must be divisible by SOLVER.REFERENCE_WORLD_SIZE (3)",
        ),
        (["--config-file", TINY, "DATASETS.TEST", "('nope',)"], "unknown dataset name 'nope'"),
        (
            ["--config-file", TINY, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou"],
            "error: the config's model cannot be built: MODEL.RETINANET.BBOX_REG_LOSS_TYPE is"
            " 'giou', but ALRPHeadLoss does not use it",
        ),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(
    train_net_main, args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert train_net_main([*args, "OUTPUT_DIR", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr, stderr
    assert not out.exists()
