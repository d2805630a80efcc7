"""benchmarks/gpu: the one-call GPU verification cannot rot. CI runs its CPU dry run (the
same script and Python code paths, tiny sizes, no build, no CUDA tests) and checks that
the report holds measured numbers; prepare.sh refuses a missing Detectron2 source clearly."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import warm_start
from runs import ROOT

GPU = os.path.join(ROOT, "benchmarks", "gpu")


def load_verify():
    spec = importlib.util.spec_from_file_location("gpu_verify", os.path.join(GPU, "verify.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_counter_attributes_each_synchronisation(monkeypatch):
    """The counter of the training-step benchmark (it runs on CUDA only): each
    synchronisation warning is counted at the innermost frame of alrp_d2, else Detectron2,
    else ``other``; other warnings pass through uncounted."""
    verify = load_verify()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(verify, "synchronize", lambda device: None)

    def warner(filename):  # a function whose frame is in ``filename``
        namespace = {"warnings": warnings}
        code = "def f(text):\n    warnings.warn(text)\n"
        exec(compile(code, filename, "exec"), namespace)
        return namespace["f"]

    in_losses = warner(os.path.join(ROOT, "alrp_d2", "losses", "ranking.py"))
    in_detectron2 = warner("/site-packages/detectron2/modeling/meta_arch/retinanet.py")
    message = "called a synchronizing CUDA operation"
    counter = verify.SyncCounter(torch.device("cpu"))
    counter.active = True
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with counter:
            in_losses(message)
            in_losses(message)
            in_detectron2(message)
            warnings.warn(message)
            warnings.warn("not a sync")
    assert [str(w.message) for w in shown] == ["not a sync"]
    assert modes == ["warn", "default"]
    assert counter.count == 4
    assert counter.by_place() == {
        "alrp_d2/losses/ranking.py:2": 2,
        "detectron2/modeling/meta_arch/retinanet.py:2": 1,
        "other": 1,
    }
    assert [verify.in_ranking_losses(p) for p in counter.by_place()] == [True, False, False]
    assert verify.SyncCounter(torch.device("cpu")).count is None  # nothing to count off CUDA


@pytest.mark.slow
@pytest.mark.detectron2
def test_cpu_dry_run_writes_a_measured_report(tmp_path):
    out = tmp_path / "out"
    # PYTHON: the warm start's interpreter (tests/warm_start.py), which starts verify.py and
    # its quickstart as the tests start the project's commands.
    python = (
        sys.executable if warm_start.cold() else warm_start.interpreter_path(warm_start.server())
    )
    env = dict(os.environ, OUT=str(out), PYTHON=python, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        ["bash", os.path.join(GPU, "run.sh"), "--cpu-dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert sorted(os.listdir(out)) == ["quickstart.log", "report.json", "report.md", "run.log"]
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["mode"] == "cpu-dry-run"
    sections = report["sections"]
    # Every section ran within the dry run's budget (none skipped for time, none failed).
    assert {k: v["status"] for k, v in sections.items()} == {
        "environment": "done",
        "loss_equality": "done",
        "loss_sync": "n/a",
        "training_steps": "done",
        "loss_benchmark": "done",
        "train_benchmark": "done",
        "quickstart": "done",
    }

    losses = sections["loss_equality"]["results"]
    assert len(losses) == 12  # 4 losses x 3 dtypes
    assert all(r["pass"] and math.isfinite(r["value_device"]) for r in losses.values())
    steps = sections["training_steps"]["steps"]
    assert len(sections["training_steps"]["families"]) >= 10
    assert all(s["pass"] and s["seconds"] > 0 for s in steps.values())
    for row in sections["loss_benchmark"]["rows"]:
        assert set(row["seconds"]) == {
            "aLRP",
            "AP",
            "Rank & Sort",
            "focal (torchvision)",
            "focal (fvcore)",
        }
        assert all(t > 0 for t in row["seconds"].values())
    bench = sections["train_benchmark"]["rows"]
    assert [r["precision"] for r in bench] == ["fp32", "bf16", "fp32"]
    assert all(
        r["ranking"]["seconds"] > 0 and r["focal"]["seconds"] > 0 and r["ratio"] > 0 for r in bench
    )
    quickstart = sections["quickstart"]
    assert quickstart["returncode"] == 0
    assert 0 <= quickstart["bbox/AP50"] <= 100 and 0 <= quickstart["lrp/oLRP"] <= 100

    # The targets are compared and printed, from the measured figures.
    assert report["targets"] and all(isinstance(t["pass"], bool) for t in report["targets"])
    markdown = (out / "report.md").read_text()
    assert "CPU DRY RUN" in markdown and "## Targets" in markdown
    ratio = bench[0]["ratio"]
    assert f"{ratio:.3f}x" in markdown
    assert "run.sh: exit 0" in (out / "run.log").read_text()


def test_prepare_refuses_a_missing_detectron2_source(tmp_path):
    env = dict(os.environ, DETECTRON2_SOURCE=str(tmp_path / "nowhere"))
    done = subprocess.run(
        ["bash", os.path.join(GPU, "prepare.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "neither a git repository nor a .tar.gz" in done.stderr


def test_run_refuses_an_unknown_argument():
    done = subprocess.run(
        ["bash", os.path.join(GPU, "run.sh"), "--cpu"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, OUT=os.devnull + "-not-used"),
    )
    assert done.returncode == 2
    assert "unknown argument: --cpu" in done.stderr and "--cpu-dry-run" in done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    done = subprocess.run(
        ["shellcheck", os.path.join(GPU, "prepare.sh"), os.path.join(GPU, "run.sh")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout
