"""A run killed at any moment and resumed ends where the uninterrupted run ends.

Each test kills or stops train_net.py as a user's cluster does (tests/fault_injection.py),
resumes it, and compares with an uninterrupted run of the same config: the batches
trained (image ids of every step, no step twice or missing) and the final weights.
Tiny config: 2 epochs of 4 iterations, last.ckpt every 2 iterations.
"""

import functools
import json
import os
import shutil
import signal
import time

import pytest
import torch
import warm_start
from runs import ROOT, TINY, train_net

# Slow: train_net.py killed and resumed (the fast lane, -m "not slow", leaves them out).
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]

INJECT = os.path.join(ROOT, "tests", "fault_injection.py")
TOLERANCE = 1e-5  # largest absolute weight difference accepted (the bound)


def common(processes=1, workers=0):
    return [
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--devices",
        processes,
        "DATASETS.TEST",
        "()",
        "SOLVER.CHECKPOINT_ITERS",
        2,
        "SOLVER.CHECKPOINT_PERIOD",
        1,
        "DATALOADER.NUM_WORKERS",
        workers,
    ]


def split_flags(args):
    """train_net flags must come before the KEY VALUE overrides."""
    first = args.index("DATASETS.TEST")
    return args[:first], args[first:]


# Training sets of the kill matrix: the tiny synthetic split (square images), or a copy
# with landscape and portrait images (``mixed_aspect_split``), so that the batches are
# grouped by aspect ratio, and with repeat-factor sampling on top.
MIXED = ["DATASETS.TRAIN", "('tiny_mixed',)"]
REPEAT = [
    *MIXED,
    "DATALOADER.SAMPLER_TRAIN",
    "RepeatFactorTrainingSampler",
    "DATALOADER.REPEAT_THRESHOLD",
    0.9,
]
VARIANTS = {"square": [], "mixed": MIXED, "repeat": REPEAT}


def mixed_aspect_split(root):
    """``root/mixed/train.json`` and its images: the tiny training split with every third
    image cut to 128x80 (landscape) and every third from the second to 80x128 (portrait),
    the boxes clipped to what is left (those left under 4 pixels dropped)."""
    from PIL import Image

    source = root / "alrp_synthetic"
    with open(source / "annotations" / "tiny_train.json") as f:
        coco = json.load(f)
    images = root / "mixed" / "train"
    images.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for a in coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    annotations = []
    for i, image in enumerate(coco["images"]):
        width, height = {1: (128, 80), 2: (80, 128)}.get(i % 3, (128, 128))
        Image.open(source / "tiny_train" / image["file_name"]).crop((0, 0, width, height)).save(
            images / image["file_name"]
        )
        image.update(width=width, height=height)
        for a in boxes.get(image["id"], []):
            x, y, w, h = a["bbox"]
            w, h = min(x + w, width) - x, min(y + h, height) - y
            if w >= 4 and h >= 4:
                annotations.append(dict(a, bbox=[x, y, w, h], area=w * h))
    coco["annotations"] = annotations
    with open(root / "mixed" / "train.json", "w") as f:
        json.dump(coco, f)


def start(cmd, environ, log_path):
    """``python CMD`` in its own session, its output in ``log_path`` (started warm where
    the environment allows: tests/warm_start.py)."""
    return warm_start.start(cmd, cwd=ROOT, env=environ, stdout=log_path, stderr=log_path)


def run(
    data,
    out,
    *faults,
    processes=1,
    workers=0,
    resume=False,
    extra=(),
    env=None,
    timeout=300,
    variant="square",
):
    flags, opts = split_flags(common(processes, workers))
    flags += ["--dataset", "tiny_mixed", data / "mixed" / "train.json", data / "mixed" / "train"]
    opts += VARIANTS[variant]
    cmd = [
        INJECT,
        "--trace",
        out / "trace",
        *faults,
        "--",
        *flags,
        *(["--resume"] if resume else []),
        *opts,
        "OUTPUT_DIR",
        out,
        *extra,
    ]
    environ = dict(
        os.environ, DETECTRON2_DATASETS=str(data), PYTHONWARNINGS="ignore", **(env or {})
    )
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    proc = start(cmd, environ, log_path)
    try:
        proc.wait(timeout=timeout)
    finally:
        # A killed rank 0 may leave its peers (waiting in a collective) or data-loader
        # workers behind: end the whole group, as a node loss would.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, log_path.read_text()


