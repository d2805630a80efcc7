"""What the tests share: the project's paths, the tiny config, ``train_net.py`` as a user
runs it, and the tiny training that several test modules read (``trained_run`` in
conftest.py)."""

import os
import subprocess
import sys
import types

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_synthetic.yaml")
VAL = "alrp_synthetic_tiny_val"
EPOCH = 4  # iterations per epoch of the tiny config (32 images, batch 8)
# Two epochs, one evaluation (at the end: inference/<VAL>/lrp_thresholds.json and
# model_best.pth), an iteration line every 3 iterations, a learning rate still warming up
# (so that each line's lr is its own). A barely trained model scores every anchor about
# 0.01: SCORE_THRESH_TEST 0 keeps its 20 best detections per image.
# The batch and learning rate are asked for 2 processes (SOLVER.REFERENCE_WORLD_SIZE): one
# process trains 8 images at 0.002 with a warm-up of 8 iterations.
TRAINING = [
    "SOLVER.IMS_PER_BATCH",
    16,
    "SOLVER.REFERENCE_WORLD_SIZE",
    2,
    "SOLVER.MAX_EPOCHS",
    2,
    "TEST.EVAL_PERIOD",
    2,
    "SOLVER.LOG_PERIOD",
    3,
    "SOLVER.BASE_LR",
    0.004,
    "SOLVER.WARMUP_ITERS",
    4,
    "MODEL.RETINANET.SCORE_THRESH_TEST",
    0.0,
    "TEST.DETECTIONS_PER_IMAGE",
    20,
]


def train_net(*args, env_root, timeout=300):
    """``python train_net.py ARGS`` in the repository root, its datasets under
    ``env_root``; the finished process (``returncode``, ``stdout``, ``stderr``)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(env_root), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_net.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python_module(module, *args, env_root=None, timeout=300):
    """``python -m MODULE ARGS`` in the repository root, as :func:`train_net`."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if env_root is not None:
        env["DETECTRON2_DATASETS"] = str(env_root)
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_training(base):
    """``train_net.py --logger csv`` of the tiny config (``TRAINING``) into ``base/out``,
    its data in ``base/data``: a namespace of its folders and console output."""
    from alrp_d2.data.synthetic import generate_split

    for split in ("tiny_train", "tiny_val"):
        generate_split(os.path.join(base / "data", "alrp_synthetic"), split)
    out = base / "out"
    done = train_net(
        "--config-file",
        TINY,
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
        *TRAINING,
        "OUTPUT_DIR",
        out,
        env_root=base / "data",
    )
    return types.SimpleNamespace(
        base=base, data=base / "data", out=out, done=done, console=done.stdout + done.stderr
    )
