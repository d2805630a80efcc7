"""The run folder's layout lives in one module (alrp_d2/run_folder.py); model_best.pth keeps
the thresholds of the evaluation that chose it; predict finds the thresholds of an
--eval-only of its weights."""

import ast
import json
import os

import pytest
from runs import ROOT, python_module

from alrp_d2.run_folder import THRESHOLD_FILES, RunFolder

# The names only the run folder's module may spell in code (docstrings and messages aside).
LAYOUT_NAMES = {
    "last.ckpt",
    "last.prev.ckpt",
    "checkpoints",
    "model_final",
    "model_best",
    "final_metrics.json",
    "config.yaml",
    "inference",
    "eval",
    "log.txt",
    *THRESHOLD_FILES.values(),
}


def code_strings(path):
    """String constants of a module that are not docstrings."""
    tree = ast.parse(open(path).read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node.lineno, node.value


def test_no_other_module_spells_the_layout():
    offenders = []
    package = os.path.join(ROOT, "alrp_d2")
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith("run_folder.py"):
                continue
            for line, value in code_strings(path):
                if value.strip("/") in LAYOUT_NAMES:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{line}: {value!r}")
    assert not offenders, "the run folder's layout outside alrp_d2/run_folder.py:\n" + "\n".join(
        offenders
    )


def test_layout():
    run = RunFolder("/runs/a")
    assert run.last == "/runs/a/last.ckpt" and run.previous == "/runs/a/last.prev.ckpt"
    assert run.numbered_checkpoint(7) == "/runs/a/checkpoints/epoch007.ckpt"
    assert run.lrp_thresholds("val") == "/runs/a/inference/val/lrp_thresholds.json"
    assert run.lrp_thresholds("val", "segm") == "/runs/a/inference/val/lrp_thresholds_segm.json"
    assert (run.final_model, run.best_model, run.final_metrics, run.config) == (
        "/runs/a/model_final.pth",
        "/runs/a/model_best.pth",
        "/runs/a/final_metrics.json",
        "/runs/a/config.yaml",
    )
    assert run.evaluation_of("/w/model_best.pth").root == "/runs/a/eval/model_best"
    assert (
        run.evaluation_of("/w/last.ckpt").evaluation_of("x.pth").root == "/runs/a/eval/last/eval/x"
    )


def test_checkpoints_lists_every_training_state(tmp_path):
    run = RunFolder(str(tmp_path))
    assert run.checkpoints() == []
    for path in (run.last, run.numbered_checkpoint(2), str(tmp_path / "hpc_ckpt_1.ckpt")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    (tmp_path / "model_final.pth").write_text("")
    assert sorted(run.checkpoints()) == sorted(
        [run.last, run.numbered_checkpoint(2), str(tmp_path / "hpc_ckpt_1.ckpt")]
    )


def test_predict_finds_the_thresholds_of_an_evaluation_of_the_weights(tmp_path):
    from alrp_d2.predict import PredictError, find_lrp_thresholds

    weights = tmp_path / "model_best.pth"
    weights.write_text("")
    assert find_lrp_thresholds(str(weights), "val") is None
    training = RunFolder(str(tmp_path))
    os.makedirs(os.path.dirname(training.lrp_thresholds("val")))
    open(training.lrp_thresholds("val"), "w").close()
    assert find_lrp_thresholds(str(weights), "val") == training.lrp_thresholds("val")
    # An --eval-only of these very weights comes before the training's evaluation.
    evaluated = training.evaluation_of(str(weights))
    for dataset in ("other_a", "other_b"):
        os.makedirs(os.path.dirname(evaluated.lrp_thresholds(dataset)))
        open(evaluated.lrp_thresholds(dataset), "w").close()
    assert find_lrp_thresholds(str(weights), "other_b") == evaluated.lrp_thresholds("other_b")
    with pytest.raises(PredictError, match="several LRP thresholds files"):
        find_lrp_thresholds(str(weights), "val")
    (tmp_path / "lrp_thresholds.json").write_text(json.dumps({}))  # beside: first
    assert find_lrp_thresholds(str(weights), "val") == str(tmp_path / "lrp_thresholds.json")


# -- the commands' shared layer (alrp_d2/cli.py) ------------------------------------------

COMMANDS = {
    "alrp-d2-train": "alrp_d2.engine.launch",
    "alrp-d2-predict": "alrp_d2.predict",
    "alrp-d2-plot": "alrp_d2.plot",
    "alrp-d2-lrp": "alrp_d2.evaluation.lrp",
    "alrp-d2-export": "alrp_d2.export",
}


def test_console_scripts_are_the_python_m_commands():
    """pyproject.toml declares them; the installed ones run (pip install -e . makes them)."""
    import shutil
    import subprocess

    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    for name in ("alrp-d2-plot", "alrp-d2-lrp"):
        path = shutil.which(name)
        assert path, f"{name} is not installed: pip install -e ."
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["alrp_d2.plot", "/no/such/run"], "error: "),
        (["alrp_d2.evaluation.lrp", "/no/gt.json", "/no/dets.json"], "error: cannot read"),
        pytest.param(
            [
                "alrp_d2.predict",
                "--config-file",
                "/no/config.yaml",
                "--weights",
                "w.pth",
                "--input",
                "x.jpg",
                "--output",
                "out",
            ],
            "error: ",
            marks=pytest.mark.slow,  # predict imports Detectron2 and torch: 5 s
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, message, tmp_path):
    done = python_module(*argv, cwd=tmp_path, timeout=120)
    last = done.stderr.strip().splitlines()[-1]  # (after the libraries' warnings)
    assert done.returncode == 2 and last.startswith(message), done.stderr
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []


def test_load_config_names_each_problem(tmp_path):
    from alrp_d2.cli import UsageError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("SOLVER:\n  BASE_LR: 0.1\n")
    assert load_config(str(config), ["SOLVER.MAX_EPOCHS", "3"]).SOLVER.MAX_EPOCHS == 3
    for opts, message in (
        (["SOLVER.MAX_EPOCHS"], "KEY VALUE pairs"),
        (["SOLVER.NO_SUCH_KEY", "1"], "bad override"),
        (["SOLVER.MAX_EPOCHS", "3", "--resume", "x"], "--resume comes after"),
    ):
        with pytest.raises(UsageError, match=message):
            load_config(str(config), opts)
    with pytest.raises(UsageError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), [])


def test_plot_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, alrp_d2.plot; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
