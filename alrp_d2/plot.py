"""A picture of a training run, drawn from the logs that the run writes.

Usage::

    python -m alrp_d2.plot OUTPUT_DIR [-o FILE.png] [--overwrite]

writes one PNG (default ``OUTPUT_DIR/training.png``) with four panels:

1. the losses against iteration: ``total_loss``, every ``loss_*`` and the unweighted
   components (``alrp/cls``, ``alrp/loc``, dashed); a trailing running median, the raw
   values faint behind it;
2. the learning rate against iteration (``lr`` and the ``lr-*`` columns of Lightning's
   ``LearningRateMonitor``);
3. the self-balance weight of every ``*/sb_weight`` against epoch (logged at the end of an
   epoch, used from the next one);
4. ``bbox/AP``, ``bbox/AP50``, ``lrp/oLRP``, ``segm/AP`` and ``lrp_segm/oLRP`` per evaluation,
   against epoch.

The scalars come from Lightning's CSV logs, ``OUTPUT_DIR/csv/version_N/metrics.csv``, or,
where those hold nothing, from the TensorBoard logs, ``OUTPUT_DIR/tensorboard/version_N``.
The versions of a resumed run are combined in version order, a later version's value
replacing an earlier one's at the same step. A run in progress can be drawn at any time:
the line a logger is still writing is left out, and a panel without data says so. An
existing output is replaced only with ``--overwrite``; it is replaced whole (written
beside it, then renamed). The exit status is 2 for a missing run folder, a folder without
logs, or an existing output.

From Python: :func:`plot_run` draws and writes; :func:`read_scalars` returns the
scalars, ``{tag: [(step, value), ...]}``.
"""

from __future__ import annotations

import argparse
import csv
import errno
import glob
import io
import math
import os
import re
import sys
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .cli import UsageError, run_command
from .io import atomic_write

__all__ = [
    "DEFAULT_NAME",
    "Scalars",
    "draw_run",
    "main",
    "plot_run",
    "read_csv_logs",
    "read_scalars",
    "read_tensorboard_logs",
    "running_median",
]

Scalars = Dict[str, List[Tuple[int, float]]]  # tag: [(step, value), ...] by step

DEFAULT_NAME = "training.png"
FIGSIZE = (12.0, 8.0)  # inches; at DPI, a 1200 x 800 picture
DPI = 100
EVAL_KEYS = ("bbox/AP", "bbox/AP50", "lrp/oLRP", "segm/AP", "lrp_segm/oLRP")
LOWER_IS_BETTER = ("lrp/oLRP", "lrp_segm/oLRP")
_COMPONENT = re.compile(r"[^/]+/(cls|loc)")  # alrp/cls, rpn_alrp/loc: unweighted
_VERSION = re.compile(r"version_(\d+)")


# -- reading -----------------------------------------------------------------------


def _version_folders(root: str) -> List[str]:
    """``root``'s ``version_*`` folders in version order (numbered ones by number)."""

    def order(path):
        match = _VERSION.fullmatch(os.path.basename(path))
        return (0, int(match.group(1)), "") if match else (1, 0, os.path.basename(path))

    return sorted(
        (p for p in glob.glob(os.path.join(root, "version_*")) if os.path.isdir(p)), key=order
    )


def _csv_files(output_dir: str) -> List[str]:
    folders = _version_folders(os.path.join(output_dir, "csv"))
    return [p for p in (os.path.join(f, "metrics.csv") for f in folders) if os.path.isfile(p)]


def _event_folders(output_dir: str) -> List[str]:
    return [
        f
        for f in _version_folders(os.path.join(output_dir, "tensorboard"))
        if glob.glob(os.path.join(f, "events.out.tfevents.*"))
    ]


def _merge(points: Iterable[Tuple[str, int, float]]) -> Scalars:
    """``(tag, step, value)`` in logging order -> :data:`Scalars`, a later value
    replacing an earlier one at the same step."""
    merged: Dict[str, Dict[int, float]] = {}
    for tag, step, value in points:
        merged.setdefault(tag, {})[step] = value
    return {tag: sorted(by_step.items()) for tag, by_step in sorted(merged.items())}


