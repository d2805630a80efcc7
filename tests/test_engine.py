"""train_net.py end to end on CPU: 2-process DDP, self-balance, resume, eval-only, bad input."""

import json
import os

import pytest
from runs import TINY, train_net

# Slow: train_net.py trainings (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]


# A model this briefly trained scores every anchor about 0.01: evaluate its 20 best
# detections per image, so that AP (and model_best.pth) is a number on every machine.
EVALUATE_ALL = ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20]


def records(out_dir, rank):
    with open(os.path.join(out_dir, f"self_balance_rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Run 1: two CPU processes, stopped after epoch 1 (evaluated after training).
    Run 2: --resume up to epoch 2, evaluated every epoch."""
    base = tmp_path_factory.mktemp("engine")
    out = base / "out"
    common = ["--config-file", TINY, "--accelerator", "cpu", "--devices", 2]
    first = train_net(
        *common, "SOLVER.MAX_EPOCHS", 1, *EVALUATE_ALL, "OUTPUT_DIR", out, env_root=base / "data"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = {r: records(out, r) for r in (0, 1)}
    with open(out / "final_metrics.json") as f:
        first_metrics = json.load(f)
    # The resumed run also evaluates every epoch (TEST.EVAL_PERIOD 1) inside the fit loop.
    second = train_net(
        *common,
        "--resume",
        "SOLVER.MAX_EPOCHS",
        2,
        "TEST.EVAL_PERIOD",
        1,
        *EVALUATE_ALL,
        "OUTPUT_DIR",
        out,
        env_root=base / "data",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    return {
        "base": base,
        "out": out,
        "first": after_first,
        "first_metrics": first_metrics,
        "all": {r: records(out, r) for r in (0, 1)},
        "second_log": second.stderr + second.stdout,
    }


def epoch_weights(rows):
    return {r["epoch"]: r for r in rows if "weight" in r}


def test_ranks_agree_and_weight_is_the_mean_over_all_iterations(ddp_runs):
    rows = ddp_runs["all"]
    w0, w1 = epoch_weights(rows[0]), epoch_weights(rows[1])
    assert set(w0) == set(w1) == {0, 1}
    for epoch in (0, 1):
        assert w0[epoch]["weight"] == w1[epoch]["weight"]
        per_rank = [
            [r for r in rows[rank] if r["epoch"] == epoch and "cls" in r] for rank in (0, 1)
        ]
        assert len(per_rank[0]) == len(per_rank[1]) > 1  # the same number of batches on each rank
        iters = per_rank[0] + per_rank[1]
        mean_cls = sum(r["cls"] for r in iters) / len(iters)
        mean_loc = sum(r["loc"] for r in iters) / len(iters)
        assert w0[epoch]["weight"] == pytest.approx((mean_cls + mean_loc) / mean_loc, rel=1e-5)
    assert w0[0]["weight_used"] == 50.0  # SB_INIT during the first epoch


def test_resume_continues_at_epoch_two_with_the_saved_weight(ddp_runs):
    first = epoch_weights(ddp_runs["first"][0])
    assert set(first) == {0}
    resumed = [r for r in ddp_runs["all"][0][len(ddp_runs["first"][0]) :]]
    assert resumed and all(r["epoch"] == 1 for r in resumed)  # no epoch trained twice
    assert epoch_weights(resumed)[1]["weight_used"] == first[0]["weight"]
    assert "Resuming from" in ddp_runs["second_log"]


def test_outputs(ddp_runs):
    out = ddp_runs["out"]
    for name in (
        "config.yaml",
        "last.ckpt",
        "model_final.pth",
        "final_metrics.json",
        "log.txt",
        "model_best.pth",
    ):
        assert (out / name).is_file(), name
    assert any((out / "csv").rglob("metrics.csv")) and any((out / "tensorboard").rglob("events.*"))
    metrics = json.loads((out / "final_metrics.json").read_text())
    for key in ("bbox/AP50", "bbox/AP", "lrp/oLRP", "lrp/oLRP_FN", "alrp/sb_weight"):
        assert key in metrics, key
    assert metrics["alrp/sb_weight"] == epoch_weights(ddp_runs["all"][0])[1]["weight"]
    assert (out / "inference" / "alrp_synthetic_tiny_val" / "lrp_thresholds.json").is_file()


def test_eval_only_reproduces_the_metrics(ddp_runs):
    out = ddp_runs["out"]
    evaluated = ddp_runs["base"] / "eval"
    run = train_net(
        "--config-file",
        TINY,
        "--eval-only",
        "MODEL.WEIGHTS",
        out / "model_final.pth",
        *EVALUATE_ALL,
        "OUTPUT_DIR",
        evaluated,
        env_root=ddp_runs["base"] / "data",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    evaluated = evaluated / "eval" / "model_final"  # a folder of its own, named by the weights
    trained = json.loads((out / "final_metrics.json").read_text())
    again = json.loads((evaluated / "final_metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "lrp/oLRP", "lrp/oLRP_FP", "alrp/sb_weight"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6), key
    # Only a training's evaluations choose the best model.
    assert not (evaluated / "model_best.pth").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config-file", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
        (["--config-file", TINY, "MODEL.ALRP.NOT_A_KEY", "1"], "MODEL.ALRP.NOT_A_KEY"),
        (
            ["--config-file", TINY, "DATASETS.TRAIN", "('no_such_dataset',)"],
            "unknown dataset name 'no_such_dataset'",
        ),
        (
            ["--config-file", TINY, "MODEL.WEIGHTS", "missing/weights.pth"],
            "weights file not found: missing/weights.pth",
        ),
        (
            ["--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", "missing.pth"],
            "weights file not found: missing.pth",
        ),
        (
            ["--config-file", TINY, "SOLVER.LOG_PERIOD", "0"],
            "SOLVER.LOG_PERIOD must be at least 1 iteration",
        ),
    ],
)
def test_bad_input_exits_with_a_message_and_touches_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.ckpt").write_bytes(b"previous run")
    (out / "final_metrics.json").write_text('{"bbox/AP50": 1.0}')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    run = train_net(*args, "OUTPUT_DIR", out, env_root=tmp_path / "data", timeout=120)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before


def test_single_process_with_mixed_precision_and_clipping(tmp_path):
    out = tmp_path / "out"
    run = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "SOLVER.MAX_EPOCHS",
        1,
        "SOLVER.AMP.ENABLED",
        True,
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        True,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
        1.0,
        "OUTPUT_DIR",
        out,
        env_root=tmp_path / "data",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert "bbox/AP50" in metrics and metrics["alrp/sb_weight"] > 0
    assert "bfloat16 Automatic Mixed Precision" in run.stderr + run.stdout


def test_a_diverged_loss_names_the_likely_cause_and_the_checkpoint(tmp_path):
    import types

    import torch

    from alrp_d2.config import get_cfg
    from alrp_d2.engine.module import DetectionModule

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.OUTPUT_DIR = str(tmp_path)
    module = types.SimpleNamespace(cfg=cfg, global_step=22)
    losses = {"loss_alrp_cls": torch.tensor(0.98), "loss_alrp_loc": torch.tensor(float("nan"))}
    message = DetectionModule._divergence_message(module, losses)
    assert "at iteration 22 (loss_alrp_cls: 0.98, loss_alrp_loc: nan)" in message
    assert "SOLVER.BASE_LR 0.02 for SOLVER.IMS_PER_BATCH 8" in message
    assert "last.ckpt" not in message  # none written yet
    (tmp_path / "last.ckpt").write_bytes(b"")
    message = DetectionModule._divergence_message(module, losses)
    assert f"MODEL.WEIGHTS {tmp_path / 'last.ckpt'}" in message


def test_steps_after_the_last_epoch_are_named_in_the_users_key():
    """Detectron2 would warn about SOLVER.STEPS, a key the user never set."""
    import logging

    from alrp_d2.config import get_cfg
    from alrp_d2.engine.module import schedule_in_iterations

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    cfg.merge_from_list(["SOLVER.MAX_EPOCHS", 3, "SOLVER.STEPS_EPOCHS", (2, 5)])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("alrp_d2").addHandler(handler)
    try:
        solver = schedule_in_iterations(cfg, iters_per_epoch=10)
    finally:
        logging.getLogger("alrp_d2").removeHandler(handler)
    assert tuple(solver.SOLVER.STEPS) == (20,)
    (record,) = records
    assert (
        "SOLVER.STEPS_EPOCHS (2, 5): the steps at epochs [5] come after the last epoch"
        in record.getMessage()
    )
