"""alrp_d2.plot: the scalars of Lightning's CSV and TensorBoard logs of a run (a resumed
one, one in progress) and the picture drawn from them."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from runs import ROOT

from alrp_d2 import plot

EPOCH = 10  # iterations per epoch
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_rows(steps, shift=0.0):
    """``(step, metrics)`` as the trainer logs them: per logged iteration a
    LearningRateMonitor row (no epoch) and the training row; at the end of an epoch the
    evaluation row and the self-balance row. ``shift`` tells versions apart."""
    for step in steps:
        epoch = step // EPOCH
        lr = 0.01 * min(1.0, (step + 1) / 50) + shift * 1e-6
        cls, loc = 1.0 / (1 + step) + shift, 0.5 / (1 + step) + shift
        yield step, {"lr-SGD": lr}
        yield (
            step,
            {
                "total_loss": cls + 4 * loc,
                "loss_alrp_cls": cls,
                "loss_alrp_loc": 4 * loc,
                "alrp/cls": cls,
                "alrp/loc": loc,
                "alrp/num_pos": 12.0,
                "lr": lr,
                "epoch": epoch,
            },
        )
        if (step + 1) % EPOCH == 0:
            yield (
                step,
                {
                    "bbox/AP": 10.0 + epoch + shift,
                    "bbox/AP50": 20.0 + epoch + shift,
                    "lrp/oLRP": 90.0 - epoch - shift,
                    "epoch": epoch,
                },
            )
            yield step, {"alrp/sb_weight": 4.0 + epoch / 10 + shift, "epoch": epoch}


# A run resumed from iteration 20: its second version logs iterations 21..29 again.
FIRST = list(run_rows(range(1, 30, 2)))
SECOND = list(run_rows(range(21, 600, 2), shift=100.0))


def expected(*versions, cast=float):
    merged = {}
    for rows in versions:
        for step, metrics in rows:
            for tag, value in metrics.items():
                merged.setdefault(tag, {})[step] = cast(value)
    return {tag: sorted(by_step.items()) for tag, by_step in merged.items()}


def write(logger, rows):
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def csv_path(out, version):
    return out / "csv" / f"version_{version}" / "metrics.csv"


@pytest.fixture
def csv_run(tmp_path):
    out = tmp_path / "run_csv"
    write(CSVLogger(out, name="csv"), FIRST)
    write(CSVLogger(out, name="csv"), SECOND)  # the resumed run: version_1
    assert csv_path(out, 1).is_file()
    return out


@pytest.fixture
def tensorboard_run(tmp_path):
    out = tmp_path / "run_tb"
    write(TensorBoardLogger(out, name="tensorboard"), FIRST)
    write(TensorBoardLogger(out, name="tensorboard"), SECOND)
    assert (out / "tensorboard" / "version_1").is_dir()
    return out


def assert_png(path, size=(1200, 800)):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        image.verify()


# -- reading -----------------------------------------------------------------------


def test_csv_versions_combined_later_winning(csv_run):
    scalars = plot.read_scalars(csv_run)
    assert scalars == expected(FIRST, SECOND)
    losses = dict(scalars["total_loss"])
    assert losses[1] == pytest.approx(0.5 + 4 * 0.25)  # first version only
    assert losses[21] > 100 and losses[599] > 100  # the resumed run's
    ap = dict(scalars["bbox/AP"])
    assert ap[19] == 11.0 and ap[29] == 112.0  # iteration 29 evaluated again: not 12
    assert [step for step, _ in scalars["epoch"]] == sorted({s for s, _ in FIRST + SECOND})


def test_csv_preferred_over_tensorboard(csv_run):
    write(TensorBoardLogger(csv_run, name="tensorboard"), run_rows(range(1, 5, 2), shift=7.0))
    assert plot.read_scalars(csv_run) == expected(FIRST, SECOND)


def test_tensorboard_when_no_csv(tensorboard_run):
    assert not (tensorboard_run / "csv").exists()
    float32 = lambda value: float(np.float32(value))  # noqa: E731 - TensorBoard's precision
    assert plot.read_scalars(tensorboard_run) == expected(FIRST, SECOND, cast=float32)


def test_partial_last_csv_line_left_out(csv_run):
    path = csv_path(csv_run, 1)
    complete = path.read_bytes()
    header = complete.decode().splitlines()[0].split(",")
    row = {"step": "601", "epoch": "60", "total_loss": "123.456", "lr": "0.01"}
    line = (",".join(row.get(column, "") for column in header) + "\r\n").encode()
    before = plot.read_scalars(csv_run)
    # Mid-row, mid-number (123.4), the whole row but its line end.
    for cut in (5, line.index(b"123.4") + 5, len(line) - 2, len(line) - 1):
        path.write_bytes(complete + line[:cut])
        assert plot.read_scalars(csv_run) == before
    assert_png(plot.plot_run(csv_run))
    path.write_bytes(complete + line)
    assert plot.read_scalars(csv_run)["total_loss"][-1] == (601, 123.456)


def test_logs_without_scalars_yet(tmp_path):
    path = csv_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text("alrp/cls,epoch,st")  # the header being written
    assert plot.read_scalars(tmp_path) == {}
    figure = plot.draw_run({})
    assert [text.get_text() for ax in figure.axes for text in ax.texts] == ["no data yet"] * 4
    assert_png(plot.plot_run(tmp_path))


def test_panels(csv_run):
    scalars = plot.read_scalars(csv_run)
    losses, lr, balance, evaluation = plot.draw_run(scalars).axes
    labels = [line.get_label() for line in losses.get_lines()]
    assert [label for label in labels if not label.startswith("_")] == [
        "total_loss",
        "loss_alrp_cls",
        "loss_alrp_loc",
        "alrp/cls",
        "alrp/loc",
    ]
    assert len(labels) == 10  # smoothed, and raw behind
    assert losses.get_yscale() == "log"
    assert {line.get_label() for line in lr.get_lines()} == {"lr", "lr-SGD"}
    (weight,) = balance.get_lines()
    assert weight.get_label() == "alrp/sb_weight"
    assert list(weight.get_xdata()) == list(range(60))  # against epoch
    assert list(weight.get_ydata()) == [v for _, v in scalars["alrp/sb_weight"]]
    assert [line.get_label() for line in evaluation.get_lines()] == [
        "bbox/AP",
        "bbox/AP50",
        "lrp/oLRP (lower is better)",
    ]
    assert balance.get_xlabel() == evaluation.get_xlabel() == "epoch"


def test_training_without_evaluation_yet(tmp_path):
    write(CSVLogger(tmp_path, name="csv"), run_rows(range(1, 8, 2)))  # inside epoch 0
    scalars = plot.read_scalars(tmp_path)
    assert "bbox/AP" not in scalars and "alrp/sb_weight" not in scalars
    losses, lr, balance, evaluation = plot.draw_run(scalars).axes
    assert not losses.texts and not lr.texts
    assert [t.get_text() for t in balance.texts + evaluation.texts] == ["no data yet"] * 2
    assert_png(plot.plot_run(tmp_path))


def test_run_without_self_balance_says_so():
    """Rank & Sort (as AP and focal loss) has no self-balance weight: its panel says so."""
    scalars = {
        "total_loss": [(1, 2.0), (2, 1.5)],
        "loss_rs_rank": [(1, 0.9), (2, 0.8)],
        "epoch": [(1, 0), (2, 0)],
    }
    balance = plot.draw_run(scalars).axes[2]
    assert [t.get_text() for t in balance.texts] == [
        "none in this run\n(only aLRP Loss balances itself per epoch)"
    ]


def test_running_median():
    assert list(plot.running_median([1, 100, 2, 3, 4], 3)) == [1, 50.5, 2, 3, 3]
    assert list(plot.running_median([1, math.nan, 3], 2)) == [1, 1, 3]
    assert list(plot.running_median([5, 6], 1)) == [5, 6]


# -- writing and the command line ----------------------------------------------------


def test_plot_run_writes_png(csv_run):
    path = plot.plot_run(csv_run)
    assert path == os.path.join(csv_run, "training.png")
    assert_png(path)
    assert not [name for name in os.listdir(csv_run) if name.startswith(".tmp-")]


def test_plot_run_from_tensorboard(tensorboard_run, tmp_path):
    path = plot.plot_run(tensorboard_run, tmp_path / "pictures" / "tb.png")
    assert path == str(tmp_path / "pictures" / "tb.png")
    assert_png(path)


@pytest.mark.slow
def test_main_default_and_custom_output(csv_run, tmp_path, capsys):
    assert plot.main([str(csv_run)]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(csv_run, "training.png")
    custom = tmp_path / "custom.png"
    assert plot.main([str(csv_run), "-o", str(custom)]) == 0
    assert_png(custom)


@pytest.mark.slow
def test_existing_output_kept_without_overwrite(csv_run, capsys):
    output = csv_run / "training.png"
    output.write_bytes(b"an earlier picture")
    with pytest.raises(FileExistsError):
        plot.plot_run(csv_run)
    assert plot.main([str(csv_run)]) == 2
    err = capsys.readouterr().err
    assert str(output) in err and "--overwrite" in err
    assert output.read_bytes() == b"an earlier picture"
    assert plot.main([str(csv_run), "--overwrite"]) == 0
    assert_png(output)
    assert plot.plot_run(csv_run, overwrite=True) == str(output)


def test_missing_run_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert plot.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and str(missing) in err
    assert not missing.exists()
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        plot.read_scalars(missing)


def test_folder_without_logs(tmp_path, capsys):
    (tmp_path / "log.txt").write_text("not a metrics log\n")
    (tmp_path / "csv" / "version_0").mkdir(parents=True)  # a logger made it, wrote nothing yet
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no logs found" in err and str(tmp_path) in err
    assert not (tmp_path / "training.png").exists()


@pytest.mark.slow
def test_command_line(csv_run):
    """``python -m alrp_d2.plot`` end to end; the module imports neither torch nor detectron2."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    code = (
        "import sys, alrp_d2.plot as p\n"
        "status = p.main(sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'detectron2') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(csv_run)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "alrp_d2.plot", str(csv_run)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--overwrite" in done.stderr