def _number(cell) -> Optional[float]:
    if not isinstance(cell, str) or not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def _complete_lines(path: str) -> str:
    """The text of ``path`` up to its last newline: a line still being written is left
    out. Empty if the file has gone (a logger rewriting it)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    return text[: text.rfind("\n") + 1]


def _csv_points(path: str) -> Iterator[Tuple[str, int, float]]:
    for row in csv.DictReader(io.StringIO(_complete_lines(path))):
        step = _number(row.get("step"))
        if step is None or not math.isfinite(step):
            continue
        for key, cell in row.items():
            value = _number(cell) if key not in (None, "step") else None
            if value is not None:
                yield key, int(step), value


def read_csv_logs(output_dir: str) -> Scalars:
    """The scalars of every ``OUTPUT_DIR/csv/version_N/metrics.csv``, combined in version
    order (rows are sparse: each holds some of the columns)."""
    return _merge(point for path in _csv_files(output_dir) for point in _csv_points(path))


def read_tensorboard_logs(output_dir: str) -> Scalars:
    """The scalars of every ``OUTPUT_DIR/tensorboard/version_N``, combined in version
    order (TensorBoard stores them as 32-bit floats)."""
    folders = _event_folders(output_dir)
    if not folders:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    def points():
        for folder in folders:
            accumulator = EventAccumulator(folder, size_guidance={SCALARS: 0})  # 0: keep all
            accumulator.Reload()
            for tag in accumulator.Tags()[SCALARS]:
                for event in accumulator.Scalars(tag):
                    yield tag, int(event.step), float(event.value)

    return _merge(points())


def _check_run_folder(output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"no such run folder: {output_dir}")


def _read(output_dir: str) -> Tuple[str, Scalars]:
    """``(source, scalars)``: the CSV logs where they hold any scalar, else the
    TensorBoard logs; source ``"csv"``, ``"tensorboard"`` or ``""`` (logs without data
    yet). ``FileNotFoundError`` for a missing folder or one without logs."""
    _check_run_folder(output_dir)
    scalars = read_csv_logs(output_dir)
    if scalars:
        return "csv", scalars
    scalars = read_tensorboard_logs(output_dir)
    if scalars:
        return "tensorboard", scalars
    if _csv_files(output_dir) or _event_folders(output_dir):
        return "", {}
    raise FileNotFoundError(
        f"no logs found in {output_dir}: expected csv/version_*/metrics.csv or "
        f"tensorboard/version_*/events.out.tfevents.* there"
    )


def read_scalars(output_dir: str) -> Scalars:
    """``{tag: [(step, value), ...]}`` (by step) of the run in ``output_dir``: from its
    CSV logs, or from its TensorBoard logs where the CSV ones hold nothing (empty while
    the logs hold no scalar yet). Raises ``FileNotFoundError`` for a missing folder or
    one without logs."""
    return _read(os.fspath(output_dir))[1]


# -- drawing -----------------------------------------------------------------------


def running_median(values: Sequence[float], window: int) -> np.ndarray:
    """The median of each value with the ``window - 1`` before it (fewer at the start);
    NaNs are left out."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < 2:
        return values
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    out = np.empty(len(values))
    chunk = max(1, 2**20 // window)  # nanmedian copies what it is given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window of NaNs only
        for start in range(0, len(values), chunk):
            out[start : start + chunk] = np.nanmedian(windows[start : start + chunk], axis=1)
    return out


def _window(count: int) -> int:
    return int(np.clip(count // 25, 1, 50))


def _arrays(points: Sequence[Tuple[int, float]]) -> Tuple[np.ndarray, np.ndarray]:
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, dtype=float)


def _epochs(scalars: Scalars, steps: np.ndarray) -> Optional[np.ndarray]:
    """The epoch logged at each of ``steps`` (the latest at or before it); None without
    an ``epoch`` scalar."""
    if not scalars.get("epoch"):
        return None
    epoch_steps, epochs = _arrays(scalars["epoch"])
    return epochs[np.clip(np.searchsorted(epoch_steps, steps, side="right") - 1, 0, None)]


def _no_data(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        "no data yet",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="gray",
        fontsize="large",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, count: int) -> None:
    ax.legend(fontsize="x-small", ncol=2 if count > 6 else 1, loc="best")


def _loss_keys(scalars: Scalars) -> List[str]:
    """``total_loss``, every ``loss_*``, then the unweighted ``*/cls`` and ``*/loc``."""
    keys = (["total_loss"] if "total_loss" in scalars else []) + sorted(
        k for k in scalars if k.startswith("loss_")
    )
    return [k for k in keys + sorted(k for k in scalars if _COMPONENT.fullmatch(k)) if scalars[k]]


def _plot_losses(ax, scalars: Scalars) -> None:
    keys = _loss_keys(scalars)
    if not keys:
        return _no_data(ax, "losses")
    positive, smoothed = True, False
    for key in keys:
        steps, values = _arrays(scalars[key])
        window = _window(len(values))
        (line,) = ax.plot(
            steps, running_median(values, window), "--" if "/" in key else "-", lw=1.3, label=key
        )
        if window > 1:
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, lw=0.6)
            smoothed = True
        positive = positive and bool(np.all(values[np.isfinite(values)] > 0))
    if positive:
        ax.set_yscale("log")
    ax.set_title("losses" + (" (running median; raw faint)" if smoothed else ""))
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    _legend(ax, len(keys))


def _lr_keys(scalars: Scalars) -> List[str]:
    return [
        k
        for k in sorted(scalars)
        if (k == "lr" or k.startswith("lr-"))
        and scalars[k]
        and not k.endswith(("-momentum", "-weight_decay"))
    ]


def _plot_lr(ax, scalars: Scalars) -> None:
    keys = _lr_keys(scalars)
    if not keys:
        return _no_data(ax, "learning rate")
    for number, key in enumerate(keys):
        ax.plot(*_arrays(scalars[key]), ("-", "--", ":")[number % 3], lw=1.3, label=key)
    ax.set_title("learning rate")
    ax.set_xlabel("iteration")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    ax.grid(alpha=0.3)
    _legend(ax, len(keys))


def _per_epoch(ax, scalars: Scalars, keys: Sequence[str], title: str, draw) -> None:
    """``draw(ax, x, values, key)`` for each of ``keys``, against epoch (iteration
    without an ``epoch`` scalar)."""
    if not keys:
        return _no_data(ax, title)
    for key in keys:
        steps, values = _arrays(scalars[key])
        epochs = _epochs(scalars, steps)
        draw(ax, steps if epochs is None else epochs, values, key)
    ax.set_title(title)
    ax.set_xlabel("iteration" if epochs is None else "epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(ax, len(keys))


def _plot_self_balance(ax, scalars: Scalars) -> None:
    keys = [k for k in sorted(scalars) if k.endswith("/sb_weight") and scalars[k]]
    if not keys and scalars and not any("alrp" in k for k in scalars):  # Rank & Sort, AP, focal
        ax.set_title("self-balance weight")
        ax.text(
            0.5,
            0.5,
            "none in this run\n(only aLRP Loss balances itself per epoch)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return

    def draw(ax, x, values, key):
        ax.step(x, values, where="post", marker="o", ms=3, lw=1.3, label=key)

    _per_epoch(ax, scalars, keys, "self-balance weight (set at the end of the epoch)", draw)


def _plot_evaluation(ax, scalars: Scalars) -> None:
    keys = [
        k
        for name in EVAL_KEYS
        for k in sorted(scalars)
        if (k == name or k.endswith("/" + name)) and scalars[k]
    ]

    def draw(ax, x, values, key):
        lower = key.endswith(LOWER_IS_BETTER)
        ax.plot(x, values, "o-", ms=3, lw=1.3, label=key + (" (lower is better)" if lower else ""))

    _per_epoch(ax, scalars, keys, "evaluation (%)", draw)


def _title(name: str, scalars: Scalars, source: str) -> str:
    """The run's name, its last iteration and epoch, where the scalars came from."""
    lasts = [points[-1][0] for points in scalars.values() if points]
    if not lasts:
        return f"{name}: no data yet"
    title = f"{name}: iteration {max(lasts)}"
    if scalars.get("epoch"):
        title += f", epoch {int(max(value for _, value in scalars['epoch']))}"
    return title + (f"  ({source} logs)" if source else "")


def draw_run(scalars: Scalars, title: str = "") -> Figure:
    """The four panels of :mod:`alrp_d2.plot` for ``scalars`` (as :func:`read_scalars`
    returns them), on an Agg canvas."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    _plot_losses(axes[0, 0], scalars)
    _plot_lr(axes[0, 1], scalars)
    _plot_self_balance(axes[1, 0], scalars)
    _plot_evaluation(axes[1, 1], scalars)
    if title:
        figure.suptitle(title)
    return figure


def plot_run(output_dir: str, output: Optional[str] = None, overwrite: bool = False) -> str:
    """Draws the run in ``output_dir`` and writes it as a PNG to ``output`` (default
    ``output_dir/training.png``), replacing it whole; returns the path written.

    Raises ``FileNotFoundError`` for a missing folder or one without logs,
    ``FileExistsError`` where ``output`` exists and not ``overwrite``."""
    output_dir = os.fspath(output_dir)
    _check_run_folder(output_dir)
    path = os.fspath(output) if output is not None else os.path.join(output_dir, DEFAULT_NAME)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(errno.EEXIST, "the output exists (overwrite=True replaces it)", path)
    source, scalars = _read(output_dir)
    name = os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    figure = draw_run(scalars, _title(name, scalars, source))
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alrp_d2.plot",
        description="Draw a training run (losses, learning rate, self-balance weight, AP and "
        "oLRP) from the logs in its OUTPUT_DIR, as one PNG.",
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="the run's folder (cfg.OUTPUT_DIR)"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE.png",
        help=f"the picture to write (default: OUTPUT_DIR/{DEFAULT_NAME})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing picture")
    return run_command(_run, parser.parse_args(argv))


def _run(args) -> int:
    try:
        path = plot_run(args.output_dir, args.output, overwrite=args.overwrite)
    except FileExistsError as e:
        raise UsageError(f"{e.filename} already exists; pass --overwrite to replace it") from None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