def trace(out, rank=0):
    """step -> image ids, keeping the last entry of a step a resumed run trained again."""
    steps = {}
    with open(out / "trace" / f"trace_rank{rank}.jsonl") as f:
        for line in f:
            row = json.loads(line)
            steps[row["step"]] = row["ids"]
    return steps


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def max_difference(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    from alrp_d2.data.synthetic import generate_split

    for split in ("tiny_train", "tiny_val"):
        generate_split(os.path.join(root, "alrp_synthetic"), split)
    mixed_aspect_split(root)
    return root


class References(dict):
    """Uninterrupted runs, trained when first asked for: ``references[processes]`` of the
    square split, ``references[processes, variant]`` of a ``VARIANTS`` training set."""

    def __init__(self, data, tmp_path_factory):
        super().__init__()
        self.data, self.tmp_path_factory = data, tmp_path_factory

    def __missing__(self, key):
        processes, variant = key if isinstance(key, tuple) else (key, "square")
        out = self.tmp_path_factory.mktemp(f"reference{processes}-{variant}")
        code, log = run(self.data, out, processes=processes, variant=variant)
        assert code == 0, log[-3000:]
        self[key] = out
        return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    return References(data, tmp_path_factory)


def assert_same_training(out, reference, processes, expected_resumes=1):
    for rank in range(processes):
        assert trace(out, rank) == trace(reference, rank), f"rank {rank} trained other batches"
    difference = max_difference(out / "model_final.pth", reference / "model_final.pth")
    print(f"max |weight difference| = {difference:.3g}")
    assert difference <= TOLERANCE
    # The self-balance weight of the last epoch came from complete, once-counted sums.
    assert (
        weights(out / "model_final.pth")["self_balance.weight"]
        == weights(reference / "model_final.pth")["self_balance.weight"]
    )


KILLS = [
    pytest.param(1, 0, ["--kill-at-step", 3], "mixed", id="1proc-mid-epoch-grouped"),
    pytest.param(1, 0, ["--kill-at-epoch-start", 1], "square", id="1proc-after-epoch-end"),
    pytest.param(1, 0, ["--kill-in-save", 3], "square", id="1proc-during-checkpoint-write"),
    pytest.param(1, 1, ["--kill-at-step", 7], "square", id="1proc-1worker-mid-epoch"),
    pytest.param(2, 0, ["--kill-at-step", 7], "square", id="2proc-mid-epoch"),
    pytest.param(2, 0, ["--kill-in-save", 2], "square", id="2proc-during-checkpoint-write"),
    pytest.param(
        2, 1, ["--kill-at-step", 3], "repeat", id="2proc-1worker-mid-epoch-grouped-repeat"
    ),
]


@pytest.mark.parametrize("processes,workers,fault,variant", KILLS)
def test_sigkill_then_resume_trains_what_the_uninterrupted_run_trained(
    data, reference, tmp_path, processes, workers, fault, variant
):
    out = tmp_path / "out"
    run_ = functools.partial(run, processes=processes, workers=workers, variant=variant)
    code, log = run_(data, out, *fault)
    assert code == -signal.SIGKILL, log[-3000:]
    assert not (out / "model_final.pth").exists()
    assert (out / "last.ckpt").is_file() or (out / "last.prev.ckpt").is_file()
    code, log = run_(data, out, resume=True)
    assert code == 0, log[-3000:]
    assert "Resuming from" in log
    assert not list(out.glob(".tmp-*")), "a killed write's temporary file was left behind"
    assert_same_training(out, reference[processes, variant], processes)


def trace_rows(out, rank=0):
    with open(out / "trace" / f"trace_rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_the_mixed_runs_group_by_aspect_ratio_and_repeat_images(data, reference):
    """What the grouped and repeated kill cases rely on: their batches are landscape-only
    or portrait-only (but for an epoch's last batches), and the repeat-factor run trains
    more batches than the plain one, some images twice in an epoch."""
    with open(data / "mixed" / "train.json") as f:
        ratio = {im["id"]: im["width"] / im["height"] for im in json.load(f)["images"]}
    rows = trace_rows(reference[1, "mixed"])
    assert len(rows) == 8  # 2 epochs of 4 batches
    # 3 shapes, 3 groups: at least the first 2 batches of an epoch hold one shape each.
    single = [len({ratio[i] for i in row["ids"]}) == 1 for row in rows]
    assert all(single[0:2]) and all(single[4:6]), rows
    repeated = trace_rows(reference[2, "repeat"], 0) + trace_rows(reference[2, "repeat"], 1)
    first_epoch = [i for row in repeated if row["epoch"] == 0 for i in row["ids"]]
    assert len(repeated) > 2 * 4 and len(first_epoch) > len(set(first_epoch))


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_and_exits_cleanly_then_resumes(data, reference, tmp_path, processes):
    out = tmp_path / "out"
    code, log = run(data, out, "--signal-at-step", 3, processes=processes)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log
    assert "Training stopped by a signal at iteration 3" in log
    saved = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3  # the step in progress finished, then the checkpoint
    code, log = run(data, out, processes=processes, resume=True)
    assert code == 0, log[-3000:]
    assert_same_training(out, reference[processes], processes)


def test_sigterm_to_another_rank_than_the_first_stops_every_process_at_the_same_step(
    data, reference, tmp_path
):
    out = tmp_path / "out"
    code, log = run(data, out, "--signal-at-step", 3, "--signal-rank", 1, processes=2)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log
    assert "Training stopped by a signal at iteration 3" in log
    saved = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    assert max(trace(out, 1)) == max(trace(out, 0)) == 3  # neither process went on alone
    code, log = run(data, out, processes=2, resume=True)
    assert code == 0, log[-3000:]
    assert_same_training(out, reference[2], 2)


def test_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(data, reference, tmp_path):
    out = tmp_path / "out"
    code, log = run(data, out, "--kill-at-step", 8)
    assert code == -signal.SIGKILL
    newest = out / "last.ckpt"
    content = newest.read_bytes()
    newest.write_bytes(content[: len(content) // 2])  # truncated, as by a full disk
    code, log = run(data, out, resume=True)
    assert code == 0, log[-3000:]
    assert f"Cannot resume from {newest}" in log
    assert f"Resuming from {out / 'last.prev.ckpt'}" in log
    assert_same_training(out, reference[1], 1)


def test_numbered_checkpoints_without_validation_and_ckpt_as_weights(reference):
    out = reference[1]
    assert (out / "checkpoints" / "epoch001.ckpt").is_file()
    assert (out / "checkpoints" / "epoch002.ckpt").is_file()
    from detectron2.modeling import build_model

    from alrp_d2.config import get_cfg
    from alrp_d2.engine import WeightsCheckpointer

    cfg = get_cfg()
    cfg.merge_from_file(TINY)
    model = build_model(cfg)
    WeightsCheckpointer(model).load(str(out / "checkpoints" / "epoch002.ckpt"))
    final = weights(out / "model_final.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key


def snapshot(folder):
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_resume_with_a_changed_config_fails_listing_the_keys(data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[1], out)
    before = snapshot(out)
    code, log = run(
        data,
        out,
        resume=True,
        extra=[
            "SOLVER.BASE_LR",
            0.5,
            "MODEL.ALRP.DELTA",
            0.5,
            "SOLVER.MAX_EPOCHS",
            3,
            "TEST.EVAL_PERIOD",
            1,
        ],
    )
    assert code == 2, log[-3000:]
    assert "SOLVER.BASE_LR: 0.02 -> 0.5" in log and "MODEL.ALRP.DELTA: 1.0 -> 0.5" in log
    assert "MAX_EPOCHS:" not in log and "EVAL_PERIOD:" not in log  # allowed changes
    assert snapshot(out) == before
    code, log = run(data, out, resume=True, processes=2)
    assert code == 2 and "number of processes: 1 -> 2" in log


def test_fresh_run_into_a_used_folder_exits_2_and_writes_nothing(data, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[1], out)
    before = snapshot(out)
    code, log = run(data, out)
    assert code == 2, log[-3000:]
    assert "holds another run's checkpoints" in log and "--resume" in log
    assert snapshot(out) == before


def test_a_second_training_into_the_same_folder_stops(data, tmp_path):
    out = tmp_path / "out"
    flags, opts = split_flags(common())
    environ = dict(os.environ, DETECTRON2_DATASETS=str(data), PYTHONWARNINGS="ignore")
    first = start(
        [INJECT, "--", *flags, *opts, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", 50],
        environ,
        tmp_path / "first.log",
    )
    try:
        deadline = time.time() + 120
        while not (out / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.5)
        code, log = run(data, out, resume=True)
        assert code == 2, log[-3000:]
        assert "another training is running in" in log
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.fixture()
def damaged_data(data, tmp_path):
    """A copy of the data whose training image of id 12 is truncated."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    image = root / "alrp_synthetic" / "tiny_train" / "00011.png"
    original = image.read_bytes()
    image.write_bytes(original[: len(original) // 2])
    return root, image, original


def test_truncated_image_names_file_and_dataset_then_resume(damaged_data, reference, tmp_path):
    root, image, original = damaged_data
    out = tmp_path / "out"
    code, log = run(root, out)
    assert code == 1, log[-3000:]
    assert f"training image '{image}' of dataset 'alrp_synthetic_tiny_train' cannot be used" in log
    assert "image file is truncated" in log
    assert (out / "last.ckpt").is_file() and "progress up to iteration" in log
    check = train_net("--config-file", TINY, "--check-data", env_root=root, timeout=120)
    assert check.returncode == 1
    assert f"{image}: image unreadable" in check.stderr + check.stdout
    assert "1 problems found" in check.stdout
    image.write_bytes(original)  # repaired
    code, log = run(root, out, resume=True)
    assert code == 0, log[-3000:]
    assert_same_training(out, reference[1], 1)


def test_model_final_is_written_before_the_final_evaluation(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "alrp_synthetic" / "tiny_val" / "00003.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    flags, opts = split_flags(common())
    code, log = run(root, out, extra=["DATASETS.TEST", "('alrp_synthetic_tiny_val',)"])
    assert code != 0  # the evaluation crashed on the bad test image ...
    assert (out / "model_final.pth").is_file()  # ... after the model was saved


def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(
    data, reference, tmp_path
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.txt"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    fake.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "alrp",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    out = tmp_path / "out"
    code, log = run(data, out, "--signal-at-step", 5, "--signal", "USR1", env=slurm)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    # The requeued job runs the same command, without --resume.
    code, log = run(data, out, env=dict(slurm, SLURM_RESTART_COUNT="1"))
    assert code == 0, log[-3000:]
    assert "Resuming from" in log
    assert_same_training(out, reference[1], 1)
